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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

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
        self.stats = FetchStats()
        self._slots = threading.BoundedSemaphore(parallel)
        self._pool = ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="chunk")
        self._ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chunk-ahead")
        self._ahead_pending = threading.Semaphore(2)  # at most two windows queued ahead
        self._lock = threading.Lock()
        self._inflight: dict[str, threading.Event] = {}
        self._failed: dict[str, str] = {}

    def ensure(self, ids: list[int]) -> None:
        """Return once all chunks `ids` are in the cache; ChunkError if one cannot be."""
        todo: list[Chunk] = []
        waits: list[tuple[Chunk, threading.Event]] = []
        with self._lock:
            for i in dict.fromkeys(ids):
                c = self.meta.chunks[i]
                if self.cache.has(c.digest):
                    continue
                ev = self._inflight.get(c.digest)
                if ev is not None:
                    waits.append((c, ev))
                    continue
                ev = threading.Event()
                self._inflight[c.digest] = ev
                self._failed.pop(c.digest, None)
                todo.append(c)
                waits.append((c, ev))
        if todo:
            runs = plan_ranges(todo, self.merge_gap, self.max_request)
            futures = [self._pool.submit(self._fetch_run, run) for run in runs[1:]]
            self._fetch_run(runs[0])  # the first in this thread: one request needs no hand-off
            for f in futures:
                f.result()
        for c, ev in waits:
            ev.wait()
            if not self.cache.has(c.digest):
                raise ChunkError(self._failed.get(c.digest, f"chunk {c.digest} could not be fetched"))

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
        blob_digest = self.meta.blobs[run[0].blob][0]
        start = run[0].offset
        end = max(c.offset + c.stored for c in run)
        try:
            with self._slots:
                data = self._get_range(blob_digest, start, end)
            for c in run:
                try:
                    plain = decode_chunk(c, data[c.offset - start:c.offset - start + c.stored])
                except ValueError as exc:
                    msg = (f"lazy: chunk verification failed: {exc} (blob {blob_digest} bytes "
                           f"{c.offset}-{c.offset + c.stored - 1} from {self.client.host}/{self.repository})")
                    log.error("%s", msg)
                    self._fail(c, msg)
                    continue
                self.cache.put(c.digest, plain)
                self.stats.add(chunks=1)
                self._done(c)
        except Exception as exc:  # noqa: BLE001 - every waiter must be woken with the reason
            msg = f"lazy: fetching {len(run)} chunk(s) of blob {blob_digest} from {self.client.host} failed: {exc}"
            log.error("%s", msg)
            for c in run:
                self._fail(c, msg)

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

    def _get_range(self, blob_digest: str, start: int, end: int) -> bytes:
        resp = self.client.request(
            "GET", f"{self.repository}/blobs/{blob_digest}", stream=True, ok=(206,),
            headers={"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"},
            what=f"range {start}-{end - 1} of blob {self.repository}@{blob_digest}")
        with resp:
            want = end - start
            out = bytearray()
            for part in resp.iter_content(1 << 20):
                out += part
                if len(out) > want:
                    raise ChunkError(f"registry sent more than the {want} bytes asked for")
        self.stats.add(requests=1, nbytes=len(out))
        if len(out) != want:
            raise ChunkError(f"registry sent {len(out)} of the {want} bytes asked for")
        return bytes(out)

    def close(self) -> None:
        self._ahead.shutdown(wait=True, cancel_futures=True)
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
