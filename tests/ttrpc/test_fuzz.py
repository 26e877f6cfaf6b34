"""Property tests: whatever bytes a peer sends, the server neither crashes nor leaks tasks,
answers only with well-formed frames, and keeps serving other connections."""

from __future__ import annotations

import os
import struct
import sys

import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from echo_service import SERVICE, EchoState, make_server  # noqa: E402

from agent.ttrpc import frame as fr  # noqa: E402
from agent.ttrpc.ttrpc_pb2 import KeyValue, Request, Response  # noqa: E402

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _frame(sid: int, payload: bytes, mtype: int = fr.TYPE_REQUEST, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", len(payload), sid, mtype, flags) + payload


def _request(method: str, key: str, timeout_nano: int = 0) -> bytes:
    return Request(service=SERVICE, method=method, payload=KeyValue(key=key).SerializeToString(),
                   timeout_nano=timeout_nano).SerializeToString()


def _tasks_under(task) -> int:
    return sum(1 + _tasks_under(t) for n in task.child_nurseries for t in n.child_tasks)


def _parse_responses(data: bytes) -> list[tuple[int, Response]]:
    out = []
    while data:
        assert len(data) >= 10, "server wrote a partial header"
        n, sid, mtype, flags = struct.unpack(">IIBB", data[:10])
        assert mtype == fr.TYPE_RESPONSE and n <= fr.MAX_MESSAGE
        assert len(data) >= 10 + n, "server wrote a partial frame"
        out.append((sid, Response.FromString(data[10:10 + n])))
        data = data[10 + n:]
    return out


def _feed(server, chunks: list[bytes]) -> list[tuple[int, Response]]:
    """Send the chunks on one connection, close it, collect every response frame."""
    received = bytearray()

    async def main():
        root = trio.lowlevel.current_root_task()
        baseline = _tasks_under(root)
        client, srv = trio.testing.memory_stream_pair()
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(server.serve_stream, srv)

                async def drain():
                    while True:
                        data = await client.receive_some(65536)
                        if not data:
                            return
                        received.extend(data)

                n.start_soon(drain)
                for c in chunks:
                    await client.send_all(c)
                    await trio.sleep(0)
                await client.send_stream.aclose()
        # serve_stream returned, so every task it started is gone
        assert _tasks_under(root) == baseline

    trio.run(main)
    return _parse_responses(bytes(received))


@SETTINGS
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_random_bytes_never_crash(chunks):
    state = EchoState()
    _feed(make_server(state), chunks)
    assert state.active == 0


_good = st.builds(
    lambda sid, method, key: _frame(sid * 2 + 1, _request(method, key)),
    st.integers(0, 1000), st.sampled_from(["Echo", "Nope", "Fail", "Metadata", "Quick"]), st.text(max_size=20),
)


@st.composite
def mutated_streams(draw):
    frames = draw(st.lists(_good, min_size=1, max_size=6))
    data = bytearray(b"".join(frames))
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        if not data:
            break
        i = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "cut":
            del data[i:i + draw(st.integers(1, 20))]
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=20))
        elif len(data) >= 4:  # rewrite a header length with something hostile
            struct.pack_into(">I", data, 0, draw(st.sampled_from([0, 1, 9, 2**31, 2**32 - 1, (4 << 20) + 1])))
    split = draw(st.integers(0, len(data)))
    return [bytes(data[:split]), bytes(data[split:])]


@SETTINGS
@given(mutated_streams())
def test_mutated_frames_never_crash(chunks):
    state = EchoState()
    responses = _feed(make_server(state), chunks)
    for sid, resp in responses:
        assert resp.status.code >= 0
    assert state.active == 0


@SETTINGS
@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.sampled_from(["Echo", "Sleep", "Deadline", "Quick"]),
                          st.integers(0, 10**9)), min_size=1, max_size=20))
def test_every_wellformed_request_gets_exactly_one_answer(calls):
    """Unique odd stream ids each get one response; sleepers are cut off by their deadline."""
    seen = set()
    frames = []
    expect = set()
    for sid, method, t in calls:
        sid = sid | 1
        if sid in seen:
            continue
        seen.add(sid)
        key = "0.001" if method == "Sleep" else "k"
        req = Request(service=SERVICE, method=method, timeout_nano=t,
                      payload=KeyValue(key=key, value=key).SerializeToString()).SerializeToString()
        frames.append(_frame(sid, req))
        expect.add(sid)
    server = make_server()
    responses = []

    async def main():
        client, srv = trio.testing.memory_stream_pair()
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(server.serve_stream, srv)
                await client.send_all(b"".join(frames))
                reader = fr.FrameReader(client)
                while len(responses) < len(expect):
                    f = await reader.read()
                    responses.append((f.header.stream_id, Response.FromString(f.payload)))
                await client.aclose()

    trio.run(main)
    assert sorted(s for s, _ in responses) == sorted(expect)


def test_server_keeps_serving_after_hostile_connections():
    server = make_server()
    _feed(server, [b"\xff" * 50, _frame(1, b"garbage")])
    _feed(server, [struct.pack(">IIBB", 2**32 - 1, 1, 1, 0) + b"x" * 100])
    got = []

    async def main():
        client, srv = trio.testing.memory_stream_pair()
        with trio.fail_after(10):
            async with trio.open_nursery() as n:
                n.start_soon(server.serve_stream, srv)
                await client.send_all(_frame(3, _request("Echo", "alive")))
                f = await fr.FrameReader(client).read()
                got.append(KeyValue.FromString(Response.FromString(f.payload).payload).key)
                await client.aclose()

    trio.run(main)
    assert got == ["alive"]
    assert server.stats.bad_frames >= 2
