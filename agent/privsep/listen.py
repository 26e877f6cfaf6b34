"""Opening the host-facing endpoint in init, so the daemon never needs privilege to bind it.

Address syntax as Kata's: ``vsock://CID:PORT`` (CID -1 = any), ``unix:///path``,
``unix://@abstract``, ``serial:///dev/virtio-ports/NAME``. For the first three init binds and
listens; for serial it opens the port. Either way the daemon inherits one fd.
"""
from __future__ import annotations

import os

from ..address import Address, listen_fd, parse_address  # noqa: F401 - init's names for them

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
    if addr.scheme == "unix" and not addr.path.startswith("\0"):
        os.makedirs(os.path.dirname(addr.path) or "/", exist_ok=True)
    return listen_fd(addr, backlog)  # blocking: whoever inherits the fd chooses its own mode
