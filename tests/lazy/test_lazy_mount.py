"""Lazy pull end to end: a real registry, the converter, a real FUSE mount under overlayfs."""
from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from puller.lazy.convert import index_image
from puller.lazy.format import MetaError
from puller.lazy.locate import load_record_meta, pull_lazy
from puller.pull import PullOptions, pull
from puller.snapshot import make_snapshot
from puller.store import Store

CHUNK = 64 << 10  # small chunks, so a test image has files of many chunks


def tar_tree(root: Path) -> bytes:
    """GNU tar keeping numeric owners and xattrs (the kit's tar_dir forces root ownership)."""
    return subprocess.run(["tar", "-C", str(root), "--sort=name", "--mtime=@1000000", "--numeric-owner",
                           "--format=posix", "--pax-option=delete=atime,delete=ctime", "--xattrs",
                           "--xattrs-include=*", "-cf", "-", "."], check=True, capture_output=True).stdout


def opts(reg, timeout=10.0) -> PullOptions:
    from puller.registry import RegistryOptions
    return PullOptions(registry=RegistryOptions(plain_http=frozenset({reg.host}), timeout=timeout))


def walk(root: Path) -> tuple[dict, set]:
    """Everything a container could observe of a tree, and its hard-link groups."""
    out, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st = os.lstat(p)
            xattrs = {k: os.getxattr(p, k, follow_symlinks=False) for k in os.listxattr(p, follow_symlinks=False)
                      if k.startswith(("user.", "security.capability"))}
            entry = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, xattrs]
            if stat.S_ISREG(st.st_mode):
                entry += [st.st_size, hashlib.sha256(p.read_bytes()).hexdigest(), st.st_mtime_ns, st.st_nlink]
                inodes.setdefault(st.st_ino, set()).add(rel)
            elif stat.S_ISLNK(st.st_mode):
                entry += [os.readlink(p)]
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                entry += [st.st_rdev]
            out[rel] = entry
    return out, {frozenset(v) for v in inodes.values() if len(v) > 1}


@pytest.fixture(scope="module")
def rich_image(registry, pusher, kit, tmp_path_factory):
    """Three layers (gzip, gzip, zstd) with every kind of entry and the OCI whiteout rules."""
    tmp = tmp_path_factory.mktemp("rich")
    l1 = kit.busybox_tree(tmp / "l1")
    d = l1 / "data"
    d.mkdir()
    for size in (0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 17):
        (d / f"f{size}").write_bytes(os.urandom(size))
    (d / "zeros").write_bytes(bytes(3 * CHUNK))  # three equal chunks: stored once
    (d / "text").write_text("hello lazy world\n" * 20000)  # compressible
    os.link(d / "f65537", d / "hardlink")
    os.symlink("../etc/passwd", d / "link")
    os.mkfifo(d / "fifo")
    os.mknod(d / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (d / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(d / "suid", 0o4755)
    (d / "owned").write_bytes(b"mine")
    os.chown(d / "owned", 1000, 1000)
    os.setxattr(d / "owned", "user.note", b"a value")
    subprocess.run(["setcap", "cap_net_raw+ep", str(d / "suid")], check=True)
    (l1 / "gone").mkdir()
    (l1 / "gone/file").write_text("removed later")
    (l1 / "opq").mkdir()
    (l1 / "opq/old").write_text("hidden by the opaque whiteout")
    (l1 / "data/replaced").write_text("v1")
    l2 = tmp / "l2"
    (l2 / "opq").mkdir(parents=True)
    (l2 / ".wh.gone").write_bytes(b"")
    (l2 / "opq/.wh..wh..opq").write_bytes(b"")
    (l2 / "opq/new").write_text("kept")
    (l2 / "data").mkdir()
    (l2 / "data/replaced").write_text("v2, longer than v1")
    (l2 / "data/.wh.f1").write_bytes(b"")
    l3 = tmp / "l3"
    (l3 / "extra").mkdir(parents=True)
    (l3 / "extra/copy-of-f327697").write_bytes((d / "f327697").read_bytes())  # dedup across layers
    layers = [kit.Layer(tar_tree(l1), "gzip"), kit.Layer(tar_tree(l2), "gzip"), kit.Layer(tar_tree(l3), "zstd")]
    img = pusher.image("lazy/rich", "v1", layers)
    ref = f"{registry.host}/lazy/rich:v1"
    result = index_image(ref, opts(registry), chunk_size=CHUNK)
    return ref, img, result


def test_lazy_tree_equals_full_pull_byte_for_byte(registry, rich_image, tmp_path, lazy_snapshots):
    ref, img, result = rich_image
    # Equal chunks are stored once: the zeros file and the cross-layer copy add nothing.
    assert result.stored_bytes < result.file_bytes - 3 * CHUNK - 327697 + 3 * CHUNK // 2
    full = Store(str(tmp_path / "full"))
    image = pull(ref, full, opts(registry))
    full_snap = make_snapshot(full, image.chain_ids, tmp_path / "full-root", mode="overlay")
    try:
        lazy = Store(str(tmp_path / "lazy"))
        record = pull_lazy(ref, lazy, opts(registry))
        assert record is not None and record["manifest_digest"] == img.digest
        assert not (tmp_path / "lazy" / "lazy").exists()  # nothing but metadata so far
        snap = lazy_snapshots(lazy, ref, tmp_path / "lazy-root", amplify=0)
        want, want_links = walk(tmp_path / "full-root")
        got, got_links = walk(tmp_path / "lazy-root")
        assert set(got) == set(want)
        for rel in want:
            assert got[rel] == want[rel], rel
        assert got_links == want_links == {frozenset({"data/f65537", "data/hardlink"})}
        assert "gone" not in got and "data/f1" not in got and "opq/old" not in got and "opq/new" in got
        # Writes land in the overlay's upper dir; the lazy layer is untouched.
        (tmp_path / "lazy-root/data/text").write_text("changed")
        (tmp_path / "lazy-root/newfile").write_text("new")
        assert (lazy.snapshot_dir(snap.id) / "upper/newfile").read_text() == "new"
        assert (lazy.snapshot_dir(snap.id) / "lower/data/text").read_text().startswith("hello lazy")
        st = snap.stats()
        meta = load_record_meta(lazy, record)
        # Every distinct chunk of a visible file was fetched exactly once (those of files
        # whited out are never asked for), with fewer requests than chunks (merging).
        visible = {meta.chunks[i].digest for n in meta.nodes for i in n.chunks}
        assert len(visible) < len({c.digest for c in meta.chunks})
        assert st["chunks"] == len(visible)
        assert st["requests"] < st["chunks"] and st["failures"] == 0
    finally:
        full_snap.remove()


def test_corrupted_chunk_gives_eio_never_wrong_bytes(registry, pusher, kit, tmp_path, lazy_snapshots):
    root = tmp_path / "img"
    (root / "d").mkdir(parents=True)
    good, bad = os.urandom(3 * CHUNK), os.urandom(3 * CHUNK)
    (root / "d/good").write_bytes(good)
    (root / "d/bad").write_bytes(bad)
    pusher.image("lazy/corrupt", "v1", [kit.Layer(tar_tree(root))])
    ref = f"{registry.host}/lazy/corrupt:v1"
    index_image(ref, opts(registry), chunk_size=CHUNK)
    store = Store(str(tmp_path / "store"))
    record = pull_lazy(ref, store, opts(registry))
    meta = load_record_meta(store, record)
    node = next(n for n in meta.nodes if n.path == "d/bad")
    victim = meta.chunks[node.chunks[1]]
    blob = registry.blob_file(meta.blobs[victim.blob][0])
    data = bytearray(blob.read_bytes())
    data[victim.offset + 100] ^= 0xFF  # the registry serves stored bytes without checking them
    blob.write_bytes(bytes(data))
    snap = lazy_snapshots(store, ref, tmp_path / "root")
    assert (tmp_path / "root/d/good").read_bytes() == good
    # No thread of the daemon serving registry data holds a capability (capability sets are
    # per thread: the fetch threads, started before the mount, drop their own).
    tasks = os.listdir(f"/proc/{snap.pid}/task")
    assert len(tasks) > 1
    for tid in tasks:
        status = dict(line.split(":", 1) for line in open(f"/proc/{snap.pid}/task/{tid}/status"))
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0, tid
        assert int(status["NoNewPrivs"]) == 1, tid
    with open(tmp_path / "root/d/bad", "rb") as f:
        assert f.read(CHUNK) == bad[:CHUNK]  # the chunk before it is fine
        with pytest.raises(OSError) as exc:
            f.seek(CHUNK)
            f.read(CHUNK)
        assert exc.value.errno == errno.EIO
    log = (store.snapshot_dir(snap.id) / "daemon.log").read_text()
    assert "chunk verification failed" in log and victim.digest in log
    from puller.lazy.cache import ChunkCache
    from puller.lazy.daemon import cache_dir
    assert not ChunkCache(cache_dir(store)).has(victim.digest)


def test_shared_files_across_images_are_fetched_once(registry, pusher, kit, tmp_path, lazy_snapshots):
    shared = os.urandom(4 * CHUNK + 5)
    refs = []
    for name in ("a", "b"):
        root = tmp_path / name
        (root / "lib").mkdir(parents=True)
        (root / "lib/shared.so").write_bytes(shared)
        (root / f"own-{name}").write_bytes(os.urandom(2 * CHUNK))  # so the layers differ
        pusher.image(f"lazy/share-{name}", "v1", [kit.Layer(tar_tree(root))])
        refs.append(f"{registry.host}/lazy/share-{name}:v1")
        index_image(refs[-1], opts(registry), chunk_size=CHUNK)
    store = Store(str(tmp_path / "store"))
    for ref in refs:
        pull_lazy(ref, store, opts(registry))
    snap_a = lazy_snapshots(store, refs[0], tmp_path / "ra", amplify=0)
    snap_b = lazy_snapshots(store, refs[1], tmp_path / "rb", amplify=0)
    assert (tmp_path / "ra/lib/shared.so").read_bytes() == shared
    fetched_a = snap_a.stats()["bytes"]
    assert fetched_a >= len(shared)
    assert (tmp_path / "rb/lib/shared.so").read_bytes() == shared
    assert snap_b.stats().get("bytes", 0) == 0  # all from the shared chunk cache
    assert (tmp_path / "rb/own-b").stat().st_size == 2 * CHUNK
    (tmp_path / "rb/own-b").read_bytes()
    assert 0 < snap_b.stats()["bytes"] < len(shared)
    (tmp_path / "ra/own-a").read_bytes()
    from puller.lazy.daemon import cache_dir
    files = [p for p in Path(cache_dir(store)).rglob("*") if p.is_file()]
    assert len(files) == len({p.name for p in files}) == 5 + 2 + 2  # shared once, own chunks per image


def test_xattrs_of_an_image_without_any(registry, pusher, kit, tmp_path, lazy_snapshots, rich_image):
    """An image with no xattr at all: listing shows none (as a full pull does) and getxattr
    is "not supported" - the daemon said ENOSYS once, so the kernel stops asking it on every
    exec and write.  An image with xattrs still answers each name (ENODATA when absent)."""
    root = kit.busybox_tree(tmp_path / "img")
    pusher.image("lazy/noxattr", "v1", [kit.Layer(tar_tree(root))])
    ref = f"{registry.host}/lazy/noxattr:v1"
    index_image(ref, opts(registry), chunk_size=CHUNK)
    store = Store(str(tmp_path / "s"))
    pull_lazy(ref, store, opts(registry))
    lazy_snapshots(store, ref, tmp_path / "root")
    busybox = tmp_path / "root/bin/busybox"
    assert os.listxattr(busybox) == []
    for _ in range(2):
        with pytest.raises(OSError) as exc:
            os.getxattr(busybox, "security.capability")
        assert exc.value.errno == errno.EOPNOTSUPP
    assert subprocess.run(["chroot", str(tmp_path / "root"), "/bin/sh", "-c", "echo ok"],
                          capture_output=True).stdout == b"ok\n"

    rich_ref = rich_image[0]
    rstore = Store(str(tmp_path / "rs"))
    pull_lazy(rich_ref, rstore, opts(registry))
    lazy_snapshots(rstore, rich_ref, tmp_path / "rich")
    assert os.getxattr(tmp_path / "rich/data/owned", "user.note") == b"a value"
    with pytest.raises(OSError) as exc:
        os.getxattr(tmp_path / "rich/data/text", "user.note")
    assert exc.value.errno == errno.ENODATA


def _fuse_fds() -> list[str]:
    """The caller's open fds on /dev/fuse (one left open keeps a dead mount waiting)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == "/dev/fuse":
                out.append(fd)
        except OSError:
            pass
    return out


@pytest.mark.parametrize("fork", [True, False])
def test_daemon_holds_no_privilege_and_a_failed_start_leaves_nothing(registry, pusher, kit, tmp_path,
                                                                    lazy_snapshots, fork):
    """The caller mounts the FUSE connection and hands it over: the daemon (forked or a new
    interpreter) never holds a capability, and the mount is what libfuse would have made.  A
    daemon that cannot start (its stored metadata was tampered with) leaves no mount, no fd,
    no snapshot, and says why - the stored metadata is checked again, parsed copy or not."""
    root = kit.busybox_tree(tmp_path / "img")
    pusher.image("lazy/priv", "v1", [kit.Layer(tar_tree(root))])
    ref = f"{registry.host}/lazy/priv:v1"
    index_image(ref, opts(registry), chunk_size=CHUNK)
    store = Store(str(tmp_path / "s"))
    record = pull_lazy(ref, store, opts(registry))
    snap = lazy_snapshots(store, ref, tmp_path / "root", fork=fork)
    assert (tmp_path / "root/bin/busybox").read_bytes() == (root / "bin/busybox").read_bytes()
    lower = os.path.realpath(store.snapshot_dir(snap.id) / "lower")
    fields = next(line.split() for line in open("/proc/self/mountinfo") if line.split()[4] == lower)
    sep = fields.index("-")
    assert set(fields[5].split(",")) >= {"ro", "nosuid", "nodev"}
    assert fields[sep + 1:sep + 3] == ["fuse.puller-lazy", "puller-lazy"]
    assert set(fields[sep + 3].split(",")) >= {"ro", "allow_other", "default_permissions", "user_id=0"}
    for tid in os.listdir(f"/proc/{snap.pid}/task"):
        status = dict(line.split(":", 1) for line in open(f"/proc/{snap.pid}/task/{tid}/status"))
        assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == int(status["CapBnd"], 16) == 0, tid
        assert int(status["NoNewPrivs"]) == 1, tid
    assert _fuse_fds() == []

    blob = store.blob_path(record["lazy"]["meta"])
    blob.write_bytes(blob.read_bytes()[:-1] + b"x")
    with pytest.raises(MetaError, match="does not match its digest"):
        load_record_meta(store, record)
    before = set(os.listdir(store.root / "snapshots"))
    mounts = open("/proc/self/mountinfo").read()
    from puller.snapshot import SnapshotError
    t = time.monotonic()
    with pytest.raises((SnapshotError, MetaError), match="digest"):
        lazy_snapshots(store, ref, tmp_path / "root2", fork=fork)
    assert time.monotonic() - t < 20
    assert set(os.listdir(store.root / "snapshots")) == before
    assert open("/proc/self/mountinfo").read() == mounts
    assert _fuse_fds() == []
    assert not (tmp_path / "root2").exists()


def test_registry_gone_gives_eio_and_cached_data_stays(kit, pusher, tmp_path, tmp_path_factory, lazy_snapshots):
    reg = kit.start_registry(tmp_path_factory.mktemp("gone"))
    try:
        p = kit.Pusher(reg)
        root = tmp_path / "img"
        root.mkdir()
        first, second = os.urandom(2 * CHUNK), os.urandom(2 * CHUNK)
        (root / "first").write_bytes(first)
        (root / "second").write_bytes(second)
        p.image("lazy/gone", "v1", [kit.Layer(tar_tree(root))])
        ref = f"{reg.host}/lazy/gone:v1"
        index_image(ref, opts(reg), chunk_size=CHUNK)
        store = Store(str(tmp_path / "store"))
        pull_lazy(ref, store, opts(reg, timeout=2.0))
        lazy_snapshots(store, ref, tmp_path / "r1", amplify=0)
        assert (tmp_path / "r1/first").read_bytes() == first
    finally:
        reg.stop()
    # A new mount (no page cache to help) after the registry went away.
    lazy_snapshots(store, ref, tmp_path / "r2", amplify=0)
    assert (tmp_path / "r2/first").read_bytes() == first
    started = time.monotonic()
    with pytest.raises(OSError) as exc:
        (tmp_path / "r2/second").read_bytes()
    assert exc.value.errno == errno.EIO
    assert time.monotonic() - started < 15


def test_metadata_bound_to_its_image(registry, pusher, kit, tmp_path, rich_image):
    """Metadata of one image published as a referrer of another is refused."""
    from puller.lazy.convert import add_referrers_tag
    from puller.lazy.format import ARTIFACT_TYPE
    from puller.registry import RegistryClient
    ref, img, result = rich_image
    other = pusher.image("lazy/rich", "other", [kit.unique_layer(tmp_path, "other", 1000)])
    client = RegistryClient(registry.host, opts(registry).registry)
    art = client.request("GET", f"lazy/rich/manifests/{result.artifact_digest}",
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json"}).content
    add_referrers_tag(client, "lazy/rich", other.digest,
                      {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": result.artifact_digest,
                       "size": len(art), "artifactType": ARTIFACT_TYPE})
    with pytest.raises(MetaError, match="subject"):
        pull_lazy(f"{registry.host}/lazy/rich:other", Store(str(tmp_path / "s")), opts(registry))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "puller", *args], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).parents[2])


def test_cli_index_pull_snapshot_record_prefetch_fallback(registry, pusher, kit, tmp_path, lazy_snapshots):
    root = kit.busybox_tree(tmp_path / "img")
    (root / "big").write_bytes(os.urandom(8 << 20))
    pusher.image("lazy/cli", "v1", [kit.Layer(tar_tree(root))],
                 config={"Entrypoint": ["/bin/cat", "/etc/passwd"], "Env": ["PATH=/bin"]})
    ref = f"{registry.host}/lazy/cli:v1"
    host = ["--plain-http", registry.host]
    # No metadata yet: the lazy pull falls back to a full pull and says so.
    out = _cli("pull", ref, "--lazy", "--store", str(tmp_path / "s0"), *host)
    assert out.returncode == 0, out.stderr
    assert "no lazy metadata" in out.stderr and "falling back to a full pull" in out.stderr
    out = _cli("index", ref, *host)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["files"] >= 3
    store = tmp_path / "s1"
    out = _cli("pull", ref, "--lazy", "--store", str(store), *host)
    assert out.returncode == 0, out.stderr
    assert "lazy" in json.loads(out.stdout)
    # snapshot via the CLI, with the access recorder, then a real run inside it.
    recorded = tmp_path / "prefetch.txt"
    out = _cli("snapshot", ref, "--store", str(store), "--dest", str(tmp_path / "root"),
               "--container-id", "c1", "--record-access", str(recorded))
    assert out.returncode == 0, out.stderr
    try:
        assert json.loads(out.stdout)["mode"] == "lazy"
        run = subprocess.run(["chroot", str(tmp_path / "root"), "/bin/cat", "/etc/passwd"], capture_output=True)
        assert run.stdout.startswith(b"root:x:0:0")
        assert recorded.read_text().split() == ["bin/busybox", "etc/passwd"]
    finally:
        rm = _cli("snapshot-rm", "c1", "--store", str(store))
    assert rm.returncode == 0, rm.stderr
    assert not (tmp_path / "root").exists()
    assert not any(str(store) in line for line in open("/proc/mounts"))
    # A fresh store prefetches the recorded files without anyone reading them.
    store2 = Store(str(tmp_path / "s2"))
    pull_lazy(ref, store2, opts(registry))
    snap = lazy_snapshots(store2, ref, tmp_path / "root2", prefetch=str(recorded))
    meta = load_record_meta(store2, store2.get_image(ref))
    want = {meta.chunks[i].digest for n in meta.nodes if n.path in ("bin/busybox", "etc/passwd") for i in n.chunks}
    deadline = time.monotonic() + 20
    while snap.stats().get("chunks", 0) < len(want) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert snap.stats()["chunks"] == len(want)  # and not the 8 MiB file nobody opened


def test_entrypoint_is_fetched_at_mount_without_a_read(registry, pusher, kit, tmp_path, lazy_snapshots):
    root = kit.busybox_tree(tmp_path / "img")
    (root / "big").write_bytes(os.urandom(4 << 20))
    # A bare name looked up along PATH, through the image's own symlink bin/sh -> busybox.
    pusher.image("lazy/entry", "v1", [kit.Layer(tar_tree(root))],
                 config={"Entrypoint": ["sh", "-c"], "Cmd": ["true"], "Env": ["PATH=/nowhere:/bin"]})
    ref = f"{registry.host}/lazy/entry:v1"
    index_image(ref, opts(registry), chunk_size=CHUNK)
    store = Store(str(tmp_path / "s"))
    record = pull_lazy(ref, store, opts(registry))
    snap = lazy_snapshots(store, ref, tmp_path / "root", amplify=0)
    meta = load_record_meta(store, record)
    busybox = next(n for n in meta.nodes if n.path == "bin/busybox")
    want = {meta.chunks[i].digest for i in busybox.chunks}
    deadline = time.monotonic() + 20
    while snap.stats().get("chunks", 0) < len(want) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert snap.stats()["chunks"] == len(want)  # busybox's chunks, nothing else
    from puller.lazy.daemon import cache_dir
    cached = {"sha256:" + p.name for p in Path(cache_dir(store)).rglob("*") if p.is_file()}
    assert cached == want
    assert (tmp_path / "root/bin/busybox").read_bytes() == (root / "bin/busybox").read_bytes()
    assert snap.stats()["chunks"] == len(want)  # the read found them all in the cache


def test_prefetch_list_in_the_image_is_fetched_at_mount(registry, pusher, kit, tmp_path, lazy_snapshots):
    """`index --prefetch FILE` carries a recorded list in the metadata: a lazy mount fetches the
    entrypoint and those files before anything reads them, with no list given at mount time;
    paths the image does not have are left out at indexing."""
    root = kit.busybox_tree(tmp_path / "img")
    (root / "app").mkdir()
    for name in ("a", "b", "c"):
        (root / "app" / name).write_bytes(os.urandom(3 * CHUNK))
    pusher.image("lazy/plist", "v1", [kit.Layer(tar_tree(root))],
                 config={"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["cat /app/c /app/a"]})
    ref = f"{registry.host}/lazy/plist:v1"
    plist = tmp_path / "recorded.txt"
    plist.write_text("/app/c\napp/./a\n/app/c\nnot/there\n")
    out = subprocess.run([sys.executable, "-m", "puller", "index", ref, "--plain-http", registry.host,
                          "--chunk-size", str(CHUNK), "--prefetch", str(plist)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "'not/there' is not in the image" in out.stderr
    store = Store(str(tmp_path / "s"))
    record = pull_lazy(ref, store, opts(registry))
    meta = load_record_meta(store, record)
    assert meta.prefetch == ["app/c", "app/a"]
    snap = lazy_snapshots(store, ref, tmp_path / "root", amplify=0)
    by_path = {n.path: n for n in meta.nodes}
    want = {meta.chunks[i].digest for p in ("bin/busybox", "app/c", "app/a") for i in by_path[p].chunks}
    deadline = time.monotonic() + 20
    while snap.stats().get("chunks", 0) < len(want) and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    assert snap.stats()["chunks"] == len(want)  # the list and the entrypoint, not app/b
    from puller.lazy.daemon import cache_dir
    assert {"sha256:" + p.name for p in Path(cache_dir(store)).rglob("*") if p.is_file()} == want
    assert (tmp_path / "root/app/a").read_bytes() == (root / "app/a").read_bytes()
    assert snap.stats()["chunks"] == len(want)  # found in the cache


def test_whole_snapshot_fetches_everything_in_background(registry, pusher, kit, tmp_path, lazy_snapshots):
    root = tmp_path / "img"
    root.mkdir()
    for i in range(4):
        (root / f"f{i}").write_bytes(os.urandom(3 * CHUNK))
    pusher.image("lazy/whole", "v1", [kit.Layer(tar_tree(root))])
    ref = f"{registry.host}/lazy/whole:v1"
    index_image(ref, opts(registry), chunk_size=CHUNK)
    store = Store(str(tmp_path / "s"))
    record = pull_lazy(ref, store, opts(registry))
    # A miss at a file's end brings the neighbouring chunks of the data blob along (amplify).
    amp = lazy_snapshots(store, ref, tmp_path / "amp", amplify=2 * CHUNK + 1000)
    # The rest of f0 and f1's first two chunks ride in the read's request (read-around); the
    # read waits only for its own chunks, the others keep arriving after it returned.
    assert (tmp_path / "amp/f0").read_bytes() == (root / "f0").read_bytes()
    deadline = time.monotonic() + 10
    while amp.stats().get("chunks", 0) < 3 + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert amp.stats()["chunks"] == 3 + 2 and amp.stats()["requests"] == 1
    (tmp_path / "amp/f1").read_bytes()
    deadline = time.monotonic() + 10
    while amp.stats().get("chunks", 0) < 3 + 3 + 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert amp.stats()["chunks"] == 3 + 3 + 2
    amp.remove()
    store = Store(str(tmp_path / "s2"))
    record = pull_lazy(ref, store, opts(registry))
    snap = lazy_snapshots(store, ref, tmp_path / "root", whole=True)
    n = len(load_record_meta(store, record).chunks)
    deadline = time.monotonic() + 20
    while snap.stats().get("chunks", 0) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    assert snap.stats()["chunks"] == n == 12


def test_agentjob_lazy_pull_snapshot_unsnapshot(registry, pusher, kit, tmp_path):
    """The agent's job entry with --lazy: metadata-only pull, lazy rootfs + runtime config, removal."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = kit.busybox_tree(tmp_path / "img")
    pusher.image("lazy/job", "v1", [kit.Layer(tar_tree(root))],
                 config={"Entrypoint": ["/bin/id"], "User": "user", "Env": ["PATH=/bin"]})
    ref = f"{registry.host}/lazy/job:v1"
    index_image(ref, opts(registry), chunk_size=CHUNK)
    store = tmp_path / "store"

    def job(*args: str) -> dict:
        out = subprocess.run([sys.executable, "-m", "puller.agentjob", *args], capture_output=True, text=True,
                             timeout=60, cwd=Path(__file__).parents[2])
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    pulled = job("pull", ref, "--store", str(store), "--plain-http", registry.host, "--lazy")
    assert pulled["lazy"] is True and pulled["manifest_digest"].startswith("sha256:")
    assert not any((store / "layers").iterdir())  # no layer was downloaded
    snap = job("snapshot", ref, "--store", str(store), "--dest", str(tmp_path / "rootfs"), "--id", "c9", "--lazy")
    try:
        assert snap["lazy"] is True
        assert snap["config"]["process"]["user"]["uid"] == 1000  # "user" resolved from the lazy /etc/passwd
        assert (tmp_path / "rootfs/bin/busybox").stat().st_size == (root / "bin/busybox").stat().st_size
    finally:
        removed = job("unsnapshot", "c9", "--store", str(store))
    assert removed == {"removed": True}
    assert not any(str(store) in line for line in open("/proc/mounts"))


def test_converter_refuses_hostile_layers(registry, pusher, kit, tmp_path):
    import io
    import tarfile

    from puller.errors import LayerError

    def layer(*members: tuple[str, bytes, dict]) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for name, data, pax in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.pax_headers = pax
                tar.addfile(info, io.BytesIO(data))
        return buf.getvalue()

    cases = {
        "dotdot": (layer(("../escape", b"x", {})), "'..' component"),
        "overlay-xattr": (layer(("etc", b"", {}), ("etc/f", b"x", {"SCHILY.xattr.trusted.overlay.opaque": "y"})),
                          "overlayfs-private"),
        "dangling-hardlink": (None, "no regular file"),
    }
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("link")
        info.type = tarfile.LNKTYPE
        info.linkname = "missing"
        tar.addfile(info)
    cases["dangling-hardlink"] = (buf.getvalue(), "no regular file")
    for name, (tar, message) in cases.items():
        pusher.image("lazy/hostile", name, [kit.Layer(tar)])
        with pytest.raises(LayerError, match=message):
            index_image(f"{registry.host}/lazy/hostile:{name}", opts(registry))
