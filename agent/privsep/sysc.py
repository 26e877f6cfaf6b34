"""The few system calls init needs that Python 3.11's os module lacks (over libc, through the
launcher's small layer on ``_ctypes``: the ctypes package itself costs ~0.3 MB more).

Loaded lazily: even that stays in PID 1's memory for good. :func:`in_child` runs a call
(or a whole boot step) in a short-lived fork instead, so the import happens there: a fork
shares init's mount, UTS and every other namespace, so a mount made there is init's too.
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


def reaped():
    """(pid, status) of each child that has ended, as waitpid(-1, WNOHANG) gives them, until
    none is left to collect."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        yield pid, status


def drain(fd: int) -> None:
    """Read a non-blocking self-pipe empty (its bytes only said "wake up")."""
    try:
        while os.read(fd, 512):
            pass
    except BlockingIOError:
        pass


def _c():
    global _libc
    if _libc is None:
        from ..launcher.syscalls import libc
        _libc = libc()
    return _libc


def _check(ret: int, what: str) -> int:
    if ret < 0:
        from _ctypes import get_errno
        err = get_errno()
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


def in_child(fn, *args):
    """Run ``fn(*args)`` in a forked child; return what it returns (JSON-able), or raise the
    OSError it raised (same errno and text), or RuntimeError for anything else."""
    from .. import jsonlite
    r, w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's result is what the parent checks
        code = 0
        try:
            os.close(r)
            try:
                out = {"ok": fn(*args)}
            except OSError as e:
                out = {"errno": e.errno or 0, "msg": e.strerror or str(e)}
                code = 1
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                out = {"error": f"{type(e).__name__}: {e}"}
                code = 1
            data = jsonlite.dumps(out, default=repr).encode()
            while data:
                data = data[os.write(w, data):]
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    try:
        while True:
            b = os.read(r, 65536)
            if not b:
                break
            chunks.append(b)
    finally:
        os.close(r)
        os.waitpid(pid, 0)
    try:
        out = jsonlite.loads(b"".join(chunks))
    except ValueError:
        raise RuntimeError(f"{getattr(fn, '__name__', fn)} in a child: the child died "
                           "without an answer") from None
    if "ok" in out:
        return out["ok"]
    if "errno" in out:
        raise OSError(out["errno"], out["msg"])
    raise RuntimeError(out["error"])


def reboot(cmd: int) -> None:
    _check(_c().reboot(cmd), f"reboot({cmd:#x})")
