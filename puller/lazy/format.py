"""The lazy-pull metadata: the merged file tree of an image and where each file's bytes live.

The artifact (artifactType ARTIFACT_TYPE, `subject` = the image manifest) has as its layers
first the metadata blob (META_MEDIA_TYPE: zstd-compressed JSON, below), then the chunk data
blobs (DATA_MEDIA_TYPE).  A data blob is a plain concatenation of chunks; each chunk is a
piece of at most `chunk_size` bytes of one regular file, stored zstd-compressed when that
saves space, else raw, and known by the sha256 of its *uncompressed* bytes.  A chunk equal to
one already stored (in this layer or any lower one) is not stored again: files point at the
same entry.  Because a layer's data blob holds only chunks new relative to the layers below
it, it depends only on the layer's ChainID, so images sharing base layers share data blobs.

So that a lazy pull takes few requests, the metadata may carry the image config's bytes
("config", base64), the artifact manifest may embed the metadata blob in its descriptor, and
the referrers tag entry the artifact manifest (OCI `data`); the artifact's annotations
META_DIGEST_ANNOTATION / META_SIZE_ANNOTATION name the metadata blob.  Each embedded copy is
checked against the digest that names it, and is only a shortcut: without it (or when it does
not match) the same content is fetched by digest.

Everything here is untrusted input: load_meta() checks paths, indices, ranges and digests so
the file system can index without further checks.
"""
from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass, field
from typing import NamedTuple

from ..digest import parse_digest
from ..errors import InvalidDigest, ManifestError

ARTIFACT_TYPE = "application/vnd.sandbox-agent.lazy.v1"
META_MEDIA_TYPE = "application/vnd.sandbox-agent.lazy.meta.v1+json+zstd"
DATA_MEDIA_TYPE = "application/vnd.sandbox-agent.lazy.chunks.v1"
# Annotations of the artifact (copied into referrers entries) naming its metadata blob, so a
# puller can fetch the metadata side by side with the artifact manifest.
META_DIGEST_ANNOTATION = "io.sandbox-agent.lazy.meta"
META_SIZE_ANNOTATION = "io.sandbox-agent.lazy.meta-size"
FORMAT_VERSION = 1
MAX_META_BYTES = 512 << 20  # uncompressed metadata JSON
KINDS = ("reg", "dir", "lnk", "chr", "blk", "fifo")
MAX_PREFETCH = 100_000  # paths in an embedded prefetch list


class MetaError(ManifestError):
    """Lazy metadata that is malformed or does not fit its image."""


class Chunk(NamedTuple):
    """A tuple: immutable, and built fast (metadata of a large image has many thousands)."""

    digest: str  # sha256 of the uncompressed bytes
    blob: int  # index into Meta.blobs
    offset: int  # where the stored bytes start in that blob
    stored: int  # number of stored bytes
    size: int  # uncompressed bytes
    zstd: bool  # stored compressed


@dataclass
class Node:
    """One directory entry of the merged tree.  Hard links are Nodes sharing `ino`."""

    path: str  # relative, "" is the root
    kind: str
    mode: int  # permission bits incl. setuid/setgid/sticky
    uid: int = 0
    gid: int = 0
    mtime_ns: int = 0
    size: int = 0
    target: str = ""  # symlink target
    rdev: tuple[int, int] = (0, 0)
    xattrs: dict[str, bytes] = field(default_factory=dict)
    chunks: list[int] = field(default_factory=list)
    ino: int = 0  # equal for hard links of one file; assigned by load_meta/to_json


@dataclass
class Meta:
    subject: str  # the image manifest digest this describes
    chunk_size: int
    blobs: list[tuple[str, int]]  # (digest, size) of each data blob, in artifact order
    chunks: list[Chunk]
    nodes: list[Node]  # parents before children
    # The image config's bytes, carried along so a lazy pull need not fetch it (checked there
    # against the manifest's config descriptor, like a fetched one).
    config_raw: bytes | None = None
    # Paths a container of this image reads first (a recorded run's list: `index --prefetch`),
    # fetched as soon as a lazy mount serves, in this order.  The list travels with the image,
    # so every puller of it - the agent's included - starts with it.
    prefetch: list[str] = field(default_factory=list)

    def to_bytes(self) -> bytes:
        import zstandard
        first: dict[int, str] = {}
        nodes = []
        for n in self.nodes:
            if n.kind == "reg" and n.ino in first:
                nodes.append({"p": n.path, "h": first[n.ino]})
                continue
            first.setdefault(n.ino, n.path)
            d: dict = {"p": n.path, "k": n.kind, "m": n.mode, "u": n.uid, "g": n.gid, "t": n.mtime_ns}
            if n.kind == "reg":
                d["s"], d["c"] = n.size, n.chunks
            if n.target:
                d["l"] = n.target
            if n.rdev != (0, 0):
                d["r"] = list(n.rdev)
            if n.xattrs:
                d["x"] = {k: base64.b64encode(v).decode() for k, v in sorted(n.xattrs.items())}
            nodes.append(d)
        doc = {"version": FORMAT_VERSION, "subject": self.subject, "chunk_size": self.chunk_size,
               "blobs": [{"digest": d, "size": s} for d, s in self.blobs],
               "chunks": [[c.digest.split(":", 1)[1], c.blob, c.offset, c.stored, c.size, int(c.zstd)]
                          for c in self.chunks],
               "nodes": nodes}
        if self.config_raw is not None:
            doc["config"] = base64.b64encode(self.config_raw).decode()
        if self.prefetch:
            doc["prefetch"] = list(self.prefetch)
        raw = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        return zstandard.ZstdCompressor(level=10).compress(raw)


_MAX = 1 << 62
_HEX64 = re.compile(r"[0-9a-f]{64}")
_NO_RDEV = [0, 0]


def _int(v: object, what: str, lo: int = 0, hi: int = 1 << 62) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise MetaError(f"lazy metadata: {what} is {v!r:.40}, not an integer in [{lo}, {hi}]")
    return v


def _path(v: object, what: str) -> str:
    if not isinstance(v, str) or len(v) > 4096 or "\0" in v or v.startswith("/") or v.endswith("/"):
        raise MetaError(f"lazy metadata: {what}: bad path {v!r:.100}")
    if v and any(p in ("", ".", "..") for p in v.split("/")):
        raise MetaError(f"lazy metadata: {what}: path {v!r:.100} has an empty, '.' or '..' component")
    return v


def load_meta(blob: bytes, subject: str) -> Meta:
    """Parse and check metadata bytes (already verified against their digest)."""
    import zstandard
    try:
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=MAX_META_BYTES)
        doc = json.loads(raw)
    except (zstandard.ZstdError, ValueError) as exc:
        raise MetaError(f"lazy metadata for {subject}: cannot decode: {exc}") from None
    if not isinstance(doc, dict) or doc.get("version") != FORMAT_VERSION:
        raise MetaError(f"lazy metadata for {subject}: not version {FORMAT_VERSION} metadata")
    if doc.get("subject") != subject:
        raise MetaError(f"lazy metadata describes {doc.get('subject')!r:.80}, not the image {subject}")
    chunk_size = _int(doc.get("chunk_size"), "chunk_size", 4096, 64 << 20)
    blobs = []
    for i, b in enumerate(doc.get("blobs") or []):
        try:
            d = str(parse_digest(b.get("digest") if isinstance(b, dict) else None, what=f"blobs[{i}]"))
        except InvalidDigest as exc:
            raise MetaError(f"lazy metadata: {exc}") from None
        blobs.append((d, _int(b.get("size"), f"blobs[{i}].size")))
    # The checks below are written out (no helper call, no message built unless one fails):
    # load_meta runs on every lazy pull and every mount, for up to hundreds of thousands of
    # entries.
    chunks = []
    nblobs = len(blobs)
    max_stored = 2 * chunk_size + 1024
    hex64 = _HEX64.fullmatch
    for i, c in enumerate(doc.get("chunks") or []):
        if type(c) is not list or len(c) != 6:
            raise MetaError(f"lazy metadata: chunks[{i}] is not a 6-element list")
        h, bi, off, stored, size, z = c
        if type(h) is not str or not hex64(h):
            raise MetaError(f"lazy metadata: chunks[{i}]: {h!r:.80} is not 64 lowercase hex digits of a sha256")
        if not (type(bi) is int and 0 <= bi < nblobs and type(off) is int and 0 <= off <= _MAX
                and type(stored) is int and 0 <= stored <= max_stored and type(size) is int
                and 0 <= size <= chunk_size):
            _int(bi, f"chunks[{i}].blob", 0, nblobs - 1)
            _int(off, f"chunks[{i}].offset")
            _int(stored, f"chunks[{i}].stored", 0, max_stored)
            _int(size, f"chunks[{i}].size", 0, chunk_size)
        if off + stored > blobs[bi][1]:
            raise MetaError(f"lazy metadata: chunks[{i}] ends at {off + stored}, past its blob's {blobs[bi][1]} bytes")
        chunks.append(Chunk("sha256:" + h, bi, off, stored, size, bool(z)))
    nchunks = len(chunks)
    nodes: list[Node] = []
    by_path: dict[str, Node] = {}
    for i, d in enumerate(doc.get("nodes") or []):
        if type(d) is not dict:
            raise MetaError(f"lazy metadata: nodes[{i}] is not an object")
        p = _path(d.get("p"), f"nodes[{i}]")
        if p in by_path:
            raise MetaError(f"lazy metadata: {p!r} appears twice")
        parent = p.rpartition("/")[0] if p else None
        if parent is not None and (parent not in by_path or by_path[parent].kind != "dir"):
            raise MetaError(f"lazy metadata: {p!r} comes before (or without) its parent directory")
        if "h" in d:
            other = by_path.get(d["h"]) if isinstance(d["h"], str) else None
            if other is None or other.kind != "reg":
                raise MetaError(f"lazy metadata: hard link {p!r} to {d['h']!r:.100}, which is no earlier regular file")
            n = Node(p, "reg", other.mode, other.uid, other.gid, other.mtime_ns, other.size, "", (0, 0),
                     other.xattrs, other.chunks, other.ino)
        else:
            kind = d.get("k")
            if kind not in KINDS:
                raise MetaError(f"lazy metadata: {p!r} has unknown kind {kind!r:.20}")
            xattrs = d.get("x")
            xa: dict[str, bytes] = {}
            if xattrs:
                if not isinstance(xattrs, dict):
                    raise MetaError(f"lazy metadata: {p!r}: xattrs are not an object")
                try:
                    xa = {str(k): base64.b64decode(v, validate=True) for k, v in xattrs.items()}
                except (ValueError, TypeError):
                    raise MetaError(f"lazy metadata: {p!r}: an xattr value is not base64") from None
                if any(k.startswith(("trusted.overlay.", "user.overlay.")) for k in xa):
                    raise MetaError(f"lazy metadata: {p!r} carries an overlayfs-private xattr")
            target = d.get("l", "")
            rdev = d.get("r", _NO_RDEV)
            if type(target) is not str or type(rdev) is not list or len(rdev) != 2:
                raise MetaError(f"lazy metadata: {p!r}: bad link target or device numbers")
            m, u, g, t = d.get("m"), d.get("u"), d.get("g"), d.get("t")
            if not (type(m) is int and 0 <= m <= 0o7777 and type(u) is int and 0 <= u < 1 << 32
                    and type(g) is int and 0 <= g < 1 << 32 and type(t) is int and -_MAX <= t <= _MAX):
                _int(m, f"{p!r} mode", 0, 0o7777)
                _int(u, f"{p!r} uid", 0, 2**32 - 1)
                _int(g, f"{p!r} gid", 0, 2**32 - 1)
                _int(t, f"{p!r} mtime", -(1 << 62))
            n = Node(p, kind, m, u, g, t, 0, target, (_int(rdev[0], "major"), _int(rdev[1], "minor")), xa, [], i + 1)
            if kind == "reg":
                size = d.get("s")
                if type(size) is not int or not 0 <= size <= _MAX:
                    _int(size, f"{p!r} size")
                n.size = size
                ids = d.get("c")
                if type(ids) is not list:
                    raise MetaError(f"lazy metadata: {p!r}: chunk list missing")
                for c in ids:
                    if type(c) is not int or not 0 <= c < nchunks:
                        _int(c, f"{p!r} chunk index", 0, nchunks - 1)
                n.chunks = ids
                total = 0
                last = len(ids) - 1
                for k, c in enumerate(ids):
                    cs = chunks[c].size
                    if cs != chunk_size and k != last:
                        total = -1
                        break
                    total += cs
                if total != size:
                    raise MetaError(f"lazy metadata: {p!r}: chunks do not add up to its {n.size} bytes "
                                    f"in pieces of {chunk_size}")
        if p == "" and n.kind != "dir":
            raise MetaError("lazy metadata: the root is not a directory")
        by_path[p] = n
        nodes.append(n)
    if not nodes or nodes[0].path != "":
        raise MetaError("lazy metadata: the tree does not start with its root directory")
    config_raw = None
    if "config" in doc:
        try:
            config_raw = base64.b64decode(doc["config"], validate=True) if isinstance(doc["config"], str) else None
        except ValueError:
            config_raw = None
        if config_raw is None:
            raise MetaError("lazy metadata: the embedded image config is not base64")
    prefetch = doc.get("prefetch", [])
    if type(prefetch) is not list or len(prefetch) > MAX_PREFETCH:
        raise MetaError(f"lazy metadata: prefetch is not a list of at most {MAX_PREFETCH} paths")
    for i, p in enumerate(prefetch):
        _path(p, f"prefetch[{i}]")
    return Meta(subject, chunk_size, blobs, chunks, nodes, config_raw, prefetch)


def resolve_path(by_path: dict[str, Node], path: str, max_links: int = 40) -> Node | None:
    """The node `path` names inside the image, following symlinks as the kernel would with
    the image as root; None when it does not exist (or loops)."""
    parts = [p for p in path.split("/") if p and p != "."]
    cur: list[str] = []
    links = 0
    while parts:
        name = parts.pop(0)
        if name == "..":
            if cur:
                cur.pop()
            continue
        n = by_path.get("/".join([*cur, name]))
        if n is None:
            return None
        if n.kind == "lnk":
            links += 1
            if links > max_links:
                return None
            target = [p for p in n.target.split("/") if p and p != "."]
            if n.target.startswith("/"):
                cur = []
            parts = target + parts
            continue
        cur.append(name)
    return by_path.get("/".join(cur))
