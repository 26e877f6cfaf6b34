"""pull(): reference -> verified manifest, config and unpacked layers in the store.

Each layer runs in a worker thread as one stream: download -> size/digest check
-> decompress (isal gzip runs in a thread of its own) -> diff_id hash -> the
unpacker writing into a staging directory.  The store renames the staging
directory into place only when the context exits cleanly, which happens only
after both digests were checked at end of stream, so nothing unverified ever
becomes visible.  Layers already in the store (same ChainID) are skipped, and
a per-layer store lock lets concurrent pulls of the same image share the work.
"""
from __future__ import annotations

import contextlib
import io
import json
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Callable

from . import mediatypes as mt
from .digest import chain_ids as compute_chain_ids
from .errors import LayerError, ManifestError, PullError, VerificationError
from .fetch import CHUNK, BlobReader, DiffIDReader, decompressor
from .manifest import Descriptor, Manifest
from .platform import Platform
from .reference import Reference, parse_reference
from .registry import RegistryClient, RegistryOptions
from .resolve import Resolved, fetch_manifest, referrers, resolve

ProgressFn = Callable[[dict], None]
MAX_ARTIFACT_BLOB = 1 << 30
MAX_DRAIN_FOR_DIAGNOSIS = 64 << 20


@dataclass
class PullOptions:
    platform: Platform | None = None  # default: the running machine's
    registry: RegistryOptions = field(default_factory=RegistryOptions)
    parallel: int = 3  # layers downloading at once
    limits: Any = None  # puller.unpack.Limits, passed to apply_layer
    progress: ProgressFn | None = None


@dataclass
class LayerResult:
    digest: str
    diff_id: str
    chain_id: str
    size: int
    status: str  # "pulled" or "exists"
    stats: Any = None


@dataclass
class PulledImage:
    reference: str
    manifest_digest: str  # the platform manifest
    index_digest: str | None
    config_digest: str
    config: dict
    diff_ids: list[str]
    chain_ids: list[str]
    layers: list[LayerResult]
    platform: str | None
    seconds: float = 0.0

    def record(self) -> dict:
        return {
            "reference": self.reference,
            "manifest_digest": self.manifest_digest,
            "index_digest": self.index_digest,
            "config_digest": self.config_digest,
            "diff_ids": self.diff_ids,
            "chain_ids": self.chain_ids,
            "layers": [{"digest": l.digest, "size": l.size, "chain_id": l.chain_id} for l in self.layers],
            "platform": self.platform,
        }


def _emit(progress: ProgressFn | None, **event: Any) -> None:
    if progress is not None:
        progress(event)


def _store_blob(store, digest: str, data: bytes) -> None:
    if store.has_blob(digest):
        return
    with store.ingest(digest, len(data)) as f:
        f.write(data)


def _pull_layer(client: RegistryClient, repository: str, desc: Descriptor, diff_id: str, chain_id: str,
                store, limits: Any, progress: ProgressFn | None, abort: threading.Event) -> LayerResult:
    what = f"{desc.digest}"
    if store.has_layer(chain_id):
        _emit(progress, event="layer", layer=desc.digest, status="exists", bytes=desc.size, total=desc.size)
        return LayerResult(desc.digest, diff_id, chain_id, desc.size, "exists")
    compression = mt.LAYER_COMPRESSION.get(desc.media_type)
    if compression is None:
        raise LayerError(what, f"unsupported layer media type {desc.media_type!r}")
    last = [0.0]

    def on_progress(count: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.2 or count == desc.size:
            last[0] = now
            _emit(progress, event="layer", layer=desc.digest, status="downloading", bytes=count, total=desc.size)

    stats: list[Any] = []

    def fill(staging) -> None:
        """Runs inside the store's staging dir; any exception discards the dir."""
        resp = client.open_blob(repository, desc.digest)
        try:
            blob = BlobReader(resp, desc.digest, desc.size, what=f"layer {what}",
                              on_progress=on_progress if progress else None, abort=abort,
                              resume=lambda offset: client.open_blob(repository, desc.digest, offset),
                              resume_deadline=time.monotonic() + client.options.timeout)
        except VerificationError as exc:
            resp.close()
            raise LayerError(what, _strip(str(exc), what)) from exc
        stream = None
        try:
            stream = decompressor(compression, blob)
            tar = DiffIDReader(stream, diff_id, what=f"layer {what}",
                               max_bytes=getattr(limits, "max_bytes", None))
            buffered = io.BufferedReader(tar, CHUNK)
            stats.append(_apply(buffered, staging, desc.digest, limits))
            # The unpacker may stop at the tar end blocks: the rest still counts.
            while buffered.read(CHUNK):
                pass
            tar.drain_and_verify()
            blob.drain()
        except PullError as exc:
            if isinstance(exc, LayerError):
                raise
            raise LayerError(what, _strip(str(exc), what)) from exc
        except Exception as exc:
            # Corrupt content usually breaks the decompressor before the digest check at the
            # end: read the (bounded) rest so the error names the digest lie. Not for local
            # I/O errors (errno set: disk full...), which say what they are.
            remaining = desc.size - blob.count
            if (not blob.verified and remaining <= MAX_DRAIN_FOR_DIAGNOSIS and not abort.is_set()
                    and getattr(exc, "errno", None) is None):
                if stream is not None and stream is not blob:
                    stream.close()  # stops isal's reader thread before we read the blob ourselves
                try:
                    blob.drain()
                except VerificationError as vexc:
                    raise LayerError(what, _strip(str(vexc), what)) from exc
                except Exception:
                    pass
            raise LayerError(what, _strip(f"{exc}" if type(exc).__name__ == "UnpackError"
                                          else f"{type(exc).__name__}: {exc}", what)) from exc
        finally:
            if stream is not None and stream is not blob:
                stream.close()
            blob.close()

    _, made = store.ensure_layer(chain_id, fill)
    if not made:  # another pull finished it while we waited for the layer lock
        _emit(progress, event="layer", layer=desc.digest, status="exists", bytes=desc.size, total=desc.size)
        return LayerResult(desc.digest, diff_id, chain_id, desc.size, "exists")
    _emit(progress, event="layer", layer=desc.digest, status="done", bytes=desc.size, total=desc.size)
    return LayerResult(desc.digest, diff_id, chain_id, desc.size, "pulled", stats[0] if stats else None)


def _apply(stream, staging, layer: str, limits: Any):
    """Hand the uncompressed tar stream to the unpacker (puller/unpack.py)."""
    from . import unpack
    apply = getattr(unpack, "apply_layer", None) or unpack.unpack_layer
    kwargs = {"limits": limits} if limits is not None else {}
    return apply(stream, staging, layer=layer, **kwargs)


def _strip(message: str, layer: str) -> str:
    prefix = f"layer {layer}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def pull_layers(client: RegistryClient, resolved: Resolved, store, options: PullOptions) -> list[LayerResult]:
    diff_ids = list(resolved.config["rootfs"]["diff_ids"])
    chains = compute_chain_ids(diff_ids)
    layers = resolved.manifest.layers
    abort = threading.Event()
    results: list[LayerResult | None] = [None] * len(layers)
    with ThreadPoolExecutor(max_workers=max(1, options.parallel), thread_name_prefix="layer") as pool:
        futures = {
            pool.submit(_pull_layer, client, resolved.reference.repository, desc, diff_ids[i], chains[i],
                        store, options.limits, options.progress, abort): i
            for i, desc in enumerate(layers)
        }
        done, pending = wait(futures, return_when=FIRST_EXCEPTION)
        failed = [f for f in done if f.exception() is not None]
        if failed:
            abort.set()
            for f in pending:
                f.cancel()
            wait(pending)
            # Report the first real failure, not the "aborted" knock-on errors.
            raise failed[0].exception()  # type: ignore[misc]
        for f, i in futures.items():
            results[i] = f.result()
    return [r for r in results if r is not None]


def pull(ref: str | Reference, store, options: PullOptions | None = None) -> PulledImage:
    """Pull an image into `store` (a puller.store.Store) and record it under `ref`."""
    options = options or PullOptions()
    ref = ref if isinstance(ref, Reference) else parse_reference(ref)
    started = time.monotonic()
    client = RegistryClient(ref.api_host, options.registry)
    # Pinned: gc must not remove what we ingest before the image record refers to it.
    with store.pin(), contextlib.closing(client):
        resolved = resolve(client, ref, options.platform)
        _emit(options.progress, event="resolved", reference=str(ref), manifest=resolved.manifest.digest,
              layers=len(resolved.manifest.layers))
        if resolved.index is not None:
            _store_blob(store, resolved.index.digest, resolved.index.raw)
        _store_blob(store, resolved.manifest.digest, resolved.manifest.raw)
        _store_blob(store, resolved.manifest.config.digest, resolved.config_raw)
        layer_results = pull_layers(client, resolved, store, options)
        diff_ids = list(resolved.config["rootfs"]["diff_ids"])
        image = PulledImage(
            reference=str(ref),
            manifest_digest=resolved.manifest.digest,
            index_digest=resolved.index.digest if resolved.index else None,
            config_digest=resolved.manifest.config.digest,
            config=resolved.config,
            diff_ids=diff_ids,
            chain_ids=compute_chain_ids(diff_ids),
            layers=layer_results,
            platform=str(resolved.platform) if resolved.platform else None,
            seconds=time.monotonic() - started,
        )
        record = image.record()
        store.put_image(str(ref), image.manifest_digest, record)
    _emit(options.progress, event="done", reference=str(ref), manifest=image.manifest_digest,
          seconds=round(image.seconds, 3))
    return image


@dataclass
class PulledArtifact:
    reference: str
    manifest_digest: str
    artifact_type: str | None
    blobs: list[Descriptor]
    annotations: dict


def pull_artifact(ref: str | Reference, store, options: PullOptions | None = None) -> PulledArtifact:
    """Fetch an artifact manifest and all its blobs, verified, into the store's blobs."""
    options = options or PullOptions()
    ref = ref if isinstance(ref, Reference) else parse_reference(ref)
    client = RegistryClient(ref.api_host, options.registry)
    try:
        doc = fetch_manifest(client, ref.repository, ref.selector)
        if not isinstance(doc, Manifest):
            raise ManifestError(f"{ref}: is an index, not an artifact manifest")
        _store_blob(store, doc.digest, doc.raw)
        blobs = [doc.config, *doc.layers]
        for desc in blobs:
            if store.has_blob(desc.digest):
                continue
            if desc.size > MAX_ARTIFACT_BLOB:
                raise VerificationError(f"artifact blob {desc.digest} of {ref}: {desc.size} bytes is over the limit")
            reader = BlobReader(client.open_blob(ref.repository, desc.digest), desc.digest, desc.size,
                                what=f"artifact blob {desc.digest} of {ref}")
            try:
                # The store verifies again on exit; our reader fails early on a lie.
                with store.ingest(desc.digest, desc.size) as f:
                    buf = bytearray(CHUNK)
                    while n := reader.readinto(buf):
                        f.write(buf[:n])
            finally:
                reader.close()
    finally:
        client.close()
    return PulledArtifact(str(ref), doc.digest, doc.artifact_type or doc.config.media_type,
                          blobs, doc.annotations)


def list_referrers(ref: str | Reference, options: PullOptions | None = None,
                   artifact_type: str | None = None) -> list[Descriptor]:
    """Referrers of the manifest `ref` names (resolving a tag to its digest first)."""
    options = options or PullOptions()
    ref = ref if isinstance(ref, Reference) else parse_reference(ref)
    client = RegistryClient(ref.api_host, options.registry)
    try:
        digest = ref.digest or fetch_manifest(client, ref.repository, ref.selector).digest
        return referrers(client, ref.repository, digest, artifact_type)
    finally:
        client.close()


def image_record_json(image: PulledImage) -> str:
    return json.dumps(image.record(), sort_keys=True)
