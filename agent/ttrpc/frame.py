"""ttRPC framing: a 10-byte big-endian header then the message bytes.

    0      4          8      9       10
    | len  | streamid | type | flags | message (len bytes) ...

The length excludes the header and may not exceed MAX_MESSAGE (4 MiB). Message types are
Request (1), Response (2) and, since ttrpc 1.2, Data (3) for streams.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

HEADER = struct.Struct(">IIBB")
HEADER_SIZE = HEADER.size  # 10
MAX_MESSAGE = 4 << 20

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

FLAG_REMOTE_CLOSED = 0x1
FLAG_REMOTE_OPEN = 0x2
FLAG_NO_DATA = 0x4


@dataclass(frozen=True, slots=True)
class Header:
    length: int
    stream_id: int
    type: int
    flags: int = 0

    def pack(self) -> bytes:
        return HEADER.pack(self.length, self.stream_id, self.type, self.flags)


def pack_frame(stream_id: int, mtype: int, payload: bytes, flags: int = 0) -> bytes:
    """One frame, header and payload, as a single buffer (one write, one syscall)."""
    if len(payload) > MAX_MESSAGE:
        raise ValueError(f"message of {len(payload)} bytes exceeds the {MAX_MESSAGE}-byte ttRPC limit")
    return HEADER.pack(len(payload), stream_id, mtype, flags) + payload


class FrameError(Exception):
    """The byte stream cannot be read as ttRPC frames any more (truncated, closed)."""


@dataclass(slots=True)
class Frame:
    header: Header
    # None when the message was over MAX_MESSAGE and was discarded; a memoryview when it was
    # received in place (see FrameReader's receive_into and recycle)
    payload: bytes | memoryview | None


class FrameReader:
    """Incremental frame decoder over any trio ReceiveStream.

    Oversized messages are skipped as they stream in, never buffered whole, and are
    reported as a Frame with payload None so the caller can answer RESOURCE_EXHAUSTED on
    that stream and carry on, as Go's ttrpc does.
    """

    __slots__ = ("_receive", "_receive_into", "_buf", "_chunk", "_spare")

    def __init__(self, stream, chunk: int = 64 * 1024, *, receive=None, receive_into=None) -> None:
        # `receive(n)` may replace stream.receive_some: the server passes a socket fast path.
        self._receive = receive or stream.receive_some
        # `receive_into(buffer, n)`, when given, receives a big message straight into its own
        # buffer: no growing of the read buffer, no copy out of it.
        self._receive_into = receive_into
        self._buf = bytearray()
        self._chunk = chunk
        # a big message's buffer, handed back by its consumer (recycle) for the next one:
        # fresh multi-MiB buffers cost a page fault per 4 KiB, more than the copy into them
        self._spare: bytearray | None = None

    async def _fill(self, need: int) -> bool:
        """Read until `need` bytes are buffered. False on a clean EOF before any byte."""
        buf = self._buf
        while len(buf) < need:
            # a big message is read in big pieces: fewer syscalls and scheduler trips
            data = await self._receive(max(self._chunk, min(need - len(buf), MAX_MESSAGE + HEADER_SIZE)))
            if not data:
                if buf:
                    raise FrameError(f"connection closed mid-frame ({len(buf)} of {need} bytes)")
                return False
            buf += data
        return True

    def has_frame(self) -> bool:
        """Whether the next read() can complete from what is buffered, without waiting."""
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return False
        length = int.from_bytes(buf[:4], "big")
        return length > MAX_MESSAGE or len(buf) >= HEADER_SIZE + length

    async def read(self) -> Frame | None:
        """The next frame, or None at a clean end of stream."""
        if not await self._fill(HEADER_SIZE):
            return None
        buf = self._buf
        length, sid, mtype, flags = HEADER.unpack_from(buf)
        header = Header(length, sid, mtype, flags)
        if length > MAX_MESSAGE:
            del buf[:HEADER_SIZE]
            await self._discard(length)
            return Frame(header, None)
        end = HEADER_SIZE + length
        if len(buf) < end and length > self._chunk and self._receive_into is not None:
            return Frame(header, await self._read_into(length))
        if len(buf) < end and not await self._fill(end):
            raise FrameError("connection closed mid-frame")
        payload = bytes(buf[HEADER_SIZE:end])
        del buf[:end]
        return Frame(header, payload)

    def recycle(self, payload) -> None:
        """Give back a payload read in place (a memoryview of it will do) once nothing reads
        it any more: the next big message is received into the same memory."""
        if isinstance(payload, memoryview):
            payload = payload.obj
        if isinstance(payload, bytearray) and (self._spare is None or len(payload) > len(self._spare)):
            self._spare = payload

    async def _read_into(self, length: int) -> memoryview:
        """The rest of a big message, received in place; the read buffer ends up empty."""
        buf = self._buf
        spare, self._spare = self._spare, None
        if spare is None or len(spare) < length:
            # whole MiBs: messages of varying size still fit the one buffer kept
            spare = bytearray(-(-length // (1 << 20)) << 20)
        view = memoryview(spare)[:length]
        got = len(buf) - HEADER_SIZE
        view[:got] = memoryview(buf)[HEADER_SIZE:]
        buf.clear()
        while got < length:
            n = await self._receive_into(view[got:], length - got)
            if not n:
                raise FrameError(f"connection closed mid-frame ({HEADER_SIZE + got} of "
                                 f"{HEADER_SIZE + length} bytes)")
            got += n
        return view

    async def _discard(self, n: int) -> None:
        buf = self._buf
        while n:
            if not buf:
                data = await self._receive(self._chunk)
                if not data:
                    raise FrameError(f"connection closed while skipping an oversized message ({n} bytes left)")
                buf += data
            k = min(n, len(buf))
            del buf[:k]
            n -= k
