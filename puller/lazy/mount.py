"""Lazy snapshots: the FUSE daemon's mount as the lower layer of an overlayfs at the destination.

snapshots/<id>/ holds lower/ (the FUSE mount), upper/ and work/ (the container's writes go to
the overlay's upper directory: the FUSE layer stays read-only and never sees a write),
daemon.log, stats.json and snapshot.json with mode "lazy" and the daemon's pid.
"""
from __future__ import annotations

import contextlib
import errno
import os
import secrets
import select
import shutil
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import fsutil
from ..snapshot import SnapshotError
from ..store import Store

READY_TIMEOUT = 30.0
# The kernel asks a FUSE file system for at most its read-ahead window per read (128 KiB by
# default, what the FUSE handshake settles on); every request is a round trip through the
# daemon.  A 1 MiB window - a chunk - makes a sequential or mmap'd read of a chunk one request
# instead of eight.
READAHEAD_KB = 1024


@dataclass
class LazySnapshot:
    id: str
    dest: Path
    ref: str
    pid: int
    store: Store
    created_dest: bool = False
    started: str = ""  # the daemon's start time (see _start_time)

    @property
    def dir(self) -> Path:
        return self.store.snapshot_dir(self.id)

    @property
    def lower(self) -> Path:
        return self.dir / "lower"

    def stats(self) -> dict:
        """The daemon's fetch counters ({} before it wrote any)."""
        import json
        for _ in range(20):
            try:
                return json.loads((self.dir / "stats.json").read_bytes())
            except FileNotFoundError:
                return {}
            except ValueError:  # caught the daemon mid-write (see daemon._StatsWriter)
                time.sleep(0.001)
        return {}

    def record(self) -> dict:
        return {"id": self.id, "dest": str(self.dest), "chain_ids": [], "mode": "lazy", "writable": True,
                "ref": self.ref, "pid": self.pid, "created_dest": self.created_dest,
                "started": self.started}

    def remove(self) -> None:
        """Unmount the overlay and the FUSE mount, stop the daemon, delete the snapshot's dirs."""
        if fsutil.is_mountpoint(str(self.dest)):
            fsutil.umount(str(self.dest))
        _stop_daemon(self.pid, self.lower, self.started or None)
        if self.created_dest:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(self.dest)
        if self.dir.exists():
            fsutil.rmtree_at_path(self.dir)


def raise_readahead(mountpoint: str, kb: int) -> None:
    """Set the read-ahead of the mount at `mountpoint`, found in mountinfo (a stat would be a
    request to the daemon).  Best effort: only speed depends on it."""
    real = os.path.realpath(os.path.dirname(mountpoint))  # mountinfo names real paths
    target = os.path.join(real, os.path.basename(mountpoint))
    dev = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == target:
                    dev = fields[2]  # major:minor; the last line is the newest mount
        if dev is not None:
            with open(f"/sys/class/bdi/{dev}/read_ahead_kb", "w") as f:
                f.write(str(kb))
    except OSError:
        pass


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    import re
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks ("" if it is gone or a zombie): with the pid, an
    identity that survives pid reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return "" if fields[0] in ("Z", "X") else fields[19]


def _alive(pid: int, started: str | None = None) -> bool:
    now = _start_time(pid)
    return bool(now) and (started is None or now == started)


def _stop_daemon(pid: int, lower: Path, started: str | None = None) -> None:
    if fsutil.is_mountpoint(str(lower)):
        # fusermount3 -u makes the daemon's main loop return; it then exits by itself.
        if subprocess.run(["fusermount3", "-u", str(lower)], capture_output=True).returncode != 0:
            with contextlib.suppress(OSError):
                fsutil.umount(str(lower), fsutil.MNT_DETACH)
    deadline = time.monotonic() + 5
    while pid and _alive(pid, started) and time.monotonic() < deadline:
        _reap(pid)
        time.sleep(0.02)
    if pid and _alive(pid, started):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _reap(pid)
    if fsutil.is_mountpoint(str(lower)):
        with contextlib.suppress(OSError):
            fsutil.umount(str(lower), fsutil.MNT_DETACH)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def make_lazy_snapshot(store: Store, ref: str, dest: str | os.PathLike, *, snapshot_id: str | None = None,
                       whole: bool = False, prefetch: str | None = None, record: str | None = None,
                       timeout: float | None = None, fork: bool = False,
                       amplify: int | None = None) -> LazySnapshot:
    """Mount the lazily pulled image `ref` at `dest` (an empty or new directory).

    The file system is served by a daemon process: a new interpreter by default, or with
    `fork` a child of this process, which skips Python's start-up and imports (~0.3 s) - for
    long-lived callers without threads that could hold locks across the fork.  `amplify`: see
    LazyFS (bytes of neighbouring chunks fetched along with a miss; default 4 MiB)."""
    dest = Path(dest).absolute()
    sid = snapshot_id or secrets.token_hex(8)
    sdir = store.snapshot_dir(sid)
    try:
        sdir.mkdir(parents=True)
    except FileExistsError:
        raise SnapshotError(f"snapshot {sid!r} already exists") from None
    created = False
    snap: LazySnapshot | None = None
    try:
        if dest.exists():
            if not dest.is_dir() or dest.is_symlink() or any(dest.iterdir()):
                raise SnapshotError(f"snapshot destination {dest} is not an empty directory")
        else:
            dest.mkdir()
            created = True
        for sub in ("lower", "upper", "work"):
            (sdir / sub).mkdir()
        # The chunk cache's gc must count this snapshot's chunks as in use before its daemon
        # can look at the cache: the gc lock's shared side is held until the record exists.
        pin: int | None = _pin(store)

        def started(pid: int) -> None:
            # Recorded (for the remover and the chunk gc) while the daemon starts, not after.
            nonlocal snap, pin
            try:
                snap = LazySnapshot(sid, dest, ref, pid, store, created, _start_time(pid))
                store.put_snapshot_record(sid, snap.record())
            finally:
                os.close(pin)
                pin = None

        try:
            _start_daemon(store, ref, sdir, whole=whole, prefetch=prefetch, record=record, timeout=timeout,
                          fork=fork, amplify=amplify, started=started, pin=pin)
        finally:
            if pin is not None:
                os.close(pin)
        fsutil.mount("overlay", str(dest), "overlay", 0,
                     f"lowerdir={sdir / 'lower'},upperdir={sdir / 'upper'},workdir={sdir / 'work'}")
        # After the overlay mount the FUSE handshake is surely done (it sets the window too).
        raise_readahead(str(sdir / "lower"), READAHEAD_KB)
        return snap
    except BaseException:
        if snap is not None:
            snap.remove()
        else:
            if created:
                shutil.rmtree(dest, ignore_errors=True)
            shutil.rmtree(sdir, ignore_errors=True)
        raise


def _start_daemon(store: Store, ref: str, sdir: Path, *, whole: bool, prefetch: str | None,
                  record: str | None, timeout: float | None, fork: bool = False,
                  amplify: int | None = None, started=None, pin: int | None = None) -> int:
    """Start the daemon and wait for it to serve; `started(pid)` is called in between.  A
    forked daemon closes its copy of the fd `pin` first thing."""
    r, w = os.pipe()
    cmd = ["--store", str(store.root), "--ref", ref,
           "--mountpoint", str(sdir / "lower"), "--ready-fd", str(w), "--stats", str(sdir / "stats.json")]
    if whole:
        cmd.append("--whole")
    if prefetch:
        cmd += ["--prefetch", prefetch]
    if record:
        cmd += ["--record", record]
    if timeout is not None:
        cmd += ["--timeout", str(timeout)]
    if amplify is not None:
        cmd += ["--amplify", str(amplify)]
    fuse_fd = None
    try:
        fuse_fd = mount_fuse(sdir / "lower")
        if fuse_fd is not None:
            cmd += ["--fuse-fd", str(fuse_fd)]
        if fork:
            pid = _fork_daemon(cmd, sdir / "daemon.log", r, w, pin)
            proc = None
        else:
            env = dict(os.environ)
            pkg_root = str(Path(__file__).resolve().parents[2])
            env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
            with open(sdir / "daemon.log", "ab") as log:
                proc = subprocess.Popen([sys.executable, "-m", "puller.lazy.daemon", *cmd], stdin=subprocess.DEVNULL,
                                        stdout=log, stderr=log, start_new_session=True, env=env,
                                        pass_fds=(w,) if fuse_fd is None else (w, fuse_fd))
            pid = proc.pid
    except BaseException:
        if fuse_fd is not None:
            # First: while this fd is open, a look at the mount waits for a daemon that is not
            # there.  Closed, the connection is gone and the mount fails fast until removed.
            os.close(fuse_fd)
            _stop_daemon(0, sdir / "lower")
        os.close(r)
        os.close(w)
        raise
    # Only the daemon holds the connection now: if it dies, requests fail instead of waiting.
    if fuse_fd is not None:
        os.close(fuse_fd)
    os.close(w)
    try:
        if started is not None:
            started(pid)
        ready, _, _ = select.select([r], [], [], READY_TIMEOUT)
        line = os.read(r, 64) if ready else b""
    finally:
        os.close(r)
    if line.startswith(b"ready"):
        return pid
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    if proc is not None:
        proc.wait()
    else:
        os.waitpid(pid, 0)
    _stop_daemon(0, sdir / "lower")
    tail = (sdir / "daemon.log").read_text(errors="replace")[-1500:]
    raise SnapshotError(f"lazy file system for {ref} did not start: {tail}")


def mount_fuse(mountpoint: Path) -> int | None:
    """Mount a FUSE connection at `mountpoint` (as libfuse does for root: read-only, nosuid,
    nodev, allow_other, default_permissions) and return its /dev/fuse fd for the daemon;
    None when this process may not mount (the daemon then mounts with libfuse itself).

    Mounting here, before the daemon exists, means the daemon never needs a capability: it
    drops them all before it starts a thread or serves a request, and a new interpreter
    before it reads the metadata (a forked one skips the mount's cost on its way to serving)."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return None
    data = (f"fd={fd},rootmode={stat.S_IFDIR:o},user_id={os.getuid()},group_id={os.getgid()},"
            "default_permissions,allow_other")
    try:
        fsutil.mount("puller-lazy", str(mountpoint), "fuse.puller-lazy",
                     fsutil.MS_RDONLY | fsutil.MS_NOSUID | fsutil.MS_NODEV, data)
    except OSError as exc:
        os.close(fd)
        if exc.errno == errno.EPERM:
            return None
        raise SnapshotError(f"cannot mount the lazy file system at {mountpoint}: {exc}") from None
    return fd


def _pin(store: Store) -> int:
    """An fd holding the shared side of the store's gc lock (what Store.pin() holds), for a
    caller that forks: the child closes its copy, and the lock goes with the parent's."""
    import fcntl
    fd = os.open(store._lock_path("gc"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _fork_daemon(argv: list[str], log: Path, r: int, w: int, pin: int | None = None) -> int:
    import gc

    from . import daemon  # imported before the fork: the child must not pay for it
    try:
        # Built here rather than in the child, where every first touch of an inherited page
        # copies it: the same work costs the child two to three times as much.
        state = daemon.prepare(daemon.parse_args(argv))
    except BaseException as exc:  # r and w are the caller's to close
        if isinstance(exc, daemon.NotLazy):
            raise SnapshotError(str(exc)) from None
        raise
    # The child's collections would otherwise walk (and so copy, page by page) every object
    # it inherited; frozen, they are left alone.
    gc.freeze()
    pid = os.fork()
    if pid:
        gc.unfreeze()
        return pid
    code = 1
    try:
        os.setsid()
        os.close(r)
        if pin is not None:
            os.close(pin)
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        code = daemon.serve(state)
    except BaseException:  # noqa: BLE001 - the child must never return into the caller's code
        import traceback
        traceback.print_exc()
    finally:
        os._exit(code)


def load_lazy_snapshot(store: Store, snapshot_id: str) -> LazySnapshot | None:
    rec = store.get_snapshot_record(snapshot_id)
    if rec is None or rec.get("mode") != "lazy":
        return None
    return LazySnapshot(rec["id"], Path(rec["dest"]), rec["ref"], rec["pid"], store, rec.get("created_dest", False),
                        rec.get("started", ""))
