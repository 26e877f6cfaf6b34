"""Fetching chunks from the registry with HTTP range requests into the chunk cache.

Missing chunks of one blob that lie close together are merged into one range request (gaps
up to `merge_gap` are downloaded and thrown away: one round trip costs more than a few KiB);
requests are capped at `max_request` bytes and at most `parallel` run at once across all
callers.  Every chunk is decompressed and checked against its sha256 before it enters the
cache; a chunk being fetched by one caller is waited for, not fetched again, by others.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ..errors import PullError
from ..registry import RegistryClient
from .cache import ChunkCache
from .chunker import decode_chunk
from .format import Chunk, Meta

log = logging.getLogger("puller.lazy")


class ChunkError(PullError):
    """A chunk that could not be fetched or did not verify."""


@dataclass
class FetchStats:
    requests: int = 0
    bytes: int = 0  # bytes received from the registry
    chunks: int = 0  # chunks added to the cache
    failures: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, requests: int = 0, nbytes: int = 0, chunks: int = 0, failures: int = 0) -> None:
        with self.lock:
            self.requests += requests
            self.bytes += nbytes
            self.chunks += chunks
            self.failures += failures

    def as_dict(self) -> dict:
        return {"requests": self.requests, "bytes": self.bytes, "chunks": self.chunks, "failures": self.failures}


def plan_ranges(chunks: list[Chunk], merge_gap: int, max_request: int) -> list[list[Chunk]]:
    """Group distinct chunks into runs each fetched by one range request (one blob, close together)."""
    runs: list[list[Chunk]] = []
    for c in sorted(chunks, key=lambda c: (c.blob, c.offset)):
        if runs:
            last = runs[-1]
            start, end = last[0].offset, last[-1].offset + last[-1].stored
            if (c.blob == last[0].blob and 0 <= c.offset - end <= merge_gap
                    and c.offset + c.stored - start <= max_request):
                last.append(c)
                continue
        runs.append([c])
    return runs


class ChunkFetcher:
    def __init__(self, client: RegistryClient, repository: str, meta: Meta, cache: ChunkCache, *,
                 parallel: int = 4, merge_gap: int = 256 << 10, max_request: int = 8 << 20) -> None:
        self.client = client
        self.repository = repository
        self.meta = meta
        self.cache = cache
        self.merge_gap = merge_gap
        self.max_request = max_request
        self.on_run_done: Callable[[], None] | None = None  # after each range request (counters)
        self.stats = FetchStats()
        self._slots = threading.BoundedSemaphore(parallel)
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="chunk")
        # read-around requests a reader does not wait for to the end (ensure with `extra`)
        self._fg = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="chunk-fg")
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-ahead")
        self._ahead_pending = threading.Semaphore(2)  # at most two windows queued ahead
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self._failed: dict[str, str] = {}
        self._sent: tuple[tuple[int, int, int], object] | None = None  # see presend

    def presend(self, ids: list[int], extra: list[int] | tuple = ()) -> None:
        """Send the first range request ensure(ids, extra) will make, now, without a thread
        (so before a fork: the child inherits the connection and reads the answer), to have
        the registry's answer under way while the file system starts."""
        have = self.cache.has
        chunks = [self.meta.chunks[i] for i in dict.fromkeys([*ids, *extra])]
        runs = plan_ranges([c for c in chunks if not have(c.digest)], self.merge_gap, self.max_request)
        if not runs:
            return
        run = runs[0]
        key = (run[0].blob, run[0].offset, max(c.offset + c.stored for c in run))
        sent = self.client.send_range(self.repository, self.meta.blobs[key[0]][0], key[1], key[2])
        if sent is not None:
            self._sent = (key, sent)

    def _take_sent(self, key: tuple[int, int, int]):
        with self._lock:
            if self._sent is None or self._sent[0] != key:
                return None
            sent, self._sent = self._sent[1], None
            return sent

    def ensure(self, ids: list[int], extra: list[int] | tuple = ()) -> None:
        """Return once all chunks `ids` are in the cache; ChunkError if one cannot be.

        `extra` chunks (read-around) ride in the same range requests but are not waited for:
        the requests then run in the pool, and this returns as soon as the chunks of `ids`
        arrived and verified, while the rest of the response is still coming."""
        need: list[Chunk] = []
        more: list[Chunk] = []
        waits: list[tuple[Chunk, threading.Event]] = []
        needed = set(ids)
        with self._lock:
            for i in dict.fromkeys([*ids, *extra]):
                c = self.meta.chunks[i]
                if self.cache.has(c.digest):
                    continue
                ev = self._inflight.get(c.digest)
                if ev is None:
                    ev = threading.Event()
                    self._inflight[c.digest] = ev
                    self._failed.pop(c.digest, None)
                    (need if i in needed else more).append(c)
                if i in needed:
                    waits.append((c, ev))
        if more:
            # One request for both (requests side by side only compete for a busy machine's
            # CPU).  Chunks are published as they arrive, in blob order, which puts the read's
            # own chunks first: read-ahead and neighbours lie after them.
            for run in plan_ranges(need + more, self.merge_gap, self.max_request):
                self._fg.submit(self._fetch_run, run)
        elif need:
            runs = plan_ranges(need, self.merge_gap, self.max_request)
            futures = [self._pool.submit(self._fetch_run, run) for run in runs[1:]]
            self._fetch_run(runs[0])  # the first in this thread: one request needs no hand-off
            for f in futures:
                f.result()
        for c, ev in waits:
            ev.wait()
            if not self.cache.has(c.digest):
                raise ChunkError(self._failed.get(c.digest, f"chunk {c.digest} could not be fetched"))

    def all_in_flight(self, digests: list[str]) -> bool:
        """True when every chunk of `digests` is being fetched already."""
        with self._lock:
            return all(d in self._inflight for d in digests)

    def ensure_soon(self, ids: list[int]) -> None:
        """Start fetching `ids` without waiting (read-ahead); failures surface on the real read."""
        with self._lock:
            if all(self.cache.has(self.meta.chunks[i].digest) or self.meta.chunks[i].digest in self._inflight
                   for i in ids):
                return
        if not self._ahead_pending.acquire(blocking=False):
            return

        def run() -> None:
            try:
                self.ensure(ids)
            except ChunkError:
                pass
            finally:
                self._ahead_pending.release()
        self._ahead.submit(run)

    def _fetch_run(self, run: list[Chunk]) -> None:
        """One range request for `run`; each chunk is read into a buffer of its own, verified
        and published as soon as its bytes have arrived, so the reader of the first chunk does
        not wait for the whole range (which is what makes large read-around requests cheap for
        the reader).  Chunks of one run never overlap (plan_ranges)."""
        blob_digest = self.meta.blobs[run[0].blob][0]
        start = run[0].offset
        end = max(c.offset + c.stored for c in run)
        pending = deque(sorted(run, key=lambda c: c.offset))
        got = 0
        sent = self._take_sent((run[0].blob, start, end))
        try:
            with self._slots:
                with self.client.open_range(self.repository, blob_digest, start, end,
                                            f"range {start}-{end - 1} of blob {self.repository}@{blob_digest}",
                                            sent=sent) as body:
                    pos = start
                    while pending:
                        c = pending[0]
                        if c.offset > pos:  # a gap merged into the request: read and drop
                            got += _read_exactly(body, bytearray(c.offset - pos), end - start, got)
                        buf = bytearray(c.stored)
                        got += _read_exactly(body, buf, end - start, got)
                        pos = c.offset + c.stored
                        pending.popleft()
                        # Checked and written here, while the kernel receives the next chunk
                        # into the socket's buffer (sized for that: fasthttp).  A second
                        # thread for this measured slower: on two cores the hand-offs and the
                        # interpreter lock going back and forth cost more than they overlap.
                        try:
                            self._publish(c, buf, blob_digest)
                        except Exception as exc:  # noqa: BLE001 - _publish reports its own; anything else too
                            self._fail(c, f"lazy: checking chunk {c.digest} failed: {exc!r}")
                    if body.readinto(bytearray(1)):
                        raise ChunkError(f"registry sent more than the {end - start} bytes asked for")
                self.stats.add(requests=1, nbytes=got)
        except Exception as exc:  # noqa: BLE001 - every waiter must be woken with the reason
            msg = (f"lazy: fetching {len(run)} chunk(s) of blob {blob_digest} from {self.client.host} "
                   f"failed: {exc}")
            log.error("%s", msg)
            for c in pending:
                self._fail(c, msg)
            if got:
                self.stats.add(requests=1, nbytes=got)
        if self.on_run_done is not None:
            self.on_run_done()

    def _publish(self, c: Chunk, stored: bytes, blob_digest: str) -> None:
        try:
            plain = decode_chunk(c, stored)
        except ValueError as exc:
            msg = (f"lazy: chunk verification failed: {exc} (blob {blob_digest} bytes "
                   f"{c.offset}-{c.offset + c.stored - 1} from {self.client.host}/{self.repository})")
            log.error("%s", msg)
            self._fail(c, msg)
            return
        try:
            self.cache.put(c.digest, plain)
        except OSError as exc:
            msg = f"lazy: cannot write chunk {c.digest} to the cache: {exc}"
            log.error("%s", msg)
            self._fail(c, msg)
            return
        self.stats.add(chunks=1)
        self._done(c)

    def _fail(self, c: Chunk, msg: str) -> None:
        self.stats.add(failures=1)
        with self._lock:
            self._failed[c.digest] = msg
            ev = self._inflight.pop(c.digest, None)
        if ev is not None:
            ev.set()

    def _done(self, c: Chunk) -> None:
        with self._lock:
            ev = self._inflight.pop(c.digest, None)
        if ev is not None:
            ev.set()

    def close(self) -> None:
        with self._lock:
            if self._sent is not None:
                self._sent[1].close()
                self._sent = None
        self._ahead.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._fg.shutdown(wait=True, cancel_futures=True)
        self.client.close()


def _read_exactly(body, buf: bytearray, want: int, got: int) -> int:
    """Fill `buf` from `body`; ChunkError naming the shortfall when the answer ends early."""
    view = memoryview(buf)
    n = 0
    while n < len(buf):
        k = body.readinto(view[n:])
        if not k:
            raise ChunkError(f"registry sent {got + n} of the {want} bytes asked for")
        n += k
    return n
