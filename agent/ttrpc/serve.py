"""Serving a :class:`Server` on an agent address, whatever its transport."""

from __future__ import annotations

import logging
import os
import select
import socket

import trio

from .server import Server
from .transport import Address, _make_raw, listen_socket, parse_address

log = logging.getLogger("agent.ttrpc")


async def serve_address(server: Server, address: str | Address, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on `address` and serve until cancelled."""
    a = parse_address(address) if isinstance(address, str) else address
    if a.scheme == "serial":
        await serve_serial(server, a.path, task_status=task_status)
        return
    sock = listen_socket(a)
    try:
        await server.serve_socket(sock, task_status=task_status)
    finally:
        sock.close()


async def serve_serial(server: Server, path: str, *, task_status=trio.TASK_STATUS_IGNORED,
                       max_backoff: float = 0.5) -> None:
    """Serve the one connection a serial port carries, again and again.

    A virtio-serial port reads EOF (and polls POLLHUP) while no host process holds the other
    end; when the host side reconnects, a fresh ttRPC connection starts on a fresh reader so
    no half frame of the old one leaks into the new. The device is reopened each time, which
    also covers a port that goes away and comes back (hot-unplug, a pty in tests).
    """
    started = False
    backoff = 0.01
    while True:
        fd = _open_port(path)
        if fd is None or not _host_connected(fd):
            if fd is not None:
                os.close(fd)
            if not started:
                task_status.started()
                started = True
            await trio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)
            continue
        stream = trio.lowlevel.FdStream(fd)  # owns fd from here
        if not started:
            task_status.started()
            started = True
        log.info("serial %s: host connected", path)
        t0 = trio.current_time()
        await server.serve_stream(stream, peer=path)
        log.info("serial %s: host disconnected", path)
        # A port that hangs up at once (pty whose master is gone, a flapping host) must not
        # spin: back off unless the connection lived a while.
        backoff = 0.01 if trio.current_time() - t0 > 1.0 else min(backoff * 2, max_backoff)
        await trio.sleep(backoff)


def _open_port(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        log.debug("serial %s: cannot open: %s", path, exc)
        return None
    try:
        _make_raw(fd)
    except OSError:
        os.close(fd)
        return None
    return fd


def _host_connected(fd: int) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN | select.POLLOUT)
    events = p.poll(0)
    if not events:
        return True
    ev = events[0][1]
    # Hang-up without pending input means nobody is on the host side yet.
    return not (ev & (select.POLLHUP | select.POLLERR)) or bool(ev & select.POLLIN)


async def serve_serial_fd(server: Server, fd: int, *, task_status=trio.TASK_STATUS_IGNORED,
                          max_backoff: float = 0.5) -> None:
    """Like :func:`serve_serial` on a port already opened by someone else (init opens it and
    hands the fd to the confined daemon, which may not open devices): the fd stays, each
    host connection is served on a duplicate of it."""
    _make_raw(fd)
    os.set_blocking(fd, False)
    task_status.started()
    backoff = 0.01
    while True:
        if not _host_connected(fd):
            await trio.sleep(backoff)
            backoff = min(backoff * 2, max_backoff)
            continue
        t0 = trio.current_time()
        await server.serve_stream(trio.lowlevel.FdStream(os.dup(fd)), peer=f"fd:{fd}")
        backoff = 0.01 if trio.current_time() - t0 > 1.0 else min(backoff * 2, max_backoff)
        await trio.sleep(backoff)
