"""The local chunk cache: verified, uncompressed chunks by digest, shared by all containers.

A chunk is written to a temporary name and renamed into place only after its digest was
checked, so a file under its digest's name always holds those bytes.  The same chunk reached
through any file, layer or image is one file here.
"""
from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

from ..digest import parse_digest


class ChunkCache:
    def __init__(self, root: str | os.PathLike, *, max_open: int = 256) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._lock = threading.Lock()
        self._max_open = max_open
        self._known: set[str] = set()  # digests seen present, to skip the stat on hot paths

    def path(self, digest: str) -> Path:
        hexpart = parse_digest(digest, what="chunk digest").hex
        return self.root / hexpart[:2] / hexpart

    def has(self, digest: str) -> bool:
        if digest in self._known:
            return True
        if self.path(digest).exists():
            self._known.add(digest)
            return True
        return False

    def put(self, digest: str, data: bytes) -> None:
        """Store verified bytes (the caller checked them against `digest`)."""
        final = self.path(digest)
        if final.exists():
            self._known.add(digest)
            return
        final.parent.mkdir(exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}")
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, final)
        self._known.add(digest)

    def _fd(self, digest: str) -> int:
        with self._lock:
            fd = self._fds.get(digest)
            if fd is not None:
                self._fds.move_to_end(digest)
                return fd
        fd = os.open(self.path(digest), os.O_RDONLY | os.O_CLOEXEC)
        with self._lock:
            if digest in self._fds:  # another thread opened it meanwhile
                os.close(fd)
                return self._fds[digest]
            self._fds[digest] = fd
            while len(self._fds) > self._max_open:
                _, old = self._fds.popitem(last=False)
                os.close(old)
        return fd

    def read(self, digest: str, offset: int, size: int) -> bytes:
        try:
            return os.pread(self._fd(digest), size, offset)
        except OSError:
            # an fd closed by eviction in another thread between lookup and pread: reopen once
            with open(self.path(digest), "rb") as f:
                f.seek(offset)
                return f.read(size)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
