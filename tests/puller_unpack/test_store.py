"""The content-addressed store: digests, ingest, staging, locks across processes, kill safety, gc."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import textwrap
import time

import pytest

from puller.store import (
    DigestMismatch, InvalidDigest, LockTimeout, Store, StoreError, chain_ids,
)
from puller.unpack import unpack_layer
from unpack_helpers import archive, entry

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def run_py(code: str, *args: str, **kw) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=REPO)
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], env=env, **kw)


def test_chain_ids_follow_the_image_spec():
    d = [sha(b"a"), sha(b"b"), sha(b"c")]
    c = chain_ids(d)
    assert c[0] == d[0]
    c1 = "sha256:" + hashlib.sha256((d[0] + " " + d[1]).encode()).hexdigest()
    assert c[1] == c1
    assert c[2] == "sha256:" + hashlib.sha256((c1 + " " + d[2]).encode()).hexdigest()
    assert chain_ids([]) == []
    with pytest.raises(InvalidDigest):
        chain_ids([d[0], "sha256:xyz"])


@pytest.mark.parametrize("bad", ["sha256:../../etc/passwd", "sha256:" + "A" * 64, "sha256:abc",
                                 "md5:" + "0" * 32, "sha256:" + "0" * 64 + "/x", "", "../x",
                                 "sha256:" + "0" * 63 + "\n"])
def test_digests_validated_before_use_in_paths(tmp_path, bad):
    s = Store(tmp_path)
    for call in (s.blob_path, s.has_blob, s.layer_path, s.has_layer):
        with pytest.raises(InvalidDigest) as ei:
            call(bad)
        assert repr(bad) in str(ei.value)
    with pytest.raises(InvalidDigest):
        s.put_image("r", bad, {})
    with pytest.raises(InvalidDigest):
        with s.ingest(bad, 1):
            pass
    if bad:
        assert s.get_image(bad) is None


def test_ingest_verifies_size_and_digest(tmp_path):
    s = Store(tmp_path)
    data = os.urandom(300_000)
    d = sha(data)
    with s.ingest(d, len(data)) as w:
        for i in range(0, len(data), 65536):
            w.write(data[i:i + 65536])
    assert s.has_blob(d) and s.open_blob(d).read() == data

    other = os.urandom(100)
    with pytest.raises(DigestMismatch, match="hashes to"):
        with s.ingest(sha(b"something else"), len(other)) as w:
            w.write(other)
    with pytest.raises(DigestMismatch, match="more data"):
        with s.ingest(sha(other), 50) as w:
            w.write(other)
    with pytest.raises(DigestMismatch, match="got 50 bytes"):
        with s.ingest(sha(other), 100) as w:
            w.write(other[:50])
    with pytest.raises(RuntimeError):
        with s.ingest(sha(other), 100) as w:
            w.write(other)
            raise RuntimeError("download failed")
    assert not s.has_blob(sha(other)) and not s.has_blob(sha(b"something else"))
    assert os.listdir(tmp_path / "staging") == []
    assert os.listdir(tmp_path / "blobs/sha256") == [d.split(":")[1]]


def test_stage_layer_is_atomic(tmp_path):
    s = Store(tmp_path)
    cid = sha(b"layer")
    with pytest.raises(ValueError):
        with s.stage_layer(cid) as p:
            (p / "half").write_text("x")
            raise ValueError("unpack failed")
    assert not s.has_layer(cid) and os.listdir(tmp_path / "staging") == []
    with s.stage_layer(cid) as p:
        unpack_layer(io.BytesIO(archive(entry("f", b"data"))), p)
        assert not s.has_layer(cid)
    assert (s.layer_path(cid) / "f").read_bytes() == b"data"
    # a second producer (without the lock) loses quietly; the first copy stays
    with s.stage_layer(cid) as p:
        (p / "other").write_text("y")
    assert sorted(os.listdir(s.layer_path(cid))) == ["f"]
    assert os.listdir(tmp_path / "staging") == []


def test_images_records(tmp_path):
    s = Store(tmp_path)
    md = sha(b"manifest")
    cids = chain_ids([sha(b"l1"), sha(b"l2")])
    s.put_image("example.com/a:1", md, {"config": sha(b"cfg"), "chain_ids": cids})
    rec = s.get_image("example.com/a:1")
    assert rec["manifest_digest"] == md and rec["chain_ids"] == cids
    assert s.get_image(md)["ref"] == "example.com/a:1"
    assert s.get_image("example.com/a:2") is None
    assert [r["ref"] for r in s.list_images()] == ["example.com/a:1"]
    assert s.remove_image("example.com/a:1") and s.get_image(md) is None
    with pytest.raises(StoreError):
        s.put_image("r", md, {"chain_ids": ["sha256:nope"]})


_ENSURE = """
import os, sys, time
from puller.store import Store
root, cid, counter = sys.argv[1:4]
s = Store(root)
def fill(p):
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.6)
    (p / "content").write_text("made by " + str(os.getpid()))
path, made = s.ensure_layer(cid, fill)
print(made, (path / "content").read_text())
"""


def test_concurrent_processes_share_the_work(tmp_path):
    root, counter = tmp_path / "store", tmp_path / "counter"
    Store(root)
    cid = sha(b"shared layer")
    procs = [run_py(_ENSURE, str(root), cid, str(counter), stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(counter.read_text().split()) == 1  # fill ran once
    assert sorted(o[0] for o in outs) == ["False", "False", "True"]
    assert len({" ".join(o[1:]) for o in outs}) == 1  # everyone sees the same layer
    assert os.listdir(root / "staging") == []


_KILLED = """
import sys
from puller.store import Store
from puller.unpack import unpack_layer
root, cid = sys.argv[1:3]
s = Store(root)
# the layer arrives on stdin; the test stops sending half way and kills us
s.ensure_layer(cid, lambda p: unpack_layer(sys.stdin.buffer, p, layer=cid))
print("finished", flush=True)
"""


def test_killed_mid_unpack_leaves_no_half_layer(tmp_path):
    root = tmp_path / "store"
    Store(root)
    layer = archive(*[entry(f"dir{i % 7}/f{i}", os.urandom(3000)) for i in range(400)])
    cid = sha(layer)
    p = run_py(_KILLED, str(root), cid, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    p.stdin.write(layer[:len(layer) // 2])
    p.stdin.flush()
    deadline = time.monotonic() + 30
    # wait until the unpacker has written part of the layer into staging
    while sum(len(fs) for _, _, fs in os.walk(root / "staging")) < 50:
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.02)
    p.kill()
    p.wait(timeout=10)
    p.stdin.close()
    p.stdout.close()
    assert not (root / "layers" / cid.split(":")[1]).exists()
    s = Store(root)  # no writer is alive: the litter goes at once
    assert not s.has_layer(cid)
    assert os.listdir(root / "staging") == []
    # a re-run finishes the job
    p = run_py(_KILLED, str(root), cid, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    out, _ = p.communicate(layer, timeout=60)
    assert p.returncode == 0 and out.strip() == b"finished"
    assert len(os.listdir(s.layer_path(cid))) == 7
    assert sum(len(fs) for _, _, fs in os.walk(s.layer_path(cid))) == 400


def test_staging_of_a_live_writer_is_not_cleaned(tmp_path):
    s = Store(tmp_path)
    cid = sha(b"live")
    with s.stage_layer(cid) as p:
        (p / "f").write_text("x")
        assert s.clean_staging(wait=False) == 0
        Store(tmp_path)  # another opener must not remove our work
        assert (p / "f").exists()
    assert s.has_layer(cid)


_HOLD = """
import sys, time
from puller.store import Store
s = Store(sys.argv[1])
with s.lock(sys.argv[2], shared=sys.argv[3] == "shared"):
    print("held", flush=True)
    time.sleep(float(sys.argv[4]))
"""


def test_lock_excludes_other_processes_and_times_out(tmp_path):
    s = Store(tmp_path)
    p = run_py(_HOLD, str(tmp_path), "image:x", "excl", "1.0", stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    t0 = time.monotonic()
    with pytest.raises(LockTimeout, match="image:x"):
        with s.lock("image:x", timeout=0.2):
            pass
    with s.lock("image:x", timeout=10):
        assert time.monotonic() - t0 >= 0.5  # only after the holder let go
    p.wait(timeout=10)


def test_gc_removes_only_unreferenced(tmp_path):
    from puller.snapshot import make_snapshot

    s = Store(tmp_path / "store")
    blobs = {n: os.urandom(1000) for n in ("m1", "m2", "cfg1", "cfg2", "shared", "only1", "stray")}
    for data in blobs.values():
        with s.ingest(sha(data), len(data)) as w:
            w.write(data)
    diffs = {n: sha(b"diff-" + n.encode()) for n in ("shared", "only1", "only2")}
    c1 = chain_ids([diffs["shared"], diffs["only1"]])
    c2 = chain_ids([diffs["shared"], diffs["only2"]])
    for c in {*c1, *c2, sha(b"orphan layer")}:
        s.ensure_layer(c, lambda p, c=c: (p / "id").write_text(c))
    s.put_image("a", sha(blobs["m1"]), {"config": {"digest": sha(blobs["cfg1"])},
                                        "layers": [sha(blobs["shared"]), sha(blobs["only1"])],
                                        "chain_ids": c1})
    s.put_image("b", sha(blobs["m2"]), {"config": {"digest": sha(blobs["cfg2"])},
                                        "layers": [sha(blobs["shared"])], "diff_ids":
                                        [diffs["shared"], diffs["only2"]]})
    st = s.gc()
    assert (st.blobs_removed, st.layers_removed) == (1, 1)
    assert not s.has_blob(sha(blobs["stray"])) and not s.has_layer(sha(b"orphan layer"))
    assert all(s.has_layer(c) for c in c1 + c2)

    snap = make_snapshot(s, c1, tmp_path / "rootfs", mode="copy")
    s.remove_image("a")
    st = s.gc()
    # image a's blobs go; its layers stay while the snapshot uses them
    assert st.blobs_removed == 3 and st.layers_removed == 0
    assert not s.has_blob(sha(blobs["m1"])) and not s.has_blob(sha(blobs["only1"]))
    assert s.has_blob(sha(blobs["shared"])) and s.has_blob(sha(blobs["cfg2"]))
    snap.remove()
    st = s.gc()
    assert st.layers_removed == 1 and not s.has_layer(c1[1]) and s.has_layer(c1[0])
    assert st.bytes_freed > 0


def test_gc_waits_for_active_pulls(tmp_path):
    s = Store(tmp_path)
    p = run_py(_HOLD, str(tmp_path), "gc", "shared", "1.0", stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    with pytest.raises(LockTimeout):
        s.gc(timeout=0.2)
    assert s.gc(timeout=10).blobs_removed == 0
    p.wait(timeout=10)


def test_durable_store_publishes_the_same_way(tmp_path):
    s = Store(tmp_path, durable=True)
    data = b"durable blob"
    with s.ingest(sha(data), len(data)) as w:
        w.write(data)
    path, made = s.ensure_layer(sha(b"dl"), lambda p: unpack_layer(
        io.BytesIO(archive(entry("f", b"x"))), p))
    assert made and (path / "f").read_bytes() == b"x" and s.open_blob(sha(data)).read() == data


_KILLED_INGEST = """
import sys, time
from puller.store import Store
s = Store(sys.argv[1])
with s.ingest(sys.argv[2], 10_000_000) as w:
    w.write(b"x" * 1_000_000)
    w.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_killed_ingest_leaves_no_blob(tmp_path):
    digest = sha(b"never finished")
    p = run_py(_KILLED_INGEST, str(tmp_path), digest, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    assert len(os.listdir(tmp_path / "staging")) == 1
    p.kill()
    p.wait(timeout=10)
    p.stdout.close()
    s = Store(tmp_path)
    assert not s.has_blob(digest) and os.listdir(tmp_path / "staging") == []


_SLOW_FILL = """
import sys, time
from puller.store import Store
s = Store(sys.argv[1])
def fill(p):
    print("filling", flush=True)
    (p / "by").write_text(sys.argv[3])
    time.sleep(float(sys.argv[4]))
path, made = s.ensure_layer(sys.argv[2], fill)
print(made, (path / "by").read_text(), flush=True)
"""


def test_waiter_takes_over_when_the_producer_dies(tmp_path):
    cid = sha(b"contended")
    a = run_py(_SLOW_FILL, str(tmp_path), cid, "a", "60", stdout=subprocess.PIPE, text=True)
    assert a.stdout.readline().strip() == "filling"
    b = run_py(_SLOW_FILL, str(tmp_path), cid, "b", "0", stdout=subprocess.PIPE, text=True)
    time.sleep(0.3)
    assert b.poll() is None  # waiting for a's layer lock
    a.kill()
    a.wait(timeout=10)
    a.stdout.close()
    out = b.communicate(timeout=30)[0].split()
    assert out == ["filling", "True", "b"]
    assert (Store(tmp_path).layer_path(cid) / "by").read_text() == "b"
    assert os.listdir(tmp_path / "staging") == []
