"""Garbage collection of the shared chunk cache: until the cache fits a size bound, drop first
the chunks no image of the store lists, then those of images without a snapshot, oldest
first - never a chunk a mounted lazy snapshot may read.

A chunk is "in use" when the metadata of an image with a lazy snapshot in the store lists
it: its daemon may read it at any time and remembers having it, so deleting it would turn a
read into an error.  The collection holds the store's gc lock; make_lazy_snapshot holds the
shared side of it until the snapshot's record exists, so a daemon is either counted or starts
after the collection.  Oldest means oldest written (mtime): reads do not touch the files.
"""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import PullError
from ..store import Store
from .daemon import cache_dir
from .locate import load_record_meta

log = logging.getLogger("puller.lazy")


@dataclass
class ChunkGcStats:
    kept: int = 0
    kept_bytes: int = 0
    in_use: int = 0  # chunks kept because a mounted snapshot's image lists them
    removed: int = 0
    removed_bytes: int = 0


def _chunks_of_images(store: Store, records: list[dict]) -> set[str]:
    """Hex digests of the chunks the lazy metadata of `records` lists."""
    out: set[str] = set()
    for record in records:
        ref = record.get("reference")
        if not record.get("lazy"):
            continue
        try:
            meta = load_record_meta(store, record)
        except (OSError, PullError) as exc:  # its daemon loaded it before; nothing to protect now
            log.warning("chunk gc: metadata of %s unreadable (%s)", ref, exc)
            continue
        out.update(c.digest.split(":", 1)[1] for c in meta.chunks)
    return out


def chunks_in_use(store: Store) -> set[str]:
    """Hex digests of the chunks the images of lazy snapshots in `store` list."""
    refs = {rec.get("ref") for rec in store.list_snapshot_records() if rec.get("mode") == "lazy"}
    return _chunks_of_images(store, [r for ref in refs if isinstance(ref, str) and (r := store.get_image(ref))])


def gc_chunks(store: Store, max_bytes: int, *, timeout: float | None = None) -> ChunkGcStats:
    """Shrink the chunk cache of `store` to at most `max_bytes` (chunks in use excepted,
    which may keep it above the bound)."""
    if max_bytes < 0:
        raise ValueError(f"chunk cache bound must be >= 0 bytes, not {max_bytes}")
    root = Path(cache_dir(store))
    stats = ChunkGcStats()
    if not root.is_dir():
        return stats
    with store.lock("gc", timeout=timeout):
        used = chunks_in_use(store)
        listed = _chunks_of_images(store, store.list_images())
        files = []
        total = 0
        for sub in root.iterdir():
            if not sub.is_dir():
                continue
            for p in sub.iterdir():
                try:
                    st = p.lstat()
                except FileNotFoundError:
                    continue
                if p.name.startswith("."):  # a chunk being written (or litter of a killed writer)
                    continue
                total += st.st_size
                if p.name in used:
                    stats.in_use += 1
                    stats.kept += 1
                    stats.kept_bytes += st.st_size
                    continue
                files.append((p.name in listed, st.st_mtime_ns, p.name, p, st.st_size))
        files.sort()
        for _, _, _, p, size in files:
            if total <= max_bytes:
                stats.kept += 1
                stats.kept_bytes += size
                continue
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
            total -= size
            stats.removed += 1
            stats.removed_bytes += size
    return stats
