"""Terminal for the container process: a pty created inside the container's devpts, the master
handed to the caller's --console-socket with SCM_RIGHTS (the protocol runc and containerd use),
the slave made the process's controlling terminal and stdio."""
from __future__ import annotations

import _socket
import fcntl
import os
import struct
import termios

_TIOCSPTLCK = 0x40045431
_TIOCGPTPEER = 0x5441


def open_pty(size: tuple[int, int] | None) -> tuple[int, int]:
    """(master, slave) from /dev/ptmx of the current mount namespace."""
    master = os.open("/dev/ptmx", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)
    fcntl.ioctl(master, _TIOCSPTLCK, struct.pack("i", 0))
    try:
        # TIOCGPTPEER opens the slave through the master: no path lookup that could be raced.
        slave = fcntl.ioctl(master, _TIOCGPTPEER, os.O_RDWR | os.O_NOCTTY)
    except OSError:
        n = struct.unpack("I", fcntl.ioctl(master, termios.TIOCGPTN, b"\0" * 4))[0]
        slave = os.open(f"/dev/pts/{n}", os.O_RDWR | os.O_NOCTTY)
    if size and (size[0] or size[1]):
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", size[0], size[1], 0, 0))
    return master, slave


def make_controlling(slave: int) -> None:
    os.setsid()
    fcntl.ioctl(slave, termios.TIOCSCTTY, 0)
    for fd in (0, 1, 2):
        os.dup2(slave, fd)


def send_master(socket_path: str, master: int) -> None:
    """Connect to --console-socket and send the master fd (one byte of data, like runc)."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        s.connect(socket_path)
        s.sendmsg([b"pty"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                              struct.pack("i", master))])
    except OSError as e:
        raise OSError(e.errno, f"console socket {socket_path!r}: {e.strerror}") from None
    finally:
        s.close()
