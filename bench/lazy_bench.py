"""Lazy pull benchmark: time to a container's first output, lazy vs full pull, in one run.

Builds an image of about --mb MB of incompressible files (busybox, ~200 files of 1 MiB, a
100 MiB file, the rest in 10 MiB files) in two gzip layers, pushes it to a local
docker-registry, indexes it (`puller index`), then for --runs rounds each, from an empty
store every time:

  full   puller pull + overlay snapshot + chroot the entrypoint, until its first output line
  lazy   puller pull --lazy + lazy snapshot (FUSE + overlay) + the same entrypoint, with the
         FUSE daemon a new interpreter (exec: make_lazy_snapshot's default, safe for callers
         with threads), a fork of this process (what `python -m puller snapshot` and the
         agent's pull job do), and a fork mounting the same image in a second repository,
         indexed with the prefetch list a recording run wrote (`index --prefetch`: the list
         travels in the metadata, no list is given at mount time)

The entrypoint reads a few MB (busybox and --read-mb MiB of the small files) and prints a
line.  Before each timed run what the previous one left dirty is written back (a full pull
leaves ~650 MB), so that writeback is charged to no run.  Each lazy line shows the ratio of the medians and the median of each round's own ratio
(full and lazy runs of a round follow each other, so that one is steadier on a shared
machine), and per round the phases pull / mount (daemon start + FUSE + overlay) / run.  Also: bytes fetched by the lazy run vs the image's size, and sequential reads of the
100 MiB file through the lazy mount (cold: from the registry; warm-chunks: a fresh mount on
a filled chunk cache; warm-page: the same mount again) beside the same read from the full
pull's overlay snapshot, and skopeo copy + umoci unpack as a reference full pull.

Then --agent-runs rounds of the same through the agent (init + daemon on this host): PullImage
with a container_id, CreateContainer, StartContainer, ReadStdout to the output, full vs lazy,
each from an empty image store; the puller's jobs run in forks of init's warm puller.

Needs root, docker-registry, /dev/fuse, fusermount3 (and skopeo, umoci for the reference).
Usage: python bench/lazy_bench.py [--mb 320] [--runs 3] [--read-mb 4] [--loopback-only]
                                  [--agent-runs 5]
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from puller.lazy.convert import index_image  # noqa: E402
from puller.lazy.locate import pull_lazy  # noqa: E402
from puller.lazy.mount import make_lazy_snapshot  # noqa: E402
from puller.pull import PullOptions, pull  # noqa: E402
from puller.registry import RegistryOptions  # noqa: E402
from puller.snapshot import make_snapshot  # noqa: E402
from puller.store import Store  # noqa: E402


LISTED = "bench/lazy-listed"  # the same image, indexed with the recorded prefetch list


def test_kit():
    """The puller tests' registry starter and image builder (tests/puller/conftest.py)."""
    name = "puller_tests_conftest"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "tests/puller/conftest.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return sys.modules[name]


def build_image(kit, work: Path, mb: int) -> tuple[list, list[str]]:
    base = kit.busybox_tree(work / "l1")
    small = []
    (base / "lib").mkdir()
    for i in range(200):  # "libraries": 200 x 1 MiB
        p = base / "lib" / f"lib{i:03d}.so"
        p.write_bytes(os.urandom(1 << 20))
        small.append(f"lib/{p.name}")
    app = work / "l2"
    (app / "data").mkdir(parents=True)
    (app / "data/big").write_bytes(os.urandom(100 << 20))
    rest = max(0, mb - 200 - 100 - 2)
    for i in range(rest // 10):
        (app / "data" / f"blob{i:02d}").write_bytes(os.urandom(10 << 20))
    layers = [kit.Layer(kit.tar_dir(base), "gzip"), kit.Layer(kit.tar_dir(app), "gzip")]
    shutil.rmtree(base)
    shutil.rmtree(app)
    return layers, small


def first_output(rootfs: Path, script: str, expect: int) -> float:
    """Seconds until the entrypoint writes its first line (measured by the caller's clock)."""
    proc = subprocess.Popen(["chroot", str(rootfs), "/bin/sh", "-c", script], stdout=subprocess.PIPE)
    line = proc.stdout.readline()
    proc.wait()
    if line.strip() != b"ready " + str(expect).encode():
        raise RuntimeError(f"entrypoint printed {line!r}")
    return time.monotonic()


def read_file(path: Path) -> float:
    """MB/s of one sequential read in 1 MiB pieces."""
    n = 0
    t = time.monotonic()
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            n += len(chunk)
    return n / (time.monotonic() - t) / 1e6


class LinkProxy:
    """A forwarding HTTP proxy that shares one bandwidth budget among all its connections and
    delays each request by `rtt`: a registry across a network link, without touching the
    machine's own network (the machine is shared)."""

    def __init__(self, upstream: str, bytes_per_s: float, rtt: float) -> None:
        import http.server
        import threading

        import requests
        lock = threading.Lock()
        state = {"free_at": 0.0}
        session = requests.Session()

        def spend(n: int) -> None:
            with lock:
                now = time.monotonic()
                start = max(now, state["free_at"])
                state["free_at"] = start + n / bytes_per_s
                wait = state["free_at"] - now
            if wait > 0:
                time.sleep(wait)

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                # headers and body go out in separate writes: without this, Nagle + delayed ACK
                # add 40 ms to every small answer
                import socket
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self):
                time.sleep(rtt)
                headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "accept", "authorization")}
                with session.get(f"http://{upstream}{self.path}", headers=headers, stream=True, timeout=60) as r:
                    self.send_response(r.status_code)
                    for k, v in r.headers.items():
                        if k.lower() not in ("transfer-encoding", "connection", "content-encoding"):
                            self.send_header(k, v)
                    self.end_headers()
                    for piece in r.raw.stream(64 << 10, decode_content=False):
                        spend(len(piece))
                        self.wfile.write(piece)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def settle() -> None:
    """Before each timed run: write back what the previous one left dirty (a full pull leaves
    ~650 MB), so its writeback is not charged to the next run, whichever kind."""
    os.sync()
    time.sleep(0.05)


def shrink() -> None:
    """Give back the memory the image build used: forking (the lazy daemon, the entrypoint)
    costs time by the size of the forking process, and the bench, not the puller, grew it."""
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def compare(a, work: Path, host: str, image_bytes: int, script: str, mounts: list, title: str) -> None:
    """Full vs lazy pull to first output through `host`, each round from an empty store."""
    ref = f"{host}/bench/lazy:v1"
    opts = PullOptions(registry=RegistryOptions(plain_http=frozenset({host}), timeout=60))
    variants = {"exec": (ref, {}), "fork": (ref, {"fork": True}),
                "fork+prefetch": (f"{host}/{LISTED}:v1", {"fork": True})}
    full_t: list[float] = []
    lazy_t: dict[str, list[float]] = {k: [] for k in variants}
    fetched: dict[str, list[int]] = {k: [] for k in variants}
    phases: dict[str, list[tuple]] = {k: [] for k in variants}
    for i in range(a.runs):
        settle()
        store = Store(str(work / f"full{i}"))
        t = time.monotonic()
        img = pull(ref, store, opts)
        snap = make_snapshot(store, img.chain_ids, work / f"full-root{i}", mode="overlay")
        full_t.append(first_output(snap.dest, script, a.read_mb << 20) - t)
        snap.remove()
        shutil.rmtree(work / f"full{i}")
        for name, (lref, kw) in variants.items():
            settle()
            sdir = work / f"lazy{i}{name}"
            store = Store(str(sdir))
            t = time.monotonic()
            record = pull_lazy(lref, store, opts)
            t1 = time.monotonic()
            lsnap = make_lazy_snapshot(store, lref, work / f"lazy-root{i}{name}", **kw)
            t2 = time.monotonic()
            mounts.append(lsnap)
            lazy_t[name].append(first_output(lsnap.dest, script, a.read_mb << 20) - t)
            phases[name].append((t1 - t, t2 - t1, t + lazy_t[name][-1] - t2))
            time.sleep(0.3)  # let a prefetch finish, so its bytes are counted too
            meta_size = store.blob_path(record["lazy"]["meta"]).stat().st_size
            fetched[name].append(lsnap.stats()["bytes"] + meta_size)
            lsnap.remove()
            mounts.remove(lsnap)
            shutil.rmtree(sdir)
    print(f"\n{title}\ntime from pull to the entrypoint's first output, median of {a.runs}, each from an empty store:")
    print(f"  full pull + overlay snapshot + run    {med(full_t):6.3f} s  {['%.3f' % x for x in full_t]}")
    for name in variants:
        # Also the median of each round's own ratio: on a shared machine the load drifts, and a
        # round's full and lazy runs follow each other closely.
        per_round = med([f / l for f, l in zip(full_t, lazy_t[name])])
        print(f"  lazy ({name:13s}) + mount + run   {med(lazy_t[name]):6.3f} s  "
              f"{med(full_t) / med(lazy_t[name]):5.1f}x sooner (goal >= 10x; per round {per_round:.1f}x);  "
              "phases pull/mount/run: " + ", ".join(f"{p:.3f}/{m:.3f}/{r:.3f}" for p, m, r in phases[name]))
    for name in variants:
        f = med(fetched[name])
        print(f"  bytes fetched, lazy {name:13s}: {f / 1e6:6.2f} MB = {100 * f / image_bytes:5.2f}% "
              f"of the {image_bytes / 1e6:.0f} MB image (goal <= 10%)")


def agent_compare(a, work: Path, host: str, script: str) -> None:
    """The same comparison through the agent, as a runtime drives it: init and the daemon run
    on this host as the agent tests start them, and each round is PullImage (with a
    container_id: pull job + snapshot job) then CreateContainer, StartContainer and ReadStdout
    to the entrypoint's output, full vs lazy, every round from an empty image store."""
    import trio
    sys.path.insert(0, str(REPO / "tests" / "agent"))
    import client as C  # noqa: E402 - the agent tests' own helpers
    from conftest import Agent, spec  # noqa: E402

    from agent.protos import agent_pb2
    from agent.ttrpc import open_client

    os.chmod(work, 0o711)  # the confined daemon (uid 65534) makes its dirs beneath
    (work / "agent").mkdir()
    ag = Agent(work / "agent")
    try:
        ag.start()
        store = ag.run_dir / "images"
        ref = f"{host}/bench/lazy:v1"
        times: dict[str, list[tuple[float, float]]] = {"full": [], "lazy": []}

        async def one(cid: str, lazy: bool) -> tuple[float, float]:
            async with open_client(ag.addr) as c:
                t = time.monotonic()
                r = await c.call(C.SVC, "PullImage", agent_pb2.PullImageRequest(
                    image=ref, container_id=cid, insecure_registries=[host], lazy=lazy),
                    agent_pb2.PullImageResponse, timeout=300)
                t1 = time.monotonic()
                assert r.lazy == lazy, r
                ctr = spec(r.rootfs, ["/bin/sh", "-c", script], netns=False)
                ctr["root"]["readonly"] = False
                await C.create(c, cid, ctr)
                await C.start(c, cid)
                out = await C.read_all(c, cid)
                t2 = time.monotonic()
                assert out == f"ready {a.read_mb << 20}\n".encode(), out
                await C.wait(c, cid)
                await C.remove(c, cid)
                return t1 - t, t2 - t

        # An untimed round first: init starts its warm puller at the first image request.
        trio.run(one, "warmup", True)
        end = time.monotonic() + 60
        while "warm puller ready" not in ag.logs() and time.monotonic() < end:
            time.sleep(0.1)
        warm = "warm puller ready" in ag.logs()
        for i in range(a.agent_runs):
            for kind in ("full", "lazy"):
                if store.exists():
                    shutil.rmtree(store)  # its snapshots are gone with their containers
                settle()
                times[kind].append(trio.run(one, f"{kind}{i}", kind == "lazy"))
        full = [b for _, b in times["full"]]
        lazy = [b for _, b in times["lazy"]]
        print(f"\nthrough the agent (PullImage + Create/Start + ReadStdout), median of {a.agent_runs}, "
              f"warm puller {'ready' if warm else 'NOT ready (jobs were new processes)'}:")
        for kind, xs in (("full", full), ("lazy", lazy)):
            print(f"  {kind}: PullImage {med([p for p, _ in times[kind]]):6.3f} s, output "
                  f"{med(xs):6.3f} s  {['%.3f' % x for x in xs]}")
        print(f"  lazy first output {med(full) / med(lazy):5.1f}x sooner "
              f"(per round {med([f / l for f, l in zip(full, lazy)]):.1f}x)")
    finally:
        ag.stop()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=320)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--read-mb", type=int, default=4)
    ap.add_argument("--no-reference", action="store_true", help="skip skopeo copy + umoci unpack")
    ap.add_argument("--loopback-only", action="store_true",
                    help="only the loopback comparison (no emulated link, format cost or read throughput)")
    ap.add_argument("--link-mbit", type=int, default=1000, help="bandwidth of the emulated link")
    ap.add_argument("--rtt-ms", type=float, default=2.0, help="delay added to each request on the emulated link")
    ap.add_argument("--agent-runs", type=int, default=5,
                    help="rounds of the comparison through the agent (0: skip it)")
    a = ap.parse_args()
    if os.geteuid() != 0:
        print("lazy_bench needs root (FUSE allow_other, overlayfs, chroot)", file=sys.stderr)
        return 2
    kit = test_kit()
    work = Path(tempfile.mkdtemp(prefix="lazy-bench-"))
    reg = kit.start_registry(work / "registry")
    mounts: list = []
    try:
        t = time.monotonic()
        layers, small = build_image(kit, work / "build", a.mb)
        for repo in ("bench/lazy", LISTED):
            kit.Pusher(reg).image(repo, "v1", layers, config={"Entrypoint": ["/bin/sh", "-c"], "Env": ["PATH=/bin"]})
        image_bytes = sum(len(l.blob) for l in layers)
        file_bytes = sum(len(l.tar) for l in layers)
        del layers
        shrink()
        print(f"image: {image_bytes / 1e6:.0f} MB compressed ({file_bytes / 1e6:.0f} MB tar), "
              f"built and pushed in {time.monotonic() - t:.1f}s")
        ref = f"{reg.host}/bench/lazy:v1"
        opts = PullOptions(registry=RegistryOptions(plain_http=frozenset({reg.host}), timeout=30))
        t = time.monotonic()
        res = index_image(ref, opts)
        print(f"index: {time.monotonic() - t:.1f}s; metadata {res.meta_bytes} bytes, {res.chunks} chunks, "
              f"data blob {res.stored_bytes / 1e6:.0f} MB")
        # The image has no /dev (a runtime mounts it): the copy goes to the overlay's upper dir.
        script = (f"cat {' '.join('/' + s for s in small[:a.read_mb])} > /tmp/out; "
                  "echo ready $(/bin/busybox stat -c %s /tmp/out)")

        # One recording run writes the prefetch list (the files the entrypoint opens).
        plist = work / "prefetch.txt"
        store = Store(str(work / "rec"))
        pull_lazy(ref, store, opts)
        rs = make_lazy_snapshot(store, ref, work / "rec-root", record=str(plist), fork=True)
        mounts.append(rs)
        first_output(rs.dest, script, a.read_mb << 20)
        rs.remove()
        mounts.remove(rs)
        shutil.rmtree(work / "rec")
        recorded = plist.read_text().split()
        index_image(f"{reg.host}/{LISTED}:v1", opts, prefetch=recorded)
        print(f"recorded prefetch list: {len(recorded)} files, indexed into {LISTED}")

        compare(a, work, reg.host, image_bytes, script, mounts, "loopback (registry on 127.0.0.1)")
        if a.agent_runs:
            agent_compare(a, work, reg.host, script)
        if a.loopback_only:
            return 0
        proxy = LinkProxy(reg.host, a.link_mbit * 1e6 / 8, a.rtt_ms / 1e3)
        try:
            compare(a, work, proxy.host, image_bytes, script, mounts,
                    f"emulated link: {a.link_mbit} Mbit/s, {a.rtt_ms} ms per request (a proxy in front of the registry)")
        finally:
            proxy.close()

        if not a.no_reference and shutil.which("skopeo") and shutil.which("umoci"):
            t = time.monotonic()
            subprocess.run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{ref}",
                            f"oci:{work / 'oci'}:v1"], check=True, capture_output=True)
            subprocess.run(["umoci", "unpack", "--image", f"{work / 'oci'}:v1", str(work / "bundle")],
                           check=True, capture_output=True)
            print(f"\nreference on loopback: skopeo copy + umoci unpack (no run)  {time.monotonic() - t:.2f} s")
            shutil.rmtree(work / "oci")
            shutil.rmtree(work / "bundle")

        # What the chunked data blob costs on compressible content (the bench image is random).
        src = Path("/usr/lib/python3.11")
        if src.is_dir():
            layer = kit.Layer(subprocess.run(["tar", "-C", str(src), "--sort=name", "--mtime=@0", "--owner=0",
                                              "--group=0", "--numeric-owner", "-cf", "-", "."],
                                             check=True, capture_output=True).stdout, "gzip")
            kit.Pusher(reg).image("bench/py", "v1", [layer])
            t = time.monotonic()
            r2 = index_image(f"{reg.host}/bench/py:v1", opts)
            print(f"\nformat cost on {src} ({r2.files} files): tar {len(layer.tar) / 1e6:.1f} MB, gzip layer "
                  f"{len(layer.blob) / 1e6:.1f} MB, chunk data blob {r2.stored_bytes / 1e6:.1f} MB "
                  f"(+{100 * r2.stored_bytes / len(layer.blob):.0f}% registry space beside the layer), metadata "
                  f"{r2.meta_bytes / 1e3:.0f} kB, indexed in {time.monotonic() - t:.1f}s")
            del layer

        # Sequential reads of the 100 MiB file.
        store = Store(str(work / "thr"))
        pull_lazy(ref, store, opts)
        s1 = make_lazy_snapshot(store, ref, work / "thr-root1", fork=True)
        mounts.append(s1)
        cold = read_file(s1.dest / "data/big")
        page = read_file(s1.dest / "data/big")
        s2 = make_lazy_snapshot(store, ref, work / "thr-root2", fork=True)
        mounts.append(s2)
        warm = read_file(s2.dest / "data/big")
        fstore = Store(str(work / "thr-full"))
        img = pull(ref, fstore, opts)
        fs = make_snapshot(fstore, img.chain_ids, work / "thr-full-root", mode="overlay")
        native_first = read_file(fs.dest / "data/big")
        native = read_file(fs.dest / "data/big")
        fs.remove()
        print("\nsequential read of the 100 MiB file (1 MiB reads):")
        print(f"  lazy cold (chunks from the registry)      {cold:8.0f} MB/s  ({s1.stats()['requests']} range requests)")
        print(f"  lazy warm, chunk cache (fresh mount)      {warm:8.0f} MB/s  (goal >= 500)")
        print(f"  lazy warm, page cache (same mount again)  {page:8.0f} MB/s")
        print(f"  full pull's overlay snapshot, 1st / 2nd   {native_first:8.0f} / {native:.0f} MB/s")
    finally:
        for s in mounts:
            s.remove()
        reg.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
