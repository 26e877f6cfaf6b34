"""Parsing and validating manifests, indexes and descriptors.

Everything here is untrusted registry data: each digest is validated, sizes
must be non-negative integers, and the declared media type must agree with the
HTTP Content-Type and with the document's shape.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from . import mediatypes as mt
from .digest import parse_digest, sha256_of
from .errors import InvalidDigest, ManifestError

MAX_LAYERS = 1000  # far beyond any real image; bounds work on hostile input


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    platform: dict | None = None
    annotations: dict = field(default_factory=dict)
    artifact_type: str | None = None
    urls: tuple[str, ...] = ()
    # The content itself, embedded (OCI 1.1 `data`): kept only when it matches digest and size.
    data: bytes | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        out: dict = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        if self.data is not None:
            import base64
            out["data"] = base64.b64encode(self.data).decode()
        if self.platform:
            out["platform"] = self.platform
        if self.annotations:
            out["annotations"] = self.annotations
        if self.artifact_type:
            out["artifactType"] = self.artifact_type
        return out


def parse_descriptor(obj: object, where: str) -> Descriptor:
    if not isinstance(obj, dict):
        raise ManifestError(f"{where}: descriptor is not an object")
    media_type = obj.get("mediaType")
    if not isinstance(media_type, str) or not media_type:
        raise ManifestError(f"{where}: descriptor has no mediaType")
    try:
        digest = str(parse_digest(obj.get("digest"), what=f"{where} digest"))
    except InvalidDigest as exc:
        raise ManifestError(str(exc)) from None
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ManifestError(f"{where}: descriptor {digest} has invalid size {size!r:.40}")
    platform = obj.get("platform")
    if platform is not None and not isinstance(platform, dict):
        raise ManifestError(f"{where}: descriptor {digest} has a non-object platform")
    annotations = obj.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ManifestError(f"{where}: descriptor {digest} has non-object annotations")
    artifact_type = obj.get("artifactType")
    urls = obj.get("urls") or ()
    return Descriptor(media_type, digest, size, platform, annotations,
                      artifact_type if isinstance(artifact_type, str) else None,
                      tuple(u for u in urls if isinstance(u, str)) if isinstance(urls, list) else (),
                      _embedded(obj.get("data"), digest, size))


def _embedded(value: object, digest: str, size: int) -> bytes | None:
    """Embedded content that is what the descriptor says it is; None otherwise (absent, not
    base64, or not matching: the content is then fetched by its digest as usual)."""
    if not isinstance(value, str) or len(value) > 4 * (size + 2) // 3 + 4:
        return None
    import base64
    import binascii
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return data if len(data) == size and parse_digest(digest).matches(data) else None


@dataclass(frozen=True)
class Index:
    media_type: str
    digest: str
    raw: bytes
    manifests: tuple[Descriptor, ...]
    annotations: dict
    subject: Descriptor | None = None


@dataclass(frozen=True)
class Manifest:
    media_type: str
    digest: str
    raw: bytes
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: dict
    artifact_type: str | None = None
    subject: Descriptor | None = None

    @property
    def is_image(self) -> bool:
        """An image (runnable rootfs) rather than an artifact."""
        return self.artifact_type is None and self.config.media_type in mt.IMAGE_CONFIG_TYPES


def _kind_of(media_type: str) -> str:
    if media_type in mt.INDEX_TYPES:
        return "index"
    if media_type in mt.MANIFEST_TYPES:
        return "manifest"
    if media_type in mt.DOCKER_SCHEMA1:
        raise ManifestError(f"Docker schema 1 manifests ({media_type}) are not supported")
    return ""


def parse_manifest(body: bytes, content_type: str, *, source: str,
                   expected_digest: str | None = None) -> Index | Manifest:
    """Parse `body`; verify it against `expected_digest` when one is given."""
    digest = sha256_of(body)
    if expected_digest is not None:
        want = parse_digest(expected_digest, what=f"{source} expected digest")
        if not want.matches(body):
            raise ManifestError(f"{source}: manifest content does not match digest {expected_digest}")
        digest = str(want)
    try:
        doc = json.loads(body)
    except ValueError as exc:
        raise ManifestError(f"{source}: manifest is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: manifest is not a JSON object")
    if doc.get("schemaVersion") != 2:
        raise ManifestError(f"{source}: unsupported schemaVersion {doc.get('schemaVersion')!r:.20}")

    declared = doc.get("mediaType")
    if declared is not None and not isinstance(declared, str):
        raise ManifestError(f"{source}: mediaType is not a string")
    has_manifests, has_layers = "manifests" in doc, ("layers" in doc or "config" in doc)
    if has_manifests and has_layers:
        raise ManifestError(f"{source}: document has both 'manifests' and 'layers'/'config'")
    shape = "index" if has_manifests else "manifest" if has_layers else ""
    if not shape:
        raise ManifestError(f"{source}: document is neither a manifest nor an index")

    header_kind = "" if content_type in mt.GENERIC_CONTENT_TYPES else _kind_of(content_type)
    if content_type not in mt.GENERIC_CONTENT_TYPES and not header_kind:
        raise ManifestError(f"{source}: Content-Type {content_type!r} is not a manifest media type")
    if declared:
        if not _kind_of(declared):
            raise ManifestError(f"{source}: unknown manifest mediaType {declared!r}")
        if header_kind and declared != content_type:
            raise ManifestError(
                f"{source}: mediaType {declared!r} in the manifest contradicts Content-Type {content_type!r}")
        media_type = declared
    elif header_kind:
        media_type = content_type
    else:
        media_type = mt.OCI_INDEX if shape == "index" else mt.OCI_MANIFEST
    if _kind_of(media_type) != shape:
        raise ManifestError(f"{source}: media type {media_type!r} does not fit the document's shape ({shape})")

    annotations = doc.get("annotations") or {}
    if not isinstance(annotations, dict):
        raise ManifestError(f"{source}: annotations is not an object")
    subject = parse_descriptor(doc["subject"], f"{source} subject") if doc.get("subject") is not None else None
    if shape == "index":
        entries = doc.get("manifests")
        if not isinstance(entries, list) or len(entries) > MAX_LAYERS:
            raise ManifestError(f"{source}: 'manifests' is not a list of at most {MAX_LAYERS}")
        return Index(media_type, digest, body,
                     tuple(parse_descriptor(e, f"{source} manifests[{i}]") for i, e in enumerate(entries)),
                     annotations, subject)
    if "config" not in doc:
        raise ManifestError(f"{source}: manifest has no config descriptor")
    layers = doc.get("layers", [])
    if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
        raise ManifestError(f"{source}: 'layers' is not a list of at most {MAX_LAYERS}")
    artifact_type = doc.get("artifactType")
    if artifact_type is not None and not isinstance(artifact_type, str):
        raise ManifestError(f"{source}: artifactType is not a string")
    return Manifest(media_type, digest, body,
                    parse_descriptor(doc["config"], f"{source} config"),
                    tuple(parse_descriptor(e, f"{source} layers[{i}]") for i, e in enumerate(layers)),
                    annotations, artifact_type, subject)
