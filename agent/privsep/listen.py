"""Opening the host-facing endpoint in init, so the daemon never needs privilege to bind it.

Address syntax as Kata's: ``vsock://CID:PORT`` (CID -1 = any), ``unix:///path``,
``unix://@abstract``, ``serial:///dev/virtio-ports/NAME``. For the first three init binds and
listens; for serial it opens the port. Either way the daemon inherits one fd.
"""
from __future__ import annotations

import os
import socket
from .record import record

VMADDR_CID_ANY = 0xFFFFFFFF


@record(frozen=True)
class Address:
    scheme: str      # "vsock" | "unix" | "serial"
    path: str = ""   # unix path ("@name" = abstract) or serial device
    cid: int = VMADDR_CID_ANY
    port: int = 1024


def parse_address(addr: str) -> Address:
    scheme, sep, rest = addr.partition("://")
    if not sep:
        raise ValueError(f"server address {addr!r}: missing '://'")
    if scheme == "unix":
        if rest.startswith("@") and len(rest) > 1:
            return Address("unix", rest)
        if not rest.startswith("/"):
            raise ValueError(f"server address {addr!r}: unix:// needs an absolute path or @name")
        return Address("unix", rest)
    if scheme == "serial":
        if not rest.startswith("/"):
            raise ValueError(f"server address {addr!r}: serial:// needs an absolute device path")
        return Address("serial", rest)
    if scheme == "vsock":
        cid_s, _, port_s = rest.partition(":")
        try:
            cid = int(cid_s)
            port = int(port_s) if port_s else 1024
        except ValueError:
            raise ValueError(f"server address {addr!r}: vsock://CID:PORT needs integers") from None
        if cid == -1:
            cid = VMADDR_CID_ANY
        if not 0 <= cid <= 0xFFFFFFFF or not 0 < port <= 0xFFFFFFFF:
            raise ValueError(f"server address {addr!r}: CID or port out of range")
        return Address("vsock", cid=cid, port=port)
    raise ValueError(f"server address {addr!r}: unknown scheme {scheme!r}")


VIRTIO_PORTS_DIR = "/dev/virtio-ports/"


def link_virtio_port(path: str, timeout: float = 5.0,
                     sysfs: str = "/sys/class/virtio-ports") -> None:
    """Make /dev/virtio-ports/NAME -> /dev/vportNpM, udev's job, in a guest without udev.

    The port's name arrives from the host a moment after virtio_console is loaded, so wait
    (bounded) for a port whose sysfs ``name`` matches. Not found in time: the open that follows
    fails with ENOENT naming the path.
    """
    import time
    name = path[len(VIRTIO_PORTS_DIR):]
    deadline = time.monotonic() + timeout
    while True:
        try:
            ports = sorted(os.listdir(sysfs))
        except OSError:
            ports = []
        for port in ports:
            try:
                with open(os.path.join(sysfs, port, "name"), encoding="utf-8") as f:
                    if f.read().strip() != name:
                        continue
                os.makedirs(VIRTIO_PORTS_DIR, exist_ok=True)
                os.symlink("../" + port, path)
            except FileExistsError:
                return
            except OSError:
                continue
            return
        if time.monotonic() >= deadline:
            return
        time.sleep(0.02)


def open_endpoint(addr: Address, backlog: int = 64) -> int:
    """A listening socket (or the opened serial port) as a close-on-exec fd owned by the caller."""
    if addr.scheme == "serial":
        if addr.path.startswith(VIRTIO_PORTS_DIR) and not os.path.exists(addr.path):
            link_virtio_port(addr.path)
        return os.open(addr.path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    if addr.scheme == "vsock":
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            s.bind((addr.cid, addr.port))
            s.listen(backlog)
        except BaseException:
            s.close()
            raise
        return s.detach()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if addr.path.startswith("@"):
            s.bind("\0" + addr.path[1:])
        else:
            try:
                os.unlink(addr.path)
            except FileNotFoundError:
                pass
            os.makedirs(os.path.dirname(addr.path) or "/", exist_ok=True)
            s.bind(addr.path)
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s.detach()
