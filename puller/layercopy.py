"""Copy an unpacked layer directory onto a merged root, applying its overlay-style whiteouts.

Used where overlayfs is missing: the snapshot is the plain result of stacking the layers. The
layer holds whiteouts as overlayfs stores them (0/0 character device, `trusted.overlay.opaque`);
here they become deletions. Every directory on both sides is walked by fd opened with
O_NOFOLLOW, so a symlink from a lower layer in the destination can never redirect a write.
"""

from __future__ import annotations

import errno
import os
import stat

from . import fsutil

OPAQUE_XATTR = "trusted.overlay.opaque"
_COPY_CHUNK = 1 << 30


def copy_layer(layer_dir: str | os.PathLike, dest: str | os.PathLike) -> None:
    sfd = os.open(layer_dir, fsutil.DIR_FLAGS | os.O_NOFOLLOW)
    try:
        with fsutil.Root(dest) as root:
            links: dict[tuple[int, int], str] = {}
            _copy_dir(sfd, root.fd, "", root, links)
            _copy_meta_fd(sfd, root.fd)
    finally:
        os.close(sfd)


def _lstat_or_none(name: str, dfd: int) -> os.stat_result | None:
    try:
        return os.lstat(name, dir_fd=dfd)
    except FileNotFoundError:
        return None


def _copy_dir(sfd: int, dfd: int, rel: str, root: fsutil.Root, links: dict) -> None:
    with os.scandir(sfd) as it:
        entries = list(it)
    for e in entries:
        name = e.name
        st = e.stat(follow_symlinks=False)
        mode = st.st_mode
        child = f"{rel}/{name}" if rel else name
        have = _lstat_or_none(name, dfd)
        if stat.S_ISCHR(mode) and st.st_rdev == 0:  # whiteout
            if have is not None:
                fsutil.rmtree_at(dfd, name)
            continue
        if stat.S_ISDIR(mode):
            csfd = os.open(name, fsutil.DIR_FLAGS | os.O_NOFOLLOW, dir_fd=sfd)
            try:
                if have is not None and stat.S_ISDIR(have.st_mode):
                    if _is_opaque(csfd):
                        _clear_dir(dfd, name)
                else:
                    if have is not None:
                        fsutil.rmtree_at(dfd, name)
                    os.mkdir(name, 0o700, dir_fd=dfd)
                cdfd = os.open(name, fsutil.DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dfd)
                try:
                    _copy_dir(csfd, cdfd, child, root, links)
                    _copy_meta_fd(csfd, cdfd)
                finally:
                    os.close(cdfd)
            finally:
                os.close(csfd)
            continue
        if have is not None:
            fsutil.rmtree_at(dfd, name)
        if stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            first = links.get(key) if st.st_nlink > 1 else None
            if first is not None and _link_to(root, first, dfd, name):
                continue
            _copy_file(sfd, dfd, name)
            if st.st_nlink > 1:
                links[key] = child
        elif stat.S_ISLNK(mode):
            os.symlink(os.readlink(name, dir_fd=sfd), name, dir_fd=dfd)
            os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
            _copy_xattrs_path(f"/proc/self/fd/{sfd}/{name}", f"/proc/self/fd/{dfd}/{name}")
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd,
                     follow_symlinks=False)
        else:  # fifo, device, socket
            os.mknod(name, stat.S_IFMT(mode) | 0o600, st.st_rdev, dir_fd=dfd)
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            try:
                os.chown(name, st.st_uid, st.st_gid, dir_fd=dfd, follow_symlinks=False)
                os.chmod(f"/proc/self/fd/{fd}", stat.S_IMODE(mode))
            finally:
                os.close(fd)
            _copy_xattrs_path(f"/proc/self/fd/{sfd}/{name}", f"/proc/self/fd/{dfd}/{name}")
            os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dfd,
                     follow_symlinks=False)


def _link_to(root: fsutil.Root, first: str, dfd: int, name: str) -> bool:
    parent, _, base = first.rpartition("/")
    try:
        pfd = root.open_dir(parent)
    except OSError:
        return False
    try:
        os.link(base, name, src_dir_fd=pfd, dst_dir_fd=dfd, follow_symlinks=False)
        return True
    except OSError:
        return False  # the first copy was replaced meanwhile: copy the data instead
    finally:
        os.close(pfd)


def _copy_file(sfd: int, dfd: int, name: str) -> None:
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=sfd)
    try:
        dst = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                      0o600, dir_fd=dfd)
        try:
            _copy_data(src, dst)
            _copy_meta_fd(src, dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_data(src: int, dst: int) -> None:
    try:
        while os.copy_file_range(src, dst, _COPY_CHUNK):
            pass
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
            raise
    while os.sendfile(dst, src, None, _COPY_CHUNK):
        pass


def _copy_meta_fd(sfd: int, dfd: int) -> None:
    st = os.fstat(sfd)
    os.fchown(dfd, st.st_uid, st.st_gid)
    os.fchmod(dfd, stat.S_IMODE(st.st_mode))
    for k in os.listxattr(sfd):
        if k.startswith("trusted.overlay."):
            continue
        os.setxattr(dfd, k, os.getxattr(sfd, k))
    os.utime(dfd, ns=(st.st_atime_ns, st.st_mtime_ns))


def _copy_xattrs_path(src: str, dst: str) -> None:
    try:
        keys = os.listxattr(src, follow_symlinks=False)
    except OSError:
        return
    for k in keys:
        if k.startswith("trusted.overlay."):
            continue
        os.setxattr(dst, k, os.getxattr(src, k, follow_symlinks=False), follow_symlinks=False)


def _is_opaque(fd: int) -> bool:
    try:
        return os.getxattr(fd, OPAQUE_XATTR) == b"y"
    except OSError:
        return False


def _clear_dir(dfd: int, name: str) -> None:
    cfd = os.open(name, fsutil.DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dfd)
    try:
        for n in os.listdir(cfd):
            fsutil.rmtree_at(cfd, n)
    finally:
        os.close(cfd)
