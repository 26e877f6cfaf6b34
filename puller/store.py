"""Content-addressed store of blobs, unpacked layers, image records and snapshot records.

Layout under `root`:
    blobs/<alg>/<hex>          verified blobs (manifests, configs, compressed layers)
    layers/<chainid-hex>/      unpacked layer directories, keyed by ChainID, shared by images
    images/<sha256(ref)>.json  ref -> manifest digest + whatever the puller records
    snapshots/<id>/            per-container snapshot: snapshot.json, upper/, work/ (snapshot.py)
    staging/                   work in progress; renamed into place only when complete
    locks/                     flock files

Crash safety: nothing becomes visible under blobs/ or layers/ except by one rename of a complete,
verified object, so a process killed at any point leaves at most litter in staging/, which is
removed by the next process that finds no pull running (exclusive `gc` lock).

Concurrency: every writer holds the `gc` lock shared (`pin()`) while it works; gc() and staging
cleanup take it exclusively. Callers that produce a layer hold `lock("layer:<chainid>")` so a
second process waits and then finds the layer present (`ensure_layer` does that).
Lock ownership is per open file (flock), so threads of one process exclude each other too; a
process must not call gc() while it holds pin().
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

from . import fsutil
from .digest import chain_ids as _chain_ids

_DIGEST_RE = re.compile(r"^(sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_SNAPSHOT_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}$")
_HASHES = {"sha256": hashlib.sha256, "sha512": hashlib.sha512}


class StoreError(Exception):
    pass


class InvalidDigest(StoreError, ValueError):
    pass


class DigestMismatch(StoreError):
    pass


class LockTimeout(StoreError):
    pass


def parse_digest(digest: str, *, what: str = "digest") -> tuple[str, str]:
    """Validate `alg:hex` before it is used in any path; return (alg, hex)."""
    if not isinstance(digest, str) or not _DIGEST_RE.match(digest):
        raise InvalidDigest(f"invalid {what} {digest!r}: expected sha256:<64 hex> "
                            "or sha512:<128 hex>, lower case")
    alg, _, hexd = digest.partition(":")
    return alg, hexd


def _chain_hex(chain_id: str) -> str:
    alg, hexd = parse_digest(chain_id, what="chain id")
    if alg != "sha256":
        raise InvalidDigest(f"invalid chain id {chain_id!r}: chain ids are sha256")
    return hexd


def chain_ids(diff_ids: list[str]) -> list[str]:
    """OCI image-spec ChainIDs (puller.digest.chain_ids), refusing a bad diff id with the
    store's own InvalidDigest."""
    for d in diff_ids:
        parse_digest(d, what="diff id")
    return _chain_ids(diff_ids)


@dataclass
class GcStats:
    blobs_removed: int = 0
    layers_removed: int = 0
    staging_removed: int = 0
    bytes_freed: int = 0
    blobs_kept: int = 0
    layers_kept: int = 0


class BlobWriter:
    """File-like sink handed out by Store.ingest: hashes and counts while the data streams."""

    def __init__(self, f: BinaryIO, digest: str, size: int | None):
        self._f = f
        self.digest = digest
        self.expected_size = size
        self.hasher = _HASHES[digest.partition(":")[0]]()
        self.written = 0

    def write(self, data) -> int:
        n = len(data)
        if self.expected_size is not None and self.written + n > self.expected_size:
            raise DigestMismatch(f"blob {self.digest}: more data than the descriptor's size "
                                 f"{self.expected_size}")
        self.hasher.update(data)
        self._f.write(data)
        self.written += n
        return n

    def flush(self) -> None:
        self._f.flush()

    def writable(self) -> bool:
        return True


class Store:
    def __init__(self, root: str | os.PathLike, *, durable: bool = False, create: bool = True):
        """`durable`: fsync blobs and syncfs before publishing layers (survive power loss,
        not only a killed process).  `create=False`: a reader of a store that exists (no
        directories made, no staging litter cleaned)."""
        self.root = Path(root).absolute()
        self.durable = durable
        if not create:
            return
        for sub in ("blobs/sha256", "blobs/sha512", "layers", "images", "snapshots", "staging",
                    "locks"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.clean_staging(wait=False)

    # --- locks ---

    def _lock_path(self, key: str) -> Path:
        if not key or len(key) > 300:
            raise StoreError(f"invalid lock key {key!r}")
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", key)[:80]
        return self.root / "locks" / f"{safe}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.lock"

    @contextlib.contextmanager
    def lock(self, key: str, *, shared: bool = False, timeout: float | None = None) -> Iterator[None]:
        fd = os.open(self._lock_path(key), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            _flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX, timeout, key)
            yield
        finally:
            os.close(fd)  # releases the lock

    def pin(self, timeout: float | None = None) -> contextlib.AbstractContextManager[None]:
        """Hold while producing content that is not yet referenced by an image record."""
        return self.lock("gc", shared=True, timeout=timeout)

    # --- blobs ---

    def blob_path(self, digest: str) -> Path:
        alg, hexd = parse_digest(digest)
        return self.root / "blobs" / alg / hexd

    def has_blob(self, digest: str) -> bool:
        return self.blob_path(digest).is_file()

    def open_blob(self, digest: str) -> BinaryIO:
        return open(self.blob_path(digest), "rb")

    @contextlib.contextmanager
    def ingest(self, digest: str, size: int | None) -> Iterator[BlobWriter]:
        """Write a blob; it appears under blobs/ only if size and digest match on exit."""
        final = self.blob_path(digest)
        if size is not None and size < 0:
            raise StoreError(f"blob {digest}: negative size {size}")
        with self.pin():
            fd, tmp = tempfile.mkstemp(prefix=f"blob-{final.name[:16]}.", dir=self.root / "staging")
            try:
                with os.fdopen(fd, "wb", buffering=1 << 20) as f:
                    w = BlobWriter(f, digest, size)
                    yield w
                    f.flush()
                    if self.durable:
                        os.fsync(f.fileno())
                if size is not None and w.written != size:
                    raise DigestMismatch(f"blob {digest}: got {w.written} bytes, descriptor "
                                         f"says {size}")
                got = f"{digest.partition(':')[0]}:{w.hasher.hexdigest()}"
                if got != digest:
                    raise DigestMismatch(f"blob {digest}: content hashes to {got}")
                os.chmod(tmp, 0o644)
                os.replace(tmp, final)  # same content if someone else won the race
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
                raise

    # --- layers ---

    def layer_path(self, chain_id: str) -> Path:
        return self.root / "layers" / _chain_hex(chain_id)

    def has_layer(self, chain_id: str) -> bool:
        return self.layer_path(chain_id).is_dir()

    @contextlib.contextmanager
    def stage_layer(self, chain_id: str) -> Iterator[Path]:
        """A fresh staging dir to unpack into; renamed to layers/<hex> if the block succeeds.

        If the layer appeared meanwhile (another process, without `lock`), ours is discarded.
        """
        final = self.layer_path(chain_id)
        with self.pin():
            tmp = Path(tempfile.mkdtemp(prefix=f"layer-{final.name[:16]}.", dir=self.root / "staging"))
            try:
                os.chmod(tmp, 0o755)
                yield tmp
                if self.durable:
                    _syncfs(tmp)
                try:
                    fsutil.rename_noreplace(str(tmp), str(final))
                except OSError as e:
                    if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                        raise
                    shutil.rmtree(tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

    def ensure_layer(self, chain_id: str, fill: Callable[[Path], Any],
                     timeout: float | None = None) -> tuple[Path, bool]:
        """Produce the layer once across processes: (path, True if this call made it)."""
        final = self.layer_path(chain_id)
        if final.is_dir():
            return final, False
        with self.lock(f"layer:{chain_id}", timeout=timeout):
            if final.is_dir():
                return final, False
            with self.stage_layer(chain_id) as tmp:
                fill(tmp)
        return final, True

    # --- images ---

    def _image_file(self, ref: str) -> Path:
        if not isinstance(ref, str) or not ref or len(ref) > 4096:
            raise StoreError(f"invalid image reference {ref!r}")
        return self.root / "images" / (hashlib.sha256(ref.encode()).hexdigest() + ".json")

    def put_image(self, ref: str, manifest_digest: str, record: dict) -> None:
        parse_digest(manifest_digest, what="manifest digest")
        for c in record.get("chain_ids", []):
            _chain_hex(c)
        data = dict(record)
        data["ref"] = ref
        data["manifest_digest"] = manifest_digest
        _atomic_write_json(self._image_file(ref), data)

    def get_image(self, ref_or_digest: str) -> dict | None:
        if _DIGEST_RE.match(ref_or_digest or ""):
            for rec in self.list_images():
                if rec.get("manifest_digest") == ref_or_digest:
                    return rec
            return None
        try:
            return json.loads(self._image_file(ref_or_digest).read_text())
        except FileNotFoundError:
            return None

    def list_images(self) -> list[dict]:
        out = []
        for p in sorted((self.root / "images").glob("*.json")):
            with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
                out.append(json.loads(p.read_text()))
        return out

    def remove_image(self, ref: str) -> bool:
        try:
            self._image_file(ref).unlink()
            return True
        except FileNotFoundError:
            return False

    # --- snapshot records (the mounts themselves are snapshot.py's) ---

    def snapshot_dir(self, snapshot_id: str) -> Path:
        if not _SNAPSHOT_ID_RE.match(snapshot_id or ""):
            raise StoreError(f"invalid snapshot id {snapshot_id!r}")
        return self.root / "snapshots" / snapshot_id

    def put_snapshot_record(self, snapshot_id: str, record: dict) -> None:
        for c in record.get("chain_ids", []):
            _chain_hex(c)
        _atomic_write_json(self.snapshot_dir(snapshot_id) / "snapshot.json", record)

    def get_snapshot_record(self, snapshot_id: str) -> dict | None:
        try:
            return json.loads((self.snapshot_dir(snapshot_id) / "snapshot.json").read_text())
        except FileNotFoundError:
            return None

    def list_snapshot_records(self) -> list[dict]:
        out = []
        for d in sorted((self.root / "snapshots").iterdir()):
            rec = self.get_snapshot_record(d.name) if _SNAPSHOT_ID_RE.match(d.name) else None
            if rec is not None:
                out.append(rec)
        return out

    # --- cleanup ---

    def clean_staging(self, *, wait: bool = True, timeout: float | None = None) -> int:
        """Remove staging litter of dead processes; a no-op while any writer is active."""
        try:
            with self.lock("gc", timeout=timeout if wait else 0):
                return self._clean_staging_locked()
        except LockTimeout:
            return 0

    def _clean_staging_locked(self) -> int:
        n = 0
        for p in (self.root / "staging").iterdir():
            fsutil.rmtree_at_path(p)
            n += 1
        return n

    def gc(self, *, timeout: float | None = None) -> GcStats:
        """Remove blobs and layers no image record or snapshot refers to."""
        stats = GcStats()
        with self.lock("gc", timeout=timeout):
            stats.staging_removed = self._clean_staging_locked()
            keep_blobs: set[str] = set()
            keep_layers: set[str] = set()
            for rec in self.list_images():
                _collect_digests(rec, keep_blobs)
                keep_layers.update(rec.get("chain_ids") or [])
                if rec.get("diff_ids"):
                    with contextlib.suppress(InvalidDigest):
                        keep_layers.update(chain_ids(rec["diff_ids"]))
            for rec in self.list_snapshot_records():
                keep_layers.update(rec.get("chain_ids") or [])
            for alg in _HASHES:
                for p in (self.root / "blobs" / alg).iterdir():
                    if f"{alg}:{p.name}" in keep_blobs:
                        stats.blobs_kept += 1
                        continue
                    stats.bytes_freed += p.lstat().st_size
                    fsutil.rmtree_at_path(p)
                    stats.blobs_removed += 1
            for p in (self.root / "layers").iterdir():
                if f"sha256:{p.name}" in keep_layers:
                    stats.layers_kept += 1
                    continue
                stats.bytes_freed += _tree_size(p)
                fsutil.rmtree_at_path(p)
                stats.layers_removed += 1
        return stats


def _collect_digests(obj: Any, out: set[str]) -> None:
    # the image record's schema belongs to the registry side; any digest-shaped string in it
    # is treated as a reference, which errs on the side of keeping
    if isinstance(obj, str):
        if _DIGEST_RE.match(obj):
            out.add(obj)
    elif isinstance(obj, dict):
        for v in obj.values():
            _collect_digests(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_digests(v, out)


def _tree_size(p: Path) -> int:
    total = 0
    for dirpath, dirnames, filenames in os.walk(p):
        for n in filenames:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, n)).st_blocks * 512
    return total


def _atomic_write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _flock(fd: int, op: int, timeout: float | None, key: str) -> None:
    if timeout is None:
        fcntl.flock(fd, op)
        return
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockTimeout(f"lock {key!r} still held after {timeout} s") from None
            time.sleep(delay)
            delay = min(delay * 2, 0.1)


def _syncfs(path: Path) -> None:
    import ctypes

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        ctypes.CDLL(None, use_errno=True).syncfs(fd)
    finally:
        os.close(fd)
