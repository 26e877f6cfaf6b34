"""`python -m puller index REF`: index an image and push the lazy-pull artifact beside it.

Why a chunked data blob rather than a seekable index into the gzip layers (SOCI/zran): a zran
checkpoint must restart inflate at a bit offset with a 32 KiB window, which needs zlib's
inflatePrime - Python's zlib does not expose it - and every cold read of a few bytes would
still inflate up to a checkpoint interval of data.  A separate blob of independently
compressed chunks costs registry space (about one more copy of the image's file data) but
gives O(1) random access, per-chunk verification by digest, and cross-layer/cross-image dedup
of equal chunks, and works the same for gzip, zstd and uncompressed layers.
"""
from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import tempfile
from dataclasses import dataclass

from .. import mediatypes as mt
from ..digest import sha256_of
from ..errors import LayerError, ManifestError, NotFound
from ..fetch import CHUNK, BlobReader, DiffIDReader, decompressor
from ..manifest import Index
from ..pull import PullOptions
from ..reference import Reference, parse_reference
from ..registry import RegistryClient
from ..resolve import Resolved, fetch_manifest, resolve
from ..tarstream import TarFormatError, TarReader
from ..unpack import Limits, _Refused, clean_name
from .chunker import DEFAULT_CHUNK_SIZE, ChunkTable
from .format import (ARTIFACT_TYPE, DATA_MEDIA_TYPE, META_DIGEST_ANNOTATION, META_MEDIA_TYPE, META_SIZE_ANNOTATION,
                     Meta, resolve_path)
from .push import file_digest, push_blob, push_manifest
from .tree import MergedTree, TreeError

log = logging.getLogger(__name__)
EMPTY_CONFIG = b"{}"


@dataclass
class IndexResult:
    reference: str
    image_digest: str
    artifact_digest: str
    meta_digest: str
    meta_bytes: int
    data_blobs: list[tuple[str, int]]
    files: int
    file_bytes: int  # regular-file bytes seen in the layers, duplicates included
    stored_bytes: int  # bytes in the data blobs (deduplicated, compressed)
    chunks: int

    def record(self) -> dict:
        return dict(self.__dict__, data_blobs=[list(b) for b in self.data_blobs])


def _index_layer(client: RegistryClient, resolved: Resolved, i: int, tree: MergedTree, table: ChunkTable,
                 out: io.BufferedWriter, blob_index: int, limits: Limits) -> None:
    desc = resolved.manifest.layers[i]
    diff_id = resolved.config["rootfs"]["diff_ids"][i]
    compression = mt.LAYER_COMPRESSION.get(desc.media_type)
    if compression is None:
        raise LayerError(desc.digest, f"unsupported layer media type {desc.media_type!r}")
    repo = resolved.reference.repository
    blob = BlobReader(client.open_blob(repo, desc.digest), desc.digest, desc.size, what=f"layer {desc.digest}")
    stream = decompressor(compression, blob)
    try:
        diff = DiffIDReader(stream, diff_id, what=f"layer {desc.digest}", max_bytes=limits.max_bytes)
        reader = TarReader(io.BufferedReader(diff, CHUNK), max_bytes=limits.max_bytes, max_meta=limits.max_meta)
        tree.start_layer()
        entries = 0
        while (m := _next_member(reader, desc.digest)) is not None:
            entries += 1
            if entries > limits.max_entries:
                raise LayerError(desc.digest, f"more than {limits.max_entries} entries")
            try:
                path = clean_name(m.name, limits.max_path)
                node = tree.apply(path, m)
            except (_Refused, TreeError, TarFormatError) as exc:
                raise LayerError(desc.digest, f"member {m.name!r}: {exc}") from None
            if node is None:
                continue
            node.size = m.size
            left = m.size
            while left:
                data = reader.read_data(min(left, table.chunk_size))  # all of it, or TarFormatError
                left -= len(data)
                node.chunks.append(table.add(data, blob_index, out))
        try:
            reader.drain()
        except TarFormatError as exc:
            raise LayerError(desc.digest, str(exc)) from None
        diff.drain_and_verify()
        blob.drain()
    finally:
        if stream is not blob:
            stream.close()
        blob.close()


def _next_member(reader: TarReader, layer: str):
    try:
        return reader.next()
    except TarFormatError as exc:
        raise LayerError(layer, str(exc)) from None


def build_meta(client: RegistryClient, resolved: Resolved, workdir: str, *,
               chunk_size: int = DEFAULT_CHUNK_SIZE, limits: Limits = Limits()) -> tuple[Meta, list[str], ChunkTable]:
    """The metadata of `resolved` and the data blob files (one per layer that adds chunks)."""
    tree = MergedTree()
    table = ChunkTable(chunk_size)
    paths: list[str] = []
    blobs: list[tuple[str, int]] = []
    for i in range(len(resolved.manifest.layers)):
        path = os.path.join(workdir, f"data-{i}")
        before = len(table.chunks)
        with open(path, "wb") as out:
            _index_layer(client, resolved, i, tree, table, out, len(paths), limits)
        if len(table.chunks) == before:
            os.unlink(path)
            continue
        blobs.append((file_digest(path), os.path.getsize(path)))
        paths.append(path)
    meta = Meta(resolved.manifest.digest, chunk_size, blobs, table.chunks, tree.sorted_nodes())
    return meta, paths, table


# Metadata up to this size rides inside the artifact manifest, and the artifact manifest inside
# the referrers tag index (OCI `data`, checked against the digest like any fetched content):
# a lazy pull then takes two requests after the image manifest's.  Larger ones are fetched,
# keeping manifests far below registries' limits (4 MiB for Distribution).
EMBED_MAX = 128 << 10


def add_referrers_tag(client: RegistryClient, repo: str, subject: str, descriptor: dict) -> None:
    """Add `descriptor` to the `sha256-<hex>` tag index (for registries without the referrers API)."""
    tag = subject.replace(":", "-")
    manifests: list[dict] = []
    with contextlib.suppress(NotFound):
        doc = fetch_manifest(client, repo, tag)
        if not isinstance(doc, Index):
            raise ManifestError(f"{repo}:{tag}: referrers tag does not point at an index")
        manifests = [m for m in json.loads(doc.raw).get("manifests", []) if m.get("digest") != descriptor["digest"]]
    body = json.dumps({"schemaVersion": 2, "mediaType": mt.OCI_INDEX, "manifests": manifests + [descriptor]},
                      indent=1).encode()
    push_manifest(client, repo, tag, body, mt.OCI_INDEX)


def _prefetch_paths(meta: Meta, paths: list[str]) -> list[str]:
    """`paths` as the metadata keeps them (relative, no empty or dot components, each once),
    without those that name nothing in the image."""
    by_path = {n.path: n for n in meta.nodes}
    out: list[str] = []
    for raw in paths:
        p = "/".join(c for c in raw.strip().split("/") if c and c != ".")
        if not p or ".." in p.split("/") or p in out:
            continue
        if resolve_path(by_path, p) is None:
            log.warning("prefetch list: %r is not in the image; left out", raw)
            continue
        out.append(p)
    return out


def index_image(ref: str | Reference, options: PullOptions | None = None, *,
                chunk_size: int = DEFAULT_CHUNK_SIZE, workdir: str | None = None,
                prefetch: list[str] | None = None) -> IndexResult:
    """Build the lazy metadata of `ref` and push it (and its data blobs) as a referrer.

    `prefetch`: paths in the image a container reads first (e.g. what `snapshot
    --record-access` wrote), carried in the metadata; every lazy mount of the image fetches
    them first.  Paths not in the image are dropped (with a warning): a list is recorded
    against one image and may be reused for the next."""
    options = options or PullOptions()
    ref = ref if isinstance(ref, Reference) else parse_reference(ref)
    client = RegistryClient(ref.api_host, options.registry)
    with contextlib.closing(client), tempfile.TemporaryDirectory(dir=workdir, prefix="lazy-index-") as tmp:
        resolved = resolve(client, ref, options.platform)
        meta, paths, table = build_meta(client, resolved, tmp, chunk_size=chunk_size,
                                        limits=options.limits or Limits())
        repo = ref.repository
        meta.config_raw = resolved.config_raw  # a lazy pull then needs no config request
        if prefetch:
            meta.prefetch = _prefetch_paths(meta, prefetch)
        meta_bytes = meta.to_bytes()
        meta_digest = push_blob(client, repo, meta_bytes)
        for p in paths:
            push_blob(client, repo, path=p)
        empty = push_blob(client, repo, EMPTY_CONFIG)
        subject = {"mediaType": resolved.manifest.media_type, "digest": resolved.manifest.digest,
                   "size": len(resolved.manifest.raw)}
        annotations = {"io.sandbox-agent.lazy.chunk-size": str(chunk_size), META_DIGEST_ANNOTATION: meta_digest,
                       META_SIZE_ANNOTATION: str(len(meta_bytes))}
        meta_desc = {"mediaType": META_MEDIA_TYPE, "digest": meta_digest, "size": len(meta_bytes)}
        if len(meta_bytes) <= EMBED_MAX:
            meta_desc["data"] = base64.b64encode(meta_bytes).decode()
        doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST, "artifactType": ARTIFACT_TYPE,
               "config": {"mediaType": mt.OCI_EMPTY, "digest": empty, "size": len(EMPTY_CONFIG)},
               "layers": [meta_desc] + [{"mediaType": DATA_MEDIA_TYPE, "digest": d, "size": s} for d, s in meta.blobs],
               "subject": subject, "annotations": annotations}
        body = json.dumps(doc, indent=1).encode()
        art = push_manifest(client, repo, sha256_of(body), body, mt.OCI_MANIFEST)
        if client.referrers(repo, resolved.manifest.digest) is None:
            entry = {"mediaType": mt.OCI_MANIFEST, "digest": art, "size": len(body),
                     "artifactType": ARTIFACT_TYPE, "annotations": annotations}
            if len(body) <= 2 * EMBED_MAX:
                entry["data"] = base64.b64encode(body).decode()
            add_referrers_tag(client, repo, resolved.manifest.digest, entry)
        files = sum(1 for n in meta.nodes if n.kind == "reg")
        log.info("indexed %s: %d files, %d chunks, %d of %d bytes stored", ref, files, len(table.chunks),
                 table.stored_bytes, table.raw_bytes)
        return IndexResult(str(ref), resolved.manifest.digest, art, meta_digest, len(meta_bytes), meta.blobs,
                           files, table.raw_bytes, table.stored_bytes, len(table.chunks))
