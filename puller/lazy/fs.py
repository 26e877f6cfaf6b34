"""The read-only FUSE file system (pyfuse3, on trio) that serves an image from its metadata.

File data comes from the chunk cache; a read of chunks not yet there waits for the fetcher
(in a worker thread, so other reads go on) and fails with EIO when a chunk cannot be fetched
or does not verify - never with unverified bytes.  The kernel may keep file pages cached
(`keep_cache`): the content of an image never changes under a mount.  Writes are not this
layer's job: an overlayfs upper directory sits above it (mount.py).
"""
from __future__ import annotations

import errno
import logging
import os
import stat
import threading
from typing import Callable

import pyfuse3
import trio

from .cache import ChunkCache
from .fetcher import ChunkError, ChunkFetcher
from .format import Meta, Node, resolve_path

log = logging.getLogger("puller.lazy")
_TYPE = {"reg": stat.S_IFREG, "dir": stat.S_IFDIR, "lnk": stat.S_IFLNK, "chr": stat.S_IFCHR,
         "blk": stat.S_IFBLK, "fifo": stat.S_IFIFO}
TIMEOUT = 3600.0  # entries and attributes never change while mounted
# Read-around after a miss at a file's end.  A registry answers a range request in a few ms
# whatever its size up to several MiB (docker-registry on loopback: ~3 ms for 4 KiB, ~6 ms for
# 4 MiB), the reader waits only for its own chunks, and the files of a directory - read
# together by programs - are neighbours in the blob: one 4 MiB request saves the next misses.
AMPLIFY = 4 << 20


class AccessRecorder:
    """Collects the paths of files opened, in first-open order (the prefetch list of a run)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.seen: set[str] = set()
        self._lock = threading.Lock()
        open(path, "w").close()

    def opened(self, path: str) -> None:
        if path in self.seen:
            return
        with self._lock:
            self.seen.add(path)
            with open(self.path, "a") as f:
                f.write(path + "\n")


class LazyFS(pyfuse3.Operations):
    def __init__(self, meta: Meta, cache: ChunkCache, fetcher: ChunkFetcher, *,
                 readahead_chunks: int = 3, amplify: int = AMPLIFY, recorder: AccessRecorder | None = None,
                 on_fetch: Callable[[], None] | None = None) -> None:
        """`readahead_chunks`: chunks of the same file fetched with a miss and kept coming for
        sequential readers; `amplify`: up to this many bytes of the chunks that follow in the
        data blob ride along on a miss at a file's end (files of a directory are neighbours in
        the blob, and a registry request costs milliseconds whatever its size)."""
        super().__init__()
        self.meta = meta
        self.cache = cache
        self.fetcher = fetcher
        self.readahead = readahead_chunks
        self.amplify = amplify
        order = sorted(range(len(meta.chunks)), key=lambda i: (meta.chunks[i].blob, meta.chunks[i].offset))
        self._blob_order = order
        self._blob_pos = {i: k for k, i in enumerate(order)}
        self.recorder = recorder
        self.on_fetch = on_fetch
        self._first_request: Callable[[], None] | None = None
        # An image without any xattr answers getxattr with ENOSYS, after which the kernel stops
        # asking (getxattr fails with EOPNOTSUPP, not ENODATA): it would otherwise ask for
        # security.capability on every exec and every write, and overlayfs for its own
        # xattrs, each a round trip through here.  listxattr still answers (an empty list),
        # so whoever lists a file's xattrs sees what a full pull shows.
        self.has_xattrs = any(n.xattrs for n in meta.nodes)
        self.nodes: dict[int, Node] = {}
        self.children: dict[int, dict[bytes, int]] = {}
        self.nlink: dict[int, int] = {}
        by_path: dict[str, int] = {}
        for n in meta.nodes:
            self.nodes.setdefault(n.ino, n)
            by_path[n.path] = n.ino
            self.nlink[n.ino] = self.nlink.get(n.ino, 0) + 1
            if n.kind == "dir":
                self.children[n.ino] = {}
                self.nlink[n.ino] += 1
            if n.path:
                parent, _, name = n.path.rpartition("/")
                pino = by_path[parent]
                self.children[pino][os.fsencode(name)] = n.ino
                if n.kind == "dir":
                    self.nlink[pino] += 1
        self.parent_of = {ino: pino for pino, kids in self.children.items() for ino in kids.values()}
        self.parent_of[pyfuse3.ROOT_INODE] = pyfuse3.ROOT_INODE

    def on_first_request(self, fn: Callable[[], None]) -> None:
        """Call `fn` (once) when the first request that reaches a handler comes in."""
        self._first_request = fn

    def first_request(self) -> None:
        fn, self._first_request = self._first_request, None
        if fn is not None:
            fn()

    # -- attributes ---------------------------------------------------------------
    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        n = self.nodes[ino]
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = TIMEOUT
        a.st_mode = _TYPE[n.kind] | n.mode
        a.st_nlink = self.nlink[ino]
        a.st_uid, a.st_gid = n.uid, n.gid
        a.st_rdev = os.makedev(*n.rdev)
        a.st_size = n.size if n.kind == "reg" else len(os.fsencode(n.target)) if n.kind == "lnk" else 0
        a.st_blksize = 1 << 17
        a.st_blocks = (a.st_size + 511) // 512
        a.st_atime_ns = a.st_mtime_ns = a.st_ctime_ns = n.mtime_ns
        return a

    def _node(self, ino: int) -> Node:
        n = self.nodes.get(ino)
        if n is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return n

    async def getattr(self, inode, ctx=None):
        if self._first_request is not None:
            self.first_request()
        self._node(inode)
        return self._attr(inode)

    async def lookup(self, parent_inode, name, ctx=None):
        if self._first_request is not None:
            self.first_request()
        if name == b".":
            return self._attr(parent_inode)
        if name == b"..":
            return self._attr(self.parent_of.get(parent_inode, pyfuse3.ROOT_INODE))
        ino = self.children.get(parent_inode, {}).get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attr(ino)

    async def readlink(self, inode, ctx):
        n = self._node(inode)
        if n.kind != "lnk":
            raise pyfuse3.FUSEError(errno.EINVAL)
        return os.fsencode(n.target)

    async def getxattr(self, inode, name, ctx):
        if not self.has_xattrs:
            raise pyfuse3.FUSEError(errno.ENOSYS)
        value = self._node(inode).xattrs.get(os.fsdecode(name))
        if value is None:
            raise pyfuse3.FUSEError(errno.ENODATA)
        return value

    async def listxattr(self, inode, ctx):
        return [os.fsencode(k) for k in self._node(inode).xattrs]

    async def statfs(self, ctx):
        if self._first_request is not None:
            self.first_request()
        s = pyfuse3.StatvfsData()
        s.f_bsize = s.f_frsize = 4096
        s.f_blocks = sum(n.size for n in self.nodes.values()) // 4096 + 1
        s.f_bfree = s.f_bavail = 0
        s.f_files = len(self.nodes)
        s.f_ffree = s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- directories -------------------------------------------------------------
    async def opendir(self, inode, ctx):
        if self._first_request is not None:
            self.first_request()
        if self._node(inode).kind != "dir":
            raise pyfuse3.FUSEError(errno.ENOTDIR)
        return inode

    async def readdir(self, fh, start_id, token):
        entries = sorted(self.children[fh].items())
        for i in range(start_id, len(entries)):
            name, ino = entries[i]
            if not pyfuse3.readdir_reply(token, name, self._attr(ino), i + 1):
                return

    async def releasedir(self, fh):
        return None

    # -- files ----------------------------------------------------------------------
    async def open(self, inode, flags, ctx):
        if self._first_request is not None:
            self.first_request()
        n = self._node(inode)
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise pyfuse3.FUSEError(errno.EROFS)
        if n.kind != "reg":
            raise pyfuse3.FUSEError(errno.EINVAL)
        if self.recorder is not None:
            self.recorder.opened(n.path)
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh, off, size):
        n = self.nodes[fh]
        end = min(n.size, off + size)
        if off >= end:
            return b""
        cs = self.meta.chunk_size
        first, last = off // cs, (end - 1) // cs
        ids = n.chunks[first:last + 1]
        chunks = self.meta.chunks
        missing = [chunks[i].digest for i in ids if not self.cache.has(chunks[i].digest)]
        if missing:
            # Sequential readers come back for the next chunks: ask for a few in the same request
            # (not waited for: the chunks of this read are handed over as soon as they verify).
            extra = n.chunks[last + 1:last + 1 + self.readahead]
            if last + 1 + self.readahead >= len(n.chunks) and not self.fetcher.all_in_flight(missing):
                # A true miss: guess the neighbours too.  (Not when a prefetch already brings
                # these chunks - it knows what is needed, and guesses would only compete with it.)
                extra = extra + self.read_around(n.chunks[-1])
            try:
                await trio.to_thread.run_sync(self.fetcher.ensure, ids, extra)
            except ChunkError as exc:
                if not all(self.cache.has(chunks[i].digest) for i in ids):
                    log.error("lazy: read of %r bytes %d-%d fails with EIO: %s", n.path, off, end - 1, exc)
                    raise pyfuse3.FUSEError(errno.EIO) from None
            if self.on_fetch is not None:
                self.on_fetch()
        if self.readahead:
            # Keep the next window coming while the reader consumes this one.
            nxt = n.chunks[last + 1 + self.readahead:last + 1 + 2 * self.readahead]
            if nxt:
                self.fetcher.ensure_soon(nxt)
        parts = []
        for k, i in enumerate(ids):
            base = (first + k) * cs
            lo = max(off, base) - base
            hi = min(end, base + chunks[i].size) - base
            parts.append(self.cache.read(chunks[i].digest, lo, hi - lo))
        return b"".join(parts)

    def read_around(self, i: int) -> list[int]:
        """Chunks after chunk `i` (a file's last) in its data blob, up to `amplify` stored
        bytes: fetched along with a miss at a file's end, not waited for."""
        out, total = [], 0
        blob = self.meta.chunks[i].blob
        for j in self._blob_order[self._blob_pos[i] + 1:]:
            c = self.meta.chunks[j]
            total += c.stored
            if c.blob != blob or total > self.amplify:
                break
            out.append(j)
        return out

    async def release(self, fh):
        return None

    # -- prefetch ---------------------------------------------------------------------
    def chunks_of(self, paths: list[str]) -> list[int]:
        return chunks_of(self.meta, paths)


def chunks_of(meta: Meta, paths: list[str]) -> list[int]:
    """The chunks of the regular files `paths` (symlinks followed inside the image)."""
    by_path = {n.path: n for n in meta.nodes}
    out: list[int] = []
    for p in paths:
        n = resolve_path(by_path, p)
        if n is not None and n.kind == "reg":
            out.extend(n.chunks)
    return out


def entrypoint_paths(image_config: dict) -> list[str]:
    """The program a container of this image execs first (Entrypoint, else Cmd), looked up in
    the image's PATH when it is not a path: its file is the first thing every run reads."""
    cfg = image_config.get("config") or {}
    argv = cfg.get("Entrypoint") or cfg.get("Cmd") or []
    if not isinstance(argv, list) or not argv or not isinstance(argv[0], str) or not argv[0]:
        return []
    prog = argv[0]
    if "/" in prog:
        return [prog]
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    for e in cfg.get("Env") or []:
        if isinstance(e, str) and e.startswith("PATH="):
            path = e[5:]
    return [f"{d}/{prog}" for d in path.split(":") if d.startswith("/")]


async def fetch_in_background(fs: LazyFS, ids: list[int], what: str, batch: int = 8) -> None:
    """Fetch chunks a few at a time (so foreground reads are not starved), then log."""
    ids = list(dict.fromkeys(ids))
    failed = 0
    for k in range(0, len(ids), batch):
        try:
            await trio.to_thread.run_sync(fs.fetcher.ensure, ids[k:k + batch])
        except ChunkError:
            failed += 1
        if fs.on_fetch is not None:
            fs.on_fetch()
    log.info("lazy: %s done: %d chunks, %d batches failed", what, len(ids), failed)
