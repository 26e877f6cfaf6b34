"""The few system calls init needs that Python 3.11's os module lacks (ctypes over libc).

Loaded lazily: ctypes costs a few MB of RSS, and a subreaper outside a VM may never mount.
"""
from __future__ import annotations

import os

_libc = None

PR_SET_CHILD_SUBREAPER = 36
PR_SET_PDEATHSIG = 1
MNT_DETACH = 2
RB_POWER_OFF = 0x4321FEDC
RB_AUTOBOOT = 0x01234567
SYS_finit_module = 313  # x86_64


def _c():
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _check(ret: int, what: str) -> int:
    if ret < 0:
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def mount(source: str | None, target: str, fstype: str | None, flags: int = 0,
          data: str | None = None) -> None:
    enc = lambda s: None if s is None else os.fsencode(s)  # noqa: E731
    _check(_c().mount(enc(source), enc(target), enc(fstype), flags, enc(data)),
           f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r})")


def umount(target: str, flags: int = 0) -> None:
    _check(_c().umount2(os.fsencode(target), flags), f"umount2({target!r}, {flags})")


def prctl(option: int, arg: int) -> None:
    _check(_c().prctl(option, arg, 0, 0, 0), f"prctl({option}, {arg})")


def set_child_subreaper() -> None:
    prctl(PR_SET_CHILD_SUBREAPER, 1)


def finit_module(path: str, params: str = "") -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        _check(_c().syscall(SYS_finit_module, fd, os.fsencode(params), 0),
               f"finit_module({path!r})")
    finally:
        os.close(fd)


def sethostname(name: str) -> None:
    b = name.encode()
    _check(_c().sethostname(b, len(b)), f"sethostname({name!r})")


def unshare(flags: int) -> None:
    _check(_c().unshare(flags), f"unshare({flags:#x})")


CLONE_NEWUTS = 0x04000000


def reboot(cmd: int) -> None:
    _check(_c().reboot(cmd), f"reboot({cmd:#x})")
