"""The agent as a user runs it: `python -m agent.init` (init as a subreaper, the confined
daemon under it) in its own pid and mount namespace, driven only over ttRPC."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUSYBOX = "/bin/busybox"
# The OCI runtime init drives; ours unless a run asks for another (e.g. runc, to compare).
RUNTIME = os.environ.get("SANDBOX_AGENT_TEST_RUNTIME", "oci-launcher")


def _need_root():
    if os.geteuid() != 0:
        pytest.skip("needs root: namespaces, mounts, cgroups")
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed")


@pytest.fixture(scope="session")
def rootfs(tmp_path_factory) -> str:
    """A busybox root filesystem, symlinks relative so they resolve inside the container."""
    _need_root()
    root = tmp_path_factory.mktemp("bb") / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    out = subprocess.run([BUSYBOX, "--list"], capture_output=True, text=True, check=True).stdout.split()
    for name in out:
        if name != "busybox":
            os.symlink("busybox", root / "bin" / name)
    for d in ("proc", "sys", "dev", "tmp", "etc"):
        (root / d).mkdir(exist_ok=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    return str(root)


class Agent:
    def __init__(self, tmp: Path, netns: str = "", runtime: str = "",
                 extra: tuple[str, ...] = ()) -> None:
        self.netns = netns
        self.extra = list(extra)
        self.runtime = runtime or RUNTIME
        self.run_dir = tmp / "run"
        self.sock = tmp / "agent.sock"
        self.addr = f"unix://{self.sock}"
        self.log = tmp / "agent.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        argv = (["ip", "netns", "exec", self.netns] if self.netns else []) + ["unshare", "--pid", "--fork", "--mount", "--propagation", "private", "--mount-proc",
                sys.executable, "-m", "agent.init", "--subreaper", "--server-addr", self.addr,
                "--run-dir", str(self.run_dir), "--runtime", self.runtime, "--log-level", "debug"] + self.extra
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        t0 = time.monotonic()
        while not self.sock.exists():
            if self.proc.poll() is not None or time.monotonic() - t0 > 30:
                raise RuntimeError(f"agent did not start:\n{self.log.read_text()[-4000:]}")
            time.sleep(0.05)
        self.wait_serving()

    def wait_serving(self, timeout: float = 30) -> None:
        """Until the daemon answers Check: it confines itself before serving, so after this
        the daemon is the confined one."""
        import trio

        from agent.protos import health_pb2
        from agent.ttrpc import open_client

        async def check():
            with trio.fail_after(timeout):
                while True:
                    try:
                        async with open_client(self.addr) as c:
                            await c.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                                         health_pb2.HealthCheckResponse, timeout=5)
                            return
                    except Exception:  # noqa: BLE001 - not serving yet
                        await trio.sleep(0.05)
        trio.run(check)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait(10)
        self.proc = None

    def pids(self) -> dict[str, int]:
        """Host pids of init and the daemon: init is unshare's child, the daemon init's."""
        out = subprocess.run(["ps", "-ww", "-e", "-o", "pid=,ppid=,args="], capture_output=True, text=True).stdout
        rows = [line.split(None, 2) for line in out.splitlines()]
        top = self.proc.pid
        if self.netns:  # ip netns exec execs unshare in place: same pid
            pass
        init = next(int(p) for p, pp, a in rows if int(pp) == top and "agent.init" in a)
        daemon = next(int(p) for p, pp, a in rows if int(pp) == init and "agent.daemon" in a)
        return {"init": init, "daemon": daemon}

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


@pytest.fixture
def agent():
    _need_root()
    # Not under pytest's tmp_path: that is root-only (0700) and the daemon runs as nobody.
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="sa-agent-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    a = Agent(tmp)
    a.start()
    yield a
    a.stop()
    subprocess.run(["umount", "-R", "-l", str(tmp / "run")], capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


def spec(rootfs: str, args: list[str], *, terminal: bool = False, memory_limit: int = 0,
         cgroups_path: str = "", netns: bool = True) -> dict:
    """An OCI config (JSON object) for a busybox container."""
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_KILL", "CAP_SETUID", "CAP_SETGID",
            "CAP_NET_BIND_SERVICE"]
    cfg = {
        "ociVersion": "1.0.2",
        "process": {"terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args,
                    "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/",
                    "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                    "noNewPrivileges": True},
        "root": {"path": rootfs, "readonly": True},
        "hostname": "ctr",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev"]},
        ],
        "linux": {"namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount") + (("network",) if netns else ())]},
    }
    if memory_limit:
        cfg["linux"]["resources"] = {"memory": {"limit": memory_limit, "swap": memory_limit}}
    if cgroups_path:
        cfg["linux"]["cgroupsPath"] = cgroups_path
    return cfg
