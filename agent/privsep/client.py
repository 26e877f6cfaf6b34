"""The daemon's side of the privsep channel, on trio.

    async with open_client(sock) as init:
        rep = await init.call("launch", {...}, fds=[r, w, w2])
        async for ev in init.events: ...

Calls may be in flight concurrently; replies are matched by id. Unsolicited events (process
exits, error notices) go to ``events``, a trio receive channel. When init closes the channel
every pending call fails with :class:`InitGone`.
"""
from __future__ import annotations

import math
import os
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import AsyncIterator

import trio

from . import wire


class InitError(Exception):
    """Init refused or failed an operation; ``field`` names the offending request field."""

    def __init__(self, op: str, field: str, msg: str):
        self.op, self.field, self.msg = op, field, msg
        super().__init__(f"init {op}: {field + ': ' if field else ''}{msg}")


class InitGone(ConnectionError):
    """The channel to init is closed."""


@dataclass
class Reply:
    result: dict
    fds: list[int] = field(default_factory=list)


class _Pending:
    __slots__ = ("done", "msg", "fds", "op")

    def __init__(self, op: str):
        self.op = op
        self.done = trio.Event()
        self.msg: dict | None = None
        self.fds: list[int] = []


class InitClient:
    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self._next = 0
        self._pending: dict[int, _Pending] = {}
        self._ev_send, self.events = trio.open_memory_channel(math.inf)
        self._send_lock = trio.Lock()
        self.closed = False

    @classmethod
    def from_fd(cls, fd: int) -> "InitClient":
        return cls(socket.socket(fileno=fd))

    async def _send(self, msg: dict, fds) -> None:
        async with self._send_lock:
            while True:
                if self.closed:
                    raise InitGone("channel to init is closed")
                try:
                    wire.send_packet(self.sock, msg, fds)
                    return
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                except (BrokenPipeError, ConnectionResetError) as e:
                    raise InitGone(f"channel to init is closed: {e}") from None

    async def call(self, op: str, args: dict | None = None, fds=()) -> Reply:
        """Ask init for ``op``; returns its result and any fds it sent (caller owns them)."""
        self._next += 1
        rid = self._next
        p = self._pending[rid] = _Pending(op)
        try:
            await self._send({"t": "req", "id": rid, "op": op, "args": args or {}}, fds)
            await p.done.wait()
        finally:
            self._pending.pop(rid, None)
        if p.msg is None:
            raise InitGone(f"init closed the channel during {op!r}")
        if not p.msg.get("ok"):
            err = p.msg.get("error") or {}
            raise InitError(op, str(err.get("field", "")), str(err.get("msg", "")))
        return Reply(p.msg.get("result") or {}, p.fds)

    async def send_raw(self, data: bytes, fds=()) -> None:
        """Send bytes as one packet unchecked (tests of init's robustness)."""
        while True:
            try:
                if fds:
                    socket.send_fds(self.sock, [data], list(fds))
                else:
                    self.sock.send(data)
                return
            except BlockingIOError:
                await trio.lowlevel.wait_writable(self.sock)

    async def reader(self) -> None:
        """Dispatch replies and events until init closes the channel."""
        try:
            while True:
                await trio.lowlevel.wait_readable(self.sock)
                while True:
                    try:
                        pkt = wire.recv_packet(self.sock)
                    except BlockingIOError:
                        break
                    except wire.ProtocolError as e:
                        self._ev_send.send_nowait({"t": "ev", "ev": "error",
                                                   "msg": f"bad packet from init: {e}"})
                        continue
                    except OSError:
                        return
                    if pkt is None:
                        return
                    self._dispatch(pkt)
        finally:
            self.closed = True
            for p in self._pending.values():
                p.done.set()
            self._ev_send.close()

    def _dispatch(self, pkt: wire.Packet) -> None:
        msg = pkt.msg
        if msg["t"] == "rep":
            p = self._pending.get(msg["id"])
            if p is None:  # the caller was cancelled: nobody will own these fds
                pkt.close_fds()
                return
            p.msg, p.fds = msg, pkt.fds
            p.done.set()
        else:
            pkt.close_fds()
            self._ev_send.send_nowait(msg)

    def close(self) -> None:
        self.closed = True
        self.sock.close()


@asynccontextmanager
async def open_client(sock_or_fd) -> AsyncIterator[InitClient]:
    client = (InitClient.from_fd(sock_or_fd) if isinstance(sock_or_fd, int)
              else InitClient(sock_or_fd))
    async with trio.open_nursery() as n:
        n.start_soon(client.reader)
        try:
            yield client
        finally:
            n.cancel_scope.cancel()
            client.close()


def fd_from_env(name: str = "SANDBOX_AGENT_PRIVSEP_FD") -> int:
    v = os.environ.get(name)
    if v is None or not v.isdigit():
        raise RuntimeError(f"environment variable {name} must hold the privsep fd, got {v!r}")
    return int(v)
