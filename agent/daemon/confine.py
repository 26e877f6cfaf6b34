"""Confinement of the comms daemon, applied before it reads a byte from the host.

:func:`confine` in this order (each step needs the privilege the next one removes):

1. securebits NOROOT | KEEP_CAPS off, all locked, and NO_CAP_AMBIENT_RAISE: uid 0 would
   never regain capabilities by execve, and no ambient capability can be raised;
2. drop every capability from the bounding set (PR_CAPBSET_DROP) and clear the ambient set;
3. setgroups([]), setresgid, setresuid to the unprivileged ids: the kernel clears permitted
   and effective; capset then clears inheritable too: all five sets are empty;
4. PR_SET_DUMPABLE 0 (no ptrace or /proc peeking by another process of the same uid) and
   PR_SET_NO_NEW_PRIVS;
5. Landlock (when the kernel has it): read-write only beneath the run directory, read-only
   beneath the interpreter's own directories (lazy imports), /proc and the cgroup tree;
   every other path is refused whatever its mode bits say;
6. a seccomp allow-list (libseccomp through ``pyseccomp``): the system calls a trio +
   protobuf + sockets daemon makes, found by tracing the daemon (strace -f -c) and kept
   tight. Everything else fails with EPERM; the calls that only an attacker would make
   (mount, ptrace, module loading, kexec, bpf, namespace changes ...) kill the process, and
   init restarts the daemon. clone is allowed only for threads (no fork, no namespace
   flags); clone3 answers ENOSYS so glibc falls back to clone, whose flags a filter can
   see; socket only for AF_UNIX and AF_VSOCK; prctl only for thread names; ioctl all but
   TIOCSTI. kill is refused: signals go through init, which knows whose pids are whose.

The daemon must import what it needs before calling confine(): after it, files outside the
allowed trees cannot be opened (and the interpreter may live where the daemon's uid cannot
even look, as under /root on the project's test machines); :data:`PRELOAD` covers the
modules that libraries import lazily on first use.
"""
from __future__ import annotations

import errno
import os
import sys
from dataclasses import dataclass

PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_SECUREBITS = 28
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
# NOROOT|NOROOT_LOCKED | KEEP_CAPS_LOCKED | NO_CAP_AMBIENT_RAISE|its lock;
# NO_SETUID_FIXUP stays off (and locked) so setresuid clears the capability sets.
SECUREBITS = 0x01 | 0x02 | 0x08 | 0x20 | 0x40 | 0x80
LINUX_CAPABILITY_VERSION_3 = 0x20080522

SYS_capset = 126
SYS_landlock_create_ruleset, SYS_landlock_add_rule, SYS_landlock_restrict_self = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION = 1
LANDLOCK_RULE_PATH_BENEATH = 1
# Landlock filesystem rights, by the ABI version that introduced them.
LL_EXECUTE, LL_WRITE_FILE, LL_READ_FILE, LL_READ_DIR = 1, 2, 4, 8
LL_V1_ALL = (1 << 13) - 1
LL_REFER, LL_TRUNCATE, LL_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
LL_READ = LL_READ_FILE | LL_READ_DIR

# Made only by an attacker: the process is killed (init restarts it and logs the death).
KILL_SYSCALLS = (
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen",
    "fsmount", "fsconfig", "fspick", "mount_setattr", "ptrace", "process_vm_readv",
    "process_vm_writev", "init_module", "finit_module", "delete_module", "kexec_load",
    "kexec_file_load", "bpf", "perf_event_open", "setns", "unshare", "reboot", "swapon",
    "swapoff", "open_by_handle_at", "name_to_handle_at", "keyctl", "add_key", "request_key",
    "userfaultfd", "iopl", "ioperm", "acct", "settimeofday", "clock_settime", "adjtimex",
    "sethostname", "setdomainname", "quotactl", "lookup_dcookie", "syslog", "vhangup",
    "personality", "uselib", "execve", "execveat", "pidfd_getfd",
)

# The daemon's needs, found with strace -f -c over the daemon shape (trio's epoll loop, a
# worker thread, unix sockets, SCM_RIGHTS, pipes, /proc reads, run-dir files) and over the
# ttRPC server answering Health/Check, plus what its RPCs use on stdio fds and pty masters
# (read/write, ioctl TIOCSWINSZ), bundle files (mkdir, rename, unlink, fsync).
# Rules with arguments are in seccomp_filter(): clone, ioctl, prctl, socket.
ALLOW_SYSCALLS = (
    "read", "write", "readv", "writev", "pread64", "openat", "close", "close_range",
    "newfstatat", "fstat", "statx", "lseek", "getdents64", "readlink", "readlinkat",
    "access", "faccessat2", "fcntl", "getcwd", "mkdirat", "mkdir", "unlink", "unlinkat",
    "rename", "renameat", "renameat2", "rmdir", "ftruncate", "fsync", "fdatasync", "fchmod",
    # CopyFile writes chunks at offsets, sets modes and makes symlinks (Landlock keeps all of
    # it beneath the run dir)
    "pwrite64", "chmod", "fchmodat", "symlink", "symlinkat",
    "dup", "dup2", "dup3", "pipe2", "fstatfs", "umask",
    "mmap", "munmap", "mprotect", "mremap", "brk", "madvise",
    "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait", "poll", "ppoll",
    "rt_sigaction", "rt_sigprocmask", "rt_sigreturn", "clock_gettime", "clock_getres",
    "clock_nanosleep", "nanosleep", "gettimeofday", "getrandom", "sched_yield",
    "sched_getaffinity", "restart_syscall",
    "futex", "set_robust_list", "rseq", "set_tid_address", "gettid", "exit", "exit_group",
    "arch_prctl",
    "socketpair", "accept", "accept4", "connect", "bind", "listen", "shutdown", "sendto",
    "recvfrom", "sendmsg", "recvmsg", "getsockname", "getpeername", "getsockopt",
    "setsockopt",
    "getpid", "getppid", "getuid", "geteuid", "getgid", "getegid", "getresuid",
    "getresgid", "uname", "sysinfo", "prlimit64", "getrusage", "times",
    # OOM events: inotify on cgroup v2 memory.events
    "inotify_init1", "inotify_add_watch", "inotify_rm_watch",
)
PR_SET_NAME, PR_GET_NAME = 15, 16
TIOCSTI = 0x5412
AF_UNIX, AF_VSOCK = 1, 40

CLONE_NS_FLAGS = (0x00020000 | 0x08000000 | 0x04000000 | 0x10000000 | 0x20000000 |
                  0x40000000 | 0x00000080 | 0x02000000)  # NEWNS|NEWIPC|NEWUTS|NEWUSER|
                                                         # NEWPID|NEWNET|NEWTIME|NEWCGROUP


# Modules libraries import lazily on first use (protobuf's message classes import datetime).
# Imported before the drop: the interpreter may live where the daemon's uid cannot read
# (this project's test machines keep it under /root, mode 0700).
PRELOAD = ("datetime", "encodings.idna", "encodings.ascii", "encodings.latin_1",
           "encodings.raw_unicode_escape", "encodings.unicode_escape")


CLONE_VM, CLONE_THREAD = 0x100, 0x10000


class ConfineError(RuntimeError):
    """A confinement step failed; the daemon must not go on serving."""


@dataclass(frozen=True)
class Confinement:
    uid: int
    gid: int
    landlock_abi: int       # 0 = the kernel has no Landlock: path confinement missing
    seccomp: bool


_libc = None


def _c():
    global _libc
    if _libc is None:
        import ctypes
        _libc = ctypes.CDLL(None, use_errno=True)
    return _libc


def _ok(ret: int, what: str) -> int:
    if ret < 0:
        import ctypes
        e = ctypes.get_errno()
        raise ConfineError(f"{what}: {os.strerror(e)} (errno {e})")
    return ret


def _prctl(opt: int, a: int = 0, b: int = 0, what: str = "") -> int:
    return _ok(_c().prctl(opt, a, b, 0, 0), what or f"prctl({opt}, {a}, {b})")


def last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except OSError:
        return 40


def clear_capsets() -> None:
    """capset(2) with all of effective, permitted and inheritable empty."""
    import ctypes
    hdr = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()
    _ok(_c().syscall(SYS_capset, hdr, data), "capset(all empty)")


def landlock_abi() -> int:
    r = _c().syscall(SYS_landlock_create_ruleset, None, 0, LANDLOCK_CREATE_RULESET_VERSION)
    return r if r > 0 else 0


def apply_landlock(rw: list[str], ro: list[str]) -> int:
    """Restrict this process's file access to ``rw`` (read-write) and ``ro`` (read-only)
    trees. Returns the ABI version used, 0 when the kernel has no Landlock."""
    import ctypes
    abi = landlock_abi()
    if abi == 0:
        return 0
    handled = LL_V1_ALL
    if abi >= 2:
        handled |= LL_REFER
    if abi >= 3:
        handled |= LL_TRUNCATE
    if abi >= 5:
        handled |= LL_IOCTL_DEV
    attr = ctypes.c_uint64(handled)
    rs = _ok(_c().syscall(SYS_landlock_create_ruleset, ctypes.byref(attr), 8, 0),
             "landlock_create_ruleset")

    class PathBeneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]

    try:
        for paths, access in ((rw, handled & ~LL_EXECUTE), (ro, LL_READ)):
            for p in paths:
                try:
                    fd = os.open(p, os.O_PATH | os.O_CLOEXEC)
                except OSError:
                    continue  # a directory that is not there needs no rule
                try:
                    acc = access
                    if not os.path.isdir(p):  # rules on files take file rights only
                        acc &= LL_EXECUTE | LL_WRITE_FILE | LL_READ_FILE | LL_TRUNCATE | \
                            LL_IOCTL_DEV
                    rule = PathBeneath(acc, fd)
                    _ok(_c().syscall(SYS_landlock_add_rule, rs, LANDLOCK_RULE_PATH_BENEATH,
                                     ctypes.byref(rule), 0), f"landlock_add_rule({p!r})")
                finally:
                    os.close(fd)
        _ok(_c().syscall(SYS_landlock_restrict_self, rs, 0), "landlock_restrict_self")
    finally:
        os.close(rs)
    return abi


def default_read_only() -> list[str]:
    """Trees the daemon reads after confinement: its interpreter and modules, /proc (its own
    figures, meminfo), the cgroup tree (container stats), /dev/null and /dev/urandom."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.__file__),
             "/proc", "/sys/fs/cgroup", "/dev/null", "/dev/urandom", "/etc/localtime",
             "/usr/share/zoneinfo"}
    paths.update(p for p in sys.path if p and os.path.isdir(p))
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths.add(here)  # the agent package's own tree (an editable install lives outside prefix)
    return sorted(paths)


def seccomp_filter(allow=ALLOW_SYSCALLS, kill=KILL_SYSCALLS, default_errno=errno.EPERM):
    """Build (not load) the daemon's libseccomp filter."""
    import pyseccomp as sc
    f = sc.SyscallFilter(sc.ERRNO(default_errno))
    for name in allow:
        try:
            f.add_rule(sc.ALLOW, name)
        except (RuntimeError, ValueError, OSError):
            pass  # a name this architecture lacks (open, stat ... exist only on some)
    # Threads only: no fork (the daemon starts no processes; init does) and no namespaces.
    f.add_rule(sc.ALLOW, "clone", sc.Arg(0, sc.MASKED_EQ, CLONE_NS_FLAGS | CLONE_THREAD |
                                         CLONE_VM, CLONE_THREAD | CLONE_VM))
    f.add_rule(sc.ALLOW, "ioctl", sc.Arg(1, sc.NE, TIOCSTI))  # no typing into a terminal
    for opt in (PR_SET_NAME, PR_GET_NAME):  # thread names only; not PR_SET_DUMPABLE & co
        f.add_rule(sc.ALLOW, "prctl", sc.Arg(0, sc.EQ, opt))
    for family in (AF_UNIX, AF_VSOCK):  # no netlink, no IP: the daemon is not on a network
        f.add_rule(sc.ALLOW, "socket", sc.Arg(0, sc.EQ, family))
    f.add_rule(sc.ERRNO(errno.ENOSYS), "clone3")
    for name in kill:
        try:
            f.add_rule(sc.KILL_PROCESS, name)
        except (RuntimeError, ValueError, OSError):
            pass
    return f


def confine(uid: int = 65534, gid: int = 65534, allowed_dir: str = "/run/sandbox-agent", *,
            read_only: list[str] | None = None, seccomp: bool = True,
            require_landlock: bool = False, preload=PRELOAD) -> Confinement:
    """Drop to ``uid``/``gid`` with no capabilities, no_new_privs, Landlock, seccomp.

    Must run as root (it drops the bounding set) and before any host byte is read. Raises
    ConfineError if any step fails: a half-confined daemon must not serve.
    """
    if uid == 0 or gid == 0:
        raise ConfineError(f"confine: refusing to confine to uid {uid} gid {gid} (root)")
    import importlib
    for mod in preload:
        try:
            importlib.import_module(mod)
        except ImportError:
            pass
    if seccomp:
        flt = seccomp_filter()  # built first: libseccomp allocates, reads arch tables
    if os.geteuid() == 0:
        _prctl(PR_SET_SECUREBITS, SECUREBITS, what="prctl(PR_SET_SECUREBITS)")
        for cap in range(last_cap() + 1):
            _prctl(PR_CAPBSET_DROP, cap, what=f"prctl(PR_CAPBSET_DROP, {cap})")
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, what="prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    try:
        os.setgroups([])
        os.setresgid(gid, gid, gid)
        os.setresuid(uid, uid, uid)
    except OSError as e:
        raise ConfineError(f"confine: switching to uid {uid} gid {gid}: {e}") from None
    clear_capsets()
    _prctl(PR_SET_DUMPABLE, 0, what="prctl(PR_SET_DUMPABLE, 0)")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, what="prctl(PR_SET_NO_NEW_PRIVS, 1)")
    ro = default_read_only() if read_only is None else read_only
    abi = apply_landlock([allowed_dir, "/dev/null"], ro)
    if require_landlock and abi == 0:
        raise ConfineError("confine: the kernel has no Landlock; path confinement unavailable")
    if seccomp:
        try:
            flt.load()
        except OSError as e:
            raise ConfineError(f"confine: loading the seccomp filter: {e}") from None
    return Confinement(uid, gid, abi, seccomp)
