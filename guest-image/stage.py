"""Stage the guest's root file system (the initrd's content) into a directory.

    python3 stage.py --repo REPO --site SITE_PACKAGES --modules-list ORDER_FILE --out STAGE

Layout (Debian's merged /usr: /bin, /sbin, /lib, /lib64 are symlinks into /usr):

    /init                         guest-image/init (python3.11 -IS; runs agent.init)
    /usr/bin/python3.11           Debian's interpreter, its shared libraries (found with ldd)
    /usr/lib/python3.11/          the stdlib modules of stdlib-modules.txt, then our packages
                                  and their dependencies (packages.txt), all as sourceless .pyc
                                  compiled in the staged tree by its own interpreter (chroot)
    /usr/lib/modules/NAME.ko      the kernel modules, flat so agent.modules= stays short
    /usr/bin/busybox, /bin/sh     busybox-static: the debug console's shell
    /opt/busybox-rootfs/          a container root file system: busybox and its applet links
    /opt/puller-rootfs/           the puller helper container's root: python3.11, libraries,
                                  stdlib, puller/ and its dependencies, no agent/ (hard links)
    /sbin/ldconfig, /etc/ld.so.cache   ctypes.util.find_library (pyseccomp) asks ldconfig -p
    /etc/passwd, /etc/group       root and nobody (the daemon's uid)

Python's own sources are dropped after compiling (sourceless .pyc load fine; tracebacks then
show no source lines). .pyc files are made with unchecked-hash invalidation and a fixed hash
seed, so they do not depend on file times and the build is reproducible.
"""
from __future__ import annotations

import argparse
import fnmatch
import glob
import os
import re
import shutil
import stat
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PY = "python3.11"
PYBIN = "/usr/bin/python3.11"
STDLIB = "/usr/lib/python3.11"
DYNLOAD = STDLIB + "/lib-dynload"
EXT_SUFFIX = ".cpython-311-x86_64-linux-gnu.so"
LIBDIR = "usr/lib/x86_64-linux-gnu"
# Libraries loaded by name at run time (dlopen), which ldd of the binaries cannot see.
DLOPENED = ["libseccomp.so.2"]
BUSYBOX = "/bin/busybox"
DROP_DIRS = {"__pycache__", "tests", "test", "_tests", "testing", "idle_test"}
DROP_FILES = ("*.pyi", "py.typed", "*.c", "*.h", "*.pxd", "*.pyx", "*.pxi")


class StageError(Exception):
    pass


def read_list(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [ln.split("#", 1)[0].strip() for ln in f if ln.split("#", 1)[0].strip()]


def _ignore(dirpath: str, names: list[str]) -> set[str]:
    out = set()
    for n in names:
        full = os.path.join(dirpath, n)
        if os.path.isdir(full):
            if n in DROP_DIRS or n.endswith((".dist-info", ".egg-info")):
                out.add(n)
        elif any(fnmatch.fnmatch(n, pat) for pat in DROP_FILES) or n.endswith((".pyc", ".pyo")):
            out.add(n)
    return out


def copy_entry(src: str, dst_dir: str) -> None:
    """Copy a module file or a package directory (without tests/caches) into dst_dir."""
    dst = os.path.join(dst_dir, os.path.basename(src))
    if os.path.isdir(src):
        shutil.copytree(src, dst, ignore=_ignore, symlinks=False, dirs_exist_ok=True)
    else:
        shutil.copy2(src, dst)


def stage_stdlib(out: str, names: list[str]) -> None:
    lib = os.path.join(out, STDLIB.lstrip("/"))
    dyn = os.path.join(out, DYNLOAD.lstrip("/"))
    os.makedirs(dyn, exist_ok=True)
    missing = []
    for name in names:
        found = False
        for cand in (os.path.join(STDLIB, name), os.path.join(STDLIB, name + ".py"),
                     os.path.join(DYNLOAD, name + EXT_SUFFIX)):
            if os.path.exists(cand):
                copy_entry(cand, dyn if cand.startswith(DYNLOAD) else lib)
                found = True
                break
        if not found:
            missing.append(name)
    # Names compiled into the interpreter (_frozen_importlib, _typing ...) have no file: fine.
    builtin = set(sys.builtin_module_names) if sys.version_info[:2] == (3, 11) else set()
    unknown = [m for m in missing if m not in builtin and not m.startswith("_frozen")]
    if unknown:
        print(f"stage: note: no file for stdlib names {unknown} (built in?)", file=sys.stderr)


def stage_packages(out: str, entries: list[str], repo: str, site: str) -> None:
    lib = os.path.join(out, STDLIB.lstrip("/"))
    for entry in entries:
        kind, _, name = entry.partition(":")
        if kind == "drop":
            continue
        base = {"repo": repo, "site": site}.get(kind)
        if base is None or not name:
            raise StageError(f"packages.txt: {entry!r}: expected repo:NAME or site:NAME")
        matches = sorted(glob.glob(os.path.join(base, name)))
        if not matches:
            raise StageError(f"packages.txt: {entry!r}: nothing named {name!r} in {base}")
        for m in matches:
            copy_entry(m, lib)
    for entry in entries:
        kind, _, name = entry.partition(":")
        if kind == "drop":
            for m in sorted(glob.glob(os.path.join(lib, name))):
                shutil.rmtree(m) if os.path.isdir(m) else os.unlink(m)


def elf_files(root: str) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for fn in sorted(filenames):
            p = os.path.join(dirpath, fn)
            if os.path.islink(p) or not os.path.isfile(p):
                continue
            with open(p, "rb") as f:
                if f.read(4) == b"\x7fELF":
                    out.append(p)
    return out


_LDD_LINE = re.compile(r"^\s*(?:\S+ => )?(/\S+) \(0x[0-9a-f]+\)$")


def ldd(path: str) -> list[str]:
    p = subprocess.run(["ldd", path], capture_output=True, text=True)
    if "not a dynamic executable" in p.stdout + p.stderr or "statically linked" in p.stdout:
        return []
    if p.returncode != 0:
        raise StageError(f"ldd {path}: {p.stderr.strip() or p.stdout.strip()}")
    libs = []
    for line in p.stdout.splitlines():
        if "=> not found" in line:
            raise StageError(f"{path}: needs {line.split()[0]}, not found on the build host")
        m = _LDD_LINE.match(line)
        if m:
            libs.append(m.group(1))
    return libs


def stage_libs(out: str) -> list[str]:
    """Copy every shared library the staged ELF files need (and DLOPENED) into /usr/lib."""
    libdir = os.path.join(out, LIBDIR)
    os.makedirs(libdir, exist_ok=True)
    wanted: set[str] = set()
    for lib in DLOPENED:
        cands = [d + "/" + lib for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu")
                 if os.path.exists(d + "/" + lib)]
        if not cands:
            raise StageError(f"{lib} is not installed on the build host")
        wanted.add(cands[0])
    for f in elf_files(out):
        wanted.update(ldd(f))
    for lib in sorted(wanted):
        wanted.update(ldd(lib))
    copied = []
    for lib in sorted(wanted):
        name = os.path.basename(lib)
        if name.startswith("ld-linux"):
            dst = os.path.join(out, "usr/lib64", name)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
        else:
            dst = os.path.join(libdir, name)
        shutil.copyfile(os.path.realpath(lib), dst)
        os.chmod(dst, 0o755)
        copied.append(name)
    return copied


def strip_elves(out: str) -> None:
    for f in elf_files(out):
        if "/lib/modules/" in f or f.endswith("/busybox") or f.endswith("/ldconfig"):
            continue
        subprocess.run(["strip", "--strip-unneeded", "-p", f], check=True, capture_output=True)


def stage_base(out: str) -> None:
    for d in ("usr/bin", "usr/sbin", "usr/lib", "usr/lib64", "dev", "proc", "sys", "run",
              "tmp", "etc", "root", "mnt", "opt", "var"):
        os.makedirs(os.path.join(out, d), exist_ok=True)
    os.chmod(os.path.join(out, "tmp"), 0o1777)
    for link, target in (("bin", "usr/bin"), ("sbin", "usr/sbin"), ("lib", "usr/lib"),
                         ("lib64", "usr/lib64")):
        os.symlink(target, os.path.join(out, link))
    shutil.copy2(PYBIN, os.path.join(out, "usr/bin", PY))
    os.symlink(PY, os.path.join(out, "usr/bin/python3"))
    shutil.copy2(os.path.join(HERE, "init"), os.path.join(out, "init"))
    os.chmod(os.path.join(out, "init"), 0o755)
    shutil.copy2("/sbin/ldconfig", os.path.join(out, "usr/sbin/ldconfig"))
    with open(os.path.join(out, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    with open(os.path.join(out, "etc/group"), "w") as f:
        f.write("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    with open(os.path.join(out, "etc/hostname"), "w") as f:
        f.write("sandbox\n")
    with open(os.path.join(out, "etc/ld.so.conf"), "w") as f:
        f.write("/" + LIBDIR + "\n")


def busybox_applets() -> list[str]:
    p = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True)
    return sorted(a for a in p.stdout.split() if a and "/" not in a and a != "busybox")


def stage_busybox(out: str) -> None:
    shutil.copy2(BUSYBOX, os.path.join(out, "usr/bin/busybox"))
    os.symlink("busybox", os.path.join(out, "usr/bin/sh"))
    # A container root file system baked into the guest for tests and the quick start; the
    # agent's CreateContainer may name it as Root.Path.
    root = os.path.join(out, "opt/busybox-rootfs")
    for d in ("bin", "dev", "proc", "sys", "tmp", "etc", "root", "run"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    # A hard link: one copy in the archive (cpio.py writes the data once).
    os.link(os.path.join(out, "usr/bin/busybox"), os.path.join(root, "bin/busybox"))
    for a in busybox_applets():
        os.symlink("busybox", os.path.join(root, "bin", a))
    for name in ("passwd", "group", "hostname"):
        shutil.copy2(os.path.join(out, "etc", name), os.path.join(root, "etc", name))


PULLER_ROOTFS = "opt/puller-rootfs"


def stage_puller_rootfs(out: str) -> None:
    """The puller helper container's root file system: the interpreter, its libraries and the
    Python tree without the agent, as hard links into the guest's own copies (one copy of
    the data in the archive, a few kB of headers). The agent launches the puller in it like
    any container; it holds no agent code and no privileged helper."""
    root = os.path.join(out, PULLER_ROOTFS)
    for d in ("dev", "proc", "sys", "tmp", "run", "etc", "root", "store"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    for link, target in (("bin", "usr/bin"), ("lib", "usr/lib"), ("lib64", "usr/lib64")):
        os.symlink(target, os.path.join(root, link))
    lib = STDLIB.lstrip("/")
    for top in ("usr/bin", "usr/lib64", LIBDIR, lib):
        src_top = os.path.join(out, top)
        for dirpath, dirnames, filenames in os.walk(src_top):
            rel = os.path.relpath(dirpath, out)
            if rel == os.path.join(lib, "agent") or rel.startswith(os.path.join(lib, "agent") + "/"):
                dirnames[:] = []
                continue
            os.makedirs(os.path.join(root, rel), exist_ok=True)
            for fn in filenames:
                src = os.path.join(dirpath, fn)
                dst = os.path.join(root, rel, fn)
                if os.path.islink(src):
                    os.symlink(os.readlink(src), dst)
                else:
                    os.link(src, dst)
    for name in ("passwd", "group", "hostname", "ld.so.conf", "ld.so.cache"):
        os.link(os.path.join(out, "etc", name), os.path.join(root, "etc", name))


def stage_modules(out: str, order_file: str) -> list[str]:
    moddir = os.path.join(out, "usr/lib/modules")
    os.makedirs(moddir, exist_ok=True)
    paths = []
    with open(order_file, encoding="utf-8") as f:
        for line in f:
            name, src = line.split()
            shutil.copy2(src, os.path.join(moddir, name + ".ko"))
            paths.append(f"/lib/modules/{name}.ko")
    return paths


def chroot_python(out: str, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/usr/sbin", "PYTHONHASHSEED": "0", "LC_ALL": "C.UTF-8"}
    return subprocess.run(["chroot", out, "/usr/bin/" + PY, *args], env=env,
                          capture_output=True, text=True)


def compile_tree(out: str) -> None:
    """Compile in the staged tree with its own interpreter, then drop the .py sources.
    no_debug_ranges leaves the column tables out of the code objects (tracebacks name lines,
    not columns) and -o 2 the docstrings and asserts (nothing in the guest reads a docstring;
    our asserts are internal invariants, never input checks): each Python process in the
    guest is ~1.3 MiB smaller and so is the initrd. Legacy .pyc files (-b) are loaded whatever
    the interpreter's -O level, so the guest runs this bytecode without flags."""
    p = chroot_python(out, "-I", "-S", "-B", "-X", "no_debug_ranges", "-m", "compileall",
                      "-o", "2", "-q", "-b", "-f",
                      "--invalidation-mode", "unchecked-hash", STDLIB)
    if p.returncode != 0:
        raise StageError(f"compileall in the staged tree failed:\n{p.stdout}{p.stderr}")
    lib = os.path.join(out, STDLIB.lstrip("/"))
    for dirpath, _, filenames in os.walk(lib):
        for fn in filenames:
            if fn.endswith(".py") and os.path.exists(os.path.join(dirpath, fn + "c")):
                os.unlink(os.path.join(dirpath, fn))


SELF_CHECK = r"""
import importlib, pkgutil, sys
bad = []
for pkg in ("agent", "puller"):
    m = importlib.import_module(pkg)
    for i in pkgutil.walk_packages(m.__path__, pkg + "."):
        if i.name.endswith("__main__"):
            continue
        try:
            importlib.import_module(i.name)
        except Exception as e:
            bad.append(f"{i.name}: {type(e).__name__}: {e}")
for name in ("trio", "pyseccomp", "prctl", "pyroute2", "google.protobuf", "oras.provider",
             "zstandard", "isal.isal_zlib", "ctypes", "runpy"):
    try:
        importlib.import_module(name)
    except Exception as e:
        bad.append(f"{name}: {type(e).__name__}: {e}")
print("\n".join(bad))
sys.exit(1 if bad else 0)
"""


def self_check(out: str) -> None:
    """Import every module of ours inside the staged tree: a missing stdlib module or shared
    library shows up here, at build time, instead of as a guest that never answers."""
    # ctypes.util.find_library runs ldconfig with stdin from /dev/null: the guest has one
    # (devtmpfs), the staged tree gets one just for this run.
    null = os.path.join(out, "dev/null")
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    try:
        p = chroot_python(out, "-B", "-c", SELF_CHECK)
    finally:
        os.unlink(null)
    if p.returncode != 0:
        raise StageError("the staged guest cannot import everything it needs:\n"
                         + p.stdout + p.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repo", required=True)
    ap.add_argument("--site", required=True)
    ap.add_argument("--modules-order", required=True, help="NAME PATH lines from kernel.py")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    out = a.out
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(out)
    stage_base(out)
    stage_stdlib(out, read_list(os.path.join(HERE, "stdlib-modules.txt")))
    stage_packages(out, read_list(os.path.join(HERE, "packages.txt")), a.repo, a.site)
    stage_busybox(out)
    stage_libs(out)
    strip_elves(out)
    mods = stage_modules(out, a.modules_order)
    subprocess.run(["/sbin/ldconfig", "-r", out], check=True)
    compile_tree(out)
    self_check(out)
    stage_puller_rootfs(out)
    with open(os.path.join(out, "etc/agent-modules"), "w") as f:
        f.write(",".join(mods) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except StageError as e:
        print(f"stage.py: {e}", file=sys.stderr)
        sys.exit(1)
