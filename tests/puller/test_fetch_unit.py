"""Unit tests of the verifying/decompressing readers (no network)."""
from __future__ import annotations

import gzip
import hashlib
import io

import pytest
import zstandard

from puller.errors import VerificationError
from puller.fetch import BlobReader, DiffIDReader, decompressor


def digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def read_all(r) -> bytes:
    out = bytearray()
    while chunk := r.read(65536):
        out += chunk
    return bytes(out)


def test_blob_reader_accepts_exact_content():
    data = b"x" * 300_000
    r = BlobReader(io.BytesIO(data), digest(data), len(data), what="blob t")
    assert read_all(r) == data and r.verified


def test_blob_reader_refuses_extra_bytes_before_reading_them_all():
    data = b"y" * 100
    src = io.BytesIO(data + b"z" * 10_000_000)
    r = BlobReader(src, digest(data), len(data), what="blob t")
    with pytest.raises(VerificationError, match="more than the 100 bytes"):
        read_all(r)
    assert src.tell() < 2 << 20  # stopped early, did not swallow the 10 MB


def test_blob_reader_refuses_short_and_wrong_content():
    data = b"abc" * 1000
    with pytest.raises(VerificationError, match="truncated: got 1500 of 3000"):
        read_all(BlobReader(io.BytesIO(data[:1500]), digest(data), len(data), what="blob t"))
    with pytest.raises(VerificationError, match="does not match descriptor digest"):
        read_all(BlobReader(io.BytesIO(data.upper()), digest(data), len(data), what="blob t"))


@pytest.mark.parametrize("compression", ["gzip", "zstd", ""])
def test_decompress_and_diff_id(compression):
    raw = bytes(range(256)) * 4000
    blob = {"gzip": lambda d: gzip.compress(d, mtime=0), "zstd": zstandard.ZstdCompressor().compress,
            "": lambda d: d}[compression](raw)
    reader = BlobReader(io.BytesIO(blob), digest(blob), len(blob), what="blob t")
    tar = DiffIDReader(decompressor(compression, reader), digest(raw), what="layer t")
    assert read_all(tar) == raw
    assert tar.drain_and_verify() == digest(raw)
    bad = DiffIDReader(io.BytesIO(raw), digest(b"other"), what="layer t")
    with pytest.raises(VerificationError, match="does not match rootfs.diff_ids"):
        bad.drain_and_verify()


def test_multi_member_gzip_and_multi_frame_zstd():
    a, b = b"first" * 1000, b"second" * 1000
    g = gzip.compress(a) + gzip.compress(b)
    assert read_all(decompressor("gzip", io.BytesIO(g))) == a + b
    z = zstandard.ZstdCompressor().compress(a) + zstandard.ZstdCompressor().compress(b)
    assert read_all(decompressor("zstd", io.BytesIO(z))) == a + b


def test_decompression_bomb_capped():
    bomb = gzip.compress(b"\0" * (20 << 20), compresslevel=9)
    assert len(bomb) < 100_000
    tar = DiffIDReader(decompressor("gzip", io.BytesIO(bomb)), digest(b""), what="layer bomb", max_bytes=1 << 20)
    with pytest.raises(VerificationError, match="exceeds the limit of 1048576 bytes"):
        read_all(tar)
