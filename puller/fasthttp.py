"""A lean keep-alive HTTP/1.1 path for the plain registry GETs a lazy start waits on.

requests costs about 1 ms of CPU per request (environment and proxy lookups, cookie and
hook machinery, adapters) before a byte is sent; a lazy start makes a handful of small
requests in sequence and its chunk fetches compete for the same interpreter, so that
overhead is a good part of the time to a container's first output.  This module does only
the common case - a GET answered with the wanted status on a kept-alive connection - and
RegistryClient sends everything else (authentication challenges, redirects, retryable
errors, proxies, TLS it cannot verify) down its full requests-based path.
"""
from __future__ import annotations

import http.client
import socket
import ssl
import struct
import threading
import urllib.request
from dataclasses import dataclass


class FastPathUnusable(Exception):
    """The request could not be made on this path; the caller uses its general one."""


@dataclass(frozen=True)
class FastPathConfig:
    host: str  # host[:port] as the registry is addressed
    tls: bool
    ca_file: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    user_agent: str = ""
    max_idle: int = 8


def proxied(host: str, tls: bool) -> bool:
    """True when the environment routes requests for `host` through a proxy (which requests
    would honour): this path then stays out of the way."""
    proxies = urllib.request.getproxies()
    if not proxies.get("https" if tls else "http") and not proxies.get("all"):
        return False
    return not urllib.request.proxy_bypass(host.rsplit(":", 1)[0] if not host.endswith("]") else host)


class FastResponse:
    """One answer on a pooled connection.  The connection goes back to the pool once the body
    was read to its end; `close()` before that drops it (it is mid-message)."""

    def __init__(self, pool: ConnectionPool, conn: http.client.HTTPConnection,
                 resp: http.client.HTTPResponse) -> None:
        self._pool, self._conn, self._resp = pool, conn, resp
        self.status = resp.status
        self.reason = resp.reason
        self.headers = resp.headers

    def header(self, name: str, default: str = "") -> str:
        return self._resp.getheader(name, default) or default

    def readinto(self, buf) -> int:
        try:
            n = self._bulk_readinto(buf)
            if n < 0:
                n = self._resp.readinto(buf)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ConnectionError(f"connection to {self._pool.config.host} failed mid-answer: {exc}") from exc
        if n == 0 or self._resp.isclosed():
            self._finish()
        return n

    def _bulk_readinto(self, buf) -> int:
        """Fill a large `buf` with as few system calls as the data allows, -1 when this path
        does not apply.

        http.client reads a body through a buffered file whose raw reads are Python calls,
        one per segment the socket holds (often 64 KiB): each gives up the interpreter lock and
        must win it back, which in a process whose other threads are busy (the FUSE loop,
        other fetches) costs up to the switch interval each time - a 1 MiB chunk took 5-10 ms
        to arrive that way where the registry sends it in under one.  Here, what the buffered
        file already holds is taken first (after which it holds nothing), then the kernel fills
        the rest in one blocking recv (MSG_WAITALL; SO_RCVTIMEO keeps the read time bound)."""
        resp, conn = self._resp, self._conn
        view = memoryview(buf).cast("B")
        if (conn is None or self._pool.config.tls or resp.fp is None or resp.chunked
                or resp.length is None or len(view) < BULK_MIN):
            return -1
        want = min(len(view), resp.length)
        n = resp.fp.readinto1(view[:want])
        if 0 < n < want:
            sock = conn.sock
            timeout = sock.gettimeout()
            sock.settimeout(None)  # SO_RCVTIMEO (set at connect) bounds the wait instead
            try:
                while n < want:
                    try:
                        k = sock.recv_into(view[n:want], want - n, socket.MSG_WAITALL)
                    except BlockingIOError:
                        raise socket.timeout("timed out") from None
                    if not k:  # (http.client would report this as the body's end)
                        raise ConnectionError(f"the registry closed the connection {resp.length - n} "
                                              "bytes before the end of its answer")
                    n += k
            finally:
                sock.settimeout(timeout)
        # Kept as http.client keeps it (its length, and at the body's end _close_conn, which
        # frees the connection for the next request), so the two read paths can alternate.
        resp.length -= n
        if resp.length == 0 or n == 0:
            resp._close_conn()
        return n

    def read(self, cap: int) -> bytes:
        """The whole body; ValueError if it is longer than `cap` bytes."""
        length = self._resp.getheader("Content-Length")
        if length and length.isdigit() and int(length) > cap:
            self.close()
            raise ValueError(f"{length} bytes is more than the {cap} allowed")
        try:
            body = self._resp.read(cap + 1)
            more = self._resp.read(1) if len(body) <= cap and not self._resp.isclosed() else b""
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise ConnectionError(f"connection to {self._pool.config.host} failed mid-answer: {exc}") from exc
        if len(body) > cap or more:
            self.close()
            raise ValueError(f"more than the {cap} bytes allowed")
        self._finish()
        return body

    def _finish(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            if self._resp.isclosed() and not self._resp.will_close:
                self._pool.put(conn)
            else:
                conn.close()

    def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.close()
        self._resp.close()

    def __enter__(self) -> FastResponse:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


BULK_MIN = 64 << 10


RCVBUF = 8 << 20


def _big_receive_buffer(sock: socket.socket) -> None:
    """Let the registry send a whole range answer (a lazy start's first one is a few MiB)
    while nobody reads yet: the daemon's first request goes out before it forks and is read
    after its start.  With the default buffer the registry stops after ~128 KiB and the
    transfer only really begins when the reader does.  The kernel caps SO_RCVBUF at
    net.core.rmem_max; SO_RCVBUFFORCE (root with CAP_NET_ADMIN) does not."""
    for opt in (getattr(socket, "SO_RCVBUFFORCE", 33), socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, RCVBUF)
            return
        except OSError:
            continue


def _timeval(seconds: float | None) -> bytes:
    s = seconds or 0.0
    return struct.pack("@ll", int(s), int((s - int(s)) * 1e6))


class ConnectionPool:
    """Kept-alive connections to one registry, each used by one request at a time."""

    def __init__(self, config: FastPathConfig) -> None:
        self.config = config
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()
        self._ssl: ssl.SSLContext | None = None
        self.disabled = proxied(config.host, config.tls)

    def _new(self) -> http.client.HTTPConnection:
        c = self.config
        if c.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context(cafile=c.ca_file)
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                c.host, timeout=c.connect_timeout, context=self._ssl)
        else:
            conn = http.client.HTTPConnection(c.host, timeout=c.connect_timeout)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _big_receive_buffer(conn.sock)
        # For the bulk reads, which switch the socket to blocking mode (where Python's own
        # timeout does not apply); ignored while it is in timeout mode.
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(c.read_timeout))
        conn.sock.settimeout(c.read_timeout)
        return conn

    def put(self, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.config.max_idle:
                self._idle.append(conn)
                return
        conn.close()

    def get(self, path: str, headers: dict[str, str]) -> FastResponse:
        """GET `path` (absolute, e.g. /v2/...).  FastPathUnusable when no connection could be
        made or TLS failed (the general path then reports or recovers); socket.timeout when the
        registry did not answer in time."""
        if self.disabled:
            raise FastPathUnusable("disabled")
        hdrs = {"User-Agent": self.config.user_agent, **headers} if self.config.user_agent else headers
        for attempt in (0, 1):
            with self._lock:
                conn = self._idle.pop() if self._idle and attempt == 0 else None
            reused = conn is not None
            try:
                if conn is None:
                    conn = self._new()
                conn.request("GET", path, headers=hdrs)
                return FastResponse(self, conn, conn.getresponse())
            except socket.timeout:
                if conn is not None:
                    conn.close()
                raise
            except ssl.SSLError as exc:
                if conn is not None:
                    conn.close()
                self.disabled = True  # e.g. a CA only requests' bundle knows: leave TLS to it
                raise FastPathUnusable(str(exc)) from exc
            except (OSError, http.client.HTTPException) as exc:
                if conn is not None:
                    conn.close()
                if reused:  # the registry closed an idle connection: one more on a new one
                    continue
                raise FastPathUnusable(str(exc)) from exc
        raise FastPathUnusable("no connection")  # pragma: no cover - the loop returns or raises

    def send(self, path: str, headers: dict[str, str]) -> "Sent | None":
        """Send a GET on a new connection and return without waiting for the answer (None if
        that cannot be done): the answer is read later, possibly by a forked child, which
        inherits the socket."""
        if self.disabled:
            return None
        hdrs = {"User-Agent": self.config.user_agent, **headers} if self.config.user_agent else headers
        conn = None
        try:
            conn = self._new()
            conn.request("GET", path, headers=hdrs)
        except (OSError, http.client.HTTPException):
            if conn is not None:
                conn.close()
            return None
        return Sent(self, conn)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()


class Sent:
    """A request sent on its own connection whose answer is not read yet."""

    def __init__(self, pool: ConnectionPool, conn: http.client.HTTPConnection) -> None:
        self._pool, self._conn = pool, conn

    def answer(self) -> FastResponse:
        """The answer (ConnectionError if there is none)."""
        conn, self._conn = self._conn, None
        if conn is None:
            raise ConnectionError("answer already taken")
        try:
            return FastResponse(self._pool, conn, conn.getresponse())
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            raise ConnectionError(f"no answer from {self._pool.config.host}: {exc}") from exc

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
