"""From a reference to one verified image manifest and its config.

Index / manifest list -> platform entry -> manifest -> config, each document
checked against the digest that pointed to it (the tag's manifest against the
registry's Docker-Content-Digest when one is sent).  Also artifacts and the
referrers of a digest (API first, then the `sha256-<hex>` tag schema).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from . import mediatypes as mt
from .digest import parse_digest
from .errors import InvalidDigest, ManifestError, NotFound, PlatformNotFound
from .fetch import fetch_small_blob
from .manifest import Descriptor, Index, Manifest, parse_descriptor, parse_manifest
from .platform import Platform
from .reference import Reference
from .registry import RegistryClient

MAX_CONFIG_BYTES = 8 << 20
MAX_INDEX_DEPTH = 4


@dataclass(frozen=True)
class Resolved:
    reference: Reference
    manifest: Manifest
    index: Index | None  # the index the manifest was chosen from, if any
    platform: Platform | None  # the index entry's platform that was chosen
    config_raw: bytes
    config: dict

    @property
    def top_digest(self) -> str:
        """The digest the reference names: the index's if there is one."""
        return self.index.digest if self.index is not None else self.manifest.digest


def fetch_manifest(client: RegistryClient, repository: str, selector: str) -> Index | Manifest:
    """One manifest or index by tag or digest, verified against its digest."""
    by_digest = ":" in selector
    source = f"{client.host}/{repository}{'@' if by_digest else ':'}{selector}"
    resp = client.get_manifest(repository, selector, mt.ACCEPT)
    expected = selector if by_digest else None
    if not by_digest and resp.docker_content_digest:
        try:
            header = parse_digest(resp.docker_content_digest, what=f"{source} Docker-Content-Digest")
        except InvalidDigest as exc:
            raise ManifestError(str(exc)) from None
        if not header.matches(resp.body):
            raise ManifestError(f"{source}: manifest content does not match the registry's "
                                f"Docker-Content-Digest {header}")
        expected = str(header)
    return parse_manifest(resp.body, resp.content_type, source=source, expected_digest=expected)


def select_platform(index: Index, platform: Platform) -> Descriptor:
    candidates = [d for d in index.manifests
                  if d.media_type in mt.MANIFEST_TYPES | mt.INDEX_TYPES and platform.matches(d.platform)]
    if not candidates:
        have = sorted({str(Platform(d.platform.get("os", "?"), d.platform.get("architecture", "?"),
                                    d.platform.get("variant") or ""))
                       for d in index.manifests if isinstance(d.platform, dict)})
        raise PlatformNotFound(f"index {index.digest} has no manifest for {platform}; it has: "
                               f"{', '.join(have) or 'no platform entries'}")
    exact = [d for d in candidates if (d.platform or {}).get("variant", "") == platform.variant]
    return (exact or candidates)[0]


def resolve(client: RegistryClient, ref: Reference, platform: Platform | None = None,
            *, image_only: bool = True) -> Resolved:
    """Resolve `ref` to a manifest (choosing from an index by platform) and its config."""
    platform = platform or Platform.host()
    doc = fetch_manifest(client, ref.repository, ref.selector)
    index: Index | None = None
    chosen: Platform | None = None
    depth = 0
    while isinstance(doc, Index):
        depth += 1
        if depth > MAX_INDEX_DEPTH:
            raise ManifestError(f"{ref}: indexes nested deeper than {MAX_INDEX_DEPTH}")
        index = index or doc
        entry = select_platform(doc, platform)
        p = entry.platform or {}
        chosen = Platform(str(p.get("os", "")), str(p.get("architecture", "")), str(p.get("variant") or ""))
        doc = fetch_manifest(client, ref.repository, entry.digest)
        if doc.media_type != entry.media_type:
            raise ManifestError(f"{ref}: index entry {entry.digest} says {entry.media_type!r} "
                                f"but the manifest is {doc.media_type!r}")
    manifest = doc
    if image_only and not manifest.is_image:
        raise ManifestError(f"{ref}: {manifest.digest} is an artifact "
                            f"(artifactType {manifest.artifact_type or manifest.config.media_type!r}), not an image")
    config_raw = fetch_small_blob(client, ref.repository, manifest.config.digest, manifest.config.size,
                                  cap=MAX_CONFIG_BYTES, what=f"config {manifest.config.digest} of {ref}")
    config: dict = {}
    if manifest.is_image:
        config = parse_image_config(config_raw, f"config {manifest.config.digest} of {ref}", len(manifest.layers))
    return Resolved(ref, manifest, index, chosen, config_raw, config)


def parse_image_config(raw: bytes, what: str, n_layers: int) -> dict:
    try:
        config = json.loads(raw)
    except ValueError as exc:
        raise ManifestError(f"{what}: not JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ManifestError(f"{what}: not a JSON object")
    rootfs = config.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers" or not isinstance(rootfs.get("diff_ids"), list):
        raise ManifestError(f"{what}: rootfs must be {{type: layers, diff_ids: [...]}}")
    for i, d in enumerate(rootfs["diff_ids"]):
        try:
            parse_digest(d, what=f"{what} rootfs.diff_ids[{i}]")
        except InvalidDigest as exc:
            raise ManifestError(str(exc)) from None
    if len(rootfs["diff_ids"]) != n_layers:
        raise ManifestError(f"{what}: {len(rootfs['diff_ids'])} diff_ids for {n_layers} layers")
    return config


def referrers(client: RegistryClient, repository: str, digest: str,
              artifact_type: str | None = None) -> list[Descriptor]:
    """Manifests whose `subject` is `digest`: referrers API, else the tag schema."""
    subject = parse_digest(digest, what="subject digest")
    answer = client.referrers(repository, str(subject), artifact_type)
    if answer is None:
        tag = f"{subject.algorithm}-{subject.hex}"
        try:
            doc = fetch_manifest(client, repository, tag)
        except NotFound:
            return []
        if not isinstance(doc, Index):
            raise ManifestError(f"{repository}:{tag}: referrers tag does not point at an index")
        entries = list(doc.manifests)
    else:
        raw = answer.get("manifests", [])
        if not isinstance(raw, list):
            raise ManifestError(f"referrers of {repository}@{digest}: 'manifests' is not a list")
        entries = [parse_descriptor(e, f"referrers of {digest}[{i}]") for i, e in enumerate(raw)]
    if artifact_type:
        entries = [e for e in entries if e.artifact_type == artifact_type]
    return entries
