"""ttRPC server on trio.

One task reads frames from a connection; every request runs in its own task, so a
connection can hold many calls in flight at once (Kata's runtime keeps WaitProcess,
ReadStdout and GetOOMEvent blocked on one connection while it issues other calls).
Responses are written whole, one frame per write, under a lock. When the peer goes away,
the connection's tasks are cancelled.

Bad input costs the peer, never the server: a request that cannot be decoded, names an
unknown method, uses an even stream id or is over the size limit is answered with an error
status on its stream; a stream that cannot be framed any more closes that one connection.
"""

from __future__ import annotations

import logging
import math
import socket
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

import trio
from google.protobuf.message import DecodeError, Message

from . import frame as fr
from .codes import Code
from .errors import TTRPCError, status_of
from .ttrpc_pb2 import KeyValue, Request, Response, Status

log = logging.getLogger("agent.ttrpc")

# In-flight calls per connection before new ones are refused with RESOURCE_EXHAUSTED: a
# bound on what one hostile peer can make the server hold.
MAX_INFLIGHT = 1024


@dataclass(slots=True)
class CallContext:
    """What a handler knows about its call besides the request message."""

    service: str
    method: str
    stream_id: int
    metadata: dict[str, list[str]]
    deadline: float  # trio clock; math.inf when the caller set no timeout
    peer: Any = None

    def metadata_value(self, key: str) -> str | None:
        values = self.metadata.get(key.lower())
        return values[-1] if values else None


Handler = Callable[[CallContext, Message], Awaitable["Message | Encoded"]]


def varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


class Encoded:
    """A response message its handler encoded itself, as pieces sent in order without being
    joined: bulk data (ReadStdout) leaves as the buffers it was read into, where building
    the message, serialising it, wrapping it in the Response and framing it would copy every
    byte four times."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts
        self.size = sum(map(len, parts))


def bytes_field(number: int, parts: list[bytes]) -> Encoded:
    """A message whose one set field is the `bytes` field `number`, its value the parts joined
    (ReadStreamResponse is ``bytes data = 1``); no parts: the empty message, as proto3 omits
    an empty bytes field."""
    n = sum(map(len, parts))
    if not n:
        return Encoded([])
    return Encoded([varint(number << 3 | 2) + varint(n), *parts])


@dataclass(frozen=True, slots=True)
class Method:
    request_cls: type[Message]
    handler: Handler
    # A plain (not async) handler that answers at once from memory, such as a health check:
    # it runs on the connection's reader without a task of its own, and its answers to a
    # burst of requests leave in one write. It must never block.
    inline: bool = False


@dataclass(slots=True)
class _Stats:
    connections: int = 0
    calls: int = 0
    errors: int = 0
    bad_frames: int = 0


class Server:
    """A set of services served on any number of listeners and streams."""

    def __init__(self) -> None:
        self._services: dict[str, dict[str, Method]] = {}
        self.stats = _Stats()

    # registration -------------------------------------------------------------------
    def register(self, service: str, method: str, request_cls: type[Message], handler: Handler, *,
                 inline: bool = False) -> None:
        self._services.setdefault(service, {})[method] = Method(request_cls, handler, inline)

    def register_service(self, service: str, methods: Mapping[str, Method]) -> None:
        self._services.setdefault(service, {}).update(methods)

    def has_service(self, service: str) -> bool:
        return service in self._services

    # serving ------------------------------------------------------------------------
    async def serve_listeners(self, listeners: list[trio.abc.Listener], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for listener in listeners:
                nursery.start_soon(self._accept_loop, listener)
            task_status.started()

    async def serve_socket(self, sock: socket.socket, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Serve an already bound and listening stdlib socket (unix or vsock).

        Connections accepted here get the socket fast path (see _RawSocket)."""
        sock.setblocking(False)
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    conn, _ = sock.accept()
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
                    continue
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                conn.setblocking(False)
                _widen_send_buffer(conn)
                nursery.start_soon(self._serve_raw_socket, conn)

    async def _serve_raw_socket(self, conn: socket.socket) -> None:
        stream = trio.SocketStream(trio.socket.from_stdlib_socket(conn))
        await self.serve_stream(stream, raw=_RawSocket(conn))

    async def _accept_loop(self, listener: trio.abc.Listener) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    log.warning("accept failed: %s", exc)
                    await trio.sleep(0.1)
                    continue
                nursery.start_soon(self.serve_stream, stream)

    async def serve_stream(self, stream: trio.abc.Stream, peer: Any = None, *, raw: "_RawSocket | None" = None) -> None:
        """Serve one connection until the peer closes it or it stops being valid ttRPC."""
        self.stats.connections += 1
        conn = _Connection(self, stream, peer, raw)
        try:
            await conn.run()
        finally:
            with trio.CancelScope(shield=True):
                try:
                    await trio.aclose_forcefully(stream)
                except Exception:  # noqa: BLE001 - closing a broken stream may fail; nothing to do
                    pass

    # dispatch -----------------------------------------------------------------------
    def _lookup(self, service: str, method: str) -> Method:
        methods = self._services.get(service)
        if methods is None:
            raise TTRPCError(Code.UNIMPLEMENTED, f"service {service}")
        m = methods.get(method)
        if m is None:
            raise TTRPCError(Code.UNIMPLEMENTED, f"method {service}/{method}")
        return m


def _widen_send_buffer(conn: socket.socket) -> None:
    """Room in the kernel for a whole maximal frame: a 4 MiB answer then leaves in a few
    writes instead of one per default-sized buffer (200 KiB), each a wake-up of both sides.
    The kernel caps it at net.core.wmem_max; memory is charged only while data waits."""
    try:
        if conn.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < SEND_BUFFER:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
    except OSError:
        pass  # not every socket family has the option; the default works, only slower


# Asked of the kernel per connection; it doubles the value for its bookkeeping.
SEND_BUFFER = 2 << 20
# Buffers per sendmsg(): under Linux's IOV_MAX (1024). A pty gives at most 4 KiB per read,
# so one ReadStdout of a terminal may be hundreds of pieces.
IOV_BATCH = 512


class _RawSocket:
    """Direct non-blocking syscalls on a connected socket, entering trio's scheduler only
    when the kernel says EAGAIN. trio's stream methods checkpoint on every call, and at one
    call per request that was half the server's time per unary call; this keeps one
    checkpoint per few frames for fairness instead of several per call."""

    __slots__ = ("sock", "_streak")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._streak = 0

    async def receive(self, n: int) -> bytes:
        while True:
            try:
                data = self.sock.recv(n)
            except BlockingIOError:
                self._streak = 0
                await trio.lowlevel.wait_readable(self.sock)
                continue
            self._streak += 1
            if self._streak >= 16:  # a peer that never lets us block must not starve handlers
                self._streak = 0
                await trio.lowlevel.checkpoint()
            return data

    def try_send(self, data: bytes) -> int:
        try:
            return self.sock.send(data)
        except BlockingIOError:
            return 0

    def try_send_parts(self, parts: list) -> int:
        """sendmsg() of the buffers in order, without joining them: bytes written (0 when the
        socket is full). At most IOV_BATCH buffers per call (the kernel refuses more than
        IOV_MAX): the rest is a partial write like any other."""
        try:
            return self.sock.sendmsg(parts[:IOV_BATCH] if len(parts) > IOV_BATCH else parts)
        except BlockingIOError:
            return 0


class _Connection:
    __slots__ = ("server", "stream", "peer", "raw", "send_lock", "send_waiters", "inflight", "nursery", "closed",
                 "outbuf")

    def __init__(self, server: Server, stream: trio.abc.Stream, peer: Any, raw: _RawSocket | None = None) -> None:
        self.server = server
        self.stream = stream
        self.peer = peer
        self.raw = raw
        self.send_lock = trio.Lock()
        self.send_waiters = 0  # senders in the slow path; the fast path may not cut in
        self.inflight: set[int] = set()
        self.nursery: trio.Nursery | None = None
        self.closed = False
        self.outbuf: list[bytes] = []  # answers of inline methods, written once per burst

    async def run(self) -> None:
        reader = fr.FrameReader(self.stream, receive=self.raw.receive if self.raw else None)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            try:
                while True:
                    f = await reader.read()
                    if f is None:
                        break
                    self._on_frame(f)
                    if self.outbuf and not reader.has_frame():
                        data = b"".join(self.outbuf)
                        self.outbuf.clear()
                        await self._send_data(data)
            except fr.FrameError as exc:
                self.server.stats.bad_frames += 1
                log.info("closing connection: %s", exc)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                log.debug("connection ended: %s", exc)
            finally:
                # The peer is gone (or unframeable): its calls are moot.
                if self.inflight:
                    # Said at info: over a virtio-serial port a host reconnect can race the
                    # hang-up, and then these calls belonged to a client still waiting.
                    log.info("connection %s ended with %d call(s) in flight, cancelled: streams %s",
                             self.peer, len(self.inflight), sorted(self.inflight)[:8])
                self.closed = True
                nursery.cancel_scope.cancel()

    def _on_frame(self, f: fr.Frame) -> None:
        h = f.header
        if f.payload is None:
            self.server.stats.bad_frames += 1
            self._reply_error(h.stream_id, Code.RESOURCE_EXHAUSTED,
                              f"message length {h.length} exceeds maximum message size of {fr.MAX_MESSAGE}")
            return
        if h.type != fr.TYPE_REQUEST:
            # Data frames belong to streaming calls, which no method here takes; other
            # types are reserved. Ignoring them is what Go's ttrpc does, for compatibility.
            return
        try:
            req = Request.FromString(f.payload)
        except DecodeError as exc:
            self.server.stats.bad_frames += 1
            self._reply_error(h.stream_id, Code.INVALID_ARGUMENT, f"unmarshal request error: {exc}")
            return
        sid = h.stream_id
        if sid % 2 != 1:
            self._reply_error(sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams")
            return
        if sid in self.inflight:
            self._reply_error(sid, Code.INVALID_ARGUMENT, f"stream {sid} already has a call in flight")
            return
        if len(self.inflight) >= MAX_INFLIGHT:
            self._reply_error(sid, Code.RESOURCE_EXHAUSTED, f"more than {MAX_INFLIGHT} calls in flight on this connection")
            return
        self.server.stats.calls += 1
        try:
            method = self.server._lookup(req.service, req.method)
        except TTRPCError as exc:
            self.server.stats.errors += 1
            self._reply_error(sid, Code(exc.code), exc.message)
            return
        if method.inline:
            self.outbuf.append(fr.pack_frame(sid, fr.TYPE_RESPONSE, self._call_inline(sid, req, method)))
            return
        self.inflight.add(sid)
        self.nursery.start_soon(self._call, sid, req, method)

    def _context(self, sid: int, req: Request, method: Method) -> tuple[CallContext, Message]:
        """The handler's arguments: its context and the decoded request."""
        try:
            msg = method.request_cls.FromString(req.payload)
        except DecodeError as exc:
            raise TTRPCError(Code.INVALID_ARGUMENT,
                             f"{req.service}/{req.method}: cannot decode {method.request_cls.DESCRIPTOR.full_name}: {exc}")
        md: dict[str, list[str]] = {}
        for kv in req.metadata:
            md.setdefault(kv.key.lower(), []).append(kv.value)
        deadline = trio.current_time() + req.timeout_nano / 1e9 if req.timeout_nano > 0 else math.inf
        return CallContext(req.service, req.method, sid, md, deadline, self.peer), msg

    @staticmethod
    def _frame_parts(sid: int, req: Request, result: Encoded) -> list:
        """Header, Response envelope and the message's own pieces: the same bytes as
        pack_frame(sid, RESPONSE, _ok_response(message bytes))."""
        if result.size + 16 > fr.MAX_MESSAGE:
            raise TTRPCError(Code.RESOURCE_EXHAUSTED,
                             f"{req.service}/{req.method}: response of {result.size} bytes exceeds the "
                             f"{fr.MAX_MESSAGE}-byte message limit")
        env = b"\x0a\x00\x12" + varint(result.size) if result.size else b"\x0a\x00"
        head = fr.HEADER.pack(len(env) + result.size, sid, fr.TYPE_RESPONSE, 0) + env
        return [head, *result.parts]

    @staticmethod
    def _encode(req: Request, result: Message) -> bytes:
        payload = result.SerializeToString()
        if len(payload) + 16 > fr.MAX_MESSAGE:
            raise TTRPCError(Code.RESOURCE_EXHAUSTED,
                             f"{req.service}/{req.method}: response of {len(payload)} bytes exceeds the "
                             f"{fr.MAX_MESSAGE}-byte message limit")
        return _ok_response(payload)

    def _error_response(self, req: Request, exc: Exception) -> bytes:
        code, message = status_of(exc)
        if code in (Code.UNKNOWN, Code.INTERNAL):
            log.exception("%s/%s failed", req.service, req.method)
        self.server.stats.errors += 1
        return Response(status=Status(code=int(code), message=message)).SerializeToString()

    def _call_inline(self, sid: int, req: Request, method: Method) -> bytes:
        try:
            ctx, msg = self._context(sid, req, method)
            return self._encode(req, method.handler(ctx, msg))
        except Exception as exc:  # noqa: BLE001 - a handler bug must answer, not kill the server
            return self._error_response(req, exc)

    def _reply_error(self, sid: int, code: Code, message: str) -> None:
        resp = Response(status=Status(code=int(code), message=message))
        self.nursery.start_soon(self._send, sid, resp.SerializeToString())

    async def _send(self, sid: int, payload: bytes) -> None:
        await self._send_data(fr.pack_frame(sid, fr.TYPE_RESPONSE, payload))

    async def _send_parts(self, parts: list) -> None:
        """One frame given as pieces. On a raw socket they go out with sendmsg(), a partial
        write resuming from where the kernel stopped; elsewhere they are joined and sent."""
        if self.raw is None:
            await self._send_data(b"".join(parts))
            return
        if self.closed:
            return
        self.send_waiters += 1
        try:
            # The fast path as in _send_data: nobody else mid-frame, no await before the call.
            n = self.raw.try_send_parts(parts) if self.send_waiters == 1 else 0
            parts = _advance(parts, n)
            if not parts:
                return
            async with self.send_lock:
                while parts:
                    if self.closed:
                        return
                    await trio.lowlevel.wait_writable(self.raw.sock)
                    parts = _advance(parts, self.raw.try_send_parts(parts))
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._send_failed(exc)
        finally:
            self.send_waiters -= 1

    def _send_failed(self, exc: BaseException) -> None:
        """The peer is gone or the socket broke mid-frame: nothing more can be said on it."""
        log.debug("send failed, closing connection: %s", exc)
        self.closed = True
        self.nursery.cancel_scope.cancel()

    async def _send_data(self, data: bytes) -> None:
        """Write whole frames; concurrent writers never interleave bytes."""
        if self.closed:
            return
        self.send_waiters += 1
        try:
            if self.raw is not None and self.send_waiters == 1:
                # Nobody else is mid-frame: write without the lock; no await happens between
                # the check and the syscall, so no other task can interleave bytes.
                n = self.raw.try_send(data)
                if n == len(data):
                    return
                data = data[n:]
            async with self.send_lock:
                if self.closed:
                    return
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._send_failed(exc)
        finally:
            self.send_waiters -= 1

    async def _call(self, sid: int, req: Request, method: Method) -> None:
        try:
            try:
                ctx, msg = self._context(sid, req, method)
                if ctx.deadline < math.inf:
                    with trio.CancelScope(deadline=ctx.deadline) as scope:
                        result = await method.handler(ctx, msg)
                    if scope.cancelled_caught:
                        raise TTRPCError(Code.DEADLINE_EXCEEDED, f"{req.service}/{req.method}: deadline exceeded")
                else:
                    result = await method.handler(ctx, msg)
                if isinstance(result, Encoded):
                    await self._send_parts(self._frame_parts(sid, req, result))
                    return
                data = self._encode(req, result)
            except trio.Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - a handler bug must answer, not kill the server
                data = self._error_response(req, exc)
            await self._send(sid, data)
        finally:
            self.inflight.discard(sid)


def _advance(parts: list, n: int) -> list:
    """What is left of `parts` once their first n bytes are written."""
    i = 0
    while i < len(parts) and n >= len(parts[i]):
        n -= len(parts[i])
        i += 1
    rest = parts[i:]
    if n:
        rest[0] = memoryview(rest[0])[n:]
    return rest


def _ok_response(payload: bytes) -> bytes:
    """Response{status: {}, payload} encoded directly: the hot path of every successful call,
    and the same bytes the protobuf encoder gives (field 1 empty message, field 2 bytes)."""
    n = len(payload)
    if n == 0:
        return b"\x0a\x00"
    out = bytearray(b"\x0a\x00\x12")
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    out += payload
    return bytes(out)


def metadata_pairs(md: Mapping[str, str | list[str]] | None) -> list[KeyValue]:
    """Request metadata as ttRPC KeyValue pairs (a key may repeat)."""
    out: list[KeyValue] = []
    for k, v in (md or {}).items():
        for item in ([v] if isinstance(v, str) else v):
            out.append(KeyValue(key=k, value=item))
    return out
