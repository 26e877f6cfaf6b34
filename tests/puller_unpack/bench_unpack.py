"""Unpack throughput: puller.unpack vs GNU `tar -x` (and Python's tarfile) on one layer.

    .venv/bin/python tests/puller_unpack/bench_unpack.py [--mb 100] [--files 5000] [--runs 5]
        [--dir /dev/shm]

Builds a ~100 MB / 5k-file layer (mixed sizes, dirs, symlinks, hardlinks) with GNU tar in a
temp dir (tmpfs by default, so the disk does not dominate), then extracts it with each tool in
the same run, alternating, and prints medians and ratios. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from puller.unpack import unpack_layer  # noqa: E402


def build_tree(root: str, total_mb: int, nfiles: int, seed: int = 1) -> int:
    rnd = random.Random(seed)
    # size mix like a distro layer: many small files, a few big ones
    sizes = [int(rnd.lognormvariate(8.0, 1.6)) for _ in range(nfiles)]
    scale = total_mb * (1 << 20) / sum(sizes)
    sizes = [max(0, int(s * scale)) for s in sizes]
    blob = os.urandom(8 << 20)
    total = 0
    for i, size in enumerate(sizes):
        d = os.path.join(root, f"usr/share/d{i % 97:02d}/s{i % 13}")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, f"file{i}")
        with open(p, "wb") as f:
            left = size
            off = rnd.randrange(len(blob))
            while left:
                chunk = blob[off:off + left] or blob[:left]
                f.write(chunk)
                left -= len(chunk)
                off = 0
        total += size
        if i % 50 == 0:
            os.symlink(f"file{i}", os.path.join(d, f"link{i}"))
        if i % 200 == 0:
            os.link(p, os.path.join(d, f"hard{i}"))
    return total


def timed(fn) -> tuple[float, float]:
    """(wall s, CPU s of this process and its children); CPU is steadier on a busy machine."""
    r0s, r0c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    r1s, r1c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(b, f) - getattr(a, f) for a, b in ((r0s, r1s), (r0c, r1c))
              for f in ("ru_utime", "ru_stime"))
    return wall, cpu


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=100)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--dir", default="/dev/shm")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="unpack-bench-", dir=args.dir)
    try:
        src = os.path.join(work, "src")
        os.mkdir(src)
        data_bytes = build_tree(src, args.mb, args.files)
        layer = os.path.join(work, "layer.tar")
        subprocess.run(["tar", "--format=posix", "--sort=name", "--numeric-owner", "-C", src,
                        "-cf", layer, "."], check=True)
        shutil.rmtree(src)
        tar_size = os.path.getsize(layer)
        out = os.path.join(work, "out")

        def fresh() -> None:
            if os.path.exists(out):
                shutil.rmtree(out)
            os.mkdir(out)

        def gnu() -> None:
            subprocess.run(["tar", "--numeric-owner", "-xpf", layer, "-C", out], check=True)

        def ours() -> None:
            with open(layer, "rb", buffering=0) as f:
                unpack_layer(f, out)

        def ours_pipe() -> None:
            # a real non-seekable stream: cat | us
            p = subprocess.Popen(["cat", layer], stdout=subprocess.PIPE, bufsize=0)
            unpack_layer(p.stdout, out)
            p.wait()

        def py_tarfile() -> None:
            with tarfile.open(layer, "r|") as t:
                t.extractall(out, filter="fully_trusted", numeric_owner=True)

        tools = {"gnu tar -x": gnu, "puller.unpack (file)": ours,
                 "puller.unpack (pipe)": ours_pipe, "python tarfile r|": py_tarfile}
        walls: dict[str, list[float]] = {k: [] for k in tools}
        cpus: dict[str, list[float]] = {k: [] for k in tools}
        for _ in range(args.runs):
            for name, fn in tools.items():
                fresh()
                subprocess.run(["sync"], check=True)
                w, c = timed(fn)
                walls[name].append(w)
                cpus[name].append(c)
        fresh()

        print(f"layer: {tar_size / 1e6:.1f} MB tar, {data_bytes / 1e6:.1f} MB file data, "
              f"{args.files} files (+ symlinks, hardlinks), target {args.dir}, {args.runs} runs, "
              f"load {os.getloadavg()[0]:.1f}")
        base = statistics.median(walls["gnu tar -x"])
        cbase = statistics.median(cpus["gnu tar -x"])
        print(f"{'tool':24} {'wall med':>9} {'wall min':>9} {'MB/s':>6} {'x tar':>6} "
              f"{'cpu med':>8} {'x tar':>6}")
        for name in tools:
            med = statistics.median(walls[name])
            cmed = statistics.median(cpus[name])
            print(f"{name:24} {med:9.3f} {min(walls[name]):9.3f} {tar_size / 1e6 / med:6.0f} "
                  f"{med / base:6.2f} {cmed:8.3f} {cmed / cbase:6.2f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
