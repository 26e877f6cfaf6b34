"""Client streams to agent addresses (the syntax and the listening side are in
agent/address.py, which init uses without trio)."""

from __future__ import annotations

import errno
import os
import socket

import trio

from agent.address import (  # noqa: F401 - re-exported: the ttRPC package's public names
    DEFAULT_VSOCK_PORT, VMADDR_CID_ANY, Address, AddressError, listen_socket, parse_address,
)


# connecting ------------------------------------------------------------------------------

async def connect(address: Address | str) -> trio.abc.Stream:
    """Open a client stream to an agent address."""
    a = parse_address(address) if isinstance(address, str) else address
    if a.scheme == "unix":
        s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await s.connect(a.path)
        except BaseException:
            s.close()
            raise
        return trio.SocketStream(s)
    if a.scheme == "vsock":
        s = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            await s.connect((a.cid, a.port))
        except BaseException:
            s.close()
            raise
        return trio.SocketStream(s)
    if a.scheme == "hvsock":
        return await _connect_hybrid_vsock(a)
    if a.scheme == "serial":
        fd = os.open(a.path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
        _make_raw(fd)
        return trio.lowlevel.FdStream(fd)
    raise AddressError(f"{a}: unsupported scheme")


async def _connect_hybrid_vsock(a: Address) -> trio.abc.Stream:
    s = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await s.connect(a.path)
        stream = trio.SocketStream(s)
    except BaseException:
        s.close()
        raise
    await stream.send_all(f"CONNECT {a.port}\n".encode())
    line = b""
    while not line.endswith(b"\n"):
        chunk = await stream.receive_some(1)  # one byte at a time: what follows is ttRPC
        if not chunk:
            raise ConnectionError(f"{a}: hybrid vsock closed during CONNECT")
        line += chunk
        if len(line) > 64:
            raise ConnectionError(f"{a}: hybrid vsock sent an over-long reply {line!r}")
    if not line.startswith(b"OK"):
        raise ConnectionError(f"{a}: hybrid vsock refused CONNECT {a.port}: {line.strip()!r}")
    return stream


def _make_raw(fd: int) -> None:
    """Put a tty (a pty standing in for a serial port in tests) in raw mode: no echo, no
    line editing, no byte translation - ttRPC frames are binary. Not a tty: nothing to do."""
    import termios
    import tty

    try:
        tty.setraw(fd, termios.TCSANOW)
    except termios.error as exc:
        if exc.args and exc.args[0] in (errno.ENOTTY, errno.EINVAL):
            return
        raise
