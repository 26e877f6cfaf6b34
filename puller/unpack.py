"""Apply an uncompressed OCI layer tar stream to a directory, safely.

Two targets (`WhiteoutMode`):
- OVERLAY: `dest` is an empty layer directory that will later be an overlayfs lower layer.
  Whiteouts are recorded the way overlayfs reads them: `.wh.NAME` becomes a 0/0 character
  device NAME, `.wh..wh..opq` sets `trusted.overlay.opaque=y` on its directory.
- DELETE: `dest` is a merged root filesystem (the copy fallback); whiteouts delete what lower
  layers put there. Entries this layer itself created are never deleted by its own whiteouts
  (image-spec: a whiteout hides only lower layers).

Every path from the archive is resolved beneath `dest` (see fsutil.Root); the last component of
a path is never followed, so a symlink in the archive can redirect nothing. Metadata is applied
through fds of the node we created (or with AT_SYMLINK_NOFOLLOW), in the order that survives the
kernel's side effects: chown (clears setuid and security.capability), chmod, xattrs, times.
Directory times are set at the end, after their children stopped changing them.

On an error the destination is left partly written; the caller owns it (a staging dir) and
discards it.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from dataclasses import dataclass
from typing import BinaryIO

from . import fsutil
from .tarstream import (
    BLK, CHR, DIR, FIFO, LNK, REGULAR_TYPES, SYM, Member, TarFormatError, TarReader,
)

WHITEOUT_PREFIX = ".wh."
OPAQUE_MARKER = ".wh..wh..opq"
OVERLAY_OPAQUE_XATTR = "trusted.overlay.opaque"
_MAX_CACHED_DIRS = 256
_ID_NONE = 0xFFFFFFFF  # (uid_t)-1 means "leave unchanged" to chown


class WhiteoutMode(enum.Enum):
    OVERLAY = "overlay"
    DELETE = "delete"


@dataclass(frozen=True)
class Limits:
    """Caps against decompression bombs and hostile metadata."""

    max_bytes: int = 64 << 30  # uncompressed tar stream bytes read
    max_entries: int = 4_000_000
    max_meta: int = 1 << 20  # one pax / GNU long-name header
    max_path: int = 4096


@dataclass
class LayerStats:
    entries: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    hardlinks: int = 0
    devices: int = 0
    fifos: int = 0
    whiteouts: int = 0
    opaque_dirs: int = 0
    bytes: int = 0  # regular file data written
    tar_bytes: int = 0  # uncompressed stream bytes read, trailing padding included
    xattrs: int = 0
    xattrs_unsupported: int = 0
    clean_end: bool = True  # False when the archive lacked its end-of-archive blocks


class UnpackError(Exception):
    """A layer was refused; `layer` and `member` say which, `reason` why."""

    def __init__(self, layer: str, member: str | None, reason: str):
        self.layer = layer
        self.member = member
        self.reason = reason
        where = f"member {member!r}" if member is not None else "archive"
        super().__init__(f"layer {layer}: {where}: {reason}")


def unpack_layer(
    stream: BinaryIO,
    dest: str | os.PathLike,
    *,
    layer: str = "layer",
    whiteouts: WhiteoutMode = WhiteoutMode.OVERLAY,
    limits: Limits = Limits(),
    drain: bool = True,
    use_openat2: bool | None = None,
) -> LayerStats:
    """Apply the tar stream to `dest` (an existing directory); return what was written.

    `stream` only needs `read(n)`. With `drain` the stream is read to its end after the
    end-of-archive marker, so a hash computed by the caller over the stream is complete.
    """
    with fsutil.Root(dest, use_openat2=use_openat2) as root:
        applier = _Applier(root, layer, whiteouts, limits)
        try:
            return applier.run(TarReader(stream, max_bytes=limits.max_bytes,
                                         max_meta=limits.max_meta), drain)
        finally:
            applier.close()


class _Refused(Exception):
    pass


def clean_name(name: str, max_path: int) -> str:
    """Archive path -> path relative to the root, or _Refused. Refuses rather than repairs."""
    n = name[2:] if name.startswith("./") else name
    n = n.rstrip("/")
    # fast path for the usual "./usr/bin/x": nothing that could be "", ".", ".." or absolute
    if (n and n[0] not in "./" and "/." not in n and "//" not in n and "\0" not in n
            and len(name) <= max_path):
        return n
    if "\0" in name:
        raise _Refused("NUL byte in path")
    if len(name) > max_path:
        raise _Refused(f"path longer than {max_path} bytes")
    if name.startswith("/"):
        raise _Refused("absolute path")
    parts = [c for c in name.split("/") if c and c != "."]
    if ".." in parts:
        raise _Refused("'..' component in path")
    return "/".join(parts)


class _Applier:
    def __init__(self, root: fsutil.Root, layer: str, mode: WhiteoutMode, limits: Limits):
        self.root = root
        self.layer = layer
        self.mode = mode
        self.limits = limits
        self.stats = LayerStats()
        # resolved directories by relative path; dropped on any removal, since a removed dir
        # or symlink may be a component of a cached path
        self.dirs: dict[str, int] = {}
        self.dir_times: dict[str, tuple[int, int]] = {}
        self.created: set[str] = set()  # DELETE mode: paths this layer put there

    def close(self) -> None:
        self._forget_dirs()

    def _forget_dirs(self) -> None:
        for fd in self.dirs.values():
            os.close(fd)
        self.dirs.clear()

    # --- main loop ---

    def run(self, reader: TarReader, drain: bool) -> LayerStats:
        st = self.stats
        m: Member | None = None
        try:
            while True:
                m = None
                m = reader.next()
                if m is None:
                    break
                st.entries += 1
                if st.entries > self.limits.max_entries:
                    raise _Refused(f"layer has more than {self.limits.max_entries} entries")
                self._apply(m, reader)
            st.clean_end = reader.ended_cleanly
            if drain:
                reader.drain()
            self._set_dir_times()
        except _Refused as e:
            raise UnpackError(self.layer, m.name if m else None, str(e)) from None
        except TarFormatError as e:
            member = m.name if m is not None else e.name
            if member is None:
                member = f"<header at offset {e.offset}>"
            raise UnpackError(self.layer, member, str(e)) from None
        except (OverflowError, ValueError) as e:  # numbers the kernel interface cannot take
            raise UnpackError(self.layer, m.name if m else None, str(e)) from None
        except OSError as e:
            what = e.strerror or str(e)
            raise UnpackError(self.layer, m.name if m else None, f"{what} (errno {e.errno})") from e
        st.tar_bytes = reader.bytes_read
        return st

    def _apply(self, m: Member, reader: TarReader) -> None:
        if len(self.dirs) > _MAX_CACHED_DIRS:
            # only here, between members: no fd from the cache is in use by a caller
            self._forget_dirs()
        rel = clean_name(m.name, self.limits.max_path)
        if not (0 <= m.uid < _ID_NONE and 0 <= m.gid < _ID_NONE):
            raise _Refused(f"uid/gid {m.uid}/{m.gid} out of range")
        if not rel:
            if m.type != DIR:
                raise _Refused("the archive root is not a directory")
            self._meta_fd(self.root.fd, m)
            self.dir_times[""] = (m.atime_ns if m.atime_ns is not None else m.mtime_ns, m.mtime_ns)
            return
        parent, _, base = rel.rpartition("/")
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parent, base)
            return
        typ = m.type
        if typ in REGULAR_TYPES:
            self._file(m, parent, base, reader)
        elif typ == DIR:
            self._dir(m, rel, parent, base)
        elif typ == SYM:
            self._symlink(m, parent, base)
        elif typ == LNK:
            self._hardlink(m, rel, parent, base)
        elif typ in (CHR, BLK, FIFO):
            self._node(m, parent, base)
        else:
            raise _Refused(f"unsupported tar entry type {typ!r}")
        if self.mode is WhiteoutMode.DELETE:
            self.created.add(rel)

    # --- directories on the way ---

    def _parent(self, rel: str) -> int:
        """fd of directory `rel` (cached), creating missing components with mode 0755."""
        fd = self.dirs.get(rel)
        if fd is not None:
            return fd
        try:
            fd = self.root.open_dir(rel)
        except FileNotFoundError:
            up, _, base = rel.rpartition("/")
            pfd = self._parent(up)
            try:
                os.mkdir(base, 0o755, dir_fd=pfd)
                if self.mode is WhiteoutMode.DELETE:
                    self.created.add(rel)
            except FileExistsError:
                pass
            fd = self.root.open_dir(rel)
        except fsutil.EscapeError:
            raise _Refused(f"parent directory {rel!r} resolves outside the layer root "
                           "(through a symlink)") from None
        except NotADirectoryError:
            raise _Refused(f"parent {rel!r} is not a directory") from None
        self.dirs[rel] = fd
        return fd

    def _remove(self, pfd: int, base: str, st: os.stat_result) -> None:
        """Later entry wins: whatever is at base goes, a directory with its contents."""
        if stat.S_ISDIR(st.st_mode):
            fsutil.rmtree_at(pfd, base)
        else:
            os.unlink(base, dir_fd=pfd)
        self._forget_dirs()

    # --- entry types ---

    def _file(self, m: Member, parent: str, base: str, reader: TarReader) -> None:
        pfd = self._parent(parent)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(base, flags, 0o600, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, base, os.lstat(base, dir_fd=pfd))
            pfd = self._parent(parent)
            fd = os.open(base, flags, 0o600, dir_fd=pfd)
        try:
            if m.size:
                self.stats.bytes += reader.copy_data(fd)
            self._meta_fd(fd, m)
            os.utime(fd, ns=(m.atime_ns if m.atime_ns is not None else m.mtime_ns, m.mtime_ns))
        finally:
            os.close(fd)
        self.stats.files += 1

    def _dir(self, m: Member, rel: str, parent: str, base: str) -> None:
        pfd = self._parent(parent)
        opaque = False
        try:
            os.mkdir(base, 0o700, dir_fd=pfd)
        except FileExistsError:
            st = os.lstat(base, dir_fd=pfd)
            if not stat.S_ISDIR(st.st_mode):
                # a directory over this layer's own whiteout: lower content must stay hidden
                opaque = self.mode is WhiteoutMode.OVERLAY and _is_whiteout(st)
                self._remove(pfd, base, st)
                pfd = self._parent(parent)
                os.mkdir(base, 0o700, dir_fd=pfd)
        fd = os.open(base, fsutil.DIR_FLAGS | os.O_NOFOLLOW, dir_fd=pfd)
        try:
            self._meta_fd(fd, m)
            if opaque:
                os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
        except BaseException:
            os.close(fd)
            raise
        # keep it: its children usually follow (resolved beneath, so it is what `rel` means)
        old = self.dirs.pop(rel, None)
        if old is not None:
            os.close(old)
        self.dirs[rel] = fd
        self.dir_times[rel] = (m.atime_ns if m.atime_ns is not None else m.mtime_ns, m.mtime_ns)
        self.stats.dirs += 1

    def _symlink(self, m: Member, parent: str, base: str) -> None:
        if not m.linkname:
            raise _Refused("symlink with an empty target")
        pfd = self._parent(parent)
        try:
            os.symlink(m.linkname, base, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, base, os.lstat(base, dir_fd=pfd))
            pfd = self._parent(parent)
            os.symlink(m.linkname, base, dir_fd=pfd)
        os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
        self._xattrs_at(pfd, base, m)
        at = m.atime_ns if m.atime_ns is not None else m.mtime_ns
        os.utime(base, ns=(at, m.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        self.stats.symlinks += 1

    def _hardlink(self, m: Member, rel: str, parent: str, base: str) -> None:
        try:
            target = clean_name(m.linkname, self.limits.max_path)
        except _Refused as e:
            raise _Refused(f"hardlink target {m.linkname!r}: {e}") from None
        if not target:
            raise _Refused("hardlink to the archive root")
        if target == rel:
            return  # a link to itself: nothing to do (some writers emit these)
        tparent, _, tbase = target.rpartition("/")
        try:
            tpfd = self._parent_existing(tparent)
            tst = os.lstat(tbase, dir_fd=tpfd)
        except FileNotFoundError:
            raise _Refused(f"hardlink target {m.linkname!r} does not exist in this layer") from None
        if stat.S_ISDIR(tst.st_mode):
            raise _Refused(f"hardlink target {m.linkname!r} is a directory")
        pfd = self._parent(parent)
        try:
            os.link(tbase, base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
        except FileExistsError:
            st = os.lstat(base, dir_fd=pfd)
            if st.st_ino == tst.st_ino and st.st_dev == tst.st_dev:
                return
            self._remove(pfd, base, st)
            pfd = self._parent(parent)
            tpfd = self._parent_existing(tparent)
            os.link(tbase, base, src_dir_fd=tpfd, dst_dir_fd=pfd, follow_symlinks=False)
        self.stats.hardlinks += 1

    def _parent_existing(self, rel: str) -> int:
        fd = self.dirs.get(rel)
        if fd is not None:
            return fd
        try:
            fd = self.root.open_dir(rel)
        except fsutil.EscapeError:
            raise _Refused(f"directory {rel!r} resolves outside the layer root") from None
        self.dirs[rel] = fd
        return fd

    def _node(self, m: Member, parent: str, base: str) -> None:
        if m.type == FIFO:
            kind, dev = stat.S_IFIFO, 0
        else:
            kind = stat.S_IFCHR if m.type == CHR else stat.S_IFBLK
            dev = os.makedev(m.devmajor, m.devminor)
        pfd = self._parent(parent)
        try:
            os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
        except FileExistsError:
            self._remove(pfd, base, os.lstat(base, dir_fd=pfd))
            pfd = self._parent(parent)
            os.mknod(base, kind | 0o600, dev, dir_fd=pfd)
        # O_PATH: opening a device node for real could have side effects
        fd = os.open(base, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=pfd)
        try:
            if stat.S_IFMT(os.fstat(fd).st_mode) != kind:
                raise _Refused("node changed under us")
            os.chown(base, m.uid, m.gid, dir_fd=pfd, follow_symlinks=False)
            try:
                os.chmod(f"/proc/self/fd/{fd}", m.mode)
            except FileNotFoundError:  # no /proc: by name; it was checked not to be a symlink
                os.chmod(base, m.mode, dir_fd=pfd)
            self._xattrs_at(pfd, base, m)
            at = m.atime_ns if m.atime_ns is not None else m.mtime_ns
            os.utime(base, ns=(at, m.mtime_ns), dir_fd=pfd, follow_symlinks=False)
        finally:
            os.close(fd)
        if m.type == FIFO:
            self.stats.fifos += 1
        else:
            self.stats.devices += 1

    # --- metadata ---

    def _meta_fd(self, fd: int, m: Member) -> None:
        os.fchown(fd, m.uid, m.gid)
        os.fchmod(fd, m.mode)
        for k, v in m.xattrs.items():
            self._check_xattr(k)
            try:
                os.setxattr(fd, k, v)
                self.stats.xattrs += 1
            except OSError as e:
                if e.errno != errno.EOPNOTSUPP:
                    raise
                self.stats.xattrs_unsupported += 1

    def _xattrs_at(self, pfd: int, base: str, m: Member) -> None:
        for k, v in m.xattrs.items():
            self._check_xattr(k)
            try:
                os.setxattr(f"/proc/self/fd/{pfd}/{base}", k, v, follow_symlinks=False)
                self.stats.xattrs += 1
            except OSError as e:
                # user.* is not allowed on symlinks and device nodes
                if e.errno not in (errno.EOPNOTSUPP, errno.EPERM):
                    raise
                self.stats.xattrs_unsupported += 1

    @staticmethod
    def _check_xattr(key: str) -> None:
        # overlay's own attributes would let a layer redirect or hide lower content
        if key.startswith("trusted.overlay.") or key.startswith("user.overlay."):
            raise _Refused(f"layer sets overlayfs-private xattr {key!r}")

    def _set_dir_times(self) -> None:
        for rel, (at, mt) in self.dir_times.items():
            try:
                fd = self.root.open_dir(rel, nofollow_last=True)
            except (FileNotFoundError, NotADirectoryError, fsutil.EscapeError):
                continue  # replaced or whited out later in the archive
            except OSError as e:
                if e.errno == errno.ELOOP:
                    continue
                raise
            try:
                os.utime(fd, ns=(at, mt))
            finally:
                os.close(fd)

    # --- whiteouts ---

    def _whiteout(self, parent: str, base: str) -> None:
        if base == OPAQUE_MARKER:
            self.stats.opaque_dirs += 1
            if self.mode is WhiteoutMode.OVERLAY:
                os.setxattr(self._parent(parent), OVERLAY_OPAQUE_XATTR, b"y")
            else:
                self._delete_lower_children(parent)
            return
        name = base[len(WHITEOUT_PREFIX):]
        if name.startswith(WHITEOUT_PREFIX):
            return  # other aufs metadata (.wh..wh.plnk, .wh..wh.aufs): not content
        if name in ("", ".", ".."):
            raise _Refused(f"whiteout for invalid name {name!r}")
        self.stats.whiteouts += 1
        target = f"{parent}/{name}" if parent else name
        if self.mode is WhiteoutMode.OVERLAY:
            pfd = self._parent(parent)
            try:
                os.mknod(name, stat.S_IFCHR | 0o600, os.makedev(0, 0), dir_fd=pfd)
            except PermissionError:
                raise _Refused("cannot record a whiteout (mknod 0/0 refused: no CAP_MKNOD, or "
                               "the layer store is itself on overlayfs)") from None
            except FileExistsError:
                # this layer has its own `name`; it stays, and lower content under it must not
                # show through
                st = os.lstat(name, dir_fd=pfd)
                if stat.S_ISDIR(st.st_mode):
                    fd = os.open(name, fsutil.DIR_FLAGS | os.O_NOFOLLOW, dir_fd=pfd)
                    try:
                        os.setxattr(fd, OVERLAY_OPAQUE_XATTR, b"y")
                    finally:
                        os.close(fd)
            return
        if target in self.created:
            return
        try:
            pfd = self._parent_existing(parent)
        except (FileNotFoundError, NotADirectoryError):
            return  # nothing below to hide
        try:
            st = os.lstat(name, dir_fd=pfd)
        except FileNotFoundError:
            return
        self._remove(pfd, name, st)

    def _delete_lower_children(self, parent: str) -> None:
        pfd = self._parent(parent)
        prefix = f"{parent}/" if parent else ""
        doomed = [n for n in os.listdir(pfd) if prefix + n not in self.created]
        for n in doomed:
            fsutil.rmtree_at(pfd, n)
        if doomed:
            self._forget_dirs()


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
