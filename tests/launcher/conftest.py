"""Fixtures for the launcher tests: a busybox bundle built from Debian's busybox-static, a
state root per test, and helpers to drive the real ``oci-launcher`` command line."""
from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BUSYBOX = "/bin/busybox"
LAUNCHER = [sys.executable, "-I", "-S", "-c",
            f"import sys;sys.path.insert(0,{REPO!r});from agent.oci_launcher import main;main()"]

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (namespaces, mounts)")
needs_busybox = pytest.mark.skipif(not os.path.exists(BUSYBOX),
                                   reason="busybox-static is not installed")

DEFAULT_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
                "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_sealed_against_writes(fd: int) -> None:
    """`fd` (an O_PATH handle on a container process's /proc/PID/exe) reopens read-only as a
    write-sealed memfd and cannot be written through a writable reopen (CVE-2019-5736)."""
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    assert fcntl.fcntl(ro, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
    os.close(ro)
    try:
        w = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
    except OSError:
        return  # refused at open: fine as well
    try:
        with pytest.raises(PermissionError):
            os.write(w, b"#!/bin/sh\necho pwned\n")
    finally:
        os.close(w)


def base_config(args: list[str]) -> dict:
    """A config.json like `runc spec` writes, with docker's default capabilities."""
    caps = list(DEFAULT_CAPS)
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                    "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "bbtest",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                         "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys",
                            "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                            "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys",
                              "/proc/sysrq-trigger"],
        },
    }


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory) -> str:
    """A pristine busybox rootfs; tests copy it (see Bundle) before changing anything."""
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed")
    root = str(tmp_path_factory.mktemp("bbroot") / "rootfs")
    os.makedirs(os.path.join(root, "bin"))
    for d in ("proc", "sys", "dev", "etc", "tmp", "root"):
        os.makedirs(os.path.join(root, d))
    shutil.copy(BUSYBOX, os.path.join(root, "bin", "busybox"))
    names = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True,
                           check=True).stdout.split()
    for n in names:
        if n != "busybox":
            os.symlink("busybox", os.path.join(root, "bin", n))
    with open(os.path.join(root, "etc", "passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
    with open(os.path.join(root, "etc", "group"), "w") as f:
        f.write("root:x:0:\ntty:x:5:\nnogroup:x:65534:\n")
    os.chmod(os.path.join(root, "tmp"), 0o1777)
    return root


class Bundle:
    def __init__(self, path: str, config: dict) -> None:
        self.path = path
        self.config = config

    @property
    def rootfs(self) -> str:
        return os.path.join(self.path, "rootfs")

    def write(self) -> None:
        with open(os.path.join(self.path, "config.json"), "w") as f:
            json.dump(self.config, f)


class Runtime:
    """Drives the launcher CLI with its own --root; deletes leftovers at teardown."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.ids: list[str] = []

    def cmd(self, *args: str, check: bool = True, timeout: float = 30, **kw):
        # Files, not pipes: a created container keeps the launcher's stdio, so a pipe would
        # not see EOF until the container exits.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            rc = subprocess.run([*LAUNCHER, "--root", self.root, *args], stdout=out,
                                stderr=err, timeout=timeout, **kw).returncode
            out.seek(0)
            err.seek(0)
            p = subprocess.CompletedProcess(args, rc, out.read(), err.read())
        if check and p.returncode != 0:
            raise AssertionError(f"oci-launcher {' '.join(args)} -> {p.returncode}\n"
                                 f"stdout: {p.stdout}\nstderr: {p.stderr}")
        return p

    def new_id(self) -> str:
        cid = "t-" + uuid.uuid4().hex[:12]
        self.ids.append(cid)
        return cid

    def run(self, bundle: Bundle, check: bool = True, **kw):
        bundle.write()
        return self.cmd("run", "--bundle", bundle.path, self.new_id(), check=check, **kw)

    def create(self, bundle: Bundle, cid: str | None = None, *extra: str, check: bool = True,
               **kw):
        bundle.write()
        cid = cid or self.new_id()
        if cid not in self.ids:
            self.ids.append(cid)
        p = self.cmd("create", "--bundle", bundle.path, *extra, cid, check=check, **kw)
        return cid, p

    def state(self, cid: str) -> dict:
        return json.loads(self.cmd("state", cid).stdout)

    def cleanup(self) -> None:
        for cid in self.ids:
            if os.path.exists(os.path.join(self.root, cid)):
                self.cmd("delete", "--force", cid, check=False)


@pytest.fixture
def runtime(tmp_path):
    rt = Runtime(str(tmp_path / "state"))
    yield rt
    rt.cleanup()


@pytest.fixture
def make_bundle(tmp_path, busybox_rootfs):
    """make_bundle(args) -> Bundle with a private copy of the busybox rootfs."""
    n = [0]

    def make(args: list[str], config: dict | None = None) -> Bundle:
        n[0] += 1
        path = str(tmp_path / f"bundle{n[0]}")
        os.makedirs(path)
        shutil.copytree(busybox_rootfs, os.path.join(path, "rootfs"), symlinks=True)
        return Bundle(path, copy.deepcopy(config) if config else base_config(args))

    return make


@pytest.fixture(scope="session", autouse=True)
def _remove_default_cgroup_parent():
    """Containers without cgroupsPath land under /sandbox-agent/<id>; drop the (then empty)
    parent at the end. rmdir refuses a non-empty cgroup, so a parallel user is safe."""
    yield
    for d in ("/sys/fs/cgroup", "/sys/fs/cgroup/unified"):
        if not os.path.isdir(d):
            continue
        for ctl in os.listdir(d) if d == "/sys/fs/cgroup" else ["."]:
            try:
                os.rmdir(os.path.join(d, ctl, "sandbox-agent"))
            except OSError:
                pass
