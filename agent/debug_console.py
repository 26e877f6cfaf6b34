"""The guest's debug console: a root shell on the console device or on a vsock port.

Kata's ``agent.debug_console`` (a shell on the console) and ``agent.debug_console_vport=PORT``
(a shell per connection to that vsock port, which ``kata-runtime exec`` attaches to). It is off
unless the kernel command line asks for it: it is a root shell in the sandbox, meant for whoever
controls the VM's command line anyway.

init starts it once as its own process (``python -I -S -m agent.debug_console ...``) so that PID 1
holds none of this code; the process supervises itself:

    console [DEVICE]  run SHELL with DEVICE as its controlling terminal; start a new one
                      when it exits (at most once a second); DEVICE defaults to the
                      terminal behind /dev/console
    listen ADDRESS    accept connections on ADDRESS (vsock://-1:PORT, unix:///path, ...); each
                      gets its own SHELL on a fresh pty, bytes copied both ways until either
                      side closes; the shell's session gets SIGHUP when the peer goes away
"""
from __future__ import annotations

import os
import pty
import select
import signal
import socket
import sys
import time

DEFAULT_SHELL = "/bin/sh"
SHELL_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
             "HOME": "/root", "TERM": "vt100", "PS1": "sandbox# "}
_RESTART_GAP = 1.0   # seconds between two shells on the console when one exits at once
_CHUNK = 65536


def _exec_shell(shell: str, tty_fd: int) -> None:
    """In a forked child: become a session leader with ``tty_fd`` as controlling terminal and
    stdio, then exec the shell. Never returns."""
    try:
        os.setsid()
        import fcntl
        import termios
        fcntl.ioctl(tty_fd, termios.TIOCSCTTY, 0)
        for i in range(3):
            os.dup2(tty_fd, i)
        if tty_fd > 2:
            os.close(tty_fd)
        os.closerange(3, 1 << 16)
        for s in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, signal.SIG_DFL)
        os.chdir("/")
        os.execve(shell, [shell, "-i"], SHELL_ENV)
    except BaseException as e:  # noqa: BLE001 - a child must never return into the caller
        os.write(2, f"debug console: cannot start {shell}: {e}\n".encode())
    os._exit(127)


def console_device(active: str = "/sys/class/tty/console/active") -> str:
    """The terminal behind /dev/console (the last console= of the kernel command line), which
    can be a controlling terminal; /dev/console itself when that cannot be read."""
    try:
        with open(active) as f:
            names = f.read().split()
    except OSError:
        names = []
    return f"/dev/{names[-1]}" if names else "/dev/console"


def console_loop(device: str, shell: str = DEFAULT_SHELL, *, once: bool = False) -> int:
    """A shell on ``device``, restarted whenever it exits. Returns the last shell's status
    when ``once`` (for tests); otherwise runs until killed."""
    while True:
        started = time.monotonic()
        fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
        pid = os.fork()
        if pid == 0:
            _exec_shell(shell, fd)
        os.close(fd)
        _, status = os.waitpid(pid, 0)
        if once:
            return os.waitstatus_to_exitcode(status)
        time.sleep(max(0.0, _RESTART_GAP - (time.monotonic() - started)))


def relay(conn: socket.socket, master: int, child: int) -> None:
    """Copy bytes between a connection and a pty master until either side closes, then hang
    up the shell's session. Blocking writes are fine: one process serves one connection."""
    sfd = conn.fileno()
    try:
        while True:
            r, _, _ = select.select([sfd, master], [], [])
            if sfd in r:
                data = conn.recv(_CHUNK)
                if not data:
                    break
                _write_all(master, data)
            if master in r:
                try:
                    data = os.read(master, _CHUNK)
                except OSError:  # EIO: the shell and everything on its pty have gone
                    break
                if not data:
                    break
                conn.sendall(data)
    except OSError:
        pass
    finally:
        try:
            os.killpg(child, signal.SIGHUP)
        except ProcessLookupError:
            pass
        os.close(master)
        conn.close()
        os.waitpid(child, 0)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def serve_connection(conn: socket.socket, shell: str = DEFAULT_SHELL) -> None:
    master, slave = pty.openpty()
    child = os.fork()
    if child == 0:
        os.close(master)
        conn.close()
        _exec_shell(shell, slave)
    os.close(slave)
    relay(conn, master, child)


def listen_loop(address: str, shell: str = DEFAULT_SHELL) -> None:
    from .address import listen_socket

    lsock = listen_socket(address)
    lsock.setblocking(True)
    # Children are reaped as they go: a connection's process exits when its peer does.
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    while True:
        conn, _ = lsock.accept()
        pid = os.fork()
        if pid == 0:
            lsock.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            try:
                serve_connection(conn, shell)
            finally:
                os._exit(0)
        conn.close()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    shell = os.environ.get("SANDBOX_AGENT_DEBUG_SHELL", DEFAULT_SHELL)
    if args[:1] == ["console"] and len(args) == 1:
        args = ["console", console_device()]
    if len(args) != 2 or args[0] not in ("console", "listen"):
        print("usage: python -m agent.debug_console console [DEVICE] | listen ADDRESS",
              file=sys.stderr)
        return 2
    if not os.access(shell, os.X_OK):
        print(f"debug console: no shell at {shell}", file=sys.stderr)
        return 1
    if args[0] == "console":
        console_loop(args[1], shell)
    else:
        listen_loop(args[1], shell)
    return 0


if __name__ == "__main__":
    sys.exit(main())
