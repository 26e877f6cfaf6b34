"""Agent addresses, in Kata's syntax, and the listening sockets behind them.

No trio here: PID 1 (agent/init.py) opens the endpoint with this module and stays small.

    vsock://CID[:PORT]          AF_VSOCK; CID -1 = VMADDR_CID_ANY (listen on every CID);
                                PORT defaults to 1024, Kata's agent port
    unix:///abs/path            AF_UNIX socket at a path
    unix://@name                AF_UNIX abstract socket
    hvsock:///path[:PORT]       hybrid vsock of Firecracker / Cloud Hypervisor (client only):
                                a unix socket on the host, then "CONNECT PORT\\n"
    serial:///dev/virtio-ports/NAME
                                a virtio-serial port (guest side), for hypervisors without
                                vhost-vsock; it carries one connection at a time
"""

from __future__ import annotations

import _socket
import os
import stat

DEFAULT_VSOCK_PORT = 1024
VMADDR_CID_ANY = 0xFFFFFFFF
_MAX_UNIX_PATH = 107  # sun_path is 108 bytes with the terminating NUL


class AddressError(ValueError):
    """An agent address that cannot be used, with the reason and the address."""


class Address(tuple):
    """A parsed address (immutable). scheme: vsock | unix | hvsock | serial; path: the unix
    socket path or "\0name" (abstract), the serial device, the hybrid vsock host socket.
    A hand-made named tuple: PID 1 imports this, and dataclasses (~3 MB) or even
    collections.namedtuple (~0.4 MB with collections) would cost it memory."""

    __slots__ = ()
    _fields = ("scheme", "path", "cid", "port")

    def __new__(cls, scheme: str, path: str = "", cid: int = 0, port: int = 0) -> "Address":
        return tuple.__new__(cls, (scheme, path, cid, port))

    def __getnewargs__(self):
        return tuple(self)

    scheme = property(lambda self: self[0], doc="vsock | unix | hvsock | serial")
    path = property(lambda self: self[1])
    cid = property(lambda self: self[2])
    port = property(lambda self: self[3])

    def _replace(self, **changes) -> "Address":
        return Address(**{**dict(zip(self._fields, self)), **changes})

    def __repr__(self) -> str:
        return "Address(" + ", ".join(f"{k}={v!r}" for k, v in zip(self._fields, self)) + ")"

    def __str__(self) -> str:
        if self.scheme == "vsock":
            cid = -1 if self.cid == VMADDR_CID_ANY else self.cid
            return f"vsock://{cid}:{self.port}"
        if self.scheme == "unix":
            return f"unix://@{self.path[1:]}" if self.path.startswith("\0") else f"unix://{self.path}"
        if self.scheme == "hvsock":
            return f"hvsock://{self.path}:{self.port}"
        return f"serial://{self.path}"


def _parse_u32(text: str, what: str, addr: str, *, allow_minus_one: bool = False) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise AddressError(f"{addr!r}: {what} {text!r} is not a decimal number") from None
    if allow_minus_one and value == -1:
        return VMADDR_CID_ANY
    if not 0 <= value <= 0xFFFFFFFF:
        raise AddressError(f"{addr!r}: {what} {value} is out of range 0..4294967295")
    return value


def parse_address(addr: str) -> Address:
    """Parse an agent address; raise AddressError naming what is wrong."""
    if not isinstance(addr, str) or "://" not in addr:
        raise AddressError(f"{addr!r}: expected SCHEME://..., e.g. vsock://-1:1024 or unix:///run/agent.sock")
    scheme, rest = addr.split("://", 1)
    if "\0" in rest:
        raise AddressError(f"{addr!r}: NUL byte in address")
    if scheme == "vsock":
        cid_s, sep, port_s = rest.partition(":")
        if not cid_s:
            raise AddressError(f"{addr!r}: missing CID (use -1 for any)")
        cid = _parse_u32(cid_s, "CID", addr, allow_minus_one=True)
        if sep and not port_s:
            raise AddressError(f"{addr!r}: empty port")
        port = _parse_u32(port_s, "port", addr) if sep else DEFAULT_VSOCK_PORT
        return Address("vsock", cid=cid, port=port)
    if scheme == "unix":
        if rest.startswith("@"):
            name = rest[1:]
            if not name:
                raise AddressError(f"{addr!r}: empty abstract socket name")
            if len(name.encode()) > _MAX_UNIX_PATH:
                raise AddressError(f"{addr!r}: abstract name longer than {_MAX_UNIX_PATH} bytes")
            return Address("unix", path="\0" + name)
        if not rest.startswith("/"):
            raise AddressError(f"{addr!r}: unix socket path must be absolute (unix:///path)")
        if len(rest.encode()) > _MAX_UNIX_PATH:
            raise AddressError(f"{addr!r}: socket path longer than {_MAX_UNIX_PATH} bytes")
        return Address("unix", path=rest)
    if scheme == "hvsock":
        path, sep, port_s = rest.rpartition(":")
        if not sep or not path:
            path, port = rest, DEFAULT_VSOCK_PORT
        else:
            port = _parse_u32(port_s, "port", addr)
        if not path.startswith("/"):
            raise AddressError(f"{addr!r}: hybrid vsock path must be absolute")
        return Address("hvsock", path=path, port=port)
    if scheme == "serial":
        if not rest.startswith("/"):
            raise AddressError(f"{addr!r}: serial port path must be absolute (serial:///dev/virtio-ports/NAME)")
        return Address("serial", path=rest)
    raise AddressError(f"{addr!r}: unknown scheme {scheme!r} (vsock, unix, hvsock, serial)")


# listening -------------------------------------------------------------------------------

def listen_fd(address: Address | str, backlog: int = 128) -> int:
    """A bound, listening, blocking, close-on-exec socket fd for a vsock or unix address.
    Over ``_socket``: PID 1 calls this, and ``socket`` would build its enums there."""
    a = parse_address(address) if isinstance(address, str) else address
    if a.scheme == "vsock":
        family, where = _socket.AF_VSOCK, (a.cid, a.port)
    elif a.scheme == "unix":
        family, where = _socket.AF_UNIX, a.path
    else:
        raise AddressError(f"{a}: cannot listen on a {a.scheme} address")
    s = _socket.socket(family, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    try:
        if a.scheme == "unix" and not a.path.startswith("\0"):
            _remove_stale_socket(a.path)
        s.bind(where)
        s.listen(backlog)
    except OSError:
        s.close()
        raise
    return s.detach()


def listen_socket(address: Address | str, backlog: int = 128):
    """A bound, listening stdlib socket.socket for a vsock or unix address (blocking mode
    off)."""
    import socket
    s = socket.socket(fileno=listen_fd(address, backlog))
    s.setblocking(False)
    return s


def _remove_stale_socket(path: str) -> None:
    """Remove a socket file left by an earlier run; refuse to remove anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise AddressError(f"{path}: exists and is not a socket; not removing it")
    os.unlink(path)


