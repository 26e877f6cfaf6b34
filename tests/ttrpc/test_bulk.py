"""Bulk answers (ReadStdout): handlers' pre-encoded messages sent scatter-gather, the client's
in-place receive of big frames and its envelope fast path. Each against what protobuf and the
plain path produce, over real unix sockets and trio memory streams."""

from __future__ import annotations

import os
import socket
import sys

import pytest
import trio
import trio.testing
from hypothesis import given, settings, strategies as st

sys.path.insert(0, os.path.dirname(__file__))
from echo_service import SERVICE, make_server  # noqa: E402

from agent.daemon.agent_service import READ_STREAM_DATA  # noqa: E402
from agent.protos import agent_pb2  # noqa: E402
from agent.ttrpc import frame as fr, open_client, serve_address  # noqa: E402
from agent.ttrpc.client import _ok_payload  # noqa: E402
from agent.ttrpc.server import Encoded, _advance, _ok_response, bytes_field  # noqa: E402
from agent.ttrpc.ttrpc_pb2 import KeyValue, Response, Status  # noqa: E402

BULK = "test.Bulk"


def _pattern(n: int, seed: int = 0) -> bytes:
    # not constant: a misplaced or repeated piece shows
    block = bytes((i * 7 + seed) % 251 for i in range(4096))
    return (block * (n // 4096 + 1))[:n]


def _parts(data: bytes, cuts: list[int]) -> list[bytes]:
    out, last = [], 0
    for c in sorted(set(min(c, len(data)) for c in cuts)) + [len(data)]:
        out.append(data[last:c])
        last = c
    return [p for p in out if p]


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=70000), st.lists(st.integers(0, 70000), max_size=5))
def test_bytes_field_is_protobufs_encoding(data, cuts):
    enc = bytes_field(READ_STREAM_DATA, _parts(data, cuts))
    assert b"".join(enc.parts) == agent_pb2.ReadStreamResponse(data=data).SerializeToString()
    assert enc.size == len(b"".join(enc.parts))


def test_read_stream_data_is_the_descriptors_field():
    (field,) = agent_pb2.ReadStreamResponse.DESCRIPTOR.fields
    assert (field.name, field.number, field.type) == ("data", READ_STREAM_DATA, field.TYPE_BYTES)


@given(st.lists(st.binary(max_size=50), max_size=6), st.data())
def test_advance_leaves_the_unwritten_rest(parts, data):
    whole = b"".join(parts)
    n = data.draw(st.integers(0, len(whole)))
    rest = _advance(list(parts), n)
    assert b"".join(bytes(p) for p in rest) == whole[n:]
    # nothing left to write means no parts left (the send loop ends), and the next write
    # never starts with an empty piece
    assert bool(rest) == bool(whole[n:])
    assert not rest or len(rest[0])


@given(st.binary(max_size=5000))
def test_ok_payload_matches_the_protobuf_envelope(payload):
    for encoded in (_ok_response(payload), Response(status=Status(), payload=payload).SerializeToString()):
        view = _ok_payload(encoded)
        if encoded[:2] == b"\x0a\x00":
            assert view is not None and bytes(view) == payload
    # error statuses, other layouts and damaged lengths go to the decoder
    assert _ok_payload(Response(status=Status(code=5, message="x"), payload=payload).SerializeToString()) is None
    if payload:
        assert _ok_payload(_ok_response(payload)[:-1]) is None
        assert _ok_payload(_ok_response(payload) + b"\x00") is None


def _bulk_server():
    """The echo service plus Bulk/Read: `key` bytes of pattern (seeded by `value`) in pieces
    of up to 1 MiB, like a ReadStdout of several pipe-fulls."""
    server = make_server()

    async def read(ctx, req: KeyValue) -> Encoded:
        data = _pattern(int(req.key), int(req.value or 0))
        await trio.sleep(0)
        # seeds over 1000: pieces of 1 KiB, thousands of them (a terminal's reads are that small)
        step = 1024 if int(req.value or 0) > 1000 else 1 << 20
        return bytes_field(2, [data[i:i + step] for i in range(0, len(data), step)])

    server.register(BULK, "Read", KeyValue, read)
    return server


@pytest.mark.parametrize("sndbuf", [0, 16384])
def test_bulk_answers_over_a_socket_with_others_in_flight(sock_path, sndbuf, monkeypatch):
    """Multi-MiB answers leave in many partial writes (a small kernel send buffer forces
    hundreds) while small calls and other big answers are in flight on the same connection:
    every answer arrives whole and unmixed."""
    if sndbuf:
        import agent.ttrpc.server as server_mod
        monkeypatch.setattr(server_mod, "_widen_send_buffer",
                            lambda conn: conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf))
    server = _bulk_server()
    sizes = [0, 1, 65535, 65536 * 3 + 5, (1 << 20) + 1, (4 << 20) - 4096]
    got: dict[tuple, bytes] = {}

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                await n.start(serve_address, server, f"unix://{sock_path}")
                async with open_client(f"unix://{sock_path}") as c:

                    async def big(i, size):
                        payload = await c.call_raw(BULK, "Read", KeyValue(key=str(size), value=str(i)).SerializeToString())
                        got[("raw", i, size)] = payload

                    async def big_msg(i, size):
                        r = await c.call(BULK, "Read", KeyValue(key=str(size), value=str(i)), _Bytes2)
                        got[("msg", i, size)] = r.data

                    async def small(i):
                        r = await c.call(SERVICE, "Echo", KeyValue(key=f"s{i}", value="v"), KeyValue)
                        got[("small", i, 0)] = r.key.encode()

                    async with trio.open_nursery() as calls:
                        for i, size in enumerate(sizes):
                            calls.start_soon(big, i, size)
                            calls.start_soon(big_msg, i, size)
                            calls.start_soon(small, i)
                        calls.start_soon(big_msg, 1001, 3 << 20)  # 3072 pieces in one answer
                n.cancel_scope.cancel()

    trio.run(main)
    for i, size in enumerate(sizes):
        want = _pattern(size, i)
        assert got[("msg", i, size)] == want, (i, size)
        raw = got[("raw", i, size)]
        assert raw == _Bytes2(data=want).SerializeToString(), (i, size)
        assert got[("small", i, 0)] == f"s{i}".encode()
    assert got[("msg", 1001, 3 << 20)] == _pattern(3 << 20, 1001)


# A message with one bytes field numbered 2, to decode Bulk/Read answers: built from a
# descriptor at import, so the test needs no generated module of its own.
def _bytes2_class():
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    fdp = descriptor_pb2.FileDescriptorProto(name="test_bulk_bytes2.proto", package="testbulk", syntax="proto3")
    m = fdp.message_type.add(name="Bytes2")
    m.field.add(name="data", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_BYTES,
                label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("testbulk.Bytes2"))


_Bytes2 = _bytes2_class()


def test_bulk_answer_on_a_plain_stream_is_joined():
    """A stream that is not a raw socket (serial port, memory stream) gets the same bytes."""
    server = _bulk_server()
    frames = []

    async def main():
        client, srv = trio.testing.memory_stream_pair()
        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(server.serve_stream, srv)
                from agent.ttrpc.ttrpc_pb2 import Request
                req = Request(service=BULK, method="Read",
                              payload=KeyValue(key=str(3 << 20), value="7").SerializeToString()).SerializeToString()
                await client.send_all(fr.pack_frame(1, fr.TYPE_REQUEST, req))
                f = await fr.FrameReader(client).read()
                frames.append(f)
                await client.aclose()

    trio.run(main)
    (f,) = frames
    resp = Response.FromString(f.payload)
    assert resp.status.code == 0
    assert _Bytes2.FromString(resp.payload).data == _pattern(3 << 20, 7)


def test_frame_reader_receives_big_frames_in_place_and_reuses_the_buffer():
    payloads = [_pattern(3 << 20, 1), b"small", _pattern((2 << 20) + 3, 2), _pattern(100, 3), _pattern(4 << 20, 4)]
    stream = b"".join(fr.pack_frame(2 * i + 1, fr.TYPE_RESPONSE, p) for i, p in enumerate(payloads))
    seen = []

    async def main():
        a, b = trio.testing.memory_stream_pair()
        sent = trio.Event()

        async def feed():
            # odd chunk sizes: headers and payloads split anywhere
            for i in range(0, len(stream), 99991):
                await a.send_all(stream[i:i + 99991])
            sent.set()

        async with trio.open_nursery() as n:
            n.start_soon(feed)

            async def receive_into(view, nbytes):
                data = await b.receive_some(nbytes)
                view[:len(data)] = data
                return len(data)

            reader = fr.FrameReader(b, receive_into=receive_into)
            buffers = []
            for _ in payloads:
                f = await reader.read()
                seen.append(bytes(f.payload))
                if isinstance(f.payload, memoryview):
                    buffers.append(f.payload.obj)
                    reader.recycle(f.payload)
            seen.append(buffers)

    trio.run(main)
    buffers = seen.pop()
    assert seen == payloads
    # three frames over the 64 KiB chunk received in place: the 2 MiB one reuses the 3 MiB
    # one's buffer, the 4 MiB one needs a bigger buffer
    assert len(buffers) == 3 and buffers[0] is buffers[1] and buffers[2] is not buffers[0]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=300000), st.lists(st.integers(0, 300000), max_size=4), st.integers(0, 2**31 - 1))
def test_frame_parts_are_the_plain_paths_bytes(data, cuts, sid):
    """A pre-encoded answer framed by the server is byte for byte the frame of the same message
    built, serialised and wrapped the ordinary way."""
    from agent.ttrpc.server import _Connection
    from agent.ttrpc.ttrpc_pb2 import Request

    enc = bytes_field(READ_STREAM_DATA, _parts(data, cuts))
    got = b"".join(_Connection._frame_parts(sid, Request(service="s", method="m"), enc))
    want = fr.pack_frame(sid, fr.TYPE_RESPONSE, _ok_response(agent_pb2.ReadStreamResponse(data=data).SerializeToString()))
    assert got == want
