"""End-to-end pulls from a real docker-registry into a real store, incl. hostile registries."""
from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from puller.errors import LayerError, ManifestError
from puller.pull import PullOptions, pull, pull_artifact
from puller.snapshot import make_snapshot

pytestmark = [pytest.mark.registry, pytest.mark.root]


def opts(reg, options_for, **kw) -> PullOptions:
    return PullOptions(registry=options_for(reg), **kw)


def assert_store_clean(store) -> None:
    """No half-made layer or blob anywhere visible, nothing left in staging."""
    assert list((store.root / "staging").iterdir()) == []


def test_pull_busybox_and_run_it(registry, busybox_image, store, options_for, tmp_path):
    events = []
    img = pull(f"{registry.host}/test/busybox:latest", store, opts(registry, options_for, progress=events.append))
    assert img.manifest_digest == busybox_image.digest
    assert img.diff_ids == [busybox_image.layers[0].diff_id]
    assert img.chain_ids == img.diff_ids  # one layer: ChainID == DiffID
    layer_dir = store.layer_path(img.chain_ids[0])
    assert (layer_dir / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()
    assert os.readlink(layer_dir / "bin/sh") == "busybox"
    assert store.has_blob(img.manifest_digest) and store.has_blob(img.config_digest)
    rec = store.get_image(f"{registry.host}/test/busybox:latest")
    assert rec["manifest_digest"] == busybox_image.digest and rec["chain_ids"] == img.chain_ids
    assert [e["status"] for e in events if e["event"] == "layer"][-1] == "done"
    assert events[-1]["event"] == "done"
    assert_store_clean(store)

    snap = make_snapshot(store, img.chain_ids, tmp_path / "rootfs")
    try:
        out = subprocess.run(["chroot", str(tmp_path / "rootfs"), "/bin/sh", "-c", "echo hello from $0; id -u"],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["hello", "from", "/bin/sh", "0"]
    finally:
        snap.remove()

    # Second pull: everything is already there.
    again = pull(f"{registry.host}/test/busybox:latest", store, opts(registry, options_for))
    assert [l.status for l in again.layers] == ["exists"]


def _feature_layers(kit, tmp: Path):
    """Base busybox + a layer with whiteouts, an opaque dir, hardlinks, xattrs, setuid."""
    base = kit.busybox_tree(tmp / "base")
    (base / "etc/removeme").write_text("gone soon")
    (base / "opaque").mkdir()
    (base / "opaque/old").write_text("hidden by the opaque marker")
    base_layer = kit.Layer(kit.tar_dir(base), "gzip")

    top = tmp / "top"
    (top / "etc").mkdir(parents=True)
    (top / "etc/.wh.removeme").write_text("")
    (top / "opaque").mkdir()
    (top / "opaque/.wh..wh..opq").write_text("")
    (top / "opaque/new").write_text("new")
    (top / "files").mkdir()
    (top / "files/a").write_text("linked")
    os.link(top / "files/a", top / "files/b")
    (top / "files/suid").write_text("#!/bin/sh\n")
    os.chmod(top / "files/suid", 0o4755)
    os.setxattr(top / "files/a", "user.test", b"value")
    top_layer = kit.Layer(kit.tar_dir(top, xattrs=True), "zstd")

    third = tmp / "third"
    (third / "files").mkdir(parents=True)
    (third / "files/plain").write_text("uncompressed layer")
    third_layer = kit.Layer(kit.tar_dir(third), "")
    return [base_layer, top_layer, third_layer]


@pytest.mark.parametrize("mode", ["overlay", "copy"])
def test_whiteouts_hardlinks_xattrs_mixed_compression(registry, pusher, kit, store, options_for, tmp_path, mode):
    layers = _feature_layers(kit, tmp_path)
    pushed = pusher.image("test/features", "v1", layers)
    img = pull(f"{registry.host}/test/features:v1", store, opts(registry, options_for))
    assert img.manifest_digest == pushed.digest and len(img.chain_ids) == 3
    root = tmp_path / "rootfs"
    snap = make_snapshot(store, img.chain_ids, root, mode=mode)
    try:
        assert not (root / "etc/removeme").exists()
        assert (root / "etc/passwd").exists()
        assert sorted(os.listdir(root / "opaque")) == ["new"]
        a, b = os.stat(root / "files/a"), os.stat(root / "files/b")
        assert a.st_ino == b.st_ino and (root / "files/b").read_text() == "linked"
        assert os.getxattr(root / "files/a", "user.test") == b"value"
        assert stat.S_IMODE(os.stat(root / "files/suid").st_mode) == 0o4755
        assert (root / "files/plain").read_text() == "uncompressed layer"
    finally:
        snap.remove()


def test_umoci_built_image_copied_by_skopeo_as_docker_v2s2(registry, kit, store, options_for, tmp_path):
    """Interop: umoci builds the layout (incl. an `umoci insert` layer without tar end blocks),
    skopeo converts and pushes it as Docker schema 2; we pull it."""
    layout = tmp_path / "layout"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True, timeout=120)  # noqa: E731
    base = kit.busybox_tree(tmp_path / "base")
    tar = tmp_path / "base.tar"
    tar.write_bytes(kit.tar_dir(base))
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", f"{layout}:t")
    run("umoci", "raw", "add-layer", "--image", f"{layout}:t", tar)
    extra = tmp_path / "extra"
    extra.mkdir()
    (extra / "inserted").write_text("via umoci insert\n" * 100)
    run("umoci", "insert", "--image", f"{layout}:t", extra / "inserted", "/opt/inserted")
    run("umoci", "config", "--image", f"{layout}:t", "--config.cmd", "/bin/sh", "--config.user", "1000:1000")
    run("skopeo", "copy", "--quiet", "--dest-tls-verify=false", "--format", "v2s2",
        f"oci:{layout}:t", f"docker://{registry.host}/interop/umoci:v2s2")
    img = pull(f"{registry.host}/interop/umoci:v2s2", store, opts(registry, options_for))
    manifest = json.loads(store.open_blob(img.manifest_digest).read())
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"
    assert len(img.chain_ids) == 2
    top = store.layer_path(img.chain_ids[1])
    assert (top / "opt/inserted").read_text() == "via umoci insert\n" * 100
    assert img.layers[1].stats.clean_end is False  # umoci insert really left out the tar end
    assert img.config["config"]["User"] == "1000:1000"


def test_truncated_tar_end_layer(registry, pusher, kit, store, options_for, tmp_path):
    """A layer whose tar lacks its last padding and end blocks, as umoci insert writes them."""
    root = tmp_path / "t"
    root.mkdir()
    (root / "file").write_bytes(b"x" * 700)  # 700 bytes: the data block is padded to 1024
    full = kit.tar_dir(root)
    # Cut the end-of-archive blocks and the data block's padding.
    cut = full.rstrip(b"\0")
    layer = kit.Layer(cut, "gzip")
    pushed = pusher.image("test/truncend", "v1", [layer])
    img = pull(f"{registry.host}/test/truncend:v1", store, opts(registry, options_for))
    assert img.manifest_digest == pushed.digest
    assert (store.layer_path(img.chain_ids[0]) / "file").read_bytes() == b"x" * 700
    assert img.layers[0].stats.clean_end is False


def test_warm_pull_shares_layers(registry, pusher, busybox_layer, kit, store, options_for, tmp_path):
    a = pusher.image("test/warm-a", "v1", [busybox_layer, kit.unique_layer(tmp_path, "wa", 5000)])
    b = pusher.image("test/warm-b", "v1", [busybox_layer, kit.unique_layer(tmp_path, "wb", 5000)])
    ia = pull(f"{registry.host}/test/warm-a:v1", store, opts(registry, options_for))
    ib = pull(f"{registry.host}/test/warm-b:v1", store, opts(registry, options_for))
    assert [l.status for l in ia.layers] == ["pulled", "pulled"]
    assert [l.status for l in ib.layers] == ["exists", "pulled"]
    assert ia.chain_ids[0] == ib.chain_ids[0] and ia.chain_ids[1] != ib.chain_ids[1]
    assert (a.digest, b.digest) == (ia.manifest_digest, ib.manifest_digest)


def test_concurrent_pulls_share_work(registry, pusher, kit, store, options_for, tmp_path):
    layers = [kit.unique_layer(tmp_path, f"conc{i}", 300_000) for i in range(3)]
    pusher.image("test/concurrent", "v1", layers)
    results, errors = [], []

    def worker():
        try:
            results.append(pull(f"{registry.host}/test/concurrent:v1", store, opts(registry, options_for)))
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    statuses = [l.status for r in results for l in r.layers]
    assert statuses.count("pulled") == 3, statuses  # each layer unpacked exactly once
    assert len({tuple(r.chain_ids) for r in results}) == 1
    assert_store_clean(store)


# ------------------------------------------------------------------ hostile registries
def _hostile_image(pusher, kit, tmp_path, name, **kw):
    base = kit.unique_layer(tmp_path, f"{name}-ok", 2000)
    bad = kit.unique_layer(tmp_path, name, 300_000, kw.pop("compression", "gzip"))
    pushed = pusher.image(f"hostile/{name}", "v1", [base, bad], **kw)
    return pushed, bad, pushed.descriptors[1]["digest"]


def _assert_refused(registry, store, options_for, name, bad_digest, match, pushed):
    with pytest.raises(LayerError, match=match) as info:
        pull(f"{registry.host}/hostile/{name}:v1", store, opts(registry, options_for, parallel=2))
    assert info.value.layer == bad_digest
    assert bad_digest in str(info.value)
    from puller.digest import chain_ids
    bad_chain = chain_ids(pushed.config["rootfs"]["diff_ids"])[1]
    assert not store.has_layer(bad_chain)
    assert store.get_image(f"{registry.host}/hostile/{name}:v1") is None
    assert_store_clean(store)


def test_layer_digest_lie(registry, pusher, kit, store, options_for, tmp_path):
    pushed, layer, digest = _hostile_image(pusher, kit, tmp_path, "digestlie", compression="")
    f = registry.blob_file(digest)
    data = bytearray(f.read_bytes())
    data[-5000] ^= 0xFF  # same size, other content (inside file data: the tar still parses)
    f.write_bytes(bytes(data))
    _assert_refused(registry, store, options_for, "digestlie", digest, "does not match descriptor digest", pushed)


def test_layer_size_lie(registry, pusher, kit, store, options_for, tmp_path):
    pushed, layer, digest = _hostile_image(pusher, kit, tmp_path, "sizelie")
    f = registry.blob_file(digest)
    f.write_bytes(f.read_bytes() + b"\0" * 4096)
    _assert_refused(registry, store, options_for, "sizelie", digest, "announces|more than", pushed)


def test_truncated_blob(registry, pusher, kit, store, options_for, tmp_path):
    pushed, layer, digest = _hostile_image(pusher, kit, tmp_path, "truncated")
    f = registry.blob_file(digest)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    _assert_refused(registry, store, options_for, "truncated", digest, "truncated|announces", pushed)


def test_diff_id_lie(registry, pusher, kit, store, options_for, tmp_path):
    """The config's rootfs.diff_ids does not describe the layer: refused after unpacking."""
    base = kit.unique_layer(tmp_path, "diffok", 2000)
    bad = kit.unique_layer(tmp_path, "difflie", 2000)
    wrong = kit.sha256(b"something else")
    pushed = pusher.image("hostile/difflie", "v1", [base, bad], diff_ids=[base.diff_id, wrong])
    _assert_refused(registry, store, options_for, "difflie", pushed.descriptors[1]["digest"],
                    "does not match rootfs.diff_ids", pushed)


def test_unsupported_layer_media_type(registry, pusher, kit, store, options_for, tmp_path):
    base = kit.unique_layer(tmp_path, "mtok", 2000)
    bad = kit.unique_layer(tmp_path, "mtbad", 2000)
    bad.media_type = "application/vnd.oci.image.layer.v1.tar+bzip2"
    pushed = pusher.image("hostile/mediatype", "v1", [base, bad])
    _assert_refused(registry, store, options_for, "mediatype", pushed.descriptors[1]["digest"],
                    "unsupported layer media type", pushed)


def test_layer_with_path_escape_refused(registry, pusher, kit, store, options_for, tmp_path):
    """The unpacker's refusal surfaces as a LayerError naming layer and member."""
    import io
    import tarfile
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        info = tarfile.TarInfo("../../escape")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"bad"))
    layer = kit.Layer(buf.getvalue(), "gzip")
    pushed = pusher.image("hostile/escape", "v1", [kit.unique_layer(tmp_path, "escok", 2000), layer])
    _assert_refused(registry, store, options_for, "escape", pushed.descriptors[1]["digest"], "escape", pushed)
    assert not (store.root.parent / "escape").exists()


def test_media_type_mismatch_refused_in_pull(registry, busybox_image, fault_proxy, store):
    from puller.registry import RegistryOptions
    fault_proxy.rules["/v2/test/busybox/manifests/latest"] = {
        "headers": {"Content-Type": "application/vnd.oci.image.index.v1+json"}}
    with pytest.raises(ManifestError, match="contradicts Content-Type"):
        pull(f"{fault_proxy.host}/test/busybox:latest", store,
             PullOptions(registry=RegistryOptions(plain_http=frozenset({fault_proxy.host}), timeout=5)))
    assert store.list_images() == []


def test_pull_artifact(registry, pusher, kit, store, options_for):
    repo = "test/artifact"
    payload = os.urandom(3000)
    empty = b"{}"
    pusher.blob(repo, payload)
    pusher.blob(repo, empty)
    doc = {"schemaVersion": 2, "mediaType": kit.OCI_MANIFEST, "artifactType": "application/vnd.example.data",
           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": kit.sha256(empty), "size": 2},
           "layers": [{"mediaType": "application/octet-stream", "digest": kit.sha256(payload), "size": 3000}]}
    body = json.dumps(doc).encode()
    digest = pusher.manifest(repo, "v1", body, kit.OCI_MANIFEST)
    art = pull_artifact(f"{registry.host}/{repo}:v1", store, opts(registry, options_for))
    assert art.manifest_digest == digest and art.artifact_type == "application/vnd.example.data"
    with store.open_blob(kit.sha256(payload)) as f:
        assert f.read() == payload
    with pytest.raises(ManifestError, match="artifact"):
        pull(f"{registry.host}/{repo}:v1", store, opts(registry, options_for))


def test_pull_from_auth_registry(auth_registry, kit, store, options_for, tmp_path):
    from puller.auth import Credentials
    p = kit.Pusher(auth_registry)
    pushed = p.image("priv/pull", "v1", [kit.unique_layer(tmp_path, "privpull", 2000)])
    img = pull(f"{auth_registry.host}/priv/pull:v1", store,
               PullOptions(registry=options_for(auth_registry, credentials=Credentials("alice", "s3cret"))))
    assert img.manifest_digest == pushed.digest and img.layers[0].status == "pulled"


def test_connection_cut_mid_blob(registry, pusher, kit, store, fault_proxy, tmp_path):
    """The registry announces the right length but the connection ends half way."""
    from puller.registry import RegistryOptions
    pushed, layer, digest = _hostile_image(pusher, kit, tmp_path, "cut")
    fault_proxy.rules[f"/v2/hostile/cut/blobs/{digest}"] = {
        "body": layer.blob[: len(layer.blob) // 2], "content_length": len(layer.blob)}
    with pytest.raises(LayerError, match=r"download failed after \d+ of \d+ bytes|truncated") as info:
        pull(f"{fault_proxy.host}/hostile/cut:v1", store,
             PullOptions(registry=RegistryOptions(plain_http=frozenset({fault_proxy.host}), timeout=5)))
    assert info.value.layer == digest
    assert store.list_images() == []
    assert_store_clean(store)


def test_killed_pull_leaves_no_half_layer_and_rerun_finishes(registry, pusher, kit, fault_proxy, tmp_path):
    """SIGKILL a CLI pull while a layer streams (slowed by the proxy); a re-run completes."""
    import signal
    import sys
    import time
    from puller.store import Store
    layers = [kit.unique_layer(tmp_path, "kill0", 2000), kit.unique_layer(tmp_path, "kill1", 400_000)]
    pushed = pusher.image("test/killed", "v1", layers)
    slow_digest = pushed.descriptors[1]["digest"]
    fault_proxy.rules[f"/v2/test/killed/blobs/{slow_digest}"] = {"rate": 100_000}  # ~4 s for the layer
    store_dir = tmp_path / "store"
    proc = subprocess.Popen([sys.executable, "-m", "puller", "pull", f"{fault_proxy.host}/test/killed:v1",
                             "--store", str(store_dir), "--plain-http", fault_proxy.host, "--json"],
                            cwd=Path(__file__).resolve().parents[2], stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        seen = False
        for line in proc.stdout:  # wait until the slow layer is mid-stream
            ev = json.loads(line)
            if ev.get("layer") == slow_digest and ev.get("status") == "downloading" and 0 < ev["bytes"] < ev["total"]:
                seen = True
                break
            assert time.monotonic() < deadline
        assert seen
        staging = list((store_dir / "staging").iterdir())
        assert staging, "the layer should be unpacking into staging"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    from puller.digest import chain_ids
    chains = chain_ids([l.diff_id for l in layers])
    store = Store(store_dir)  # opening the store clears the dead pull's staging litter
    assert not store.has_layer(chains[1])
    assert store.get_image(f"{fault_proxy.host}/test/killed:v1") is None
    assert_store_clean(store)
    img = pull(f"{registry.host}/test/killed:v1", store,
               PullOptions(registry=__import__("puller.registry", fromlist=["x"]).RegistryOptions(
                   plain_http=frozenset({registry.host}), timeout=10)))
    assert img.manifest_digest == pushed.digest and store.has_layer(chains[1])
    assert (store.layer_path(chains[1]) / "data/kill1").stat().st_size == 400_000


def test_pull_from_token_registry(token_registry, kit, store, options_for, tmp_path):
    from puller.auth import Credentials
    p = kit.Pusher(token_registry)
    layers = [kit.unique_layer(tmp_path, f"tokpull{i}", 100_000) for i in range(3)]
    pushed = p.image("private/pull", "v1", layers)
    img = pull(f"{token_registry.host}/private/pull:v1", store,
               PullOptions(registry=options_for(token_registry, credentials=Credentials("alice", "s3cret"))))
    assert img.manifest_digest == pushed.digest
    assert [l.status for l in img.layers] == ["pulled"] * 3


def test_decompression_bomb_refused(registry, pusher, kit, store, options_for, tmp_path):
    from puller.unpack import Limits
    root = tmp_path / "bomb"
    root.mkdir()
    with open(root / "zeros", "wb") as f:
        f.truncate(64 << 20)  # 64 MiB of zeros gzip to ~64 KiB
    layer = kit.Layer(kit.tar_dir(root), "gzip")
    assert len(layer.blob) < 1 << 20
    pushed = pusher.image("hostile/bomb", "v1", [kit.unique_layer(tmp_path, "bombok", 2000), layer])
    with pytest.raises(LayerError, match="limit") as info:
        pull(f"{registry.host}/hostile/bomb:v1", store,
             opts(registry, options_for, limits=Limits(max_bytes=8 << 20)))
    assert info.value.layer == pushed.descriptors[1]["digest"]
    assert store.get_image(f"{registry.host}/hostile/bomb:v1") is None
    assert_store_clean(store)


def test_cut_connection_is_resumed_with_range(registry, pusher, kit, store, fault_proxy, tmp_path):
    """One cut mid-blob: the download continues from where it stopped (HTTP Range)."""
    from puller.registry import RegistryOptions
    pushed, layer, digest = _hostile_image(pusher, kit, tmp_path, "resume")
    path = f"/v2/hostile/resume/blobs/{digest}"
    fault_proxy.rules[path] = {"body": layer.blob[: len(layer.blob) // 2], "content_length": len(layer.blob),
                               "times": 1}
    img = pull(f"{fault_proxy.host}/hostile/resume:v1", store,
               PullOptions(registry=RegistryOptions(plain_http=frozenset({fault_proxy.host}), timeout=10)))
    assert img.manifest_digest == pushed.digest
    assert fault_proxy.hits[path] == 2
    assert (store.layer_path(img.chain_ids[1]) / "data/resume").stat().st_size == 300_000


def test_corrupt_gzip_reported_as_digest_lie(registry, pusher, kit, store, options_for, tmp_path):
    """Flipped bytes inside a gzip stream: the decompressor fails first, the error still says why."""
    pushed, layer, digest = _hostile_image(pusher, kit, tmp_path, "corruptgz")
    f = registry.blob_file(digest)
    data = bytearray(f.read_bytes())
    for i in range(1000, 1200):
        data[i] ^= 0x5A
    f.write_bytes(bytes(data))
    _assert_refused(registry, store, options_for, "corruptgz", digest, "does not match descriptor digest", pushed)


def test_layers_download_concurrently(registry, pusher, kit, store, fault_proxy, tmp_path):
    """With parallel=3, a second slow layer is streaming before the first one finished."""
    from puller.registry import RegistryOptions
    layers = [kit.unique_layer(tmp_path, f"par{i}", 150_000) for i in range(3)]
    pushed = pusher.image("test/parallel", "v1", layers)
    for d in pushed.descriptors:
        fault_proxy.rules[f"/v2/test/parallel/blobs/{d['digest']}"] = {"rate": 300_000}
    events = []
    lock = threading.Lock()

    def record(ev):
        with lock:
            events.append(ev)

    pull(f"{fault_proxy.host}/test/parallel:v1", store,
         PullOptions(registry=RegistryOptions(plain_http=frozenset({fault_proxy.host}), timeout=20),
                     parallel=3, progress=record))
    first_done = next(i for i, e in enumerate(events) if e.get("status") == "done")
    streaming_before = {e["layer"] for e in events[:first_done]
                        if e.get("status") == "downloading" and e["bytes"] < e["total"]}
    assert len(streaming_before) >= 2, events[:first_done]
