"""Thin layer over the Linux system calls the launcher needs and Python 3.11 lacks.

Every call raises :class:`OSError` with the errno and a message naming the call and its
arguments. The functions are methods of :class:`Linux` so a test can hand the higher layers an
object that records or fails calls instead (see tests/launcher/test_units.py).
"""
from __future__ import annotations

import os

# The ctypes package costs ~2 ms to import (it builds dozens of types and imports struct and
# types); the few foreign calls here need only what its C core, _ctypes, provides: a handful of
# scalar types, a function-pointer class, Structure, byref. Loaded when the first Linux() is
# built, since a plain ``state`` or ``kill`` never makes these calls.
ctypes = None  # type: ignore[assignment]

# mount(2) flags
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_SYNCHRONOUS = 0x10
MS_REMOUNT = 0x20
MS_MANDLOCK = 0x40
MS_DIRSYNC = 0x80
MS_NOSYMFOLLOW = 0x100
MS_NOATIME = 0x400
MS_NODIRATIME = 0x800
MS_BIND = 0x1000
MS_MOVE = 0x2000
MS_REC = 0x4000
MS_SILENT = 0x8000
MS_UNBINDABLE = 1 << 17
MS_PRIVATE = 1 << 18
MS_SLAVE = 1 << 19
MS_SHARED = 1 << 20
MS_RELATIME = 1 << 21
MS_I_VERSION = 1 << 23
MS_STRICTATIME = 1 << 24
MS_LAZYTIME = 1 << 25
MNT_DETACH = 2

# clone(2) namespace flags
CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
CLONE_NEWTIME = 0x00000080

# prctl(2)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_KEEPCAPS = 8
PR_SET_NAME = 15
PR_CAPBSET_READ = 23
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_CHILD_SUBREAPER = 36
PR_SET_NO_NEW_PRIVS = 38
PR_GET_NO_NEW_PRIVS = 39
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_IS_SET = 1
PR_CAP_AMBIENT_RAISE = 2
PR_CAP_AMBIENT_LOWER = 3
PR_CAP_AMBIENT_CLEAR_ALL = 4

# openat2(2) resolve flags
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08
RESOLVE_IN_ROOT = 0x10

CLOSE_RANGE_CLOEXEC = 1 << 2
CLONE_INTO_CGROUP = 0x200000000

_NR = {  # x86_64 and aarch64 numbers for calls glibc 2.36 does not wrap
    "x86_64": {"pivot_root": 155, "capget": 125, "capset": 126, "openat2": 437,
               "close_range": 436, "pidfd_open": 434, "clone3": 435},
    "aarch64": {"pivot_root": 41, "capget": 90, "capset": 91, "openat2": 437,
                "close_range": 436, "pidfd_open": 434, "clone3": 435},
}[os.uname().machine]


class _MiniCtypes:
    """The subset of the ctypes API this module uses, built on _ctypes directly."""

    def __init__(self) -> None:
        import _ctypes as C
        self._C = C

        def simple(code: str, name: str) -> type:
            return type(name, (C._SimpleCData,), {"_type_": code})

        self.c_int = simple("i", "c_int")
        self.c_uint32 = simple("I", "c_uint32")
        self.c_long = simple("l", "c_long")
        self.c_ulong = simple("L", "c_ulong")
        self.c_uint64 = simple("Q", "c_uint64")
        self.c_char_p = simple("z", "c_char_p")
        self.Structure = C.Structure
        self.byref = C.byref
        self.sizeof = C.sizeof
        self.get_errno = C.get_errno

        class FuncPtr(C.CFuncPtr):
            # cdecl, errno saved after each call (what CDLL(..., use_errno=True) sets up)
            _flags_ = C.FUNCFLAG_CDECL | C.FUNCFLAG_USE_ERRNO
            _restype_ = self.c_int

        class PyFuncPtr(C.CFuncPtr):
            # a C-API function: called holding the GIL (what ctypes.pythonapi does)
            _flags_ = C.FUNCFLAG_CDECL | C.FUNCFLAG_PYTHONAPI
            _restype_ = None

        self._FuncPtr = FuncPtr
        self._PyFuncPtr = PyFuncPtr

    def pythonapi(self) -> "_Lib":
        return _Lib(self._C.dlopen(None, 0), self._PyFuncPtr)

    def libc(self) -> "_Lib":
        return _Lib(self._C.dlopen(None, 0), self._FuncPtr)  # the process's own symbols


class _Lib:
    """Symbols of the running program and its libraries (libc), as ctypes.CDLL(None)."""

    def __init__(self, handle: int, funcptr: type) -> None:
        self._handle = handle
        self._FuncPtr = funcptr

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        f = self._FuncPtr((name, self))
        setattr(self, name, f)
        return f


def _load_ctypes() -> None:
    global ctypes, _OpenHow, _CapHeader, _CapData
    if ctypes is not None:
        return
    c = _MiniCtypes()

    class _OpenHow(c.Structure):  # noqa: N801 - struct open_how
        _fields_ = [("flags", c.c_uint64), ("mode", c.c_uint64), ("resolve", c.c_uint64)]

    class _CapHeader(c.Structure):  # noqa: N801
        _fields_ = [("version", c.c_uint32), ("pid", c.c_int)]

    class _CapData(c.Structure):  # noqa: N801
        _fields_ = [("effective", c.c_uint32), ("permitted", c.c_uint32),
                    ("inheritable", c.c_uint32)]

    class _CloneArgs(c.Structure):  # noqa: N801 - struct clone_args (CLONE_ARGS_SIZE_VER2)
        _fields_ = [(n, c.c_uint64) for n in (
            "flags", "pidfd", "child_tid", "parent_tid", "exit_signal", "stack", "stack_size",
            "tls", "set_tid", "set_tid_size", "cgroup")]

    globals()["_CloneArgs"] = _CloneArgs
    ctypes = c


def libc() -> _Lib:
    """libc's functions as ctypes.CDLL(None, use_errno=True) gives them (int result, errno
    kept for ``_ctypes.get_errno``), without importing the ctypes package."""
    _load_ctypes()
    return ctypes.libc()


_LINUX_CAPABILITY_VERSION_3 = 0x20080522


def _enc(p: str | bytes | None) -> bytes | None:
    if p is None or isinstance(p, bytes):
        return p
    return os.fsencode(p)


class Linux:
    """The real kernel. Methods mirror the system calls' arguments."""

    def __init__(self) -> None:
        _load_ctypes()
        self._libc = libc = ctypes.libc()
        self._mount = libc.mount
        self._mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p,
                                ctypes.c_ulong, ctypes.c_char_p]
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._prctl = libc.prctl
        self._prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                                ctypes.c_ulong]

    @staticmethod
    def _fail(what: str) -> OSError:
        e = ctypes.get_errno()
        return OSError(e, f"{what}: {os.strerror(e)}")

    def mount(self, source: str | None, target: str, fstype: str | None, flags: int,
              data: str | None = None) -> None:
        if self._mount(_enc(source), _enc(target), _enc(fstype), flags, _enc(data)) != 0:
            raise self._fail(f"mount({source!r}, {target!r}, {fstype!r}, {flags:#x}, {data!r})")

    def umount2(self, target: str, flags: int = 0) -> None:
        if self._libc.umount2(_enc(target), flags) != 0:
            raise self._fail(f"umount2({target!r}, {flags})")

    def unshare(self, flags: int) -> None:
        if self._libc.unshare(flags) != 0:
            raise self._fail(f"unshare({flags:#x})")

    def setns(self, fd: int, nstype: int = 0) -> None:
        if self._libc.setns(fd, nstype) != 0:
            raise self._fail(f"setns(fd {fd}, {nstype:#x})")

    def pivot_root(self, new_root: str, put_old: str) -> None:
        if self._syscall(_NR["pivot_root"], _enc(new_root), _enc(put_old)) != 0:
            raise self._fail(f"pivot_root({new_root!r}, {put_old!r})")

    def chroot(self, path: str) -> None:
        os.chroot(path)

    def prctl(self, option: int, a2: int = 0, a3: int = 0, a4: int = 0, a5: int = 0) -> int:
        r = self._prctl(option, a2, a3, a4, a5)
        if r < 0:
            raise self._fail(f"prctl({option}, {a2}, {a3})")
        return r

    def sethostname(self, name: str) -> None:
        b = name.encode()
        if self._libc.sethostname(b, len(b)) != 0:
            raise self._fail(f"sethostname({name!r})")

    def setdomainname(self, name: str) -> None:
        b = name.encode()
        if self._libc.setdomainname(b, len(b)) != 0:
            raise self._fail(f"setdomainname({name!r})")

    def capget(self) -> tuple[int, int, int]:
        """(effective, permitted, inheritable) of this thread as 64-bit masks."""
        hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        if self._syscall(_NR["capget"], ctypes.byref(hdr), ctypes.byref(data)) != 0:
            raise self._fail("capget")
        return tuple(data[0].__getattribute__(f) | (data[1].__getattribute__(f) << 32)
                     for f in ("effective", "permitted", "inheritable"))  # type: ignore

    def capset(self, effective: int, permitted: int, inheritable: int) -> None:
        hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
        data = (_CapData * 2)()
        for i in (0, 1):
            sh = 32 * i
            data[i].effective = (effective >> sh) & 0xFFFFFFFF
            data[i].permitted = (permitted >> sh) & 0xFFFFFFFF
            data[i].inheritable = (inheritable >> sh) & 0xFFFFFFFF
        if self._syscall(_NR["capset"], ctypes.byref(hdr), ctypes.byref(data)) != 0:
            raise self._fail(f"capset(eff={effective:#x}, perm={permitted:#x}, "
                             f"inh={inheritable:#x})")

    def openat2(self, dirfd: int, path: str, flags: int, resolve: int, mode: int = 0) -> int:
        how = _OpenHow(flags | os.O_CLOEXEC, mode, resolve)
        fd = self._syscall(_NR["openat2"], dirfd, _enc(path), ctypes.byref(how),
                           ctypes.sizeof(how))
        if fd < 0:
            raise self._fail(f"openat2({path!r}, flags={flags:#x}, resolve={resolve:#x})")
        return fd

    def close_range(self, first: int, last: int = 0xFFFFFFFF, flags: int = 0) -> None:
        if self._syscall(_NR["close_range"], first, last, flags) != 0:
            raise self._fail(f"close_range({first}, {last}, {flags})")

    def clone_into_cgroup(self, cgroup_fd: int, ns_flags: int = 0) -> int:
        """fork(), with the child created directly in the cgroup2 directory ``cgroup_fd``
        (clone3 with CLONE_INTO_CGROUP, Linux >= 5.7) and in new namespaces ``ns_flags``
        (CLONE_NEW*). Unlike a write to cgroup.procs this takes the kernel's
        cgroup_threadgroup_rwsem only for reading, so it never waits for an RCU grace period.
        Returns 0 in the child and its pid in the parent.

        Python's own fork bookkeeping is done as os.fork() does it (PyOS_BeforeFork and the
        AfterFork calls). Only for single-threaded callers: glibc's fork handlers do not run,
        so any lock another thread held would stay held in the child."""
        api = ctypes.pythonapi()
        args = _CloneArgs(CLONE_INTO_CGROUP | ns_flags, 0, 0, 0, 17, 0, 0, 0, 0, 0,
                          cgroup_fd)  # exit signal SIGCHLD
        api.PyOS_BeforeFork()
        pid = self._syscall(_NR["clone3"], ctypes.byref(args), ctypes.sizeof(args))
        if pid == 0:
            api.PyOS_AfterFork_Child()
            return 0
        err = ctypes.get_errno()
        api.PyOS_AfterFork_Parent()
        if pid < 0:
            raise OSError(err, f"clone3(CLONE_INTO_CGROUP|{ns_flags:#x}, cgroup fd "
                               f"{cgroup_fd}): {os.strerror(err)}")
        return pid

    def mknod(self, path: str, mode: int, device: int) -> None:
        os.mknod(path, mode, device)

    def setgroups(self, gids: list[int]) -> None:
        os.setgroups(gids)

    def setresgid(self, gid: int) -> None:
        os.setresgid(gid, gid, gid)

    def setresuid(self, uid: int) -> None:
        os.setresuid(uid, uid, uid)


_default: Linux | None = None


def default() -> Linux:
    """The process-wide real system-call layer (created on first use)."""
    global _default
    if _default is None:
        _default = Linux()
    return _default
