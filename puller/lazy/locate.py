"""Finding, checking and storing an image's lazy metadata (the `pull --lazy` half).

The artifact is found among the referrers of the image manifest digest (API or tag schema),
fetched by its digest (so its bytes are checked), and accepted only if its `subject` is that
manifest; the metadata blob is checked against the artifact's descriptor, then must name the
same subject and the same data blobs as the artifact lists.
"""
from __future__ import annotations

import contextlib
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from ..digest import chain_ids, parse_digest
from ..errors import InvalidDigest, ManifestError, NotFound, PullError
from ..fetch import fetch_small_blob
from ..manifest import Descriptor, Index, Manifest, parse_descriptor, parse_manifest
from ..pull import PullOptions, _store_blob
from ..reference import Reference, parse_reference
from ..registry import RegistryClient
from ..resolve import MAX_CONFIG_BYTES, Resolved, fetch_manifest, parse_image_config, resolve
from .format import (ARTIFACT_TYPE, DATA_MEDIA_TYPE, MAX_META_BYTES, META_DIGEST_ANNOTATION, META_MEDIA_TYPE,
                     META_SIZE_ANNOTATION, Meta, MetaError, load_meta)

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
    found = _find_artifact(client, resolved.reference.repository, resolved.manifest.digest)
    return None if found is None else LazyImage(str(resolved.reference), resolved, *found)


def _referrers(client: RegistryClient, repo: str, subject: str) -> list[Descriptor]:
    """resolve.referrers, with the referrers API and the tag schema asked side by side: most
    registries support only one of them, and asking in turn costs a round trip more."""
    d = parse_digest(subject, what="subject digest")
    tag = f"{d.algorithm}-{d.hex}"

    def by_tag() -> Index | Manifest | None:
        try:
            return fetch_manifest(client, repo, tag)
        except NotFound:
            return None

    with ThreadPoolExecutor(max_workers=1) as ex:
        tagged = ex.submit(by_tag)
        answer = client.referrers(repo, str(d), ARTIFACT_TYPE)
        if answer is not None:
            tagged.cancel()
            raw = answer.get("manifests", [])
            if not isinstance(raw, list):
                raise ManifestError(f"referrers of {repo}@{subject}: 'manifests' is not a list")
            entries = [parse_descriptor(e, f"referrers of {subject}[{i}]") for i, e in enumerate(raw)]
        else:
            doc = tagged.result()
            if doc is None:
                return []
            if not isinstance(doc, Index):
                raise ManifestError(f"{repo}:{tag}: referrers tag does not point at an index")
            entries = list(doc.manifests)
    return [e for e in entries if e.artifact_type == ARTIFACT_TYPE]


def _announced_meta(desc: Descriptor) -> tuple[str, int] | None:
    """(digest, size) of the metadata blob the referrers entry announces, if it does sensibly."""
    a = desc.annotations if isinstance(desc.annotations, dict) else {}
    digest, size = a.get(META_DIGEST_ANNOTATION), a.get(META_SIZE_ANNOTATION)
    if not isinstance(digest, str) or not isinstance(size, str) or not size.isdigit() or int(size) > MAX_META_BYTES:
        return None
    try:
        return str(parse_digest(digest)), int(size)
    except InvalidDigest:
        return None


def _find_artifact(client: RegistryClient, repo: str, subject: str) -> tuple[str, str, Meta, bytes] | None:
    """(artifact digest, metadata digest, metadata, its raw bytes) of the newest valid lazy
    artifact whose subject is the manifest `subject`.

    What the converter embeds is used without a request: the artifact manifest inside the
    referrers entry, the metadata inside the manifest (both checked against their digests when
    parsed).  Otherwise, when the referrers entry announces the metadata blob (annotations),
    the blob is fetched side by side with the artifact manifest and used only if the manifest,
    checked as always, names that very blob."""
    for desc in reversed(_referrers(client, repo, subject)):  # the tag schema appends: last is newest
        where = f"lazy artifact {repo}@{desc.digest}"
        doc = None
        if desc.data is not None:
            doc = parse_manifest(desc.data, desc.media_type, source=where, expected_digest=desc.digest)
        announced = _announced_meta(desc) if doc is None else None
        early = None
        with ThreadPoolExecutor(max_workers=1) as ex:
            if announced is not None:
                early = ex.submit(fetch_small_blob, client, repo, announced[0], announced[1],
                                  cap=MAX_META_BYTES, what=f"{where} metadata")
            if doc is None:
                doc = fetch_manifest(client, repo, desc.digest)
            if not isinstance(doc, Manifest) or doc.artifact_type != ARTIFACT_TYPE:
                raise MetaError(f"{where}: not a {ARTIFACT_TYPE} manifest")
            if doc.subject is None or doc.subject.digest != subject:
                raise MetaError(f"{where}: its subject is not the image {subject}")
            if not doc.layers or doc.layers[0].media_type != META_MEDIA_TYPE:
                raise MetaError(f"{where}: first layer is not {META_MEDIA_TYPE}")
            layer = doc.layers[0]
            raw = layer.data
            if raw is None and early is not None and announced == (layer.digest, layer.size):
                try:
                    raw = early.result()
                except PullError as exc:
                    log.debug("%s: announced metadata unusable (%s); fetching it again", where, exc)
        if raw is None:
            raw = fetch_small_blob(client, repo, layer.digest, layer.size, cap=MAX_META_BYTES,
                                   what=f"{where} metadata")
        meta = _parsed(layer.digest, raw, subject)
        listed = [(d.digest, d.size) for d in doc.layers[1:] if d.media_type == DATA_MEDIA_TYPE]
        if listed != meta.blobs:
            raise MetaError(f"{where}: the metadata's data blobs differ from the artifact's layers")
        return doc.digest, layer.digest, meta, raw
    return None


def resolve_and_find(client: RegistryClient, ref: Reference, platform=None) -> tuple[Resolved, LazyImage | None]:
    """resolve() and find_meta() in fewer round trips: when the reference names an image
    manifest (no index), the lazy artifact is looked for first, and the image config taken
    from its metadata when it carries it (checked against the manifest's config descriptor),
    else fetched."""
    doc = fetch_manifest(client, ref.repository, ref.selector)
    if not isinstance(doc, Manifest) or not doc.is_image:
        resolved = resolve(client, ref, platform)  # indexes, artifacts: the general way (and its errors)
        return resolved, find_meta(client, resolved)
    found = _find_artifact(client, ref.repository, doc.digest)
    what = f"config {doc.config.digest} of {ref}"
    config_raw = found[2].config_raw if found is not None else None
    if config_raw is not None and not (len(config_raw) == doc.config.size
                                       and parse_digest(doc.config.digest).matches(config_raw)):
        log.warning("%s: the config in the lazy metadata is not the manifest's; fetching it", what)
        config_raw = None
    if config_raw is None:
        config_raw = fetch_small_blob(client, ref.repository, doc.config.digest, doc.config.size,
                                      cap=MAX_CONFIG_BYTES, what=what)
    config = parse_image_config(config_raw, what, len(doc.layers))
    resolved = Resolved(ref, doc, None, None, config_raw, config)
    return resolved, None if found is None else LazyImage(str(ref), resolved, *found)


def pull_lazy(ref: str | Reference, store, options: PullOptions | None = None) -> dict | None:
    """Record the image in `store` from its metadata alone; None if it has no metadata.

    The record has the usual fields (manifest, config, chain ids - whose layers are absent)
    plus `lazy`: where the metadata is and how to reach the registry for chunks.
    """
    options = options or PullOptions()
    ref = ref if isinstance(ref, Reference) else parse_reference(ref)
    client = RegistryClient(ref.api_host, options.registry)
    with store.pin(), contextlib.closing(client):
        resolved, found = resolve_and_find(client, ref, options.platform)
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
    return _parsed(lazy["meta"], raw, record["manifest_digest"])


_PARSED: dict[tuple[str, str], Meta] = {}
_PARSED_MAX = 4


def _parsed(digest: str, raw: bytes, subject: str) -> Meta:
    """load_meta(raw, subject) for `raw` already checked against `digest`, parsed once per
    process: a caller that pulls and then mounts (the agent's job, the bench) would otherwise
    parse and check the same metadata twice on the way to a container's start.  Meta is
    never changed by its users, so one object can be shared."""
    key = (digest, subject)
    meta = _PARSED.get(key)
    if meta is None:
        meta = load_meta(raw, subject)
        if len(_PARSED) >= _PARSED_MAX:
            _PARSED.pop(next(iter(_PARSED)))
        _PARSED[key] = meta
    return meta
