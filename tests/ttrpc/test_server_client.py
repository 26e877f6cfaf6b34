"""ttRPC server and client against each other over real unix sockets."""

from __future__ import annotations

import json
import socket
import struct
import sys
import os

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
from echo_service import SERVICE, EchoState, make_server  # noqa: E402

from agent.ttrpc import Code, ConnectionClosed, TTRPCError, open_client, serve_address  # noqa: E402
from agent.ttrpc import frame as fr  # noqa: E402
from agent.ttrpc.ttrpc_pb2 import KeyValue, Request, Response  # noqa: E402


def run_with_server(sock_path, body, state=None, timeout=20):
    state = state or EchoState()
    server = make_server(state)

    async def main():
        with trio.fail_after(timeout):
            async with trio.open_nursery() as n:
                await n.start(serve_address, server, f"unix://{sock_path}")
                await body(server, state)
                n.cancel_scope.cancel()

    trio.run(main)
    return server, state


def test_unary_round_trip(sock_path):
    async def body(server, state):
        async with open_client(f"unix://{sock_path}") as c:
            r = await c.call(SERVICE, "Echo", KeyValue(key="k", value="v" * 1000), KeyValue)
            assert (r.key, r.value) == ("k", "v" * 1000)

    run_with_server(sock_path, body)


def test_many_calls_in_flight_one_connection(sock_path):
    """Blocked calls (like Kata's WaitProcess/ReadStdout) do not stall the rest."""
    async def body(server, state):
        async with open_client(f"unix://{sock_path}") as c:
            async with trio.open_nursery() as n:
                for _ in range(3):
                    n.start_soon(lambda: c.call(SERVICE, "Sleep", KeyValue(value="3600"), KeyValue))
                while state.active < 3:
                    await trio.sleep(0.01)
                results = []

                async def one(i):
                    r = await c.call(SERVICE, "Echo", KeyValue(key=str(i)), KeyValue)
                    results.append(int(r.key))

                async with trio.open_nursery() as inner:
                    for i in range(64):
                        inner.start_soon(one, i)
                assert sorted(results) == list(range(64))
                assert state.active == 3
                n.cancel_scope.cancel()

    run_with_server(sock_path, body)


def test_unknown_service_and_method_unimplemented(sock_path):
    async def body(server, state):
        async with open_client(f"unix://{sock_path}") as c:
            with pytest.raises(TTRPCError) as ei:
                await c.call("no.Such", "Thing", KeyValue(), KeyValue)
            assert ei.value.code == Code.UNIMPLEMENTED and "no.Such" in ei.value.message
            with pytest.raises(TTRPCError) as ei:
                await c.call(SERVICE, "Nope", KeyValue(), KeyValue)
            assert ei.value.code == Code.UNIMPLEMENTED and "Nope" in ei.value.message
            # the connection is still good
            assert (await c.call(SERVICE, "Echo", KeyValue(key="a"), KeyValue)).key == "a"

    run_with_server(sock_path, body)


def test_deadline_exceeded_and_handler_cancelled(sock_path):
    async def body(server, state):
        async with open_client(f"unix://{sock_path}") as c:
            t0 = trio.current_time()
            with pytest.raises(TTRPCError) as ei:
                await c.call(SERVICE, "Sleep", KeyValue(value="30"), KeyValue, timeout=0.2)
            assert ei.value.code == Code.DEADLINE_EXCEEDED
            assert trio.current_time() - t0 < 5
            assert state.cancelled == 1
            r = await c.call(SERVICE, "Deadline", KeyValue(), KeyValue, timeout=10)
            assert 0 < float(r.value) <= 10
            r = await c.call(SERVICE, "Deadline", KeyValue(), KeyValue)
            assert r.value == "inf"

    run_with_server(sock_path, body)


def test_metadata_reaches_handler(sock_path):
    async def body(server, state):
        async with open_client(f"unix://{sock_path}") as c:
            r = await c.call(SERVICE, "Metadata", KeyValue(), KeyValue,
                             metadata={"X-Trace": "abc", "multi": ["1", "2"]})
            assert json.loads(r.value) == {"x-trace": ["abc"], "multi": ["1", "2"]}

    run_with_server(sock_path, body)


def test_handler_errors_map_to_codes(sock_path):
    async def body(server, state):
        async with open_client(f"unix://{sock_path}") as c:
            with pytest.raises(TTRPCError) as ei:
                await c.call(SERVICE, "Fail", KeyValue(key="status", value="NOT_FOUND"), KeyValue)
            assert ei.value.code == Code.NOT_FOUND
            with pytest.raises(TTRPCError) as ei:
                await c.call(SERVICE, "Fail", KeyValue(key="oserror", value="/x"), KeyValue)
            assert ei.value.code == Code.NOT_FOUND
            with pytest.raises(TTRPCError) as ei:
                await c.call(SERVICE, "Fail", KeyValue(key="bug", value="boom"), KeyValue)
            assert ei.value.code == Code.UNKNOWN and "boom" in ei.value.message
            assert (await c.call(SERVICE, "Echo", KeyValue(key="ok"), KeyValue)).key == "ok"

    run_with_server(sock_path, body)


def test_peer_going_away_cancels_its_calls(sock_path, caplog):
    caplog.set_level("INFO", logger="agent.ttrpc")

    async def body(server, state):
        async with open_client(f"unix://{sock_path}") as c:
            async with trio.open_nursery() as n:
                async def blocked():
                    with pytest.raises(ConnectionClosed):
                        await c.call(SERVICE, "Sleep", KeyValue(value="3600"), KeyValue)
                n.start_soon(blocked)
                while state.active < 1:
                    await trio.sleep(0.01)
                n.cancel_scope.cancel()
        # the client closed its socket: the server must cancel the handler
        with trio.fail_after(5):
            while state.cancelled < 1:
                await trio.sleep(0.01)
        assert state.active == 0

    run_with_server(sock_path, body)
    # said in the log, with the streams: over virtio-serial this is how a reconnect racing the
    # hang-up shows (a call cancelled while its client still waits)
    ended = [r.getMessage() for r in caplog.records if "call(s) in flight, cancelled" in r.getMessage()]
    assert len(ended) == 1 and ended[0].endswith("streams [1]"), ended


def test_server_dies_client_calls_fail_fast(sock_path):
    async def main():
        server = make_server()
        with trio.fail_after(10):
            async with trio.open_nursery() as outer:
                srv_scope = trio.CancelScope()

                async def run_server(task_status=trio.TASK_STATUS_IGNORED):
                    with srv_scope:
                        await serve_address(server, f"unix://{sock_path}", task_status=task_status)

                await outer.start(run_server)
                async with open_client(f"unix://{sock_path}") as c:
                    async def blocked():
                        with pytest.raises(ConnectionClosed):
                            await c.call(SERVICE, "Sleep", KeyValue(value="3600"), KeyValue)
                    async with trio.open_nursery() as n:
                        n.start_soon(blocked)
                        await trio.sleep(0.2)
                        srv_scope.cancel()
                    with pytest.raises(ConnectionClosed):
                        await c.call(SERVICE, "Echo", KeyValue(), KeyValue)

    trio.run(main)


def test_large_messages_and_the_4mib_limit(sock_path):
    async def body(server, state):
        async with open_client(f"unix://{sock_path}") as c:
            big = "y" * (4 * 1024 * 1024 - 64)
            r = await c.call(SERVICE, "Echo", KeyValue(value=big), KeyValue)
            assert len(r.value) == len(big)
            with pytest.raises(ValueError):
                await c.call(SERVICE, "Echo", KeyValue(value="z" * (4 << 20)), KeyValue)
            # a response over the limit cannot be sent; the server answers an error instead
            with pytest.raises(TTRPCError):
                await c.call(SERVICE, "Big", KeyValue(value=str(5 << 20)), KeyValue)
            assert (await c.call(SERVICE, "Echo", KeyValue(key="after"), KeyValue)).key == "after"

    run_with_server(sock_path, body)


# raw-socket peers: what a broken or hostile client can send ---------------------------------

def _raw_call(s: socket.socket, sid: int, payload: bytes, mtype=fr.TYPE_REQUEST, length=None) -> None:
    n = len(payload) if length is None else length
    s.sendall(struct.pack(">IIBB", n, sid, mtype, 0) + payload)


def _raw_read(s: socket.socket) -> tuple[int, Response]:
    def exact(n):
        b = b""
        while len(b) < n:
            chunk = s.recv(n - len(b))
            if not chunk:
                raise EOFError
            b += chunk
        return b
    n, sid, t, _ = struct.unpack(">IIBB", exact(10))
    assert t == fr.TYPE_RESPONSE
    return sid, Response.FromString(exact(n))


def _req(method="Echo", key="k") -> bytes:
    return Request(service=SERVICE, method=method, payload=KeyValue(key=key).SerializeToString()).SerializeToString()


def test_bad_frames_answered_and_connection_kept(sock_path):
    async def body(server, state):
        def client():
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            s.connect(sock_path)
            # garbage where a Request should be
            _raw_call(s, 1, b"\xff\xff\xff\xff garbage")
            sid, r = _raw_read(s)
            assert sid == 1 and r.status.code == Code.INVALID_ARGUMENT
            # even stream id
            _raw_call(s, 2, _req())
            sid, r = _raw_read(s)
            assert sid == 2 and r.status.code == Code.INVALID_ARGUMENT
            # oversized: announced and sent, then skipped without buffering
            _raw_call(s, 3, b"\0" * ((4 << 20) + 1))
            sid, r = _raw_read(s)
            assert sid == 3 and r.status.code == Code.RESOURCE_EXHAUSTED
            # garbage payload inside a good envelope
            bad = Request(service=SERVICE, method="Echo", payload=b"\x0a\xff").SerializeToString()
            _raw_call(s, 5, bad)
            sid, r = _raw_read(s)
            assert sid == 5 and r.status.code == Code.INVALID_ARGUMENT
            # unknown frame type ignored; a Data frame too
            _raw_call(s, 7, b"abc", mtype=9)
            _raw_call(s, 7, b"abc", mtype=fr.TYPE_DATA)
            # and a good call still works on the same connection
            _raw_call(s, 9, _req(key="fine"))
            sid, r = _raw_read(s)
            assert sid == 9 and r.status.code == 0 and KeyValue.FromString(r.payload).key == "fine"
            s.close()
        await trio.to_thread.run_sync(client)

    server, _ = run_with_server(sock_path, body)
    assert server.stats.bad_frames == 2  # undecodable envelope + oversized


def test_truncated_frame_closes_only_that_connection(sock_path):
    async def body(server, state):
        def client():
            good = socket.socket(socket.AF_UNIX)
            good.settimeout(10)
            good.connect(sock_path)
            bad = socket.socket(socket.AF_UNIX)
            bad.settimeout(10)
            bad.connect(sock_path)
            _raw_call(bad, 1, b"", length=100)      # header promises 100 bytes ...
            bad.sendall(b"only a few")              # ... and the peer closes early
            bad.shutdown(socket.SHUT_WR)
            assert bad.recv(10) == b""              # server closed it
            bad.close()
            _raw_call(good, 1, _req(key="still"))
            sid, r = _raw_read(good)
            assert KeyValue.FromString(r.payload).key == "still"
            good.close()
        await trio.to_thread.run_sync(client)

    run_with_server(sock_path, body)


def test_abstract_unix_socket():
    name = f"sandbox-agent-test-{os.getpid()}"

    async def main():
        server = make_server()
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                await n.start(serve_address, server, f"unix://@{name}")
                async with open_client(f"unix://@{name}") as c:
                    assert (await c.call(SERVICE, "Echo", KeyValue(key="abs"), KeyValue)).key == "abs"
                n.cancel_scope.cancel()

    trio.run(main)


def test_inline_methods_answer_bursts_and_errors(sock_path):
    """Inline (plain function) methods answer on the reader, in order with the rest, and a
    burst of them leaves in one write; their errors map to codes like any handler's."""
    async def body(server, state):
        async with open_client(f"unix://{sock_path}") as c:
            got = []

            async def quick(i):
                r = await c.call(SERVICE, "Quick", KeyValue(key=str(i)), KeyValue)
                got.append(int(r.key))

            async with trio.open_nursery() as n:
                n.start_soon(lambda: c.call(SERVICE, "Sleep", KeyValue(value="0.3"), KeyValue))
                for i in range(200):
                    n.start_soon(quick, i)
            assert sorted(got) == list(range(200))
            with pytest.raises(TTRPCError) as ei:
                await c.call(SERVICE, "Quick", KeyValue(key="boom"), KeyValue)
            assert ei.value.code == Code.UNKNOWN and "inline handler bug" in ei.value.message
            with pytest.raises(TTRPCError) as ei:
                await c.call_raw(SERVICE, "Quick", b"\x0a\xff")
            assert ei.value.code == Code.INVALID_ARGUMENT
            assert (await c.call(SERVICE, "Quick", KeyValue(key="after"), KeyValue)).key == "after"

    run_with_server(sock_path, body)
