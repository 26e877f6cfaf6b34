"""Fixtures for the lazy-pull tests: the puller tests' registry and image builder, plus a
helper that makes lazy snapshots and always tears them (FUSE daemon, mounts) down."""
from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

import pytest

_name = "puller_tests_conftest"
if _name not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_name, Path(__file__).parents[1] / "puller" / "conftest.py")
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules[_name] = _mod
    _spec.loader.exec_module(_mod)
pc = sys.modules[_name]
registry = pc.registry
pusher = pc.pusher
kit = pc.kit
options_for = pc.options_for
fault_proxy = pc.fault_proxy


def _need_fuse() -> None:
    if os.geteuid() != 0:
        pytest.skip("lazy mounts need root (FUSE allow_other, overlayfs)")
    if not os.path.exists("/dev/fuse") or not shutil.which("fusermount3"):
        pytest.skip("no /dev/fuse or fusermount3 on this machine")


@pytest.fixture
def lazy_snapshots():
    """make(store, ref, dest, **kw) -> LazySnapshot; all removed at teardown."""
    _need_fuse()
    from puller.lazy.mount import make_lazy_snapshot
    made = []

    def make(store, ref, dest, **kw):
        snap = make_lazy_snapshot(store, ref, dest, **kw)
        made.append(snap)
        return snap

    yield make
    for snap in reversed(made):
        snap.remove()
