"""Pull benchmark: our puller vs skopeo copy + umoci unpack (and a GNU tar floor).

Generates a 4-layer image (~200 MB, ~10k files, ~100 MB gzip-compressed) into a
local docker-registry, then times, in the same run and on the same tmpfs:

  ours          python puller: pull + verify + unpack into a fresh store (cold)
  skopeo+umoci  skopeo copy docker:// -> oci layout, then umoci unpack
  tar floor     tar -xzf of the four already-downloaded blobs, no network, no checks
  warm          ours, pulling a second image sharing 3 of 4 layers with one present

Prints medians and ratios.  Needs root (umoci unpack, file ownership), docker-registry,
skopeo, umoci.  Usage: python bench/pull_bench.py [--runs 3] [--mb 200] [--files 10000]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from puller.pull import PullOptions, pull  # noqa: E402
from puller.registry import RegistryOptions  # noqa: E402
from puller.store import Store  # noqa: E402

try:
    from isal import igzip as fastgzip
except ImportError:  # pragma: no cover
    import gzip as fastgzip


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def start_registry(tmp: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp / "registry.yml"
    cfg.write_text(f"""version: 0.1
log: {{level: error, accesslog: {{disabled: true}}}}
storage:
  filesystem: {{rootdirectory: {tmp / 'storage'}}}
  cache: {{blobdescriptor: ''}}
http:
  addr: 127.0.0.1:{port}
  secret: bench
""")
    proc = subprocess.Popen(["docker-registry", "serve", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    host = f"127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(f"http://{host}/v2/", timeout=1).status_code == 200:
                return proc, host
        except requests.RequestException:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("docker-registry did not start")


def make_layer_dir(root: Path, seed: int, n_files: int, total: int) -> None:
    """n_files files totalling ~total bytes; content half random, half repetitive (~2:1 gzip)."""
    big_n = 10
    small_n = n_files - big_n
    small_size = max(1024, total * 2 // 5 // small_n)
    big_size = (total - small_n * small_size) // big_n
    rnd = os.urandom(big_size // 2 + 1)
    filler = (f"layer {seed} line of text, repeated; ".encode() * (big_size // 32 + 2))
    for i in range(small_n):
        d = root / f"d{i % 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        off = (i * 7919) % max(1, len(rnd) - small_size // 2)
        (d / f"f{seed}_{i}").write_bytes(rnd[off:off + small_size // 2] + filler[: small_size - small_size // 2])
    for i in range(big_n):
        data = bytearray(rnd[: big_size // 2] + filler[: big_size - big_size // 2])
        data[:8] = i.to_bytes(8, "little")
        (root / f"big{seed}_{i}").write_bytes(bytes(data))


def tar_dir(src: Path) -> bytes:
    return subprocess.run(["tar", "-C", str(src), "--sort=name", "--mtime=@0", "--owner=0", "--group=0",
                           "--numeric-owner", "-cf", "-", "."], check=True, capture_output=True).stdout


class Pusher:
    def __init__(self, host: str) -> None:
        self.base = f"http://{host}/v2"
        self.s = requests.Session()
        self.s.trust_env = False

    def blob(self, repo: str, data: bytes) -> str:
        digest = sha256(data)
        r = self.s.post(f"{self.base}/{repo}/blobs/uploads/")
        loc = r.headers["Location"]
        loc = loc if loc.startswith("http") else self.base.rsplit("/v2", 1)[0] + loc
        r = self.s.put(f"{loc}{'&' if '?' in loc else '?'}digest={digest}", data=data)
        assert r.status_code == 201, r.text
        return digest

    def image(self, repo: str, tag: str, layers: list[tuple[bytes, bytes]]) -> str:
        cfg = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
                          "rootfs": {"type": "layers", "diff_ids": [sha256(t) for t, _ in layers]}}).encode()
        descs = [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": self.blob(repo, z),
                  "size": len(z)} for _, z in layers]
        doc = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
               "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                          "digest": self.blob(repo, cfg), "size": len(cfg)}, "layers": descs}
        body = json.dumps(doc).encode()
        r = self.s.put(f"{self.base}/{repo}/manifests/{tag}", data=body,
                       headers={"Content-Type": doc["mediaType"]})
        assert r.status_code == 201, r.text
        return sha256(body)


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--mb", type=int, default=200, help="uncompressed image size")
    ap.add_argument("--files", type=int, default=10000)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--tmpfs", default="/dev/shm")
    ap.add_argument("--warmup", type=int, default=1, help="untimed rounds first (registry and caches warm)")
    args = ap.parse_args()
    for tool in ("docker-registry", "skopeo", "umoci", "tar"):
        if not shutil.which(tool):
            raise SystemExit(f"{tool} is not installed")

    work = Path(tempfile.mkdtemp(prefix="pullbench-", dir=args.tmpfs))
    proc = None
    try:
        proc, host = start_registry(work)
        t0 = time.perf_counter()
        layers = []
        per_layer = args.mb * 1_000_000 // 4
        for i in range(5):  # 4 for image A, the 5th replaces A's top layer in image B
            d = work / f"src{i}"
            make_layer_dir(d, i, args.files // 4, per_layer)
            t = tar_dir(d)
            shutil.rmtree(d)
            layers.append((t, fastgzip.compress(t, compresslevel=1)))
        p = Pusher(host)
        p.image("bench/a", "v1", layers[:4])
        p.image("bench/b", "v1", layers[:3] + [layers[4]])
        blobs = work / "blobs"
        blobs.mkdir()
        for i, (_, z) in enumerate(layers[:4]):
            (blobs / f"{i}.tar.gz").write_bytes(z)
        unc = sum(len(t) for t, _ in layers[:4]) / 1e6
        comp = sum(len(z) for _, z in layers[:4]) / 1e6
        print(f"image: 4 layers, {args.files} files, {unc:.0f} MB tar, {comp:.0f} MB gzip "
              f"(generated + pushed in {time.perf_counter() - t0:.1f}s); tmpfs {args.tmpfs}; "
              f"{os.cpu_count()} cpus")
        ropts = RegistryOptions(plain_http=frozenset({host}))
        ref_a, ref_b = f"{host}/bench/a:v1", f"{host}/bench/b:v1"

        timings: dict[str, list[float]] = {"ours": [], "skopeo+umoci": [], "skopeo copy": [], "umoci unpack": [],
                                           "tar floor": [], "ours warm (3/4 shared)": [], "ours cold (image b)": []}
        for run in range(-args.warmup, args.runs):  # negative runs: warm-up, not recorded
            # ours, cold
            sdir = work / f"store{run}"
            t = timed(lambda: pull(ref_a, Store(sdir), PullOptions(registry=ropts, parallel=args.parallel)))
            timings["ours"].append(t)
            # warm: image b into the store that has a
            timings["ours warm (3/4 shared)"].append(
                timed(lambda: pull(ref_b, Store(sdir), PullOptions(registry=ropts, parallel=args.parallel))))
            shutil.rmtree(sdir)
            sdir2 = work / f"storeb{run}"
            timings["ours cold (image b)"].append(
                timed(lambda: pull(ref_b, Store(sdir2), PullOptions(registry=ropts, parallel=args.parallel))))
            shutil.rmtree(sdir2)
            # skopeo + umoci
            layout, bundle = work / f"layout{run}", work / f"bundle{run}"
            t_copy = timed(lambda: subprocess.run(
                ["skopeo", "copy", "--quiet", "--src-tls-verify=false", f"docker://{ref_a}", f"oci:{layout}:v1"],
                check=True))
            t_unpack = timed(lambda: subprocess.run(
                ["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], check=True, capture_output=True))
            timings["skopeo copy"].append(t_copy)
            timings["umoci unpack"].append(t_unpack)
            timings["skopeo+umoci"].append(t_copy + t_unpack)
            shutil.rmtree(layout)
            shutil.rmtree(bundle)
            # GNU tar floor
            floor = work / f"floor{run}"
            floor.mkdir()
            timings["tar floor"].append(timed(lambda: [subprocess.run(
                ["tar", "-xzf", str(blobs / f"{i}.tar.gz"), "-C", str(floor)], check=True) for i in range(4)]))
            shutil.rmtree(floor)

        results = {k: v[args.warmup:] for k, v in timings.items()}
        med = {k: statistics.median(v) for k, v in results.items()}
        ref = med["skopeo+umoci"]
        print(f"\n{'runs: ' + str(args.runs):<26}{'median s':>10}{'min s':>9}{'vs skopeo+umoci':>17}")
        for k, v in results.items():
            print(f"{k:<26}{med[k]:>10.2f}{min(v):>9.2f}{med[k] / ref:>16.2f}x")
        print(f"\nours / skopeo+umoci = {med['ours'] / ref:.2f}x (goal <= 0.5x); "
              f"ours / tar floor = {med['ours'] / med['tar floor']:.2f}x; "
              f"warm / cold (image b) = {med['ours warm (3/4 shared)'] / med['ours cold (image b)']:.2f}x")
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
