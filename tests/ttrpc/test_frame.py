"""Framing and envelope encoding, without sockets."""

import pytest
import trio
import trio.testing
from hypothesis import given
from hypothesis import strategies as st

from agent.ttrpc import frame as fr
from agent.ttrpc.server import _ok_response
from agent.ttrpc.ttrpc_pb2 import Response, Status


def test_header_layout_is_big_endian_10_bytes():
    assert fr.HEADER_SIZE == 10
    assert fr.pack_frame(0x01020304, fr.TYPE_RESPONSE, b"ab", flags=fr.FLAG_NO_DATA) == \
        b"\x00\x00\x00\x02\x01\x02\x03\x04\x02\x04ab"
    assert fr.MAX_MESSAGE == 4 * 1024 * 1024


def test_pack_refuses_oversized():
    with pytest.raises(ValueError):
        fr.pack_frame(1, fr.TYPE_REQUEST, b"\0" * (fr.MAX_MESSAGE + 1))


@given(st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 255), st.binary(max_size=2000)), max_size=10),
       st.integers(1, 64))
def test_reader_reassembles_frames_whatever_the_chunking(frames, chunk):
    data = b"".join(fr.pack_frame(sid, t, p) for sid, t, p in frames)
    got = []

    async def main():
        send, recv = trio.testing.memory_stream_one_way_pair()
        reader = fr.FrameReader(recv, chunk=chunk)
        async with trio.open_nursery() as n:
            async def feed():
                for i in range(0, len(data), 7):
                    await send.send_all(data[i:i + 7])
                await send.aclose()
            n.start_soon(feed)
            while (f := await reader.read()) is not None:
                got.append((f.header.stream_id, f.header.type, f.payload))

    trio.run(main)
    assert got == [(sid, t, p) for sid, t, p in frames]


@given(st.binary(max_size=70000))
def test_fast_ok_response_encoding_matches_protobuf(payload):
    assert _ok_response(payload) == Response(status=Status(), payload=payload).SerializeToString()
