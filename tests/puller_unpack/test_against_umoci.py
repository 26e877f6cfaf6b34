"""Cross-check with a reference implementation: an OCI image with three layers (whiteouts,
opaque dirs, replacements, hardlinks, devices, setuid, xattrs) built with GNU tar and
`umoci raw add-layer`, unpacked by `umoci unpack` and by us (store + overlay and copy snapshots):
the root filesystems must be the same."""

from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import stat
import subprocess

import pytest

from puller.snapshot import make_snapshot, overlay_available
from puller.store import Store, chain_ids
from puller.unpack import unpack_layer
from unpack_helpers import CAP_NET_BIND_SERVICE_XATTR, describe, gnu_tar

pytestmark = pytest.mark.skipif(shutil.which("umoci") is None, reason="umoci not installed")


def _w(path, data: bytes = b"", mode: int | None = None, owner: tuple[int, int] | None = None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    if owner:
        os.chown(path, *owner)
    if mode is not None:
        os.chmod(path, mode)


def _layers(base: str) -> list[str]:
    l1, l2, l3 = (os.path.join(base, n) for n in ("l1", "l2", "l3"))
    # layer 1: a small distro
    _w(f"{l1}/etc/motd", b"hello")
    _w(f"{l1}/etc/hosts", b"127.0.0.1 localhost")
    _w(f"{l1}/etc/shadow", b"root:*:", 0o640, (0, 42))
    _w(f"{l1}/var/cache/apt/pkg1", b"1")
    _w(f"{l1}/var/cache/apt/sub/pkg2", b"2")
    _w(f"{l1}/var/cache/keep", b"k")
    _w(f"{l1}/usr/bin/su", b"su" * 100, 0o4755)
    _w(f"{l1}/usr/bin/ping", b"ping", 0o755)
    os.setxattr(f"{l1}/usr/bin/ping", "security.capability", CAP_NET_BIND_SERVICE_XATTR)
    os.link(f"{l1}/usr/bin/su", f"{l1}/usr/bin/su-link")
    os.symlink("usr/bin", f"{l1}/bin")
    os.makedirs(f"{l1}/dev")
    os.mknod(f"{l1}/dev/null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(f"{l1}/dev/sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
    os.mkfifo(f"{l1}/dev/fifo", 0o620)
    os.makedirs(f"{l1}/srv/shared")
    os.chmod(f"{l1}/srv/shared", 0o2775)
    os.chown(f"{l1}/srv/shared", 1000, 1000)
    os.makedirs(f"{l1}/tmp")
    os.chmod(f"{l1}/tmp", 0o1777)
    _w(f"{l1}/opt/app/config", b"v1")
    _w(f"{l1}/home/user/.profile", b"p", 0o600, (1000, 1000))
    # layer 2: deletions and replacements
    _w(f"{l2}/etc/.wh.motd")
    _w(f"{l2}/var/cache/apt/.wh..wh..opq")
    _w(f"{l2}/var/cache/apt/fresh", b"f")
    _w(f"{l2}/.wh.opt")
    _w(f"{l2}/opt", b"opt is a file now")
    _w(f"{l2}/etc/hosts", b"::1 localhost")
    os.makedirs(f"{l2}/home/user/.profile")  # file becomes a directory
    _w(f"{l2}/home/user/.profile/inner", b"i", 0o644, (1000, 1000))
    os.symlink("/etc/hosts", f"{l2}/hosts-link")
    # layer 3: re-add a deleted name, hardlinks in a new place
    _w(f"{l3}/etc/motd", b"back again")
    _w(f"{l3}/data/a", b"a" * 5000)
    os.link(f"{l3}/data/a", f"{l3}/data/b")
    _w(f"{l3}/.wh.hosts-link")
    for root in (l1, l2, l3):
        for dirpath, dirnames, filenames in os.walk(root):
            for n in dirnames + filenames:
                os.utime(os.path.join(dirpath, n), ns=(1_500_000_000_000_000_000,) * 2,
                         follow_symlinks=False)
        os.utime(root, ns=(1_500_000_000_000_000_000,) * 2)
    tars = []
    for root in (l1, l2, l3):
        gnu_tar(root, root + ".tar")
        tars.append(root + ".tar")
    return tars


def test_same_rootfs_as_umoci(tmp_path):
    base = str(tmp_path)
    tars = _layers(base)
    img = f"{base}/img"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("umoci", "init", "--layout", img)
    run("umoci", "new", "--image", f"{img}:t")
    for t in tars:
        run("umoci", "raw", "add-layer", "--image", f"{img}:t", t)
    run("umoci", "unpack", "--image", f"{img}:t", f"{base}/bundle")
    reference = describe(f"{base}/bundle/rootfs", skip_root_times=True)

    # ours, from the very blobs umoci wrote
    index = json.load(open(f"{img}/index.json"))
    blob = lambda d: f"{img}/blobs/sha256/{d.split(':')[1]}"  # noqa: E731
    manifest = json.load(open(blob(index["manifests"][0]["digest"])))
    config = json.load(open(blob(manifest["config"]["digest"])))
    diff_ids = config["rootfs"]["diff_ids"]
    store = Store(f"{base}/store")
    cids = chain_ids(diff_ids)
    for cid, layer in zip(cids, manifest["layers"]):
        raw = gzip.decompress(open(blob(layer["digest"]), "rb").read())
        store.ensure_layer(cid, lambda p, r=raw, d=layer["digest"]: unpack_layer(
            io.BytesIO(r), p, layer=d))

    modes = ["copy"] + (["overlay"] if overlay_available() else [])
    for mode in modes:
        snap = make_snapshot(store, cids, f"{base}/rootfs-{mode}", mode=mode)
        try:
            ours = describe(f"{base}/rootfs-{mode}", skip_root_times=True)
        finally:
            snap.remove()
        if mode == "overlay":
            # overlayfs reports a hardlink's nlink per layer; content and inode identity agree
            for d in list(ours.values()) + list(reference.values()):
                d.pop("link_group", None)
        assert sorted(ours) == sorted(reference), mode
        for path in reference:
            assert ours[path] == reference[path], (mode, path)
    assert reference["usr/bin/ping"]["xattrs"] == {
        "security.capability": CAP_NET_BIND_SERVICE_XATTR}
    assert "opt" in reference and reference["opt"]["type"] == stat.S_IFREG
    assert "hosts-link" not in reference and "etc/motd" in reference
    assert [k for k in reference if k.startswith("var/cache/apt/")] == ["var/cache/apt/fresh"]
    assert reference["home/user/.profile/inner"]["uid"] == 1000
    assert reference["dev/sda"]["type"] == stat.S_IFBLK and reference["srv/shared"]["mode"] == 0o2775
    assert reference["usr/bin/su"]["mode"] == 0o4755
