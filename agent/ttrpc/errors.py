"""The one exception type of the ttRPC layer: a call that ended with a non-OK status."""

from __future__ import annotations

import errno

from .codes import Code


class TTRPCError(Exception):
    """A status other than OK, raised by handlers (sent to the peer) and by clients (received).

    `code` is a :class:`Code` (or the raw int if the peer sent a value we do not know).
    """

    def __init__(self, code: Code | int, message: str = "") -> None:
        try:
            code = Code(code)
        except ValueError:
            pass
        self.code = code
        self.message = message
        super().__init__(f"{Code.name_of(int(code))}: {message}" if message else Code.name_of(int(code)))


class ConnectionClosed(TTRPCError):
    """The connection went away while a call was waiting for its answer."""

    def __init__(self, message: str = "connection closed") -> None:
        super().__init__(Code.UNAVAILABLE, message)


_ERRNO_CODES = {
    errno.ENOENT: Code.NOT_FOUND,
    errno.ESRCH: Code.NOT_FOUND,
    errno.EEXIST: Code.ALREADY_EXISTS,
    errno.EPERM: Code.PERMISSION_DENIED,
    errno.EACCES: Code.PERMISSION_DENIED,
    errno.EINVAL: Code.INVALID_ARGUMENT,
    errno.ETIMEDOUT: Code.DEADLINE_EXCEEDED,
    errno.ENOSPC: Code.RESOURCE_EXHAUSTED,
    errno.EBUSY: Code.FAILED_PRECONDITION,
}


def status_of(exc: BaseException) -> tuple[Code, str]:
    """Map an exception raised by a handler to the status sent to the peer.

    Follows Go ttrpc's conversion so that peers see the same codes from either
    implementation: OS errors by errno, anything else UNKNOWN with its text.
    """
    if isinstance(exc, TTRPCError):
        return Code(exc.code) if isinstance(exc.code, Code) else Code.UNKNOWN, exc.message
    if isinstance(exc, OSError) and exc.errno in _ERRNO_CODES:
        return _ERRNO_CODES[exc.errno], str(exc)
    if isinstance(exc, (ValueError, TypeError)):
        return Code.INVALID_ARGUMENT, str(exc) or type(exc).__name__
    return Code.UNKNOWN, f"{type(exc).__name__}: {exc}"
