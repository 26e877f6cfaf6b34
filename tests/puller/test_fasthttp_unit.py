"""The lean HTTP path of RegistryClient against a small local server: kept-alive connections
reused, a connection the server dropped while idle replaced, and everything unusual (a
challenge, a retryable error, a proxy) left to the requests-based path."""
from __future__ import annotations

import http.server
import threading

import pytest

from puller.errors import NotFound
from puller.fasthttp import ConnectionPool, FastPathConfig
from puller.registry import RegistryClient, RegistryOptions


class Server:
    """Answers GET /v2/<anything> with the path as body; `drop_after_answer` closes each
    connection after its answer without saying so (an idle timeout that struck);
    `statuses` are answered first, one per request.

    With `body` set, every GET gets that body instead, written in `piece`-byte writes `pause`
    s apart (so a client finds part of it in its buffers); `cut` stops after that many bytes
    and closes (a registry dying mid-answer); `stall` waits that long before the body."""

    def __init__(self, body: bytes | None = None, piece: int = 100_000, pause: float = 0.0) -> None:
        self.connections = 0
        self.requests: list[tuple[str, dict]] = []
        self.statuses: list[int] = []
        self.drop_after_answer = False
        self.body, self.piece, self.pause = body, piece, pause
        self.cut: int | None = None
        self.stall = 0.0
        srv = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):
                pass

            def setup(self):
                super().setup()
                srv.connections += 1

            def do_GET(self):
                srv.requests.append((self.path, dict(self.headers)))
                if srv.body is not None:
                    return self.send_body()
                status = srv.statuses.pop(0) if srv.statuses else 200
                body = self.path.encode() if status == 200 else b'{"errors":[{"code":"X","message":"no"}]}'
                self.send_response(status)
                if status == 401:
                    self.send_header("WWW-Authenticate", 'Basic realm="t"')
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                if srv.drop_after_answer:
                    self.close_connection = True

            def send_body(self):
                import time
                self.send_response(200)
                self.send_header("Content-Length", str(len(srv.body)))
                self.end_headers()
                self.wfile.flush()
                time.sleep(srv.stall)
                end = len(srv.body) if srv.cut is None else srv.cut
                for k in range(0, end, srv.piece):
                    self.wfile.write(srv.body[k:min(end, k + srv.piece)])
                    self.wfile.flush()
                    time.sleep(srv.pause)
                self.close_connection = srv.cut is not None

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.close()


def client(server, **kw) -> RegistryClient:
    return RegistryClient(server.host, RegistryOptions(plain_http=frozenset({server.host}), timeout=5, **kw))


def test_connections_are_kept_alive_and_replaced_when_dropped(server):
    c = client(server)
    for i in range(3):
        assert c.get_small(f"r/manifests/t{i}", cap=100, what="m").body == f"/v2/r/manifests/t{i}".encode()
    assert server.connections == 1
    server.drop_after_answer = True
    for i in range(3):  # from u1 on the pooled connection is dead: a new one, no error
        assert c.get_small(f"r/manifests/u{i}", cap=100, what="m").body == f"/v2/r/manifests/u{i}".encode()
    assert server.connections == 3
    assert len(server.requests) == 6
    assert all(h.get("User-Agent") == "sandbox-agent-puller/0.1" for _, h in server.requests)
    c.close()


def test_challenges_and_retryable_errors_go_the_general_way(server):
    from puller.auth import Credentials
    c = client(server, credentials=Credentials("u", "p"))
    server.statuses = [401, 401, 200]  # the challenge on the lean path; requests' path answers it
    assert c.get_small("r/manifests/a", cap=100, what="m").body == b"/v2/r/manifests/a"
    auth = [h.get("Authorization") for _, h in server.requests]
    assert auth == [None, None, "Basic dTpw"]
    # Once authenticated, the lean path sends the same header.
    assert c.get_small("r/manifests/b", cap=100, what="m").body == b"/v2/r/manifests/b"
    assert server.requests[-1][1].get("Authorization") == "Basic dTpw"
    server.statuses = [503, 200]  # retried (by requests' path) within the time budget
    assert c.get_small("r/manifests/d", cap=100, what="m").body == b"/v2/r/manifests/d"
    assert len(server.requests) == 6
    server.statuses = [404]
    with pytest.raises(NotFound, match="X: no"):
        c.get_small("r/manifests/c", cap=100, what="m")
    c.close()


def test_over_long_answers_are_refused(server):
    from puller.errors import AnswerTooLarge
    c = client(server)
    with pytest.raises(AnswerTooLarge, match="more than the 5"):
        c.get_small("r/manifests/long-name", cap=5, what="m")
    c.close()


def test_a_configured_proxy_leaves_requests_to_requests(monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    assert ConnectionPool(FastPathConfig("registry.example:5000", tls=False)).disabled
    monkeypatch.setenv("no_proxy", "registry.example")
    assert not ConnectionPool(FastPathConfig("registry.example:5000", tls=False)).disabled


def read_all(resp, piece: int) -> bytes:
    out = bytearray()
    while True:
        buf = bytearray(piece)
        n = resp.readinto(buf)
        if not n:
            return bytes(out)
        out += buf[:n]


@pytest.mark.parametrize("piece,pause,read", [(100_000, 0.0, 1 << 20), (7_777, 0.0005, 300_000),
                                              (1 << 20, 0.0, 65_536), (50_000, 0.001, 3 << 20)])
def test_large_bodies_arrive_whole_and_the_connection_is_reused(piece, pause, read):
    """Bodies read in large buffers (the bulk path: buffered bytes first, then the kernel fills
    the rest) come out byte for byte, whatever the server's write pattern and the reader's
    buffer size (including a read that ends mid-body and one larger than the body), and the
    connection serves the next request."""
    import os
    body = os.urandom(3 * (1 << 20) + 12345)
    srv = Server(body, piece, pause)
    pool = ConnectionPool(FastPathConfig(srv.host, tls=False, read_timeout=5))
    try:
        for _ in range(2):
            with pool.get("/blob", {}) as resp:
                assert resp.status == 200
                assert read_all(resp, read) == body
        assert srv.connections == 1
    finally:
        pool.close()
        srv.close()


def test_a_body_cut_short_is_an_error_not_short_data():
    import os
    body = os.urandom(2 << 20)
    srv = Server(body, 256 << 10)
    srv.cut = 1 << 20
    pool = ConnectionPool(FastPathConfig(srv.host, tls=False, read_timeout=5))
    try:
        resp = pool.get("/blob", {})
        buf = bytearray(2 << 20)
        got = 0
        with pytest.raises(ConnectionError):
            while True:
                n = resp.readinto(memoryview(buf)[got:])
                if not n:  # http.client reports a short body as IncompleteRead on the next read
                    raise AssertionError(f"body ended after {got} bytes without an error")
                got += n
        assert got <= 1 << 20 and buf[:got] == body[:got]
    finally:
        pool.close()
        srv.close()


def test_a_stalled_body_times_out():
    import os
    import socket
    import time
    srv = Server(os.urandom(1 << 20))
    srv.stall = 3.0
    pool = ConnectionPool(FastPathConfig(srv.host, tls=False, read_timeout=0.5))
    try:
        resp = pool.get("/blob", {})
        t = time.monotonic()
        with pytest.raises((ConnectionError, socket.timeout)):
            resp.readinto(bytearray(1 << 20))
        assert time.monotonic() - t < 2.5
    finally:
        pool.close()
        srv.close()
