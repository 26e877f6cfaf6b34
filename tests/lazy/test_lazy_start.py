"""What makes a lazy start quick, checked for behaviour: the metadata fetched beside the
artifact manifest only when the artifact names it, the lean HTTP path (no requests/oras on a
plain lazy start), the mount's read-ahead, and the chunk cache's size-bounded gc."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from puller.lazy.convert import add_referrers_tag, index_image
from puller.lazy.format import META_DIGEST_ANNOTATION, META_SIZE_ANNOTATION
from puller.lazy.locate import load_record_meta, pull_lazy
from puller.pull import PullOptions
from puller.registry import RegistryClient, RegistryOptions
from puller.store import Store

CHUNK = 64 << 10
REPO_ROOT = Path(__file__).parents[2]


def opts(reg) -> PullOptions:
    return PullOptions(registry=RegistryOptions(plain_http=frozenset({reg.host}), timeout=10.0))


@pytest.fixture(scope="module")
def small_image(registry, pusher, kit, tmp_path_factory):
    root = kit.busybox_tree(tmp_path_factory.mktemp("start") / "root")
    (root / "data").mkdir()
    for i in range(3):
        (root / "data" / f"f{i}").write_bytes(os.urandom(3 * CHUNK + i))
    img = pusher.image("lazy/start", "v1", [kit.Layer(kit.tar_dir(root), "gzip")],
                       config={"Entrypoint": ["/bin/sh"], "Env": ["PATH=/bin"]})
    ref = f"{registry.host}/lazy/start:v1"
    return ref, img, index_image(ref, opts(registry), chunk_size=CHUNK)


@pytest.fixture(scope="module")
def unembedded_image(registry, pusher, kit, tmp_path_factory):
    """As a converter that embeds nothing (or metadata too large to embed) leaves it."""
    from puller.lazy import convert
    root = kit.busybox_tree(tmp_path_factory.mktemp("plain") / "root")
    (root / "f").write_bytes(os.urandom(2 * CHUNK))
    img = pusher.image("lazy/start", "plain", [kit.Layer(kit.tar_dir(root), "gzip")])
    ref = f"{registry.host}/lazy/start:plain"
    saved, convert.EMBED_MAX = convert.EMBED_MAX, -1
    try:
        return ref, img, index_image(ref, opts(registry), chunk_size=CHUNK)
    finally:
        convert.EMBED_MAX = saved


def _tag_index(registry, subject: str) -> dict:
    client = RegistryClient(registry.host, RegistryOptions(plain_http=frozenset({registry.host})))
    answer = client.get_small(f"lazy/start/manifests/{subject.replace(':', '-')}", cap=1 << 20, what="tag index",
                              headers={"Accept": "application/vnd.oci.image.index.v1+json"})
    return json.loads(answer.body)


def _announce(registry, subject: str, entry: dict, digest: str, size: int) -> None:
    """Rewrite the referrers entry: no embedded artifact, and `digest` announced as metadata."""
    client = RegistryClient(registry.host, RegistryOptions(plain_http=frozenset({registry.host})))
    ann = {**entry["annotations"], META_DIGEST_ANNOTATION: digest, META_SIZE_ANNOTATION: str(size)}
    add_referrers_tag(client, "lazy/start", subject,
                      {k: v for k, v in entry.items() if k != "data"} | {"annotations": ann})


def test_embedded_artifact_metadata_and_config_save_their_requests(registry, small_image, fault_proxy, tmp_path):
    """The converter embeds the artifact manifest in the referrers entry, the metadata in the
    artifact manifest and the image config in the metadata: a lazy pull asks for the image
    manifest, the referrers (API and tag) and nothing else."""
    ref, img, result = small_image
    store = Store(str(tmp_path / "s"))
    rec = pull_lazy(f"{fault_proxy.host}/lazy/start:v1", store, opts(fault_proxy))
    assert rec["lazy"]["meta"] == result.meta_digest
    assert store.has_blob(rec["config_digest"]) and store.has_blob(result.meta_digest)
    assert sorted(fault_proxy.hits) == sorted([
        "/v2/lazy/start/manifests/v1", f"/v2/lazy/start/referrers/{img.digest}",
        f"/v2/lazy/start/manifests/{img.digest.replace(':', '-')}"])
    # Embedded content that does not match its descriptor is ignored, and fetched instead.
    client = RegistryClient(registry.host, RegistryOptions(plain_http=frozenset({registry.host})))
    entry = next(e for e in _tag_index(registry, img.digest)["manifests"] if e["digest"] == result.artifact_digest)
    forged = json.loads(base64.b64decode(entry["data"]))
    forged["annotations"]["x"] = "forged"
    try:
        add_referrers_tag(client, "lazy/start", img.digest,
                          entry | {"data": base64.b64encode(json.dumps(forged).encode()).decode()})
        fault_proxy.hits.clear()
        rec = pull_lazy(f"{fault_proxy.host}/lazy/start:v1", Store(str(tmp_path / "s2")), opts(fault_proxy))
        assert rec["lazy"]["artifact"] == result.artifact_digest
        assert f"/v2/lazy/start/manifests/{result.artifact_digest}" in fault_proxy.hits
    finally:
        add_referrers_tag(client, "lazy/start", img.digest, entry)


def test_metadata_is_announced_and_used_only_when_the_artifact_names_it(registry, unembedded_image, tmp_path):
    ref, img, result = unembedded_image
    entry = next(e for e in _tag_index(registry, img.digest)["manifests"] if e["digest"] == result.artifact_digest)
    assert "data" not in entry
    assert entry["annotations"][META_DIGEST_ANNOTATION] == result.meta_digest
    assert entry["annotations"][META_SIZE_ANNOTATION] == str(result.meta_bytes)
    rec = pull_lazy(ref, Store(str(tmp_path / "s0")), opts(registry))
    assert rec["lazy"]["meta"] == result.meta_digest
    try:
        # A referrers entry announcing another blob (here the image layer, which exists and
        # verifies against its own digest) or one that does not exist: the artifact manifest
        # decides, and its metadata is what the pull records.
        for i, (digest, size) in enumerate([(img.descriptors[0]["digest"], img.descriptors[0]["size"]),
                                            ("sha256:" + "0" * 64, 100)]):
            _announce(registry, img.digest, entry, digest, size)
            store = Store(str(tmp_path / f"s{i + 1}"))
            rec = pull_lazy(ref, store, opts(registry))
            assert rec["lazy"]["meta"] == result.meta_digest
            assert len(load_record_meta(store, rec).chunks) == result.chunks
            assert not store.has_blob(digest)
    finally:
        client = RegistryClient(registry.host, RegistryOptions(plain_http=frozenset({registry.host})))
        add_referrers_tag(client, "lazy/start", img.digest, entry)


def test_plain_lazy_start_needs_neither_requests_nor_oras(registry, small_image, tmp_path):
    """The lean HTTP path serves pull --lazy and the daemon's imports: requests and oras (a
    tenth of a second of imports) stay unloaded unless a request needs them."""
    ref, _, result = small_image
    code = f"""
import sys
from puller.lazy.locate import pull_lazy, load_record_meta
from puller.lazy import daemon, mount
from puller.lazy.cache import ChunkCache
from puller.lazy.fetcher import ChunkFetcher
from puller.pull import PullOptions
from puller.registry import RegistryClient, RegistryOptions
from puller.store import Store
host = {registry.host!r}
store = Store({str(tmp_path / 's')!r})
rec = pull_lazy({ref!r}, store, PullOptions(registry=RegistryOptions(plain_http=frozenset({{host}}))))
meta = load_record_meta(store, rec)
client = RegistryClient(host, RegistryOptions(plain_http=frozenset({{host}})))
fetcher = ChunkFetcher(client, "lazy/start", meta, ChunkCache({str(tmp_path / 'c')!r}))
fetcher.ensure(list(range(len(meta.chunks))))
fetcher.close()
print(rec["lazy"]["meta"], fetcher.stats.chunks, "requests" in sys.modules, "oras" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [result.meta_digest, str(result.chunks), "False", "False"]


def test_mount_reads_ahead_a_chunk(registry, small_image, tmp_path, lazy_snapshots):
    from puller.lazy.mount import READAHEAD_KB
    ref, _, _ = small_image
    store = Store(str(tmp_path / "store"))
    pull_lazy(ref, store, opts(registry))
    snap = lazy_snapshots(store, ref, tmp_path / "root")
    lower = os.path.realpath(snap.lower)
    devs = [line.split()[2] for line in open("/proc/self/mountinfo") if line.split()[4] == lower]
    assert len(devs) == 1
    assert int(Path(f"/sys/class/bdi/{devs[0]}/read_ahead_kb").read_text()) == READAHEAD_KB
    assert (tmp_path / "root/data/f2").stat().st_size == 3 * CHUNK + 2


def test_chunk_cache_gc_is_bounded_and_spares_chunks_in_use(registry, pusher, kit, small_image, tmp_path,
                                                            lazy_snapshots):
    from puller.lazy.cachegc import gc_chunks
    from puller.lazy.daemon import cache_dir
    ref_a, _, res_a = small_image
    root = tmp_path / "b"
    (root / "data").mkdir(parents=True)
    (root / "data/g").write_bytes(os.urandom(4 * CHUNK))
    pusher.image("lazy/start-b", "v1", [kit.Layer(kit.tar_dir(root), "gzip")])
    ref_b = f"{registry.host}/lazy/start-b:v1"
    index_image(ref_b, opts(registry), chunk_size=CHUNK)
    store = Store(str(tmp_path / "store"))
    for ref in (ref_a, ref_b):
        pull_lazy(ref, store, opts(registry))
    cache = Path(cache_dir(store))

    def cached() -> set[str]:
        return {p.name for p in cache.rglob("*") if p.is_file()}

    def digests(ref: str) -> set[str]:
        meta = load_record_meta(store, store.get_image(ref))
        return {c.digest.split(":", 1)[1] for c in meta.chunks}

    snap_b = lazy_snapshots(store, ref_b, tmp_path / "rb", amplify=0)
    g = (tmp_path / "rb/data/g").read_bytes()
    snap_b.remove()
    snap_a = lazy_snapshots(store, ref_a, tmp_path / "ra", amplify=0)
    f0 = (tmp_path / "ra/data/f0").read_bytes()
    log = store.snapshot_dir(snap_a.id) / "daemon.log"
    deadline = time.monotonic() + 10
    while "early prefetch done" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)  # the entrypoint's chunks, fetched at mount, have all arrived
    in_a = cached() & digests(ref_a)
    assert len(in_a) >= 3 and digests(ref_b) <= cached()
    os.utime(next(cache.rglob(sorted(digests(ref_b))[0])), ns=(0, 0))  # the oldest chunk
    # A bound with room for all but one chunk of b: the oldest goes, the rest stays.
    size = sum(p.stat().st_size for p in cache.rglob("*") if p.is_file())
    # (With a snapshot mounted the gc lock is free: the daemon holds no copy of it.)
    stats = gc_chunks(store, size - 1, timeout=5)
    assert stats.removed == 1 and cached() == (in_a | digests(ref_b)) - {sorted(digests(ref_b))[0]}
    # Bound 0: everything but the chunks of the mounted snapshot's image.
    stats = gc_chunks(store, 0, timeout=5)
    assert cached() == in_a and stats.in_use == len(in_a) and stats.kept_bytes > 0
    assert (tmp_path / "ra/data/f0").read_bytes() == f0  # (page cache aside) still there to read
    with open(cache / sorted(in_a)[0][:2] / sorted(in_a)[0], "rb") as fh:
        assert hashlib.sha256(fh.read()).hexdigest() == sorted(in_a)[0]
    snap_a.remove()
    assert gc_chunks(store, 0).removed == len(in_a) and cached() == set()  # no snapshot: nothing in use
    # b's chunks come back from the registry when read again.
    lazy_snapshots(store, ref_b, tmp_path / "rb2")
    assert (tmp_path / "rb2/data/g").read_bytes() == g


def test_snapshot_of_an_image_not_pulled_lazily_fails_cleanly(tmp_path, lazy_snapshots):
    from puller.snapshot import SnapshotError
    store = Store(str(tmp_path / "store"))
    fds = set(os.listdir("/proc/self/fd"))
    for fork in (True, False):
        with pytest.raises(SnapshotError, match="not a lazily pulled image"):
            lazy_snapshots(store, "127.0.0.1:1/no/such:v1", tmp_path / "root", fork=fork)
        assert not (tmp_path / "root").exists() and not list((tmp_path / "store/snapshots").iterdir())
    assert set(os.listdir("/proc/self/fd")) == fds  # no pipe or lock fd left behind


def test_presend_range_request_is_answered_in_a_forked_child(registry, small_image, fault_proxy, tmp_path):
    """The daemon's first range request goes out before the fork; the child reads its answer
    (one request in all), and a request for other chunks is dropped, not mixed up."""
    from puller.lazy.cache import ChunkCache
    from puller.lazy.fetcher import ChunkFetcher
    ref, _, result = small_image
    store = Store(str(tmp_path / "s"))
    rec = pull_lazy(f"{fault_proxy.host}/lazy/start:v1", store, opts(fault_proxy))
    meta = load_record_meta(store, rec)
    node = next(n for n in meta.nodes if n.path == "data/f1")
    blob_path = f"/v2/lazy/start/blobs/{meta.blobs[meta.chunks[node.chunks[0]].blob][0]}"
    want = (tmp_path / "want")

    def fetcher(cache_dir: str) -> ChunkFetcher:
        return ChunkFetcher(RegistryClient(fault_proxy.host, opts(fault_proxy).registry), "lazy/start", meta,
                            ChunkCache(str(tmp_path / cache_dir)))

    f = fetcher("c1")
    f.presend(node.chunks)
    pid = os.fork()
    if pid == 0:  # the child: fetch and write what it got
        code = 1
        try:
            f.ensure(node.chunks)
            want.write_bytes(b"".join(f.cache.read(meta.chunks[i].digest, 0, meta.chunks[i].size)
                                      for i in node.chunks))
            code = 0 if f.stats.requests == 1 else 2
        finally:
            os._exit(code)
    f.close()  # the parent's copy of the connection goes; the child's stays
    assert os.waitpid(pid, 0)[1] == 0  # (2: more than the one request)
    assert len(want.read_bytes()) == node.size  # chunks verified against their digests on the way
    assert fault_proxy.hits[blob_path] == 1
    # A sent request that is not the one ensure() makes is closed and not used.
    other = next(n for n in meta.nodes if n.path == "data/f2")
    g = fetcher("c2")
    g.presend(other.chunks)
    g.ensure(node.chunks)
    g.close()
    assert fault_proxy.hits[blob_path] == 3
    assert b"".join(g.cache.read(meta.chunks[i].digest, 0, meta.chunks[i].size) for i in node.chunks) \
        == want.read_bytes()
