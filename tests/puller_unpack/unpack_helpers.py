"""Helpers for the unpack tests: raw tar headers built by hand, non-seekable streams, and a
comparable description of a directory tree."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess

BLOCK = 512


def _octal(value: int, width: int) -> bytes:
    return (b"%0*o" % (width - 1, value)) + b"\0"


def header(name: bytes | str, *, type: bytes = b"0", size: int = 0, mode: int = 0o644,
           uid: int = 0, gid: int = 0, mtime: int = 1_600_000_000, linkname: bytes | str = b"",
           devmajor: int = 0, devminor: int = 0, prefix: bytes = b"",
           magic: bytes = b"ustar\x0000", bad_checksum: bool = False) -> bytes:
    """One 512-byte ustar header with whatever name the test wants, `..` and `/` included."""
    if isinstance(name, str):
        name = name.encode()
    if isinstance(linkname, str):
        linkname = linkname.encode()
    assert len(name) <= 100 and len(linkname) <= 100
    h = bytearray(BLOCK)
    h[0:len(name)] = name
    h[100:108] = _octal(mode, 8)
    h[108:116] = _octal(uid, 8)
    h[116:124] = _octal(gid, 8)
    h[124:136] = _octal(size, 12)
    h[136:148] = _octal(mtime, 12)
    h[148:156] = b" " * 8
    h[156:157] = type
    h[157:157 + len(linkname)] = linkname
    h[257:265] = magic
    h[329:337] = _octal(devmajor, 8)
    h[337:345] = _octal(devminor, 8)
    h[345:345 + len(prefix)] = prefix
    chk = sum(h) + (1 if bad_checksum else 0)
    h[148:156] = b"%06o\0 " % chk
    return bytes(h)


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % BLOCK)


def pax_records(items: dict[str, bytes | str]) -> bytes:
    out = b""
    for k, v in items.items():
        if isinstance(v, str):
            v = v.encode()
        body = b" " + k.encode() + b"=" + v + b"\n"
        n = len(body) + 1
        while len(str(n)) + len(body) != n:
            n = len(str(n)) + len(body)
        out += str(n).encode() + body
    return out


def pax(items: dict[str, bytes | str], name: str = "PaxHeader") -> bytes:
    data = pax_records(items)
    return header(name, type=b"x", size=len(data)) + pad(data)


def gnu_long(kind: bytes, value: bytes | str) -> bytes:
    if isinstance(value, str):
        value = value.encode()
    data = value + b"\0"
    return header("././@LongLink", type=kind, size=len(data), magic=b"ustar  \0") + pad(data)


def entry(name, data: bytes = b"", **kw) -> bytes:
    if kw.get("type", b"0") in (b"0", b"\0", b"7"):
        kw.setdefault("size", len(data))
    return header(name, **kw) + pad(data)


def archive(*entries: bytes, end: bool = True) -> bytes:
    body = b"".join(entries)
    return body + (b"\0" * (BLOCK * 2) if end else b"")


class NonSeekable:
    """Only read(); optionally short reads, as a pipe or decompressor gives."""

    def __init__(self, data: bytes, max_read: int | None = None):
        self._data = memoryview(data)
        self._pos = 0
        self.max_read = max_read
        self._step = 0

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = len(self._data) - self._pos
        if self.max_read:
            self._step = (self._step * 7 + 13) % self.max_read
            n = min(n, self._step + 1)
        out = bytes(self._data[self._pos:self._pos + n])
        self._pos += len(out)
        return out

    @property
    def consumed(self) -> int:
        return self._pos


def describe(root: str, *, times: bool = True, skip_root_times: bool = False) -> dict:
    """rel path -> comparable facts (type, mode, owner, size, content hash, target, rdev,
    xattrs, mtime, hardlink group)."""
    out = {}
    inodes: dict[tuple[int, int], str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = [(n, True) for n in dirnames] + [(n, False) for n in sorted(filenames)]
        if dirpath == root:
            names.insert(0, ("", True))
        for n, _ in names:
            p = os.path.join(dirpath, n) if n else dirpath
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            d = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                 "uid": st.st_uid, "gid": st.st_gid}
            if times and not (skip_root_times and rel == "."):
                d["mtime"] = st.st_mtime_ns
            if stat.S_ISREG(st.st_mode):
                d["size"] = st.st_size
                with open(p, "rb") as f:
                    d["sha"] = hashlib.sha256(f.read()).hexdigest()
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1:
                    d["link_group"] = inodes.setdefault(key, rel)
            elif stat.S_ISLNK(st.st_mode):
                d["target"] = os.readlink(p)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                d["rdev"] = (os.major(st.st_rdev), os.minor(st.st_rdev))
            try:
                keys = os.listxattr(p, follow_symlinks=False)
            except OSError:
                keys = []
            d["xattrs"] = {k: os.getxattr(p, k, follow_symlinks=False) for k in sorted(keys)}
            out[rel] = d
    return out


def gnu_tar(src: str, out: str, fmt: str = "posix", *extra: str) -> None:
    subprocess.run(["tar", f"--format={fmt}", "--xattrs", "--xattrs-include=*", "--sort=name",
                    "--numeric-owner", *extra, "-C", src, "-cf", out, "."], check=True)


def gnu_untar(tarball: str, dest: str) -> None:
    subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "-xpf",
                    tarball, "-C", dest], check=True)


# VFS_CAP_REVISION_2 with the effective flag; permitted = CAP_NET_BIND_SERVICE (bit 10)
CAP_NET_BIND_SERVICE_XATTR = (
    (0x02000000 | 1).to_bytes(4, "little") + (1 << 10).to_bytes(4, "little")
    + (0).to_bytes(4, "little") + (0).to_bytes(8, "little")
)
