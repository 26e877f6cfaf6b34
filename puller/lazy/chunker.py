"""Cutting regular files into chunks and writing the chunk data blob of one layer.

Chunks are fixed-size pieces of a file (the last one shorter), so a read at offset O of a file
needs chunk O // chunk_size without a search.  Fixed-size rather than content-defined: the
dedup that matters for images is of whole files (the same library in many images, a file
unchanged between versions), which fixed-size chunks catch as well; content-defined cutting
would cost the O(1) offset lookup and a rolling hash in Python over every byte.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import BinaryIO

import zstandard

from .format import Chunk

DEFAULT_CHUNK_SIZE = 1 << 20
# Store compressed only when it saves at least this fraction: a compressed chunk costs a
# decompression on every cold read.
MIN_SAVING = 0.10


@dataclass
class ChunkTable:
    """All chunks of one image being indexed, deduplicated by content digest."""

    chunk_size: int = DEFAULT_CHUNK_SIZE
    level: int = 3
    chunks: list[Chunk] = field(default_factory=list)
    by_digest: dict[str, int] = field(default_factory=dict)
    raw_bytes: int = 0  # file bytes seen, duplicates included
    stored_bytes: int = 0  # bytes written to data blobs

    def __post_init__(self) -> None:
        self._zstd = zstandard.ZstdCompressor(level=self.level)

    def add(self, data: bytes, blob_index: int, out: BinaryIO) -> int:
        """Index of the chunk with these bytes; stored in `out` (blob `blob_index`) if new."""
        self.raw_bytes += len(data)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        known = self.by_digest.get(digest)
        if known is not None:
            return known
        packed = self._zstd.compress(data) if data else b""
        compressed = len(packed) <= len(data) * (1 - MIN_SAVING)
        stored = packed if compressed else data
        offset = out.tell()
        out.write(stored)
        self.stored_bytes += len(stored)
        self.chunks.append(Chunk(digest, blob_index, offset, len(stored), len(data), compressed))
        self.by_digest[digest] = len(self.chunks) - 1
        return len(self.chunks) - 1


def decode_chunk(chunk: Chunk, stored: bytes) -> bytes:
    """The chunk's bytes from what the blob holds, checked against its digest.

    Raises ValueError naming the chunk when the bytes are not the ones the metadata promises.
    """
    if len(stored) != chunk.stored:
        raise ValueError(f"chunk {chunk.digest}: got {len(stored)} stored bytes, expected {chunk.stored}")
    if chunk.zstd:
        try:
            data = zstandard.ZstdDecompressor().decompress(stored, max_output_size=chunk.size)
        except zstandard.ZstdError as exc:
            raise ValueError(f"chunk {chunk.digest}: does not decompress: {exc}") from None
    else:
        data = stored
    got = hashlib.sha256(data).hexdigest()
    if len(data) != chunk.size or got != chunk.digest.split(":", 1)[1]:
        raise ValueError(f"chunk {chunk.digest}: content is sha256:{got} ({len(data)} bytes), "
                         f"not the {chunk.size} bytes the metadata names")
    return data
