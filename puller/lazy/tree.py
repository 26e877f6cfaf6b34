"""The merged file tree of an image, built member by member from its layers.

Applies the OCI layer rules in memory: later layers replace entries, `.wh.NAME` deletes NAME
(and what is below it), `.wh..wh..opq` hides what lower layers put in a directory, hard
links share an inode.  Parents a layer implies but does not list appear as root-owned 0755
directories, as unpackers create them.
"""
from __future__ import annotations

import stat

from ..tarstream import Member
from .format import Node

WHITEOUT = ".wh."
OPAQUE = ".wh..wh..opq"
_KIND = {b"0": "reg", b"\0": "reg", b"7": "reg", b"5": "dir", b"2": "lnk", b"3": "chr", b"4": "blk", b"6": "fifo"}


class TreeError(ValueError):
    pass


class MergedTree:
    def __init__(self) -> None:
        self.nodes: dict[str, Node] = {"": Node("", "dir", 0o755)}
        self._next_ino = 2
        self._layer_added: set[str] = set()

    def start_layer(self) -> None:
        self._layer_added = set()

    def _ino(self) -> int:
        self._next_ino += 1
        return self._next_ino

    def _remove(self, path: str, *, keep_this_layer: bool = False) -> None:
        prefix = path + "/" if path else ""
        for p in [p for p in self.nodes if p and (p == path or p.startswith(prefix))]:
            if keep_this_layer and p in self._layer_added:
                continue
            del self.nodes[p]

    def _ensure_parents(self, path: str) -> None:
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            p = "/".join(parts[:i])
            n = self.nodes.get(p)
            if n is None or n.kind != "dir":
                if n is not None:
                    self._remove(p)
                self.nodes[p] = Node(p, "dir", 0o755, ino=self._ino())
                self._layer_added.add(p)

    def apply(self, path: str, m: Member) -> Node | None:
        """Apply one member (path already cleaned); the new regular-file Node, if any."""
        base = path.rpartition("/")[2]
        parent = path.rpartition("/")[0]
        if base == OPAQUE:
            self._ensure_parents(path)
            self._remove(parent, keep_this_layer=True)
            return None
        if base.startswith(WHITEOUT):
            gone = (parent + "/" if parent else "") + base[len(WHITEOUT):]
            if base[len(WHITEOUT):] in ("", ".", ".."):
                raise TreeError(f"whiteout {path!r} names no entry")
            self._remove(gone)
            return None
        for key in m.xattrs:
            # overlay's own attributes on the lazy lower layer would let a layer redirect or hide content
            if key.startswith(("trusted.overlay.", "user.overlay.")):
                raise TreeError(f"layer sets overlayfs-private xattr {key!r}")
        kind = _KIND.get(m.type)
        if m.type == b"1":
            return self._hardlink(path, m)
        if kind is None:
            return None  # sockets and unknown types: not representable in a rootfs tar anyway
        if path == "":
            if kind != "dir":
                raise TreeError("the archive's root entry is not a directory")
            root = self.nodes[""]
            root.mode, root.uid, root.gid, root.mtime_ns = stat.S_IMODE(m.mode), m.uid, m.gid, m.mtime_ns
            root.xattrs = dict(m.xattrs)
            return None
        self._ensure_parents(path)
        old = self.nodes.get(path)
        if old is not None and not (old.kind == "dir" and kind == "dir"):
            self._remove(path)
        node = Node(path, kind, stat.S_IMODE(m.mode), m.uid, m.gid, m.mtime_ns,
                    target=m.linkname if kind == "lnk" else "",
                    rdev=(m.devmajor, m.devminor) if kind in ("chr", "blk") else (0, 0),
                    xattrs=dict(m.xattrs), ino=old.ino if old is not None and kind == "dir" else self._ino())
        self.nodes[path] = node
        self._layer_added.add(path)
        return node if kind == "reg" else None

    def _hardlink(self, path: str, m: Member) -> None:
        target = m.linkname.lstrip("/")
        target = target[2:] if target.startswith("./") else target
        src = self.nodes.get(target.rstrip("/"))
        if src is None or src.kind != "reg":
            raise TreeError(f"hard link {path!r} -> {m.linkname!r}: no regular file there")
        if src.path == path:
            return None
        self._ensure_parents(path)
        if path in self.nodes:
            self._remove(path)
        self.nodes[path] = Node(path, "reg", src.mode, src.uid, src.gid, src.mtime_ns, src.size,
                                xattrs=src.xattrs, chunks=src.chunks, ino=src.ino)
        self._layer_added.add(path)
        return None

    def sorted_nodes(self) -> list[Node]:
        """Parents before children; hard-link groups keep their sharing of `chunks`."""
        return [self.nodes[p] for p in sorted(self.nodes, key=lambda p: p.split("/") if p else [])]
