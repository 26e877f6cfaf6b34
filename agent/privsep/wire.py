"""Packet encoding for the privsep channel: JSON objects, one per SEQPACKET, fds beside them.

Over ``_socket`` and :mod:`jsonlite`, not ``socket`` and ``json``: init imports this, and those
two build enums and regular expressions it does not need (~2 MB of its memory). Any socket
object with sendmsg/recvmsg works, a ``socket.socket`` or trio's included.
"""
from __future__ import annotations

import _socket
import os
import sys

from .. import jsonlite

from .record import field, record

MAX_PACKET = 128 * 1024
MAX_FDS = 8
MSG_CMSG_CLOEXEC = 0x40000000
# SCM_RIGHTS carries at most MAX_FDS ints; ancillary buffer sized for exactly that.
_CMSG_SPACE = _socket.CMSG_SPACE(MAX_FDS * 4)
_SOL_SOCKET, _SCM_RIGHTS = _socket.SOL_SOCKET, _socket.SCM_RIGHTS


class ProtocolError(ValueError):
    """A packet that is not a well-formed message of this channel."""


@record
class Packet:
    msg: dict
    fds: list[int] = field(default_factory=list)

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def encode(msg: dict) -> bytes:
    data = jsonlite.dumps(msg).encode()
    if len(data) > MAX_PACKET:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the {MAX_PACKET} byte cap")
    return data


def decode(data: bytes) -> dict:
    if len(data) > MAX_PACKET:
        raise ProtocolError(f"packet of {len(data)} bytes exceeds the {MAX_PACKET} byte cap")
    try:
        msg = jsonlite.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"packet is not JSON: {e}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(f"packet is a JSON {type(msg).__name__}, not an object")
    t = msg.get("t")
    if t not in ("req", "rep", "ev"):
        raise ProtocolError(f"field 't': unknown message type {t!r}")
    if t in ("req", "rep"):
        mid = msg.get("id")
        if not isinstance(mid, int) or isinstance(mid, bool) or not 0 < mid < 2**63:
            raise ProtocolError(f"field 'id': must be a positive integer, got {mid!r}")
    return msg


def send_packet(sock, msg: dict, fds: list[int] | tuple[int, ...] = ()) -> None:
    """Send one message (blocking or not, as the socket is; raises BlockingIOError)."""
    data = encode(msg)
    if len(fds) > MAX_FDS:
        raise ProtocolError(f"{len(fds)} fds exceed the cap of {MAX_FDS}")
    if fds:
        sock.sendmsg([data], [(_SOL_SOCKET, _SCM_RIGHTS,
                               b"".join(fd.to_bytes(4, sys.byteorder, signed=True)
                                        for fd in fds))])
    else:
        sock.send(data)


def recv_packet(sock) -> Packet | None:
    """Receive one packet; None at EOF. Raises ProtocolError for a malformed one.

    Received fds are closed when the packet is rejected, so garbage cannot leak them.
    """
    # Close-on-exec from the start: init spawns runtimes while holding fds of other
    # requests, and none may leak into a process they were not meant for.
    data, ancdata, flags, _ = sock.recvmsg(MAX_PACKET + 1, _CMSG_SPACE, MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            n = len(payload) - len(payload) % 4
            fds.extend(int.from_bytes(payload[i:i + 4], sys.byteorder, signed=True)
                       for i in range(0, n, 4))
    pkt = Packet({}, fds)
    if not data and not fds:
        return None
    try:
        if flags & _socket.MSG_CTRUNC:
            raise ProtocolError(f"too many fds in one packet (cap {MAX_FDS})")
        if flags & _socket.MSG_TRUNC:
            raise ProtocolError(f"packet exceeds the {MAX_PACKET} byte cap")
        pkt.msg = decode(data)
    except ProtocolError:
        pkt.close_fds()
        raise
    return pkt


def socketpair():
    """The init end and the daemon end (``_socket.socket`` objects); both close-on-exec (init
    clears it on the child's)."""
    a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_SEQPACKET)
    try:
        # Replies such as a route listing can be large: the send buffer bounds a packet.
        a.setsockopt(_SOL_SOCKET, 32, 4 * MAX_PACKET)  # SO_SNDBUFFORCE, needs root
    except OSError:
        a.setsockopt(_SOL_SOCKET, _socket.SO_SNDBUF, 4 * MAX_PACKET)
    b.setsockopt(_SOL_SOCKET, _socket.SO_SNDBUF, 4 * MAX_PACKET)
    return a, b
