"""ttRPC client on trio: many concurrent calls over one connection.

A reader task routes each Response to the call waiting on its stream id; stream ids are
odd and increase by two, as the protocol wants of clients.
"""

from __future__ import annotations

import math
from typing import Mapping, TypeVar

import trio
from google.protobuf.message import DecodeError, Message

from . import frame as fr
from .codes import Code
from .errors import ConnectionClosed, TTRPCError
from .server import metadata_pairs
from .ttrpc_pb2 import Request, Response

M = TypeVar("M", bound=Message)

# How long past its own deadline a call waits for the server's DEADLINE_EXCEEDED before
# giving up locally: the server's answer says more, but a dead server must not hang us.
_DEADLINE_GRACE = 1.0


class _Pending:
    __slots__ = ("event", "response")

    def __init__(self) -> None:
        self.event = trio.Event()
        # the answer: its payload (a view into the frame when _ok_payload found it) or a
        # decoded Response carrying an error status
        self.response: Response | memoryview | None = None


def _ok_payload(frame: bytes | bytearray) -> memoryview | None:
    """The payload of a successful Response as servers encode it - an empty status (field 1)
    then the payload (field 2) to the end: ``0a 00 [12 <varint n> <n bytes>]`` - as a view,
    without decoding the envelope or copying the payload. None: anything else (an error
    status, other field order), for the protobuf decoder."""
    if frame[:2] != b"\x0a\x00":
        return None
    view = memoryview(frame)
    if len(frame) == 2:
        return view[2:]
    if frame[2] != 0x12:
        return None
    n = shift = 0
    i = 3
    while i < len(frame) and i < 13:
        b = frame[i]
        n |= (b & 0x7F) << shift
        i += 1
        if not b & 0x80:
            return view[i:] if len(frame) - i == n else None
        shift += 7
    return None


class Client:
    """A connected client. Use :func:`open_client` (an async context manager)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self._stream = stream
        self._next_id = 1
        self._pending: dict[int, _Pending] = {}
        self._send_lock = trio.Lock()
        self._closed: str | None = None
        self._frames: fr.FrameReader | None = None

    async def _reader(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        # a socket stream's own recv_into lets big answers land in place
        sock = getattr(self._stream, "socket", None)
        reader = self._frames = fr.FrameReader(self._stream, receive_into=getattr(sock, "recv_into", None))
        task_status.started()
        reason = "connection closed by the server"
        try:
            while True:
                f = await reader.read()
                if f is None:
                    break
                if f.header.type != fr.TYPE_RESPONSE:
                    continue
                p = self._pending.get(f.header.stream_id)
                if p is None:
                    continue  # a call we already gave up on
                if f.payload is None:
                    p.response = Response()
                    p.response.status.code = Code.RESOURCE_EXHAUSTED
                    p.response.status.message = f"response of {f.header.length} bytes exceeds the ttRPC limit"
                else:
                    ok = _ok_payload(f.payload)
                    if ok is not None:
                        p.response = ok
                        p.event.set()
                        continue
                    try:
                        p.response = Response.FromString(f.payload)
                    except DecodeError as exc:
                        p.response = Response()
                        p.response.status.code = Code.INTERNAL
                        p.response.status.message = f"undecodable response: {exc}"
                p.event.set()
        except fr.FrameError as exc:
            reason = str(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            reason = f"connection lost: {exc}"
        finally:
            self._fail_all(reason)

    def _fail_all(self, reason: str) -> None:
        self._closed = reason
        for p in self._pending.values():
            p.event.set()

    async def call_raw(self, service: str, method: str, payload: bytes, *, timeout: float | None = None,
                       metadata: Mapping[str, str | list[str]] | None = None) -> bytes:
        """Call and return the response payload bytes; raise TTRPCError on a non-OK status."""
        return bytes(await self._call(service, method, payload, timeout, metadata))

    async def _call(self, service: str, method: str, payload: bytes, timeout: float | None,
                    metadata: Mapping[str, str | list[str]] | None) -> bytes | memoryview:
        if self._closed is not None:
            raise ConnectionClosed(self._closed)
        sid = self._next_id
        self._next_id += 2
        req = Request(service=service, method=method, payload=payload,
                      timeout_nano=int(timeout * 1e9) if timeout else 0,
                      metadata=metadata_pairs(metadata))
        data = fr.pack_frame(sid, fr.TYPE_REQUEST, req.SerializeToString())
        pending = _Pending()
        self._pending[sid] = pending
        try:
            async with self._send_lock:
                try:
                    await self._stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                    raise ConnectionClosed(f"cannot send {service}/{method}: {exc}") from exc
            limit = timeout + _DEADLINE_GRACE if timeout else math.inf
            with trio.move_on_after(limit):
                await pending.event.wait()
            resp = pending.response
            if resp is None:
                if self._closed is not None:
                    raise ConnectionClosed(f"{service}/{method}: {self._closed}")
                raise TTRPCError(Code.DEADLINE_EXCEEDED, f"{service}/{method}: no answer within {timeout}s")
        finally:
            del self._pending[sid]
        if isinstance(resp, memoryview):
            return resp
        if resp.status.code != Code.OK:
            raise TTRPCError(resp.status.code, resp.status.message)
        return resp.payload

    async def call(self, service: str, method: str, request: Message, response_cls: type[M], *,
                   timeout: float | None = None, metadata: Mapping[str, str | list[str]] | None = None) -> M:
        payload = await self._call(service, method, request.SerializeToString(), timeout, metadata)
        try:
            return response_cls.FromString(payload)
        except DecodeError as exc:
            raise TTRPCError(Code.INTERNAL, f"{service}/{method}: cannot decode {response_cls.DESCRIPTOR.full_name}: {exc}")
        finally:
            # decoding copied what it needed: the frame's memory can take the next answer
            if isinstance(payload, memoryview) and self._frames is not None:
                self._frames.recycle(payload)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self._stream)


class open_client:
    """``async with open_client(addr_or_stream) as client:`` - connect, run the reader, close."""

    def __init__(self, target: str | trio.abc.Stream, *, connect_timeout: float = 10.0) -> None:
        self._target = target
        self._connect_timeout = connect_timeout
        self._nursery_mgr = None

    async def __aenter__(self) -> Client:
        if isinstance(self._target, str):
            from .transport import connect

            with trio.fail_after(self._connect_timeout):
                stream = await connect(self._target)
        else:
            stream = self._target
        self._client = Client(stream)
        self._nursery_mgr = trio.open_nursery()
        nursery = await self._nursery_mgr.__aenter__()
        self._nursery = nursery
        await nursery.start(self._client._reader)
        return self._client

    async def __aexit__(self, *exc) -> bool | None:
        self._nursery.cancel_scope.cancel()
        try:
            return await self._nursery_mgr.__aexit__(*exc)
        except BaseExceptionGroup as group:
            # The reader task only ever ends cancelled, so a group here wraps the caller's
            # own exception: hand that back as it was raised, not wrapped.
            leaves = _leaves(group)
            if len(leaves) == 1:
                raise leaves[0] from None
            raise
        finally:
            await self._client.aclose()


def _leaves(group: BaseExceptionGroup) -> list[BaseException]:
    out: list[BaseException] = []
    for e in group.exceptions:
        out.extend(_leaves(e) if isinstance(e, BaseExceptionGroup) else [e])
    return out
