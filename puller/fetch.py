"""Streaming readers: verify a blob while it downloads, decompress, hash.

The chain for one layer is

    HTTP body -> BlobReader (size + digest) -> gzip/zstd/none -> DiffIDReader -> apply_layer

BlobReader raises the moment the registry sends more bytes than the descriptor
says, and at end of stream if it sent fewer or the digest differs.  Nothing is
trusted until both readers have reached end of stream and checked their digest.
"""
from __future__ import annotations

import io
import sys
import threading
from typing import TYPE_CHECKING, BinaryIO, Callable

if TYPE_CHECKING:
    import requests

from .digest import parse_digest
from .errors import AnswerTooLarge, VerificationError

CHUNK = 1 << 20

try:  # isal's igzip is 2-4x faster than zlib and decompresses in its own thread
    from isal import igzip_threaded as _igzip_threaded
except ImportError:  # pragma: no cover - isal is a dependency, zlib is the fallback
    _igzip_threaded = None


def _is_response(obj: object) -> bool:
    """isinstance(obj, requests.Response) without importing requests (if it was never
    imported, obj is none of its responses)."""
    mod = sys.modules.get("requests")
    return mod is not None and isinstance(obj, mod.Response)


class BlobReader(io.RawIOBase):
    """Reads a blob from `source`, checking its size and digest as it goes."""

    def __init__(self, source: BinaryIO | requests.Response, digest: str, size: int, *, what: str,
                 on_progress: Callable[[int], None] | None = None,
                 abort: threading.Event | None = None,
                 resume: Callable[[int], requests.Response] | None = None,
                 resume_deadline: float | None = None) -> None:
        """`resume(offset)` reopens the download at `offset` (an HTTP Range request) after a
        cut connection, until `resume_deadline` (time.monotonic()) has passed."""
        super().__init__()
        self._on_progress = on_progress
        self._abort = abort
        self._resume = resume
        self._resume_deadline = resume_deadline
        self.resumes = 0
        self._resp = source if _is_response(source) else None
        self._raw = source.raw if self._resp is not None else source
        self._digest = parse_digest(digest, what=what)
        self._hash = self._digest.hasher()
        self.size = size
        self.count = 0
        self.what = what
        self.verified = False
        if self._resp is not None:
            self._check_length(self._resp, 0)

    def _check_length(self, resp: requests.Response, offset: int) -> None:
        length = resp.headers.get("Content-Length")
        # With a content-coding the header counts encoded bytes; the digest still decides.
        if length and length.isdigit() and not resp.headers.get("Content-Encoding") \
                and int(length) != self.size - offset:
            raise VerificationError(
                f"{self.what}: registry announces {int(length) + offset} bytes, descriptor says {self.size}")

    def readable(self) -> bool:
        return True

    def _read_raw(self, n: int) -> bytes:
        if self._resp is None:
            return self._raw.read(n)
        while True:
            try:
                # read1: whatever has arrived, so progress and the pipeline keep moving
                # on a slow link instead of waiting for a full chunk.
                if hasattr(self._raw, "read1"):
                    return self._raw.read1(n, decode_content=True)
                return self._raw.read(n, decode_content=True)
            except Exception as exc:  # urllib3 ProtocolError, ReadTimeout...: a cut connection
                failure = VerificationError(
                    f"{self.what}: download failed after {self.count} of {self.size} bytes: {exc}")
                if not self._reopen(failure):
                    raise failure from exc

    def _reopen(self, failure: Exception) -> bool:
        """Continue a cut download where it stopped, if allowed and time is left."""
        import time
        if self._resume is None or self._resume_deadline is None or time.monotonic() >= self._resume_deadline:
            return False
        if self._abort is not None and self._abort.is_set():
            return False
        try:
            resp = self._resume(self.count)
        except Exception:  # the registry's own errors end the attempt with the original failure
            return False
        if resp.status_code != 206 and self.count > 0:
            resp.close()  # no range support: starting over would need a fresh hash
            return False
        try:
            self._check_length(resp, self.count)
        except VerificationError:
            resp.close()  # an inconsistent answer: report the cut, not the retry
            return False
        self._resp.close()
        self._resp, self._raw = resp, resp.raw
        self.resumes += 1
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if self.verified:
            return 0
        if self._abort is not None and self._abort.is_set():
            raise VerificationError(f"{self.what}: aborted because another layer failed")
        # Ask for one byte more than allowed so an oversized blob shows itself.
        want = min(len(b), CHUNK, self.size - self.count + 1)
        data = self._read_raw(want)
        if not data:
            self._finish()
            return 0
        self.count += len(data)
        if self.count > self.size:
            raise VerificationError(f"{self.what}: registry sent more than the {self.size} bytes "
                                    "the descriptor says (size lie)")
        self._hash.update(data)
        n = len(data)
        b[:n] = data
        if self._on_progress is not None:
            self._on_progress(self.count)
        return n

    def _finish(self) -> None:
        if self.count < self.size:
            raise VerificationError(f"{self.what}: blob truncated: got {self.count} of {self.size} bytes")
        got = self._hash.hexdigest()
        if got != self._digest.hex:
            raise VerificationError(f"{self.what}: content digest {self._digest.algorithm}:{got} "
                                    f"does not match descriptor digest {self._digest}")
        self.verified = True

    def drain(self) -> None:
        """Read to the end so size and digest are checked."""
        buf = bytearray(CHUNK)
        while not self.verified:
            self.readinto(buf)

    def close(self) -> None:
        if self._resp is not None:
            self._resp.close()
        super().close()


class DiffIDReader(io.RawIOBase):
    """Hashes the uncompressed layer as it is read; checks it against diff_id at the end."""

    def __init__(self, source: BinaryIO, diff_id: str, *, what: str, max_bytes: int | None = None) -> None:
        super().__init__()
        self._src = source
        self._digest = parse_digest(diff_id, what=f"{what} diff_id")
        self._hash = self._digest.hasher()
        self.count = 0
        self.what = what
        self.max_bytes = max_bytes
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:  # type: ignore[override]
        if self.eof:
            return 0
        data = self._src.read(min(len(b), CHUNK))
        if not data:
            self.eof = True
            return 0
        self.count += len(data)
        if self.max_bytes is not None and self.count > self.max_bytes:
            raise VerificationError(
                f"{self.what}: uncompressed layer exceeds the limit of {self.max_bytes} bytes")
        self._hash.update(data)
        n = len(data)
        b[:n] = data
        return n

    def drain_and_verify(self) -> str:
        buf = bytearray(CHUNK)
        while not self.eof:
            self.readinto(buf)
        got = f"{self._digest.algorithm}:{self._hash.hexdigest()}"
        if got != str(self._digest):
            raise VerificationError(
                f"{self.what}: uncompressed content {got} does not match rootfs.diff_ids entry {self._digest}")
        return got


def decompressor(compression: str, source: BinaryIO) -> BinaryIO:
    """A reader of the decompressed stream of `source`."""
    if compression == "":
        return source
    if compression == "gzip":
        if _igzip_threaded is not None:
            return _igzip_threaded.open(source, "rb", threads=1, block_size=CHUNK)
        import gzip
        return gzip.GzipFile(fileobj=source, mode="rb")
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdDecompressor().stream_reader(
            source, read_size=CHUNK, read_across_frames=True, closefd=False)
    raise VerificationError(f"unsupported layer compression {compression!r}")


def fetch_small_blob(client, repository: str, digest: str, size: int, *, cap: int, what: str) -> bytes:
    """Download a whole (small) blob such as an image config, verified."""
    if size > cap:
        raise VerificationError(f"{what}: descriptor size {size} exceeds the {cap}-byte limit")
    d = parse_digest(digest, what=what)
    try:
        # One byte more than the descriptor allows, so a longer blob shows itself.
        body = client.get_small(f"{repository}/blobs/{d}", cap=size + 1, what=f"blob {repository}@{d}").body
    except AnswerTooLarge:
        raise VerificationError(f"{what}: registry sent more than the {size} bytes the descriptor says "
                                "(size lie)") from None
    if len(body) > size:
        raise VerificationError(f"{what}: registry sent more than the {size} bytes the descriptor says (size lie)")
    if len(body) < size:
        raise VerificationError(f"{what}: blob truncated: got {len(body)} of {size} bytes")
    if not d.matches(body):
        got = d.hasher()
        got.update(body)
        raise VerificationError(f"{what}: content digest {d.algorithm}:{got.hexdigest()} "
                                f"does not match descriptor digest {d}")
    return body
