"""agentctl's container commands against the real agent, as processes, like a person runs them."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
AGENTCTL = str(Path(sys.executable).parent / "agentctl")


@pytest.fixture(scope="module")
def env():
    if os.geteuid() != 0 or not os.path.exists("/bin/busybox"):
        pytest.skip("needs root and busybox-static")
    tmp = Path(tempfile.mkdtemp(prefix="sa-ctl-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    root = tmp / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for name in subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True).stdout.split():
        if name != "busybox":
            os.symlink("busybox", root / "bin" / name)
    for d in ("proc", "dev", "sys", "tmp", "etc"):
        (root / d).mkdir(exist_ok=True)
    sock = tmp / "agent.sock"
    agent = subprocess.Popen(["unshare", "--pid", "--fork", "--mount", "--propagation", "private", "--mount-proc",
                              sys.executable, "-m", "agent", "--server-addr", f"unix://{sock}",
                              "--run-dir", str(tmp / "run")], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=open(tmp / "agent.log", "wb"), start_new_session=True)
    addr = f"unix://{sock}"
    t0 = time.monotonic()
    while subprocess.run([AGENTCTL, "--server-addr", addr, "--timeout", "2", "check"], capture_output=True).returncode:
        assert agent.poll() is None and time.monotonic() - t0 < 30, (tmp / "agent.log").read_text()
        time.sleep(0.1)
    yield addr, str(root)
    os.killpg(agent.pid, 15)
    agent.wait(20)
    subprocess.run(["umount", "-R", "-l", str(tmp / "run")], capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


def ctl(addr, *args, input=None, timeout=60):
    return subprocess.run([AGENTCTL, "--server-addr", addr, *args], capture_output=True, text=True, input=input,
                          timeout=timeout)


def test_run_streams_output_and_passes_exit_code(env):
    addr, rootfs = env
    r = ctl(addr, "run", rootfs, "--", "sh", "-c", "echo to-out; echo to-err >&2; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout == "to-out\n" and "to-err" in r.stderr


def test_run_forwards_stdin(env):
    addr, rootfs = env
    r = ctl(addr, "run", "-i", rootfs, "--", "sh", "-c", "tr a-z A-Z", input="shout this\n")
    assert r.returncode == 0 and r.stdout == "SHOUT THIS\n"


def test_detached_exec_kill_wait_rm(env):
    addr, rootfs = env
    r = ctl(addr, "run", "-d", "--id", "bg", rootfs, "--", "sleep", "1000")
    assert r.returncode == 0 and r.stdout.strip() == "bg"
    r = ctl(addr, "exec", "bg", "--", "sh", "-c", "echo inside; exit 4")
    assert r.returncode == 4 and r.stdout == "inside\n"
    r = ctl(addr, "stats", "bg")
    assert r.returncode == 0 and "cgroup_stats" in r.stdout
    assert ctl(addr, "kill", "bg", "KILL").returncode == 0
    r = ctl(addr, "wait", "bg")
    assert r.stdout.strip() == "137"
    assert ctl(addr, "rm", "bg").returncode == 0
    r = ctl(addr, "wait", "bg")
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr


def test_metrics_are_prometheus_text(env):
    addr, _ = env
    r = ctl(addr, "metrics")
    assert r.returncode == 0
    assert "# TYPE sandbox_agent_process_resident_memory_bytes gauge" in r.stdout


def test_tty_session(env):
    """-t: the local terminal is put in raw mode and bytes go both ways through a pty."""
    addr, rootfs = env
    pid, master = pty.fork()
    if pid == 0:
        os.execv(AGENTCTL, [AGENTCTL, "--server-addr", addr, "run", "-t", rootfs, "--", "sh"])
    out = b""

    def read_until(token: bytes, limit: float = 30) -> None:
        nonlocal out
        end = time.monotonic() + limit
        while token not in out:
            assert time.monotonic() < end, out
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    out += os.read(master, 4096)
                except OSError:
                    return

    read_until(b"#")
    time.sleep(0.5)
    if b"\x1b[6n" in out:  # ash asks the terminal where the cursor is; answer like a terminal
        os.write(master, b"\x1b[1;3R")
        time.sleep(0.2)
    os.write(master, b"tty; echo mark-$((6*7))\r")
    read_until(b"mark-42")
    assert b"/dev/pts/" in out
    os.write(master, b"exit 3\r")
    _, status = os.waitpid(pid, 0)
    os.close(master)
    assert os.waitstatus_to_exitcode(status) == 3
