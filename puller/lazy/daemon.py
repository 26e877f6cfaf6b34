"""The FUSE server process of one lazy snapshot: ``python -m puller.lazy.daemon``.

Started by mount.py in its own session so it outlives the command that made the snapshot.
It tells its parent it is serving by writing "ready" to `--ready-fd`, keeps fetch counters in
`--stats` (JSON, rewritten after fetches), and exits when the mount goes away
(fusermount3 -u) or on SIGTERM/SIGINT, unmounting first.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import _thread
import threading
from dataclasses import dataclass

import pyfuse3
import trio

from ..auth import Credentials
from ..registry import RegistryClient, RegistryOptions
from ..store import Store
from .cache import ChunkCache
from .fetcher import ChunkError, ChunkFetcher
from .format import Meta
from .fs import AMPLIFY, AccessRecorder, LazyFS, chunks_of, entrypoint_paths, fetch_in_background, resolve_path
from .locate import load_record_meta

log = logging.getLogger("puller.lazy")


def drop_privileges() -> None:
    """Once the file system is mounted the daemon needs no capability: it reads and writes
    root-owned files as their owner, and unmounting is the remover's job.  So a bug reachable
    from registry data or FUSE requests runs without CAP_SYS_ADMIN and friends.  Capability
    sets belong to a thread: this drops the calling thread's (and those it starts later)."""
    import ctypes

    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in range(64):
        if libc.prctl(24, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:  # PR_CAPBSET_DROP; EINVAL: no more caps
            break
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2: all empty
    if libc.capset(header, data) != 0:
        raise OSError(ctypes.get_errno(), "capset: cannot drop capabilities")
    if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS)")


def cache_dir(store: Store) -> str:
    """The chunk cache every snapshot of this store shares."""
    return os.path.join(store.root, "lazy", "chunks")


def registry_options(lazy: dict, timeout: float | None = None) -> RegistryOptions:
    creds = os.environ.pop("PULLER_CREDS", "")
    return RegistryOptions(plain_http=frozenset(lazy.get("plain_http") or ()), ca_file=lazy.get("ca_file"),
                           auth_file=lazy.get("auth_file"), credentials=Credentials.parse(creds) if creds else None,
                           timeout=timeout if timeout is not None else float(lazy.get("timeout") or 30.0))


class _StatsWriter:
    """Keeps the counters file current.  Called after fetches, on the FUSE loop among others,
    so an update is one pwrite of a fixed-size JSON text (padded with spaces, still valid
    JSON) at offset 0 - not a new file and a rename each time.  A reader may catch a write
    half done; LazySnapshot.stats() then reads again."""

    SIZE = 512  # four counters take about 80 bytes

    def __init__(self, path: str | None, fetcher: ChunkFetcher) -> None:
        self.path, self.fetcher = path, fetcher
        self._fd: int | None = None
        self._lock = threading.Lock()  # written from the fetch threads too

    def __call__(self, force: bool = False) -> None:
        if self.path is None:
            return
        text = json.dumps(self.fetcher.stats.as_dict()).encode().ljust(self.SIZE)
        with self._lock:
            if self._fd is None:  # opened by the serving process, never before a fork
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
            os.pwrite(self._fd, text[:self.SIZE], 0)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m puller.lazy.daemon")
    p.add_argument("--store", required=True)
    p.add_argument("--ref", required=True)
    p.add_argument("--mountpoint", required=True)
    p.add_argument("--ready-fd", type=int)
    p.add_argument("--fuse-fd", type=int,
                   help="a /dev/fuse fd already mounted at --mountpoint (by a privileged parent)")
    p.add_argument("--stats")
    p.add_argument("--record", help="write the paths of files opened to this file")
    p.add_argument("--prefetch", help="file with paths (one a line) to fetch first (instead of the image's list)")
    p.add_argument("--whole", action="store_true", help="fetch every chunk in the background")
    p.add_argument("--timeout", type=float, help="registry request time bound (default: the pull's)")
    p.add_argument("--parallel", type=int, default=4)
    p.add_argument("--amplify", type=int, default=AMPLIFY,
                   help="bytes of the chunks following a missed file end fetched along with it")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.fuse_fd is not None:
        drop_privileges()  # mounted by the caller: nothing here needs a capability
    try:
        state = prepare(a)
    except NotLazy as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return serve(state, dropped=a.fuse_fd is not None)


class NotLazy(Exception):
    """The reference names no lazily pulled image of the store."""


@dataclass
class Prepared:
    """Everything the daemon needs before mounting, built without side effects a fork would
    duplicate (no thread, socket or mount yet): a forking caller builds it before the fork,
    where it costs less than in the child (whose first touch of each inherited page copies it)."""

    args: argparse.Namespace
    fs: LazyFS
    fetcher: ChunkFetcher
    cache: ChunkCache
    stats: _StatsWriter
    early: list[int]
    around: list[int]


def prepare(a: argparse.Namespace) -> Prepared:
    store = Store(a.store, create=False)
    record = store.get_image(a.ref)
    if record is None or not record.get("lazy"):
        raise NotLazy(f"{a.ref!r} is not a lazily pulled image in {a.store}")
    meta = load_record_meta(store, record)
    lazy = record["lazy"]
    cache = ChunkCache(cache_dir(store))
    client = RegistryClient(lazy["host"], registry_options(lazy, a.timeout))
    fetcher = ChunkFetcher(client, lazy["repository"], meta, cache, parallel=a.parallel)
    stats = _StatsWriter(a.stats, fetcher)
    fetcher.on_run_done = stats
    fs = LazyFS(meta, cache, fetcher, amplify=a.amplify, recorder=AccessRecorder(a.record) if a.record else None,
                on_fetch=stats)
    prefetch = list(meta.prefetch)  # the image's own list (index --prefetch), unless one is given
    if a.prefetch:
        with open(a.prefetch) as f:
            prefetch = [line.strip() for line in f if line.strip()]
    entry = _entrypoint_chunks(store, record, meta)
    # Without a recorded list the entrypoint's neighbours in the blob come along, as they
    # would with a read miss at its end.
    around = fs.read_around(entry[-1]) if entry and not prefetch else []
    early = entry + chunks_of(meta, prefetch)
    # The first request of the early fetch goes out now: the registry answers while the file
    # system starts (a forked daemon inherits the connection and reads the answer).
    fetcher.presend(list(dict.fromkeys(early))[:EARLY_BATCH], around)
    return Prepared(a, fs, fetcher, cache, stats, early, around)


def serve(state: Prepared, dropped: bool = False) -> int:
    """Mount (unless the parent did) and serve until unmounted.  `dropped`: this process has
    dropped its capabilities already."""
    a, fs, fetcher, stats = state.args, state.fs, state.fetcher, state.stats
    # A fetch thread woken by its socket waits for the interpreter until the thread holding it
    # lets go, by default after up to 5 ms: a read blocked on that chunk waits too.
    sys.setswitchinterval(0.0005)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s",
                        force=True)
    options = set(pyfuse3.default_options)
    options.discard("default_permissions")
    options |= {"fsname=puller-lazy", "subtype=puller-lazy", "ro", "allow_other", "default_permissions"}
    mounted_by_parent = a.fuse_fd is not None
    if mounted_by_parent:
        # Nothing below needs a capability; dropped before any thread exists, so every thread
        # started later has none either.
        if not dropped:
            drop_privileges()
        pyfuse3.init(fs, f"/dev/fd/{a.fuse_fd}", options)  # libfuse takes over the mounted fd
    else:
        pyfuse3.init(fs, a.mountpoint, options)
        drop_privileges()
    stats()
    if a.ready_fd is not None:
        os.write(a.ready_fd, b"ready\n")
        os.close(a.ready_fd)
    # The early fetch (the entrypoint's program, then the recorded prefetch list) starts once
    # the file system has answered its first request - the overlay mount above it waits for
    # that, and on two busy cores a fetch started sooner only slows the loop's start.  The
    # registry's answer to the first request (sent before the fork) meanwhile fills the
    # socket's buffer, so the transfer itself is not held up.  _thread, not threading:
    # Thread.start() waits until the new thread runs.
    prefetched = threading.Event()

    def start_early_fetch() -> None:
        _thread.start_new_thread(_fetch_early, (fetcher, state.early, stats),
                                 {"around": state.around, "done": prefetched, "drop": not mounted_by_parent})

    fs.on_first_request(start_early_fetch)
    try:
        trio.run(_serve_until_unmounted, fs, prefetched, a.whole, stats)
    finally:
        # The unmount here only works when the mount is already gone (fusermount3 -u by the
        # remover, the usual way out): the daemon holds no capability.  The remover falls back
        # to umount -l.
        pyfuse3.close(unmount=not mounted_by_parent)
        stats(force=True)
        fetcher.close()
        state.cache.close()
        stats.close()
    return 0


async def _serve_until_unmounted(fs: LazyFS, prefetched: threading.Event, whole: bool,
                                 stats: _StatsWriter) -> None:
    async with trio.open_nursery() as nursery:
        async def background() -> None:
            await trio.to_thread.run_sync(prefetched.wait, abandon_on_cancel=True)
            await fetch_in_background(fs, list(range(len(fs.meta.chunks))), "whole-image fetch")
            stats(force=True)

        async def signals() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as sigs:
                async for _ in sigs:
                    pyfuse3.terminate()
                    return

        async def early_fetch_fallback() -> None:
            await trio.sleep(EARLY_FALLBACK)  # when nothing asks (no overlay above, an idle mount)
            fs.first_request()

        if whole:  # (a thread to wait in costs the start of serving some time: only when needed)
            nursery.start_soon(background)
        nursery.start_soon(early_fetch_fallback)
        nursery.start_soon(signals)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


def _entrypoint_chunks(store: Store, record: dict, meta: Meta) -> list[int]:
    """The chunks of the file the image's entrypoint names ([] when there is none)."""
    try:
        with store.open_blob(record["config_digest"]) as f:
            config = json.load(f)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("lazy: no entrypoint prefetch, image config unreadable: %s", exc)
        return []
    by_path = {n.path: n for n in meta.nodes}
    for path in entrypoint_paths(config if isinstance(config, dict) else {}):
        n = resolve_path(by_path, path)
        if n is not None and n.kind == "reg":
            return list(n.chunks)
    return []


EARLY_BATCH = 8
EARLY_FALLBACK = 0.05  # s after serving starts: the early fetch starts by then in any case


def _fetch_early(fetcher: ChunkFetcher, ids: list[int], stats: _StatsWriter, batch: int = EARLY_BATCH,
                 around: list[int] | tuple = (), done: threading.Event | None = None, drop: bool = True) -> None:
    """Prefetch in batches (so reads are not starved of request slots); failures surface
    again, as EIO, on the read that needs the chunk.  `around` rides with the first batch.
    Runs in a thread of its own, which with `drop` drops its capabilities first (capability
    sets are per thread: a thread started before the main thread dropped its own keeps them)."""
    try:
        if drop:
            drop_privileges()
        _fetch_batches(fetcher, ids, stats, batch, around)
    except BaseException:  # noqa: BLE001 - a bare thread: say what happened, never die silently
        log.exception("lazy: early prefetch failed")
    finally:
        if done is not None:
            done.set()


def _fetch_batches(fetcher: ChunkFetcher, ids: list[int], stats: _StatsWriter, batch: int,
                   around: list[int] | tuple) -> None:
    ids = list(dict.fromkeys(ids))
    failed = 0
    for k in range(0, len(ids), batch):
        try:
            fetcher.ensure(ids[k:k + batch], around if k == 0 else ())
        except ChunkError:
            failed += 1
        except RuntimeError:  # the fetcher was closed under us: the daemon is shutting down
            return
        stats()
    stats()
    if ids:
        log.info("lazy: early prefetch done: %d chunks, %d batches failed", len(ids), failed)


if __name__ == "__main__":
    sys.exit(main())
