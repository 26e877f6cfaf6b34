"""Fixtures of the VM tests: the guest-image/ scripts as modules, the built guest."""
from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
GUEST_IMAGE = REPO / "guest-image"
GUEST_OUT = Path(os.environ.get("SANDBOX_AGENT_GUEST_DIR", REPO / "out" / "guest"))


def load(name: str):
    """Import guest-image/NAME.py (the folder is not a package: it has a dash)."""
    mod_name = f"guest_image_{name}"
    if mod_name in sys.modules:
        return sys.modules[mod_name]
    spec = importlib.util.spec_from_file_location(mod_name, GUEST_IMAGE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = mod
    spec.loader.exec_module(mod)
    return mod


def build_guest() -> Path:
    """Run rootfs-build.sh (cached: about a second when nothing changed). Skips when the
    machine cannot have QEMU or the kernel package; any other failure fails the test."""
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    if os.geteuid() != 0:
        pytest.skip("building the guest needs root (chroot into the staged tree)")
    p = subprocess.run([str(REPO / "rootfs-build.sh"), str(GUEST_OUT)], capture_output=True,
                       text=True, timeout=900)
    if p.returncode != 0:
        if "apt-get download" in p.stderr or "no linux-image" in p.stderr:
            pytest.skip(f"the guest kernel package cannot be had: {p.stderr.strip()[-500:]}")
        raise AssertionError(f"rootfs-build.sh failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return GUEST_OUT


@pytest.fixture(scope="session")
def kernel_py():
    return load("kernel")


@pytest.fixture(scope="session")
def cpio_py():
    return load("cpio")


@pytest.fixture(scope="session")
def guest_dir() -> Path:
    return build_guest()


def _console_logs(funcargs: dict) -> list[Path]:
    """The guest console logs of the VMs a test used: a state dir (a Path holding console.log)
    or a VMState (its ``console`` path), alone or inside a fixture's tuple."""
    found: list[Path] = []
    todo = list(funcargs.values())
    while todo:
        v = todo.pop(0)
        if isinstance(v, (tuple, list)):
            todo.extend(v)
            continue
        path = getattr(v, "console", None)
        if isinstance(path, str):
            path = Path(path)
        elif isinstance(v, Path) and (v / "console.log").is_file():
            path = v / "console.log"
        if isinstance(path, Path) and path.is_file() and path not in found:
            found.append(path)
    return found


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed VM test shows the end of the guest's console (init's and the daemon's logs):
    CI keeps nothing else of the guest, and a hang there says nothing on the host side."""
    outcome = yield
    rep = outcome.get_result()
    if rep.when != "call" or not rep.failed:
        return
    for path in _console_logs(getattr(item, "funcargs", {})):
        lines = [ln for ln in path.read_text(errors="replace").splitlines()
                 if '"level": "debug"' not in ln]
        rep.sections.append((f"guest console {path} (last 60 lines, debug left out)",
                             "\n".join(ln[:400] for ln in lines[-60:])))
