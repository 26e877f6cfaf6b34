"""Harness: init as PID 1 of a fresh pid + mount namespace (``unshare``), in subreaper mode,
running the dummy daemon and real runc containers from a busybox bundle."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CG_PARENT = "sandbox-agent-init-test"


def need_root():
    if os.geteuid() != 0:
        pytest.skip("init tests need root (namespaces, runc, mounts)")
    for tool in ("unshare", "runc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")


class Agent:
    """One init under test, with the helpers tests drive it by."""

    def __init__(self, base: str, daemon_prefix: str = "", extra: list[str] | None = None,
                 unshare: list[str] | None = None, log_socket: bool = False,
                 runtime: str = "runc"):
        self.base = base
        self.run_dir = os.path.join(base, "run")
        os.makedirs(self.run_dir, exist_ok=True)
        self.sock = os.path.join(self.run_dir, "agent.sock")
        self.log_path = os.path.join(base, "init.log")
        daemon = f"{sys.executable} {os.path.join(HERE, 'dummy_daemon.py')}"
        if daemon_prefix:
            daemon = f"{daemon_prefix} {daemon}"
        cmd = ["unshare"] + (unshare or []) + [
               "--pid", "--fork", "--mount", "--propagation", "private",
               "--mount-proc", sys.executable, "-m", "agent.init", "--subreaper",
               "--server-addr", f"unix://{self.sock}", "--run-dir", self.run_dir,
               "--runtime", runtime, "--daemon-cmd", daemon] + (extra or [])
        self.log_socket = os.path.join(base, "log.sock") if log_socket else None
        if self.log_socket:
            cmd += ["--log-addr", f"unix://{self.log_socket}"]
        self.runtime = runtime
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=os.path.dirname(HERE))
        self.hello: dict = {}  # filled by the factory once the daemon answers

    # -- talking to the dummy daemon ------------------------------------------------------
    def request(self, req: dict, fds=(), timeout: float = 20) -> tuple[dict, list[int]]:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(self.sock)
            line = json.dumps(req).encode() + b"\n"
            sent = socket.send_fds(s, [line], list(fds)) if fds else 0
            if sent < len(line):
                s.sendall(line[sent:])  # a stream sendmsg may be partial
            data, got = b"", []
            while not data.endswith(b"\n"):
                chunk, fds_in, _, _ = socket.recv_fds(s, 1 << 20, 8)
                got += fds_in
                if not chunk:
                    raise ConnectionError(f"daemon closed the connection; init log:\n"
                                          f"{self.read_log()[-3000:]}")
                data += chunk
            return json.loads(data), got
        finally:
            s.close()

    def call(self, op: str, args: dict | None = None, fds=()) -> dict:
        rep, got = self.request({"cmd": "call", "op": op, "args": args or {}}, fds)
        for fd in got:
            os.close(fd)
        return rep

    def call_ok(self, op: str, args: dict | None = None, fds=()) -> dict:
        rep = self.call(op, args, fds)
        assert rep["ok"], rep
        return rep["result"]

    def wait_hello(self, not_pid: int | None = None, timeout: float = 20) -> dict:
        end = time.monotonic() + timeout
        last = None
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"init exited {self.proc.returncode}:\n{self.read_log()}")
            try:
                rep, _ = self.request({"cmd": "hello"}, timeout=2)
                if not_pid is None or rep["pid"] != not_pid:
                    return rep
            except (OSError, ConnectionError, ValueError) as e:
                last = e
            time.sleep(0.05)
        raise TimeoutError(f"daemon did not answer: {last}\n{self.read_log()[-3000:]}")

    def events(self) -> list[dict]:
        return self.request({"cmd": "events"})[0]["events"]

    def wait_event(self, pred, timeout: float = 15) -> dict:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            for ev in self.events():
                if pred(ev):
                    return ev
            time.sleep(0.05)
        raise TimeoutError(f"no such event; have {self.events()}")

    def read_log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    # -- bundles -----------------------------------------------------------------------------
    def rootfs(self) -> str:
        root = os.path.join(self.run_dir, "rootfs")
        if not os.path.isdir(root):
            os.makedirs(os.path.join(root, "bin"))
            for d in ("proc", "dev", "sys", "tmp"):
                os.makedirs(os.path.join(root, d))
            shutil.copy("/bin/busybox", os.path.join(root, "bin", "busybox"))
            for tool in ("sh", "sleep", "cat", "echo", "true", "read", "ps", "tty"):
                os.symlink("busybox", os.path.join(root, "bin", tool))
        return root

    def process_spec(self, args: list[str], terminal: bool = False) -> dict:
        return {"terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args,
                "env": ["PATH=/bin", "TERM=xterm"], "cwd": "/", "noNewPrivileges": True,
                "capabilities": {k: ["CAP_KILL"] for k in
                                 ("bounding", "effective", "permitted")}}

    def bundle(self, cid: str, args: list[str], terminal: bool = False) -> str:
        b = os.path.join(self.run_dir, "bundles", cid)
        os.makedirs(b, exist_ok=True)
        spec = {
            "ociVersion": "1.0.2",
            "process": self.process_spec(args, terminal),
            "root": {"path": self.rootfs(), "readonly": True},
            "hostname": cid[:60],
            "mounts": [
                {"destination": "/proc", "type": "proc", "source": "proc"},
                {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "strictatime", "mode=755", "size=1m"]},
                {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                 "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666",
                             "mode=0620"]},
                {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs",
                 "options": ["nosuid", "nodev", "size=1m"]},
            ],
            "linux": {
                "cgroupsPath": f"/{CG_PARENT}/{os.path.basename(self.base)}-{cid}",
                "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
                "maskedPaths": ["/proc/kcore"], "readonlyPaths": ["/proc/sys"],
            },
        }
        with open(os.path.join(b, "config.json"), "w") as f:
            json.dump(spec, f)
        return b

    def process_file(self, name: str, args: list[str], terminal: bool = False) -> str:
        d = os.path.join(self.run_dir, "processes")
        os.makedirs(d, exist_ok=True)
        p = os.path.join(d, name + ".json")
        with open(p, "w") as f:
            json.dump(self.process_spec(args, terminal), f)
        return p

    def launch(self, cid: str, args: list[str], stdio=("stdout",)) -> tuple[int, dict]:
        """Create + start a container; returns (pid, {name: our end of each pipe})."""
        ends, theirs = {}, []
        for name in ("stdin", "stdout", "stderr"):
            if name in stdio:
                r, w = os.pipe()
                if name == "stdin":
                    ends[name], child = w, r
                else:
                    ends[name], child = r, w
                theirs.append(child)
        try:
            res = self.call_ok("launch", {"container_id": cid,
                                          "bundle": self.bundle(cid, args),
                                          "stdio": {n: True for n in stdio}}, theirs)
        finally:
            for fd in theirs:
                os.close(fd)
        self.call_ok("start", {"container_id": cid})
        return res["pid"], ends

    def _children(self) -> list[int]:
        out = []
        for d in os.listdir("/proc"):
            if d.isdigit():
                try:
                    with open(f"/proc/{d}/stat") as f:
                        raw = f.read()
                except OSError:
                    continue
                if int(raw[raw.rindex(")") + 2:].split()[1]) == self.proc.pid:
                    out.append(int(d))
        return out

    @staticmethod
    def read_all(fd: int, timeout: float = 10) -> bytes:
        import select
        out = b""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            r, _, _ = select.select([fd], [], [], 0.2)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    return out
                out += chunk
        raise TimeoutError(f"no EOF after {timeout}s; got {out!r}")

    # -- teardown ----------------------------------------------------------------------------
    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.call("shutdown")
            except (OSError, ConnectionError, ValueError, AssertionError):
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                # unshare does not pass signals on: stop init itself, then unshare
                for pid in self._children():
                    try:
                        os.kill(pid, signal.SIGTERM)
                    except OSError:
                        pass
                try:
                    self.proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        self.log.close()
        state = os.path.join(self.run_dir, ".oci-state", "root")
        if os.path.isdir(state):
            rt = ["runc"] if self.runtime == "runc" else \
                [sys.executable, "-m", "agent.oci_launcher"]
            for cid in os.listdir(state):
                subprocess.run(rt + ["--root", state, "delete", "--force", cid],
                               capture_output=True, cwd=os.path.dirname(HERE))
        for ctrl in os.listdir("/sys/fs/cgroup"):
            parent = os.path.join("/sys/fs/cgroup", ctrl, CG_PARENT)
            if os.path.isdir(parent):
                for d in os.listdir(parent):
                    if d.startswith(os.path.basename(self.base)):
                        try:
                            os.rmdir(os.path.join(parent, d))
                        except OSError:
                            pass
                try:
                    os.rmdir(parent)
                except OSError:
                    pass


@pytest.fixture
def agent_factory():
    need_root()
    made: list[Agent] = []
    bases: list[str] = []

    def make(**kw) -> Agent:
        base = tempfile.mkdtemp(prefix="initest-", dir="/tmp")
        os.chmod(base, 0o755)
        bases.append(base)
        a = Agent(base, **kw)
        made.append(a)  # before waiting: an agent that never answers is still stopped
        a.hello = a.wait_hello()
        return a

    yield make
    for a in made:
        a.stop()
    for b in bases:
        shutil.rmtree(b, ignore_errors=True)


@pytest.fixture
def agent(agent_factory):
    return agent_factory()
