"""The guest kernel's two build steps: the ELF vmlinux out of a bzImage, and module order.

* ``extract_vmlinux``: QEMU's PVH entry boots an uncompressed ELF ``vmlinux`` about twice as
  fast under TCG as the bzImage (no real-mode setup, no self-decompression). The bzImage
  carries that ELF compressed; like the kernel tree's ``scripts/extract-vmlinux`` we look for
  each compressor's magic, try to decompress from there, and keep the first result that is an
  ELF file.
* ``module_order``: Debian's package ships no ``modules.dep`` (depmod runs at install time,
  and we do not install), so dependencies come from each ``.ko``'s ``.modinfo`` section
  (``depends=a,b``); the result lists every module after the ones it depends on.

    python3 kernel.py vmlinux BZIMAGE OUT
    python3 kernel.py modules MODULES_DIR LIST_FILE      # prints NAME PATH lines, in load order
"""
from __future__ import annotations

import gzip
import lzma
import os
import shutil
import subprocess
import sys
import zlib

ELF_MAGIC = b"\x7fELF"
# (name, magic) as in scripts/extract-vmlinux, most likely first for Debian (xz).
MAGICS = [
    ("xz", b"\xfd7zXZ\x00"),
    ("gzip", b"\x1f\x8b\x08"),
    ("zstd", b"\x28\xb5\x2f\xfd"),
    ("lzma", b"\x5d\x00\x00\x00"),
]


class KernelError(Exception):
    pass


def _decompress(kind: str, data: bytes) -> bytes | None:
    """Decompress one stream starting at data[0]; trailing bytes are ignored. None on failure."""
    try:
        if kind == "xz":
            return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
        if kind == "lzma":
            return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(data)
        if kind == "zstd":
            if shutil.which("zstd") is None:
                return None
            # The stream is followed by the bzImage's tail: zstd reports trailing garbage
            # but has written the frame by then.
            p = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True)
            return p.stdout or None
    except (lzma.LZMAError, zlib.error, EOFError, OSError):
        return None
    return None


def extract_vmlinux(image: bytes) -> bytes:
    """The uncompressed ELF kernel inside a bzImage (or the image itself if already ELF)."""
    if image.startswith(ELF_MAGIC):
        return image
    for kind, magic in MAGICS:
        start = image.find(magic)
        while start >= 0:
            out = _decompress(kind, image[start:])
            if out and out.startswith(ELF_MAGIC):
                return out
            start = image.find(magic, start + 1)
    raise KernelError("no compressed ELF kernel found in the image (tried "
                      + ", ".join(k for k, _ in MAGICS) + ")")


def modinfo(path: str) -> dict[str, list[str]]:
    """The key=value strings of a module's .modinfo section (every NUL-separated one)."""
    with open(path, "rb") as f:
        data = f.read()
    if path.endswith(".xz"):
        data = lzma.decompress(data)
    elif path.endswith(".gz"):
        data = gzip.decompress(data)
    if not data.startswith(ELF_MAGIC):
        raise KernelError(f"{path}: not an ELF module")
    info: dict[str, list[str]] = {}
    sec = _elf_section(data, b".modinfo")
    for item in sec.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            info.setdefault(key.decode(), []).append(value.decode(errors="replace"))
    return info


def _elf_section(data: bytes, want: bytes) -> bytes:
    import struct
    if data[4] != 2 or data[5] != 1:
        raise KernelError("only little-endian ELF64 modules are handled")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    def sh(i):
        # name, type, flags, addr, offset, size
        return struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize)
    _, _, _, _, str_off, str_size = sh(shstrndx)
    names = data[str_off:str_off + str_size]
    for i in range(shnum):
        name_off, _, _, _, off, size = sh(i)
        end = names.index(b"\0", name_off)
        if names[name_off:end] == want:
            return data[off:off + size]
    raise KernelError(f"no {want.decode()} section")


def index_modules(moddir: str) -> dict[str, str]:
    """Module name -> path for every .ko under moddir ('-' and '_' are the same in names)."""
    idx: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(moddir):
        dirnames.sort()
        for fn in sorted(filenames):
            for ext in (".ko", ".ko.xz", ".ko.gz", ".ko.zst"):
                if fn.endswith(ext):
                    idx.setdefault(fn[: -len(ext)].replace("-", "_"), os.path.join(dirpath, fn))
    return idx


def module_order(names: list[str], index: dict[str, str],
                 depends=lambda p: modinfo(p).get("depends", [""])[0]) -> list[str]:
    """names plus their dependencies, each after everything it depends on (stable order)."""
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, chain: tuple[str, ...]) -> None:
        name = name.replace("-", "_")
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            raise KernelError("module dependency cycle: " + " -> ".join(chain + (name,)))
        if name not in index:
            via = f" (needed by {chain[-1]})" if chain else ""
            raise KernelError(f"module {name!r}{via} not found in the kernel package")
        state[name] = 1
        for dep in sorted(d for d in depends(index[name]).split(",") if d):
            visit(dep, chain + (name,))
        state[name] = 2
        order.append(name)

    for n in names:
        visit(n, ())
    return order


def read_list(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [ln.split("#", 1)[0].strip() for ln in f if ln.split("#", 1)[0].strip()]


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "vmlinux":
        with open(argv[1], "rb") as f:
            elf = extract_vmlinux(f.read())
        tmp = argv[2] + ".tmp"
        with open(tmp, "wb") as f:
            f.write(elf)
        os.replace(tmp, argv[2])
        return 0
    if len(argv) == 3 and argv[0] == "modules":
        idx = index_modules(argv[1])
        for name in module_order(read_list(argv[2]), idx):
            print(name, idx[name])
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KernelError as e:
        print(f"kernel.py: {e}", file=sys.stderr)
        sys.exit(1)
