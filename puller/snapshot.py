"""Container root filesystems made from shared layers: an overlayfs mount, or a plain copy.

Each snapshot has a directory in the store (snapshots/<id>/: snapshot.json, upper/, work/) and a
record listing its chain ids, so gc() keeps the layers it sits on. Overlay lowerdir strings are
limited to one page by mount(2); when the absolute paths would not fit, the mount is done from a
forked child that chdir()s into the snapshot dir and names the layers through short relative
symlinks (l/0, l/1, ...), the same trick containerd and Docker use. A fork rather than chdir in
the caller because the working directory is shared by every thread of the process.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from . import fsutil
from .layercopy import copy_layer
from .store import Store, StoreError

_MAX_MOUNT_DATA = 4000  # one page including the NUL, with some margin
_NO_OVERLAY_ERRNOS = (errno.ENODEV, errno.EINVAL, errno.EPERM, errno.EOPNOTSUPP)


class SnapshotError(StoreError):
    pass


@dataclass
class Snapshot:
    id: str
    dest: Path
    chain_ids: list[str]
    mode: str  # "overlay" or "copy"
    writable: bool
    store: Store = field(repr=False)
    created_dest: bool = False

    @property
    def dir(self) -> Path:
        return self.store.snapshot_dir(self.id)

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    def remove(self) -> None:
        """Unmount (overlay) or delete the copy, then drop the snapshot's record and dirs."""
        if self.mode == "overlay":
            if fsutil.is_mountpoint(str(self.dest)):
                fsutil.umount(str(self.dest))
            if self.created_dest:
                with contextlib.suppress(FileNotFoundError):
                    os.rmdir(self.dest)
        elif self.dest.exists():
            if self.created_dest:
                fsutil.rmtree_at_path(self.dest)
            else:
                for p in self.dest.iterdir():
                    fsutil.rmtree_at_path(p)
        if self.dir.exists():
            fsutil.rmtree_at_path(self.dir)

    def record(self) -> dict:
        return {"id": self.id, "dest": str(self.dest), "chain_ids": list(self.chain_ids),
                "mode": self.mode, "writable": self.writable, "created_dest": self.created_dest}


def overlay_available() -> bool:
    try:
        with open("/proc/filesystems") as f:
            return any(line.split()[-1] == "overlay" for line in f if line.strip())
    except OSError:
        return False


def make_snapshot(store: Store, chain_ids: list[str], dest: str | os.PathLike, *,
                  writable: bool = True, mode: str = "auto",
                  snapshot_id: str | None = None) -> Snapshot:
    """Mount (or copy) the layers `chain_ids` (bottom first, as in the image) at `dest`.

    mode: "overlay", "copy", or "auto" (overlay where the kernel has it, else copy).
    """
    if mode not in ("auto", "overlay", "copy"):
        raise SnapshotError(f"unknown snapshot mode {mode!r}")
    if not chain_ids:
        raise SnapshotError("a snapshot needs at least one layer")
    auto = mode == "auto"
    if auto:
        mode = "overlay" if overlay_available() else "copy"
    dest = Path(dest).absolute()
    sid = snapshot_id or secrets.token_hex(8)
    sdir = store.snapshot_dir(sid)
    with store.pin():  # no gc between the check and the record
        missing = [c for c in chain_ids if not store.has_layer(c)]
        if missing:
            raise SnapshotError(f"layers not in the store: {', '.join(missing)}")
        try:
            sdir.mkdir()
        except FileExistsError:
            raise SnapshotError(f"snapshot {sid!r} already exists") from None
        created = False
        try:
            if dest.exists():
                if not dest.is_dir() or dest.is_symlink() or any(dest.iterdir()):
                    raise SnapshotError(f"snapshot destination {dest} is not an empty directory")
            else:
                dest.mkdir()
                created = True
            snap = Snapshot(sid, dest, list(chain_ids), mode, writable, store, created)
            # recorded before anything is mounted, so gc never sees the layers unreferenced
            store.put_snapshot_record(sid, snap.record())
            if mode == "overlay":
                try:
                    _mount_overlay(store, snap)
                except OSError as e:
                    # e.g. the store on a filesystem overlay cannot use as upper layer
                    if not auto or e.errno not in _NO_OVERLAY_ERRNOS:
                        raise
                    for sub in ("upper", "work", "l", "empty"):
                        shutil.rmtree(sdir / sub, ignore_errors=True)
                    snap.mode = mode = "copy"
                    store.put_snapshot_record(sid, snap.record())
            if mode == "copy":
                for c in chain_ids:
                    copy_layer(store.layer_path(c), dest)
        except BaseException:
            if mode == "overlay" and fsutil.is_mountpoint(str(dest)):
                fsutil.umount(str(dest), fsutil.MNT_DETACH)
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            shutil.rmtree(sdir, ignore_errors=True)
            raise
    return snap


def load_snapshot(store: Store, snapshot_id: str) -> Snapshot | None:
    rec = store.get_snapshot_record(snapshot_id)
    if rec is None:
        return None
    return Snapshot(rec["id"], Path(rec["dest"]), rec["chain_ids"], rec["mode"], rec["writable"],
                    store, rec.get("created_dest", False))


def list_snapshots(store: Store) -> list[Snapshot]:
    return [s for r in store.list_snapshot_records()
            if (s := load_snapshot(store, r["id"])) is not None]


def _mount_overlay(store: Store, snap: Snapshot) -> None:
    sdir = snap.dir
    lowers = [str(store.layer_path(c)) for c in reversed(snap.chain_ids)]  # top layer first
    if not snap.writable and len(lowers) == 1:
        (sdir / "empty").mkdir()  # overlay without upperdir wants two lower layers
        lowers.append(str(sdir / "empty"))
    upper = work = None
    if snap.writable:
        upper, work = sdir / "upper", sdir / "work"
        upper.mkdir()
        work.mkdir()
        _copy_root_attrs(store.layer_path(snap.chain_ids[-1]), upper)
    flags = fsutil.MS_RDONLY if not snap.writable else 0
    data = _options(lowers, upper, work)
    if len(data) <= _MAX_MOUNT_DATA and not any(_needs_escape(p) for p in lowers + [str(sdir)]):
        fsutil.mount("overlay", str(snap.dest), "overlay", flags, data)
        return
    links = sdir / "l"
    links.mkdir()
    short = []
    for i, p in enumerate(lowers):
        os.symlink(p, links / str(i))
        short.append(f"l/{i}")
    data = _options(short, Path("upper") if upper else None, Path("work") if work else None)
    if len(data) > _MAX_MOUNT_DATA:
        raise SnapshotError(f"{len(lowers)} layers do not fit in one overlay mount")
    _mount_in_child(sdir, str(snap.dest), flags, data)


def _options(lowers: list[str], upper: Path | None, work: Path | None) -> str:
    opts = "lowerdir=" + ":".join(lowers)
    if upper is not None:
        opts += f",upperdir={upper},workdir={work}"
    return opts


def _needs_escape(p: str) -> bool:
    return any(c in p for c in ":,\\")


def _mount_in_child(cwd: Path, target: str, flags: int, data: str) -> None:
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 0
        try:
            os.chdir(cwd)
            fsutil.mount("overlay", target, "overlay", flags, data)
        except OSError as e:
            code = e.errno or 1
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        raise OSError(code, f"mount overlay on {target} (from {cwd}): "
                            f"{os.strerror(code) if code < 255 else 'failed'}")


def _copy_root_attrs(src: Path, dst: Path) -> None:
    # the merged root takes its owner and mode from the upper dir
    st = os.lstat(src)
    os.chown(dst, st.st_uid, st.st_gid)
    os.chmod(dst, st.st_mode & 0o7777)
    with contextlib.suppress(OSError):
        os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))


__all__ = ["Snapshot", "SnapshotError", "make_snapshot", "load_snapshot", "list_snapshots",
           "overlay_available"]
