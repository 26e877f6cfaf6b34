"""Protection of the launcher's own executable against overwrite from a container
(CVE-2019-5736).

The attack: the container's entry point is ``#!/proc/self/exe`` (or a container process opens
``/proc/<launcher pid>/exe`` while the launcher works inside the container). At that moment
/proc/self/exe is the launcher's interpreter, a host file; the container keeps an O_PATH fd to
it and, once the process exits, reopens it for writing and replaces the host's Python.

Choice: no process that enters the container ever maps a writable host executable. Before
the launcher forks the process that will enter the container's namespaces (container.py,
_start_c), it checks /proc/self/exe: a memfd sealed against writes, or a file on a read-only
mount, is accepted and the process is a plain fork; so is a ``run``, whose init executes the
program through the sealed trampoline instead (trampoline.py); anything else makes that
process execute a copy of the interpreter (17 KB here: libpython is a shared library, which a
container cannot reach through /proc/PID/exe) held in a memfd sealed with
F_SEAL_WRITE|GROW|SHRINK|SEAL. The
kernel then refuses every write to it, whatever path or fd the container obtains. The launcher
process itself never enters the container, so ``state``/``kill``/``delete`` pay nothing, and the
extra interpreter start of ``create``/``exec`` overlaps the cgroup migration the launcher waits
for anyway. A deployment that starts the launcher from a read-only mount (the guest image) does
not copy at all. :func:`ensure_protected` re-executes a whole program from a sealed copy, for
callers that want that instead.
"""
from __future__ import annotations

import fcntl
import os
import sys

_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
_ST_RDONLY = 1
_MARK = "_OCI_LAUNCHER_SEALED"


def exe_is_protected(path: str = "/proc/self/exe") -> bool:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            if fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE:
                return True
        except OSError:
            pass  # not a memfd
        return bool(os.fstatvfs(fd).f_flag & _ST_RDONLY)
    finally:
        os.close(fd)


def sealed_copy(path: str) -> int:
    """A memfd holding a copy of ``path``, sealed against any change; close-on-exec."""
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = os.memfd_create("oci-launcher-python", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        size = os.fstat(src).st_size
        off = 0
        while off < size:
            n = os.sendfile(fd, src, off, size - off)
            if n == 0:
                break
            off += n
    finally:
        os.close(src)
    os.fchmod(fd, 0o555)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    return fd


def _paths() -> list[str]:
    # -S drops site-packages and the editable-install finder: pass the package's own location
    # and the current path explicitly.
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return [pkg_root] + [p for p in sys.path if p and p != pkg_root]


def boot_code(module: str, func: str, call_args: str = "") -> str:
    """``python -c`` text that sets sys.path as ours and calls module.func(call_args)."""
    return (f"import sys;sys.path[:0]={_paths()!r};"
            f"from {module} import {func};{func}({call_args})")


def exec_sealed(fd: int, boot: str, args: list[str]) -> None:
    """Replace this process with the sealed interpreter in ``fd`` running ``boot``."""
    env = dict(os.environ)
    env[_MARK] = "1"
    # argv[0] stays the interpreter's path so Python finds its prefix (and venv) as before.
    os.execve(fd, [sys.executable, "-I", "-S", "-c", boot, *args], env)


def ensure_protected(module: str = "agent.oci_launcher") -> None:
    """Return if /proc/self/exe is safe; otherwise re-exec from a sealed copy (no return)."""
    if exe_is_protected():
        return
    if os.environ.get(_MARK) == "1":
        # We were re-executed and the exe is still not protected: never loop.
        raise RuntimeError("re-executed from a sealed memfd but /proc/self/exe is not sealed")
    fd = sealed_copy("/proc/self/exe")
    exec_sealed(fd, boot_code(module, "main"), sys.argv[1:])
