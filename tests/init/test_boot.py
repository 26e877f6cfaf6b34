"""PID 1's boot work, in throwaway namespaces: the pseudo file system mounts, module loading
errors, and the power-off path (reboot(2) in a child pid namespace kills its init with
SIGINT instead of stopping the machine)."""
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts and reboot(2) need root")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_in_ns(code: str, *unshare_flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(["unshare", "--mount", "--propagation", "private", *unshare_flags,
                           sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


def test_boot_mounts_in_a_private_mount_namespace(tmp_path):
    code = f"""
import io, json
from agent.init import boot_mounts
from agent.observe import JsonLogger
buf = io.StringIO()
done = boot_mounts(JsonLogger("init", "debug", stream=buf), root={str(tmp_path)!r})
again = boot_mounts(JsonLogger("init", "debug", stream=buf), root={str(tmp_path)!r})
mounts = {{}}
for line in open("/proc/self/mountinfo"):
    f = line.split()
    sep = f.index("-")
    mounts[f[4]] = (f[sep + 1], f[5], f[sep + 3])
print(json.dumps({{"done": done, "again": again, "mounts": mounts, "log": buf.getvalue()}}))
"""
    # its own cgroup namespace: a cgroup2 mount in the initial one applies its options
    # (favordynmods) to the host's whole cgroup2 hierarchy
    p = run_in_ns(code, "--cgroup")
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    m = out["mounts"]
    want = {"proc": "proc", "sys": "sysfs", "dev": "devtmpfs", "dev/pts": "devpts",
            "dev/shm": "tmpfs", "run": "tmpfs", "sys/fs/cgroup": "cgroup2"}
    for rel, fstype in want.items():
        path = str(tmp_path / rel)
        assert path in m and m[path][0] == fstype, (rel, m.get(path))
    assert "nosuid" in m[str(tmp_path / "proc")][1] and "noexec" in m[str(tmp_path / "proc")][1]
    assert "mode=755" in m[str(tmp_path / "run")][2]  # (1777, /dev/shm's, is the default)
    assert len(out["done"]) == len(want)
    assert out["again"] == []  # already mounted: left alone, not stacked
    assert all(json.loads(x)["level"] != "error" for x in out["log"].splitlines()), out["log"]
    # nothing of it is visible outside the namespace
    with open("/proc/self/mountinfo") as f:
        assert str(tmp_path) not in f.read()


def test_an_optional_mount_option_the_kernel_refuses_is_dropped(tmp_path, monkeypatch):
    """Kernels before 6.0 answer EINVAL to cgroup2's favordynmods: the mount is retried
    without it. The refusal is injected (this kernel knows the option); no mount happens."""
    import errno
    import io

    from agent import init
    from agent.observe import JsonLogger

    calls = []

    def fake_mount(source, target, fstype, flags, data):
        calls.append((fstype, data))
        if data == "favordynmods":
            raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(init.sysc, "mount", fake_mount)
    buf = io.StringIO()
    cg = [m for m in init.BOOT_MOUNTS if m[2] == "cgroup2"]
    done = init.boot_mounts(JsonLogger("init", "debug", stream=buf), mounts=cg,
                            root=str(tmp_path))
    assert calls == [("cgroup2", "favordynmods"), ("cgroup2", None)]
    assert done == [str(tmp_path / "sys/fs/cgroup")]
    assert "mount option refused" in buf.getvalue() and '"level": "error"' not in buf.getvalue()
    # any other refusal is an error, not retried
    calls.clear()
    monkeypatch.setattr(init.sysc, "mount", lambda *a: (calls.append(a[4]),
                                                         (_ for _ in ()).throw(OSError(errno.EPERM, "no"))))
    buf = io.StringIO()
    assert init.boot_mounts(JsonLogger("init", "debug", stream=buf), mounts=cg,
                            root=str(tmp_path)) == []
    assert calls == ["favordynmods"] and "boot mount failed" in buf.getvalue()


def test_module_load_failures_are_logged_not_fatal(tmp_path):
    junk = tmp_path / "junk.ko"
    junk.write_bytes(b"\x7fELF not really a module")
    code = f"""
import io
from agent.init import load_modules
from agent.observe import JsonLogger
buf = io.StringIO()
load_modules(("/nonexistent/x.ko", {str(junk)!r}), JsonLogger("init", "debug", stream=buf))
print(buf.getvalue())
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    recs = [json.loads(x) for x in p.stdout.splitlines() if x]
    assert [(r["level"], r["msg"]) for r in recs] == [
        ("warn", "kernel module not present"), ("error", "kernel module failed to load")]
    assert recs[1]["fields"]["path"] == str(junk)


def test_power_off_as_pid_1_of_a_pid_namespace():
    code = """
import os
from agent.init import _power_off
assert os.getpid() == 1
_power_off()
print("still here")
"""
    p = run_in_ns(code, "--pid", "--fork")
    assert "still here" not in p.stdout
    # unshare passes the death by SIGINT on (re-raised on itself, or as 128 + 2)
    assert p.returncode in (-2, 128 + 2), (p.returncode, p.stderr)
