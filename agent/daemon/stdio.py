"""Container stdio on the daemon's side: the host-facing ends of pipes or a pty master.

Reads are on demand (ReadStdout is a long poll): nothing is buffered in the daemon, so a
container writing faster than the host reads blocks on its pipe, losing nothing, and data
written before the process exited is read before the EOF that follows it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import termios

import trio

F_SETPIPE_SZ = 1031
# A ttRPC message is at most 4 MiB; leave room for the response envelope.
MAX_READ = 4 * 1024 * 1024 - 4096


class StreamClosed(Exception):
    """The stream was closed by the daemon (CloseStdin, RemoveContainer)."""


class Stream:
    """One host-facing fd (read or write end), non-blocking, serialised per direction."""

    def __init__(self, fd: int, *, tty: bool = False) -> None:
        os.set_blocking(fd, False)
        self.fd: int | None = fd
        self.tty = tty
        # one reader and one writer at a time, independently: a long-polling ReadStdout on a
        # pty master must not hold up WriteStdin to the same fd
        self._rlock = trio.Lock()
        self._wlock = trio.Lock()

    async def read(self, n: int) -> bytes:
        """Up to n bytes; b"" at end of stream (writer side closed and drained)."""
        return b"".join(await self.read_parts(n))

    async def read_parts(self, n: int) -> list[bytes]:
        """Up to n bytes as the pieces they were read in (a pipe gives at most its size per
        read): the caller sends them on without joining. [] at end of stream."""
        n = max(1, min(n, MAX_READ))
        async with self._rlock:
            while True:
                if self.fd is None:
                    return []
                try:
                    first = os.read(self.fd, n)
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(self.fd)
                    continue
                except OSError as exc:
                    # A pty master reads EIO once every slave fd is closed: that is its EOF.
                    if exc.errno == errno.EIO:
                        return []
                    raise
                if not first:
                    return []
                # Fill the answer with whatever else is there now: one RPC per pipe-full
                # would cap throughput at pipe size / round trip.
                parts, got = [first], len(first)
                while got < n:
                    try:
                        more = os.read(self.fd, n - got)
                    except (BlockingIOError, OSError):
                        break
                    if not more:
                        break
                    parts.append(more)
                    got += len(more)
                return parts

    async def write(self, data: bytes) -> int:
        async with self._wlock:
            view = memoryview(data)
            while view:
                if self.fd is None:
                    raise StreamClosed("stdin is closed")
                try:
                    view = view[os.write(self.fd, view):]
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.fd)
            return len(data)

    def close(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            trio.lowlevel.notify_closing(fd)
            os.close(fd)


# Pipe size when agent.container_pipe_size is 0: 1 MiB, the most an unprivileged process
# may ask for by default (fs.pipe-max-size); pages are allocated only as output queues up.
DEFAULT_PIPE_SIZE = 1 << 20


def make_pipe(pipe_size: int = 0) -> tuple[int, int]:
    """A close-on-exec pipe, resized to agent.container_pipe_size (default 1 MiB)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    pipe_size = pipe_size or DEFAULT_PIPE_SIZE
    if pipe_size > 0:
        try:
            fcntl.fcntl(w, F_SETPIPE_SZ, pipe_size)
        except OSError:
            pass  # over /proc/sys/fs/pipe-max-size for an unprivileged process: keep the default
    return r, w


def set_winsize(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
