"""A reproducible initramfs archive: cpio "newc" of a directory tree, entries in sorted order.

Every entry gets the same mtime, uid/gid 0 and an inode number by position, so the same tree
gives the same bytes. Extra entries (device nodes such as /dev/console, which the kernel opens
for PID 1's stdio before /init runs) can be added without creating them on the build host.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from typing import BinaryIO, Iterable

TRAILER = "TRAILER!!!"


@dataclass(frozen=True)
class Node:
    """An entry that does not exist in the staged tree (a device node)."""
    path: str           # relative, e.g. "dev/console"
    mode: int           # full st_mode, e.g. stat.S_IFCHR | 0o600
    rdev: tuple[int, int] = (0, 0)


def _header(ino: int, mode: int, nlink: int, mtime: int, size: int, rdev: tuple[int, int],
            namesize: int) -> bytes:
    fields = [ino, mode, 0, 0, nlink, mtime, size, 0, 0, rdev[0], rdev[1], namesize, 0]
    return ("070701" + "".join(f"{v:08x}" for v in fields)).encode()


def _pad(n: int) -> bytes:
    return b"\0" * (-n % 4)


def _entry(out: BinaryIO, ino: int, name: str, mode: int, mtime: int, data: bytes = b"",
           rdev: tuple[int, int] = (0, 0), nlink: int = 0) -> None:
    nb = name.encode() + b"\0"
    nlink = nlink or (2 if stat.S_ISDIR(mode) else 1)
    hdr = _header(ino, mode, nlink, mtime, len(data), rdev, len(nb))
    out.write(hdr + nb + _pad(len(hdr) + len(nb)))
    out.write(data + _pad(len(data)))


def walk(root: str) -> list[str]:
    """Relative paths of everything under root, parents before children, sorted."""
    paths: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for n in sorted(dirnames + filenames):
            paths.append(n if rel == "." else f"{rel}/{n}")
    return sorted(paths)


def write(root: str, out: BinaryIO, mtime: int = 0, extra: Iterable[Node] = ()) -> int:
    """Archive the tree at root (plus extra nodes) into out; returns the entry count."""
    extras = {n.path: n for n in extra}
    names = sorted(set(walk(root)) | set(extras))
    # Hard links share an inode number; newc stores the data with the last name of a group
    # (the kernel's unpacker keeps the first name's file and links the others to it).
    groups: dict[tuple[int, int], list[str]] = {}
    for rel in names:
        if rel not in extras:
            st = os.lstat(os.path.join(root, rel))
            if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
                groups.setdefault((st.st_dev, st.st_ino), []).append(rel)
    link_ino: dict[str, tuple[int, int, bool]] = {}  # rel -> (ino, nlink, carries data)
    first_ino = {rel: i for i, rel in enumerate(names, start=1)}
    for group in groups.values():
        ino = first_ino[group[0]]
        for k, rel in enumerate(group):
            link_ino[rel] = (ino, len(group), k == len(group) - 1)
    for ino, rel in enumerate(names, start=1):
        if rel in extras:
            n = extras[rel]
            _entry(out, ino, rel, n.mode, mtime, rdev=n.rdev)
            continue
        full = os.path.join(root, rel)
        st = os.lstat(full)
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            _entry(out, ino, rel, stat.S_IFLNK | 0o777, mtime, os.readlink(full).encode())
        elif stat.S_ISDIR(st.st_mode):
            _entry(out, ino, rel, stat.S_IFDIR | perm, mtime)
        elif rel in link_ino:
            lino, nlink, has_data = link_ino[rel]
            data = b""
            if has_data:
                with open(full, "rb") as f:
                    data = f.read()
            _entry(out, lino, rel, stat.S_IFREG | perm, mtime, data, nlink=nlink)
        elif stat.S_ISREG(st.st_mode):
            with open(full, "rb") as f:
                _entry(out, ino, rel, stat.S_IFREG | perm, mtime, f.read())
        else:
            raise ValueError(f"{full}: cannot archive a {stat.filemode(st.st_mode)[0]!r} file "
                             "(only files, dirs and symlinks; add device nodes as extra)")
    _entry(out, len(names) + 1, TRAILER, 0, 0)
    return len(names)


def read_names(data: bytes) -> list[tuple[str, int, bytes]]:
    """(name, mode, data) of each entry of an uncompressed newc archive (for tests)."""
    out, off = [], 0
    while True:
        if data[off:off + 6] != b"070701":
            raise ValueError(f"bad cpio magic at offset {off}")
        f = [int(data[off + 6 + 8 * i: off + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        off += 110
        name = data[off:off + namesize - 1].decode()
        off += namesize + (-(110 + namesize) % 4)
        body = data[off:off + size]
        off += size + (-size % 4)
        if name == TRAILER:
            return out
        out.append((name, mode, body))


def main(argv: list[str]) -> int:
    """python3 cpio.py ROOT [MTIME] > archive.cpio: ROOT plus /dev/console, written to stdout."""
    import sys
    root = argv[0]
    mtime = int(argv[1]) if len(argv) > 1 else 0
    # The kernel opens /dev/console in the initramfs for PID 1's stdin/out/err before /init
    # runs (devtmpfs is mounted only later, by init itself).
    console = Node("dev/console", stat.S_IFCHR | 0o600, (5, 1))
    write(root, sys.stdout.buffer, mtime, [console])
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main(sys.argv[1:]))
