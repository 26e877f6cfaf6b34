"""The CLI reads /etc/passwd from stored layers the way the merged rootfs shows it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from puller.storeconfig import read_in_layers as _read_in_layers


class FakeLayers:
    """Only layer_path(): a directory per chain id (real dirs, real device nodes)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def layer_path(self, chain_id: str) -> Path:
        return self.root / chain_id


@pytest.mark.root
def test_read_in_layers_whiteouts_opaque_symlinks(tmp_path):
    layers = FakeLayers(tmp_path)
    for name in ("l0", "l1", "l2"):
        (tmp_path / name / "etc").mkdir(parents=True)
    (tmp_path / "l0/etc/passwd").write_text("from l0")
    (tmp_path / "l0/etc/group").write_text("group l0")
    (tmp_path / "l0/etc/shadow").write_text("secret")
    assert _read_in_layers(layers, ["l0", "l1", "l2"], "etc/passwd") == "from l0"
    (tmp_path / "l1/etc/passwd").write_text("from l1")
    assert _read_in_layers(layers, ["l0", "l1", "l2"], "etc/passwd") == "from l1"
    os.mknod(tmp_path / "l2/etc/passwd", 0o600 | 0o020000, 0)  # overlay whiteout
    assert _read_in_layers(layers, ["l0", "l1", "l2"], "etc/passwd") == ""
    os.setxattr(tmp_path / "l2/etc", "trusted.overlay.opaque", b"y")
    assert _read_in_layers(layers, ["l0", "l1", "l2"], "etc/group") == ""
    # A symlink to a host file is never followed, in the last or a middle component.
    os.symlink("/etc/hostname", tmp_path / "l1/etc/hostname")
    assert _read_in_layers(layers, ["l0", "l1"], "etc/hostname") == ""
    (tmp_path / "l3").mkdir()
    os.symlink("/etc", tmp_path / "l3/etc")
    # l3's etc is a symlink: it hides l0's etc/ (as overlayfs would) and is not followed.
    assert _read_in_layers(layers, ["l0", "l3"], "etc/shadow") == ""
    assert _read_in_layers(layers, ["l0"], "etc/shadow") == "secret"
