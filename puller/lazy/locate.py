"""Finding, checking and storing an image's lazy metadata (the `pull --lazy` half).

The artifact is found among the referrers of the image manifest digest (API or tag schema),
fetched by its digest (so its bytes are checked), and accepted only if its `subject` is that
manifest; the metadata blob is checked against the artifact's descriptor, then must name the
same subject and the same data blobs as the artifact lists.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from ..digest import chain_ids, parse_digest
from ..errors import ManifestError
from ..fetch import fetch_small_blob
from ..manifest import Manifest
from ..pull import PullOptions, _store_blob
from ..reference import Reference, parse_reference
from ..registry import RegistryClient
from ..resolve import Resolved, fetch_manifest, referrers, resolve
from .format import ARTIFACT_TYPE, DATA_MEDIA_TYPE, META_MEDIA_TYPE, MAX_META_BYTES, Meta, MetaError, load_meta

log = logging.getLogger(__name__)


@dataclass
class LazyImage:
    reference: str
    resolved: Resolved
    artifact_digest: str
    meta_digest: str
    meta: Meta
    meta_raw: bytes


def find_meta(client: RegistryClient, resolved: Resolved) -> LazyImage | None:
    """The newest valid lazy metadata of the image, or None when there is none."""
    repo = resolved.reference.repository
    subject = resolved.manifest.digest
    found = referrers(client, repo, subject, ARTIFACT_TYPE)
    for desc in reversed(found):  # the tag schema appends: last is newest
        doc = fetch_manifest(client, repo, desc.digest)
        where = f"lazy artifact {repo}@{desc.digest}"
        if not isinstance(doc, Manifest) or doc.artifact_type != ARTIFACT_TYPE:
            raise MetaError(f"{where}: not a {ARTIFACT_TYPE} manifest")
        if doc.subject is None or doc.subject.digest != subject:
            raise MetaError(f"{where}: its subject is not the image {subject}")
        if not doc.layers or doc.layers[0].media_type != META_MEDIA_TYPE:
            raise MetaError(f"{where}: first layer is not {META_MEDIA_TYPE}")
        raw = fetch_small_blob(client, repo, doc.layers[0].digest, doc.layers[0].size,
                               cap=MAX_META_BYTES, what=f"{where} metadata")
        meta = load_meta(raw, subject)
        listed = [(d.digest, d.size) for d in doc.layers[1:] if d.media_type == DATA_MEDIA_TYPE]
        if listed != meta.blobs:
            raise MetaError(f"{where}: the metadata's data blobs differ from the artifact's layers")
        return LazyImage(str(resolved.reference), resolved, doc.digest, doc.layers[0].digest, meta, raw)
    return None


def pull_lazy(ref: str | Reference, store, options: PullOptions | None = None) -> dict | None:
    """Record the image in `store` from its metadata alone; None if it has no metadata.

    The record has the usual fields (manifest, config, chain ids - whose layers are absent)
    plus `lazy`: where the metadata is and how to reach the registry for chunks.
    """
    options = options or PullOptions()
    ref = ref if isinstance(ref, Reference) else parse_reference(ref)
    client = RegistryClient(ref.api_host, options.registry)
    with store.pin(), contextlib.closing(client):
        resolved = resolve(client, ref, options.platform)
        found = find_meta(client, resolved)
        if found is None:
            return None
        _store_blob(store, found.meta_digest, found.meta_raw)
        _store_blob(store, resolved.manifest.digest, resolved.manifest.raw)
        _store_blob(store, resolved.manifest.config.digest, resolved.config_raw)
        diff_ids = list(resolved.config["rootfs"]["diff_ids"])
        reg = options.registry
        record = {
            "reference": str(ref), "manifest_digest": resolved.manifest.digest,
            "index_digest": resolved.index.digest if resolved.index else None,
            "config_digest": resolved.manifest.config.digest, "diff_ids": diff_ids,
            "chain_ids": chain_ids(diff_ids),
            "lazy": {"artifact": found.artifact_digest, "meta": found.meta_digest,
                     "host": ref.api_host, "repository": ref.repository,
                     "plain_http": sorted(reg.plain_http), "ca_file": reg.ca_file, "auth_file": reg.auth_file,
                     "timeout": reg.timeout},
        }
        store.put_image(str(ref), resolved.manifest.digest, record)
        return record


def load_record_meta(store, record: dict) -> Meta:
    """The metadata of a lazily pulled image from the store (verified again on read)."""
    lazy = record.get("lazy")
    if not lazy:
        raise ManifestError(f"image {record.get('reference')!r} was not pulled lazily")
    with store.open_blob(lazy["meta"]) as f:
        raw = f.read()
    if not parse_digest(lazy["meta"]).matches(raw):
        raise MetaError(f"stored lazy metadata {lazy['meta']} does not match its digest")
    return load_meta(raw, record["manifest_digest"])
