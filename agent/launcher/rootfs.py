"""The container's filesystem view: mounts, devices, pivot_root, masked and read-only paths.

Every mount destination is resolved inside the rootfs with openat2(RESOLVE_IN_ROOT), created
there component by component if missing, and the mount is made onto the resulting O_PATH fd
through /proc/self/fd/N. A symlink planted in the image (even one swapped in concurrently) can
therefore never send a mount outside the rootfs (the CVE-2021-30465 class of bugs).
"""
from __future__ import annotations

import errno
import os

from . import syscalls as S
from .spec import Device, Mount, Spec

_FLAGS = {
    "ro": (True, S.MS_RDONLY), "rw": (False, S.MS_RDONLY),
    "nosuid": (True, S.MS_NOSUID), "suid": (False, S.MS_NOSUID),
    "nodev": (True, S.MS_NODEV), "dev": (False, S.MS_NODEV),
    "noexec": (True, S.MS_NOEXEC), "exec": (False, S.MS_NOEXEC),
    "sync": (True, S.MS_SYNCHRONOUS), "async": (False, S.MS_SYNCHRONOUS),
    "dirsync": (True, S.MS_DIRSYNC), "remount": (True, S.MS_REMOUNT),
    "mand": (True, S.MS_MANDLOCK), "nomand": (False, S.MS_MANDLOCK),
    "atime": (False, S.MS_NOATIME), "noatime": (True, S.MS_NOATIME),
    "diratime": (False, S.MS_NODIRATIME), "nodiratime": (True, S.MS_NODIRATIME),
    "bind": (True, S.MS_BIND), "rbind": (True, S.MS_BIND | S.MS_REC),
    "relatime": (True, S.MS_RELATIME), "norelatime": (False, S.MS_RELATIME),
    "strictatime": (True, S.MS_STRICTATIME), "nostrictatime": (False, S.MS_STRICTATIME),
    "lazytime": (True, S.MS_LAZYTIME), "nolazytime": (False, S.MS_LAZYTIME),
    "silent": (True, S.MS_SILENT), "loud": (False, S.MS_SILENT),
    "iversion": (True, S.MS_I_VERSION), "noiversion": (False, S.MS_I_VERSION),
    "nosymfollow": (True, S.MS_NOSYMFOLLOW), "symfollow": (False, S.MS_NOSYMFOLLOW),
}
PROPAGATION = {
    "private": S.MS_PRIVATE, "rprivate": S.MS_PRIVATE | S.MS_REC,
    "shared": S.MS_SHARED, "rshared": S.MS_SHARED | S.MS_REC,
    "slave": S.MS_SLAVE, "rslave": S.MS_SLAVE | S.MS_REC,
    "unbindable": S.MS_UNBINDABLE, "runbindable": S.MS_UNBINDABLE | S.MS_REC,
}
# Options runc accepts that only concern other layers (copy-up, id-mapped mounts, ...).
_IGNORED = {"tmpcopyup", "idmap", "ridmap", "defaults"}
# statvfs f_flag bits that equal MS_* flags and must be kept on a bind remount, since the
# kernel refuses to clear them on mounts locked by a less privileged user namespace.
_LOCKED = S.MS_NOSUID | S.MS_NODEV | S.MS_NOEXEC | S.MS_NOATIME | S.MS_NODIRATIME | S.MS_RELATIME

DEFAULT_DEVICES = (  # (path, major, minor): the set every container gets, as in runc
    ("/dev/null", 1, 3), ("/dev/zero", 1, 5), ("/dev/full", 1, 7), ("/dev/random", 1, 8),
    ("/dev/urandom", 1, 9), ("/dev/tty", 5, 0),
)
DEV_SYMLINKS = (("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"),
                ("/proc/self/fd/1", "/dev/stdout"), ("/proc/self/fd/2", "/dev/stderr"))


class MountOptions:
    """mount(2) arguments derived from an OCI options list."""
    __slots__ = ("flags", "clear", "propagation", "data", "bind")

    def __init__(self, flags: int, clear: int, propagation: list[int], data: str, bind: bool):
        self.flags, self.clear, self.propagation = flags, clear, propagation
        self.data, self.bind = data, bind


def parse_options(options: list[str], mtype: str | None = None) -> MountOptions:
    flags = clear = 0
    prop: list[int] = []
    data: list[str] = []
    for o in options:
        if o in _FLAGS:
            on, bit = _FLAGS[o]
            if on:
                flags |= bit
            else:
                flags &= ~bit
                clear |= bit
        elif o in PROPAGATION:
            prop.append(PROPAGATION[o])
        elif o in _IGNORED:
            continue
        else:
            data.append(o)
    bind = bool(flags & S.MS_BIND) or mtype == "bind"
    if mtype == "bind":
        flags |= S.MS_BIND
    return MountOptions(flags, clear, prop, ",".join(data), bind)


# --- confined path resolution ---------------------------------------------------------------

_RES = S.RESOLVE_IN_ROOT | S.RESOLVE_NO_MAGICLINKS


def open_in_root(sc: S.Linux, rootfd: int, path: str, flags: int = os.O_PATH) -> int:
    """O_PATH (by default) fd of ``path`` as seen with rootfd as "/"; never escapes it."""
    return sc.openat2(rootfd, path.lstrip("/") or ".", flags, _RES)


def ensure_path(sc: S.Linux, rootfd: int, path: str, is_dir: bool) -> int:
    """Create ``path`` inside the root (directories along the way, a dir or an empty file at the
    end) unless it exists, and return an O_PATH fd of it. Dangling symlinks are followed with
    their targets re-rooted, as the kernel would see them after pivot_root."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    hops = 0
    i = 0
    while i < len(parts):
        prefix = "/".join(parts[: i + 1])
        try:
            os.close(open_in_root(sc, rootfd, prefix))
            i += 1
            continue
        except FileNotFoundError:
            pass
        parent = open_in_root(sc, rootfd, "/".join(parts[:i])) if i else os.dup(rootfd)
        try:
            comp = parts[i]
            try:
                st = os.stat(comp, dir_fd=parent, follow_symlinks=False)
            except FileNotFoundError:
                st = None
            if st is not None and (st.st_mode & 0o170000) == 0o120000:
                hops += 1
                if hops > 40:
                    raise OSError(errno.ELOOP, f"too many symlinks resolving {path!r} in rootfs")
                target = os.readlink(comp, dir_fd=parent)
                base = [] if target.startswith("/") else parts[:i]
                parts = base + [p for p in target.split("/") if p not in ("", ".")] + \
                    parts[i + 1:]
                i = 0
                continue
            last = i == len(parts) - 1
            if last and not is_dir:
                fd = os.open(comp, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW |
                             os.O_CLOEXEC, 0o644, dir_fd=parent)
                os.close(fd)
            else:
                os.mkdir(comp, 0o755, dir_fd=parent)
        except FileExistsError:
            pass  # created concurrently: resolve it again
        finally:
            os.close(parent)
    return open_in_root(sc, rootfd, "/".join(parts))


def fd_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


# --- mounts ---------------------------------------------------------------------------------

class MountContext:
    """What mount_one needs besides the entry: the rootfs, whether we are in a new user
    namespace (mknod and some fs types are then refused), and the container's cgroup."""

    def __init__(self, rootfs: str, rootfd: int, userns: bool, cgroup_paths: dict[str, str],
                 cgroupns: bool):
        self.rootfs, self.rootfd, self.userns = rootfs, rootfd, userns
        self.cgroup_paths, self.cgroupns = cgroup_paths, cgroupns


def _locked_flags(path: str) -> int:
    try:
        return os.statvfs(path).f_flag & _LOCKED
    except OSError:
        return 0


def _remount_bind(sc: S.Linux, path: str, flags: int) -> None:
    want = flags & ~(S.MS_BIND | S.MS_REC | S.MS_REMOUNT)
    sc.mount(None, path, None, S.MS_BIND | S.MS_REMOUNT | want | _locked_flags(path), None)


def mount_one(sc: S.Linux, m: Mount, ctx: MountContext) -> None:
    """Perform one OCI mount entry; errors say which destination failed."""
    try:
        _mount_one(sc, m, ctx)
    except OSError as e:
        raise OSError(e.errno, f"mount {m.destination!r} (type {m.type!r}, source "
                               f"{m.source!r}): {e.strerror}") from None


def _mount_one(sc: S.Linux, m: Mount, ctx: MountContext) -> None:
    mtype = m.type or ("bind" if any(o in ("bind", "rbind") for o in m.options) else None)
    opts = parse_options(m.options, mtype)
    if mtype == "cgroup" or mtype == "cgroup2":
        _mount_cgroup(sc, m, opts, ctx)
        return
    if opts.bind:
        src = m.source or ""
        is_dir = os.path.isdir(src)
        if not os.path.lexists(src):
            raise FileNotFoundError(errno.ENOENT, f"bind source {src!r} does not exist")
        fd = ensure_path(sc, ctx.rootfd, m.destination, is_dir)
        try:
            sc.mount(src, fd_path(fd), None, S.MS_BIND | (opts.flags & S.MS_REC), None)
        finally:
            os.close(fd)
        if opts.flags & ~(S.MS_BIND | S.MS_REC):
            fd = open_in_root(sc, ctx.rootfd, m.destination)
            try:
                _remount_bind(sc, fd_path(fd), opts.flags)
            finally:
                os.close(fd)
    else:
        fd = ensure_path(sc, ctx.rootfd, m.destination, True)
        try:
            try:
                sc.mount(m.source or mtype or "none", fd_path(fd), mtype,
                         opts.flags & ~S.MS_REMOUNT, opts.data or None)
            except PermissionError:
                if mtype not in ("sysfs", "mqueue") or not ctx.userns:
                    raise
                # A new user namespace without its own netns/ipcns may not mount these: bind
                # the host's instead, read-only, as runc does.
                host = "/sys" if mtype == "sysfs" else "/dev/mqueue"
                sc.mount(host, fd_path(fd), None, S.MS_BIND | S.MS_REC, None)
                _remount_bind(sc, fd_path(fd), opts.flags | S.MS_RDONLY)
        finally:
            os.close(fd)
    for p in opts.propagation:
        fd = open_in_root(sc, ctx.rootfd, m.destination)
        try:
            sc.mount(None, fd_path(fd), None, p, None)
        finally:
            os.close(fd)


def _mount_cgroup(sc: S.Linux, m: Mount, opts: MountOptions, ctx: MountContext) -> None:
    ro = opts.flags & S.MS_RDONLY
    base = opts.flags & ~(S.MS_BIND | S.MS_REC | S.MS_REMOUNT)
    fd = ensure_path(sc, ctx.rootfd, m.destination, True)
    try:
        if os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
            # Pure cgroup v2: inside a cgroup namespace a fresh mount shows our cgroup as "/".
            if ctx.cgroupns:
                sc.mount("cgroup2", fd_path(fd), "cgroup2", base, None)
            else:
                sc.mount(ctx.cgroup_paths.get("", "/sys/fs/cgroup"), fd_path(fd), None,
                         S.MS_BIND | S.MS_REC, None)
                if ro:
                    _remount_bind(sc, fd_path(fd), base | S.MS_RDONLY)
            return
        # v1 or hybrid: a tmpfs with one bind mount per hierarchy, each showing only the
        # container's own cgroup directory (what runc does without cgroupns support on v1).
        sc.mount("tmpfs", fd_path(fd), "tmpfs", base & ~S.MS_RDONLY, "mode=755")
    finally:
        os.close(fd)
    for ctrl, host_dir in sorted(ctx.cgroup_paths.items()):
        name = ctrl or "unified"
        sub = m.destination.rstrip("/") + "/" + name
        sfd = ensure_path(sc, ctx.rootfd, sub, True)
        try:
            sc.mount(host_dir, fd_path(sfd), None, S.MS_BIND | S.MS_REC, None)
        finally:
            os.close(sfd)
        sfd = open_in_root(sc, ctx.rootfd, sub)
        try:
            _remount_bind(sc, fd_path(sfd), base | (S.MS_RDONLY if ro else 0))
        finally:
            os.close(sfd)
    if ro:
        fd = open_in_root(sc, ctx.rootfd, m.destination)
        try:
            sc.mount(None, fd_path(fd), None, S.MS_REMOUNT | S.MS_RDONLY | base, "mode=755")
        finally:
            os.close(fd)


# --- devices --------------------------------------------------------------------------------

def create_device(sc: S.Linux, d: Device, ctx: MountContext) -> None:
    import stat
    kind = {"c": stat.S_IFCHR, "u": stat.S_IFCHR, "b": stat.S_IFBLK, "p": stat.S_IFIFO}[d.type]
    mode = d.file_mode if d.file_mode is not None else 0o666
    parent_path, name = d.path.rsplit("/", 1)
    pfd = ensure_path(sc, ctx.rootfd, parent_path or "/", True)
    try:
        try:
            st = os.stat(name, dir_fd=pfd, follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, f"device path {d.path!r} is a directory")
            os.unlink(name, dir_fd=pfd)
        except FileNotFoundError:
            pass
        if ctx.userns:
            # mknod is refused in a user namespace: bind the host's node over an empty file.
            os.close(os.open(name, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW |
                             os.O_CLOEXEC, 0o644, dir_fd=pfd))
            fd = open_in_root(sc, ctx.rootfd, d.path)
            try:
                sc.mount(d.path, fd_path(fd), None, S.MS_BIND, None)
            finally:
                os.close(fd)
            return
        # mknod's mode is filtered by the umask; chmod afterwards gives the exact fileMode.
        os.mknod(name, kind | (mode & 0o7777), os.makedev(d.major, d.minor), dir_fd=pfd)
        os.chmod(name, mode & 0o7777, dir_fd=pfd)
        if d.uid is not None or d.gid is not None:
            os.chown(name, d.uid if d.uid is not None else -1,
                     d.gid if d.gid is not None else -1, dir_fd=pfd, follow_symlinks=False)
    finally:
        os.close(pfd)


def setup_dev(sc: S.Linux, spec: Spec, ctx: MountContext) -> None:
    """Default devices, spec devices, /dev symlinks and /dev/ptmx."""
    dev_bound = any(m.destination.rstrip("/") == "/dev" and
                    ("bind" in m.options or "rbind" in m.options or m.type == "bind")
                    for m in spec.mounts)
    if dev_bound:
        return
    given = {d.path for d in spec.linux.devices}
    for path, major, minor in DEFAULT_DEVICES:
        if path not in given:
            create_device(sc, Device(type="c", path=path, major=major, minor=minor,
                                     file_mode=0o666, uid=0, gid=0), ctx)
    for d in spec.linux.devices:
        create_device(sc, d, ctx)
    dfd = ensure_path(sc, ctx.rootfd, "/dev", True)
    try:
        links = list(DEV_SYMLINKS)
        if os.path.exists("/proc/kcore"):
            links.append(("/proc/kcore", "/dev/core"))
        if any(m.destination.rstrip("/") == "/dev/pts" for m in spec.mounts):
            links.append(("pts/ptmx", "/dev/ptmx"))
        for target, link in links:
            name = link.rsplit("/", 1)[1]
            if name == "ptmx":
                try:
                    os.unlink(name, dir_fd=dfd)
                except FileNotFoundError:
                    pass
            try:
                os.symlink(target, name, dir_fd=dfd)
            except FileExistsError:
                pass
    finally:
        os.close(dfd)


# --- the root itself ------------------------------------------------------------------------

def _mount_point_of(path: str) -> str:
    best = "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split(" ", 5)[4].replace("\\040", " ")
            if (path == mp or path.startswith(mp.rstrip("/") + "/")) and len(mp) > len(best):
                best = mp
    return best


def prepare_root(sc: S.Linux, rootfs: str, propagation: str | None) -> None:
    """Stop our mounts from propagating to the host and make rootfs a mount point."""
    flag = PROPAGATION.get(propagation or "", 0)
    if flag & (S.MS_SHARED | S.MS_PRIVATE | S.MS_UNBINDABLE) == 0 or not flag:
        flag = S.MS_SLAVE | S.MS_REC  # runc's default; "shared" is applied after pivot
    elif flag & S.MS_SHARED:
        flag = S.MS_SLAVE | S.MS_REC
    sc.mount(None, "/", None, flag, None)
    if not flag & S.MS_REC:
        # pivot_root refuses a new root whose parent mount is shared; after a recursive
        # change above no mount is shared any more, and mountinfo need not be read.
        sc.mount(None, _mount_point_of(os.path.dirname(rootfs) or "/"), None, S.MS_PRIVATE,
                 None)
    sc.mount(rootfs, rootfs, None, S.MS_BIND | S.MS_REC, None)


def pivot(sc: S.Linux, rootfs: str, no_pivot: bool) -> None:
    """Make rootfs "/" and leave the cwd at "/" inside it."""
    if no_pivot:
        # For a root on initramfs, which pivot_root refuses: move the mount over "/" + chroot.
        os.chdir(rootfs)
        sc.mount(rootfs, "/", None, S.MS_MOVE, None)
        sc.chroot(".")
        os.chdir("/")
        return
    old = os.open("/", os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    new = os.open(rootfs, os.O_DIRECTORY | os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fchdir(new)
        sc.pivot_root(".", ".")
        # The old root now sits on top of the new one at "/": detach it without letting the
        # unmount propagate to the host.
        os.fchdir(old)
        sc.mount(None, ".", None, S.MS_SLAVE | S.MS_REC, None)
        sc.umount2(".", S.MNT_DETACH)
    finally:
        os.close(old)
        os.close(new)
    os.chdir("/")


def after_pivot_propagation(sc: S.Linux, propagation: str | None) -> None:
    if propagation in ("shared", "rshared", "private", "rprivate", "unbindable",
                       "runbindable"):
        sc.mount(None, "/", None, PROPAGATION[propagation], None)


def mask_paths(sc: S.Linux, paths: list[str]) -> None:
    """Hide paths: directories under an empty read-only tmpfs, files under /dev/null (ro)."""
    for p in paths:
        try:
            isdir = os.path.isdir(p) and not os.path.islink(p)
            if isdir:
                sc.mount("tmpfs", p, "tmpfs", S.MS_RDONLY, None)
            else:
                if not os.path.lexists(p):
                    continue
                sc.mount("/dev/null", p, None, S.MS_BIND, None)
                sc.mount(None, p, None, S.MS_BIND | S.MS_REMOUNT | S.MS_RDONLY |
                         _locked_flags(p), None)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OSError(e.errno, f"masking {p!r}: {e.strerror}") from None


def readonly_paths(sc: S.Linux, paths: list[str]) -> None:
    for p in paths:
        if not os.path.lexists(p):
            continue
        try:
            sc.mount(p, p, None, S.MS_BIND | S.MS_REC, None)
            sc.mount(None, p, None, S.MS_BIND | S.MS_REMOUNT | S.MS_RDONLY | S.MS_REC |
                     _locked_flags(p), None)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OSError(e.errno, f"making {p!r} read-only: {e.strerror}") from None


def readonly_root(sc: S.Linux) -> None:
    sc.mount(None, "/", None, S.MS_BIND | S.MS_REMOUNT | S.MS_RDONLY | _locked_flags("/"), None)


def write_sysctls(sysctl: dict[str, str]) -> None:
    for key, value in sysctl.items():
        path = "/proc/sys/" + key.replace(".", "/")
        if ".." in key.split("."):
            raise ValueError(f"linux.sysctl: bad key {key!r}")
        try:
            with open(path, "w") as f:
                f.write(value)
        except OSError as e:
            raise OSError(e.errno, f"linux.sysctl {key}={value!r}: {e.strerror}") from None
