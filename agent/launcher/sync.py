"""Messages between the launcher and the processes it forks: one JSON object per datagram on a
SOCK_SEQPACKET socketpair, optionally with fds (SCM_RIGHTS). Errors raised in a child come back
as {"error": ...} so the launcher can report them with their text."""
from __future__ import annotations

import _socket
import os
import sys

from .. import jsonlite


class ChildError(RuntimeError):
    """The container-side process failed; the message is its error text."""


def pair() -> tuple[_socket.socket, _socket.socket]:
    # _socket instead of socket: the latter imports enum/selectors (~8 ms).
    a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET | _socket.SOCK_CLOEXEC)
    return a, b


def send(sock: _socket.socket, msg: dict, fds: list[int] | None = None) -> None:
    data = jsonlite.dumps(msg).encode()
    if fds:
        sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                              b"".join(fd.to_bytes(4, sys.byteorder) for fd in fds))])
    else:
        sock.send(data)


def recv(sock: _socket.socket, what: str) -> tuple[dict, list[int]]:
    """Next message; EOF means the peer died before saying anything."""
    data, anc, _flags, _addr = sock.recvmsg(65536, 256)
    fds: list[int] = []
    for level, typ, payload in anc:
        if level == _socket.SOL_SOCKET and typ == _socket.SCM_RIGHTS:
            n = len(payload) // 4
            fds.extend(int.from_bytes(payload[4 * i:4 * i + 4], sys.byteorder)
                       for i in range(n))
    if not data:
        raise ChildError(f"{what}: the container process exited before reporting")
    msg = jsonlite.loads(data)
    if isinstance(msg, dict) and "error" in msg:
        for fd in fds:
            os.close(fd)
        raise ChildError(msg["error"])
    return msg, fds  # type: ignore[return-value]
