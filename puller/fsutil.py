"""Thin layer over the system calls the unpacker, store and snapshots need.

Everything that touches a path chosen by untrusted input goes through `Root`, which resolves
paths strictly beneath a directory fd: openat2(RESOLVE_BENEATH) where the kernel has it (5.6+),
otherwise a component-by-component walk with O_NOFOLLOW that follows relative symlinks only
while they stay inside the root. Both refuse absolute symlinks and any escape with EscapeError,
rather than reinterpreting them relative to the root: a layer that tries is hostile.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat

_libc = ctypes.CDLL(None, use_errno=True)

# openat2 has the same number on every architecture that has it (it came after the syscall
# table unification).
_SYS_openat2 = 437
RESOLVE_NO_XDEV = 0x01
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08

AT_FDCWD = -100
RENAME_NOREPLACE = 1

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
MAX_SYMLINKS = 40


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class EscapeError(OSError):
    """A path resolved to somewhere outside the root (through `..` or a symlink)."""


def _openat2(dirfd: int, path: str, flags: int, resolve: int) -> int:
    how = _OpenHow(flags, 0, resolve)
    bpath = os.fsencode(path)
    for _ in range(16):
        fd = _libc.syscall(ctypes.c_long(_SYS_openat2), ctypes.c_long(dirfd), bpath,
                           ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return fd
        err = ctypes.get_errno()
        # EAGAIN: a rename raced the BENEATH check; the kernel asks us to retry.
        if err in (errno.EAGAIN, errno.EINTR):
            continue
        if err == errno.EXDEV:
            raise EscapeError(err, "path escapes the root", path)
        raise OSError(err, os.strerror(err), path)
    raise OSError(errno.EAGAIN, "openat2 kept racing with renames", path)


def _probe_openat2() -> bool:
    try:
        fd = _openat2(AT_FDCWD, "/", DIR_FLAGS, RESOLVE_BENEATH)
    except EscapeError:
        return True  # "/" from cwd is absolute: refused, so the call itself exists
    except OSError as e:
        return e.errno not in (errno.ENOSYS, errno.EPERM)  # EPERM: seccomp filtered it
    os.close(fd)
    return True


HAVE_OPENAT2 = _probe_openat2()


def split_components(rel: str) -> list[str]:
    return [c for c in rel.split("/") if c and c != "."]


class Root:
    """A directory fd under which every lookup is confined.

    `open_dir(rel)` returns a new fd (caller closes) for the directory `rel` inside the root;
    symlinks among the components are followed only while they stay inside.
    """

    def __init__(self, path: str | os.PathLike, *, use_openat2: bool | None = None):
        self.path = os.fspath(path)
        self.fd = os.open(self.path, DIR_FLAGS | os.O_NOFOLLOW)
        self.use_openat2 = HAVE_OPENAT2 if use_openat2 is None else use_openat2

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "Root":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open_dir(self, rel: str, *, nofollow_last: bool = False) -> int:
        """Open directory `rel` beneath the root; with nofollow_last a symlink as the last
        component fails with ELOOP/ENOTDIR instead of being followed."""
        if not split_components(rel):
            return os.dup(self.fd)
        if self.use_openat2:
            flags = DIR_FLAGS | (os.O_NOFOLLOW if nofollow_last else 0)
            return _openat2(self.fd, rel, flags, RESOLVE_BENEATH | RESOLVE_NO_MAGICLINKS)
        return self._walk(rel, nofollow_last)

    def _walk(self, rel: str, nofollow_last: bool = False) -> int:
        """Resolve `rel` one component at a time, never trusting the kernel to follow links.

        A stack of fds stands for the path walked so far, so `..` pops (and cannot pop past the
        root) and a relative symlink continues from its own directory.
        """
        if rel.startswith("/"):
            raise EscapeError(errno.EXDEV, "absolute path", rel)
        todo = split_components(rel)
        todo.reverse()
        stack = [os.dup(self.fd)]
        links = 0
        try:
            while todo:
                comp = todo.pop()
                if comp == "..":
                    if len(stack) == 1:
                        raise EscapeError(errno.EXDEV, "path escapes the root", rel)
                    os.close(stack.pop())
                    continue
                try:
                    fd = os.open(comp, DIR_FLAGS | os.O_NOFOLLOW, dir_fd=stack[-1])
                except OSError as e:
                    if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = os.lstat(comp, dir_fd=stack[-1])
                    if not stat.S_ISLNK(st.st_mode) or (nofollow_last and not todo):
                        raise
                    links += 1
                    if links > MAX_SYMLINKS:
                        raise OSError(errno.ELOOP, "too many symlinks", rel) from None
                    target = os.readlink(comp, dir_fd=stack[-1])
                    if target.startswith("/"):
                        raise EscapeError(errno.EXDEV, "absolute symlink in path", rel) from None
                    parts = split_components(target)
                    parts.reverse()
                    todo.extend(parts)
                    continue
                stack.append(fd)
            return stack.pop()
        finally:
            for fd in stack:
                os.close(fd)


# --- small wrappers --------------------------------------------------------------------------

def rename_noreplace(src: str, dst: str) -> None:
    """rename(2) that fails with EEXIST instead of replacing an existing (empty) directory."""
    res = _libc.renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE)
    if res != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL) and not os.path.lexists(dst):
            os.rename(src, dst)  # filesystem without RENAME_NOREPLACE; we hold the lock anyway
            return
        raise OSError(err, os.strerror(err), f"{src} -> {dst}")


MS_RDONLY = 1
MS_NOSUID = 2
MS_NODEV = 4
MNT_DETACH = 2


def mount(source: str, target: str, fstype: str, flags: int = 0, data: str | None = None) -> None:
    res = _libc.mount(
        os.fsencode(source), os.fsencode(target), os.fsencode(fstype), ctypes.c_ulong(flags),
        os.fsencode(data) if data is not None else None,
    )
    if res != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def umount(target: str, flags: int = 0) -> None:
    if _libc.umount2(os.fsencode(target), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")


def is_mountpoint(path: str) -> bool:
    try:
        with open("/proc/self/mountinfo", "rb") as f:
            want = os.fsencode(os.path.realpath(path))
            for line in f:
                # field 5 is the mount point, with spaces etc. octal-escaped
                mp = line.split(b" ")[4]
                if mp == want or _unescape(mp) == want:
                    return True
    except FileNotFoundError:
        return os.path.ismount(path)
    return False


def _unescape(b: bytes) -> bytes:
    if b"\\" not in b:
        return b
    out = bytearray()
    i = 0
    while i < len(b):
        if b[i] == 0x5C and i + 4 <= len(b) and b[i + 1:i + 4].isdigit():
            out.append(int(b[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(b[i])
            i += 1
    return bytes(out)


def rmtree_at(dirfd: int, name: str) -> None:
    """Remove `name` in `dirfd` whatever it is, never following symlinks."""
    import shutil

    try:
        st = os.lstat(name, dir_fd=dirfd)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(name, dir_fd=dirfd)
    else:
        os.unlink(name, dir_fd=dirfd)


def rmtree_at_path(path: str | os.PathLike) -> None:
    """Remove a file, symlink or directory tree at `path` without following symlinks."""
    path = os.fspath(path)
    parent, name = os.path.split(path.rstrip("/"))
    fd = os.open(parent or ".", DIR_FLAGS)
    try:
        rmtree_at(fd, name)
    finally:
        os.close(fd)
