"""Snapshots over shared layers: real overlayfs mounts, the copy fallback, many layers."""

from __future__ import annotations

import errno
import hashlib
import io
import os

import pytest

from puller import fsutil
from puller.snapshot import (
    SnapshotError, list_snapshots, load_snapshot, make_snapshot, overlay_available,
)
from puller.store import Store, chain_ids
from puller.unpack import WhiteoutMode, unpack_layer
from unpack_helpers import archive, describe, entry

needs_overlay = pytest.mark.skipif(not overlay_available(), reason="kernel has no overlayfs")


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


LAYERS = [
    archive(entry("./", type=b"5", mode=0o755),
            entry("etc/", type=b"5", mode=0o755),
            entry("etc/motd", b"welcome"), entry("etc/hosts", b"127.0.0.1 localhost"),
            entry("var/cache/", type=b"5", mode=0o755),
            entry("var/cache/a", b"a"), entry("var/cache/b", b"b"),
            entry("opt/tool/", type=b"5", mode=0o755), entry("opt/tool/bin", b"v1", mode=0o755),
            entry("bin", type=b"2", linkname="usr/bin"), entry("usr/bin/", type=b"5", mode=0o755),
            entry("usr/bin/sh", b"sh", mode=0o755), entry("usr/bin/sh-hard", type=b"1",
                                                           linkname="usr/bin/sh")),
    archive(entry("etc/.wh.motd"),
            entry("var/cache/.wh..wh..opq"), entry("var/cache/c", b"c"),
            entry("opt/.wh.tool"), entry("opt/tool", b"now a file")),
    archive(entry("etc/hosts", b"::1 localhost"), entry("new/", type=b"5", mode=0o700),
            entry("new/file", b"n", uid=1000, gid=1000)),
]
EXPECTED = {
    "etc": ["hosts"], "var/cache": ["c"], "opt": ["tool"], "new": ["file"],
}


@pytest.fixture
def image(tmp_path):
    store = Store(tmp_path / "store")
    cids = chain_ids([sha(l) for l in LAYERS])
    for cid, data in zip(cids, LAYERS):
        store.ensure_layer(cid, lambda p, d=data: unpack_layer(io.BytesIO(d), p))
    before = {c: describe(str(store.layer_path(c))) for c in cids}
    yield store, cids
    for snap in list_snapshots(store):
        snap.remove()
    # snapshots never write into the shared layers
    assert {c: describe(str(store.layer_path(c))) for c in cids} == before


def check_merged(root):
    for d, names in EXPECTED.items():
        assert sorted(os.listdir(os.path.join(root, d))) == names, d
    assert open(os.path.join(root, "etc/hosts")).read() == "::1 localhost"
    assert open(os.path.join(root, "opt/tool")).read() == "now a file"
    assert open(os.path.join(root, "bin/sh")).read() == "sh"
    assert os.stat(os.path.join(root, "new/file")).st_uid == 1000
    assert not any(n.startswith(".wh.") for _, ds, fs in os.walk(root) for n in ds + fs)


@needs_overlay
def test_overlay_snapshot_applies_whiteouts_and_writes_go_to_upper(image, tmp_path):
    store, cids = image
    dest = tmp_path / "rootfs"
    snap = make_snapshot(store, cids, dest, mode="overlay")
    assert snap.mode == "overlay" and fsutil.is_mountpoint(str(dest))
    check_merged(dest)
    (dest / "etc/written").write_text("container write")
    os.unlink(dest / "etc/hosts")
    assert (snap.upper / "etc/written").read_text() == "container write"
    assert not (store.layer_path(cids[2]) / "etc/written").exists()
    assert load_snapshot(store, snap.id).chain_ids == cids
    snap.remove()
    assert not dest.exists() and not snap.dir.exists()


@needs_overlay
def test_copy_snapshot_matches_overlay_view(image, tmp_path):
    store, cids = image
    ov = make_snapshot(store, cids, tmp_path / "ov", mode="overlay")
    cp = make_snapshot(store, cids, tmp_path / "cp", mode="copy")
    assert cp.mode == "copy" and not fsutil.is_mountpoint(str(tmp_path / "cp"))
    check_merged(tmp_path / "cp")
    a = describe(str(tmp_path / "ov"), skip_root_times=True)
    b = describe(str(tmp_path / "cp"), skip_root_times=True)
    for d in list(a.values()) + list(b.values()):
        d.pop("link_group", None)  # overlay reports hardlinks per layer; compare content
    assert a == b
    # hard links inside one layer stay hard links in the copy
    st1, st2 = os.stat(tmp_path / "cp/usr/bin/sh"), os.stat(tmp_path / "cp/usr/bin/sh-hard")
    assert st1.st_ino == st2.st_ino
    cp.remove()
    assert not (tmp_path / "cp").exists()


def test_copy_snapshot_never_writes_through_lower_symlinks(tmp_path):
    """A lower layer's symlink pointing outside, an upper layer's dir of the same name."""
    outside = tmp_path / "outside"
    outside.mkdir()
    store = Store(tmp_path / "store")
    layers = [archive(entry("d", type=b"2", linkname=str(outside)),
                      entry("f", type=b"2", linkname=str(outside / "victim"))),
              archive(entry("d/", type=b"5", mode=0o755), entry("d/pwned", b"x"),
                      entry("f", b"data"))]
    cids = chain_ids([sha(l) for l in layers])
    for cid, data in zip(cids, layers):
        store.ensure_layer(cid, lambda p, d=data: unpack_layer(io.BytesIO(d), p))
    snap = make_snapshot(store, cids, tmp_path / "cp", mode="copy")
    assert (tmp_path / "cp/d/pwned").exists() and os.listdir(outside) == []
    assert (tmp_path / "cp/f").read_text() == "data"
    snap.remove()


@needs_overlay
def test_read_only_single_layer(image, tmp_path):
    store, cids = image
    snap = make_snapshot(store, cids[:1], tmp_path / "ro", writable=False, mode="overlay")
    assert (tmp_path / "ro/etc/motd").read_text() == "welcome"
    with pytest.raises(OSError) as ei:
        (tmp_path / "ro/x").write_text("no")
    assert ei.value.errno == errno.EROFS
    snap.remove()


@needs_overlay
def test_many_layers_use_short_relative_lowerdirs(tmp_path):
    store = Store(tmp_path / ("store-with-a-long-name-" + "x" * 100))
    layers = [archive(entry(f"f{i:03d}", str(i).encode()), entry("top", str(i).encode()))
              for i in range(90)]
    cids = chain_ids([sha(l) for l in layers])
    for cid, data in zip(cids, layers):
        store.ensure_layer(cid, lambda p, d=data: unpack_layer(io.BytesIO(d), p))
    # absolute lowerdirs would need > 90 * 200 bytes: more than the one page mount(2) takes
    assert sum(len(str(store.layer_path(c))) + 1 for c in cids) > 4096
    snap = make_snapshot(store, cids, tmp_path / "m", mode="overlay")
    try:
        assert (snap.dir / "l").is_dir()
        assert len(os.listdir(tmp_path / "m")) == 91
        assert (tmp_path / "m/top").read_text() == "89"
        assert (tmp_path / "m/f000").read_text() == "0"
        (tmp_path / "m/written").write_text("w")
        assert (snap.upper / "written").exists()
        assert os.getcwd() != str(snap.dir)  # the chdir happened in a child only
    finally:
        snap.remove()
    assert not (tmp_path / "m").exists()


@needs_overlay
def test_two_snapshots_share_layers_independently(image, tmp_path):
    store, cids = image
    a = make_snapshot(store, cids, tmp_path / "a")
    b = make_snapshot(store, cids, tmp_path / "b")
    (tmp_path / "a/etc/only-a").write_text("a")
    assert not (tmp_path / "b/etc/only-a").exists()
    assert {s.id for s in list_snapshots(store)} == {a.id, b.id}
    a.remove()
    check_merged(tmp_path / "b")
    b.remove()


def test_refusals(image, tmp_path):
    store, cids = image
    with pytest.raises(SnapshotError, match="not in the store"):
        make_snapshot(store, cids + [sha(b"missing")], tmp_path / "x")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/file").write_text("x")
    with pytest.raises(SnapshotError, match="not an empty directory"):
        make_snapshot(store, cids, tmp_path / "busy")
    with pytest.raises(SnapshotError, match="already exists"):
        make_snapshot(store, cids, tmp_path / "y", mode="copy", snapshot_id="same")
        make_snapshot(store, cids, tmp_path / "z", mode="copy", snapshot_id="same")
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()
    assert [s.id for s in list_snapshots(store)] == ["same"]


def test_delete_mode_unpack_equals_copy_snapshot(image, tmp_path):
    """Applying the tars straight onto one dir (whiteouts delete) gives the copy snapshot."""
    store, cids = image
    merged = tmp_path / "merged"
    merged.mkdir()
    for data in LAYERS:
        unpack_layer(io.BytesIO(data), merged, whiteouts=WhiteoutMode.DELETE)
    snap = make_snapshot(store, cids, tmp_path / "cp", mode="copy")
    a = describe(str(merged), skip_root_times=True)
    b = describe(str(tmp_path / "cp"), skip_root_times=True)
    for d in list(a.values()) + list(b.values()):
        if d["type"] == 0o040000:
            # a directory the layer did not list gets "now" as its time, in both ways
            d.pop("mtime", None)
    assert a == b
    snap.remove()


@needs_overlay
def test_auto_falls_back_to_copy_where_overlay_cannot_mount(tmp_path):
    """The snapshots dir (upper/work) on overlayfs, which the kernel refuses as upperdir."""
    store = Store(tmp_path / "store")
    cids = chain_ids([sha(l) for l in LAYERS])
    for cid, data in zip(cids, LAYERS):
        store.ensure_layer(cid, lambda p, d=data: unpack_layer(io.BytesIO(d), p))
    for d in ("lo", "up", "wk"):
        (tmp_path / d).mkdir()
    snaps = str(store.root / "snapshots")
    fsutil.mount("overlay", snaps, "overlay", 0,
                 f"lowerdir={tmp_path}/lo,upperdir={tmp_path}/up,workdir={tmp_path}/wk")
    try:
        with pytest.raises(OSError) as ei:
            make_snapshot(store, cids, tmp_path / "forced", mode="overlay")
        assert ei.value.errno == errno.EINVAL
        assert not (tmp_path / "forced").exists() and list_snapshots(store) == []
        snap = make_snapshot(store, cids, tmp_path / "rootfs")
        assert snap.mode == "copy" and load_snapshot(store, snap.id).mode == "copy"
        check_merged(tmp_path / "rootfs")
        snap.remove()
    finally:
        fsutil.umount(snaps)
