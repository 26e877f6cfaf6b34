"""Container commands of agentctl, for a person at a terminal: output streamed live, stdin
forwarded, the process's exit code passed through, -t for a terminal."""

from __future__ import annotations

import json
import os
import secrets
import signal
import sys
from dataclasses import dataclass, field

import trio

from agent import specconv
from agent.protos import agent_pb2, health_pb2, oci_pb2
from agent.ttrpc import Client, Code, TTRPCError, open_client

SVC = "grpc.AgentService"
Empty = __import__("google.protobuf.empty_pb2", fromlist=["Empty"]).Empty
READ_CHUNK = 1 << 20

DEFAULT_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"]


def default_spec(rootfs: str, args: list[str], *, terminal: bool, env: list[str], cwd: str = "/") -> oci_pb2.Spec:
    """A runc-like default container: own namespaces, /proc /dev /sys, default capabilities."""
    caps = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
            "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
            "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"]
    cfg = {
        "ociVersion": "1.0.2",
        "process": {"terminal": terminal, "user": {"uid": 0, "gid": 0}, "args": args, "env": env, "cwd": cwd,
                    "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                    "noNewPrivileges": True},
        "root": {"path": rootfs, "readonly": False},
        "hostname": "sandbox",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "network", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
                            "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi", "/sys/firmware"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }
    return specconv.spec_from_oci(cfg)


@dataclass
class RunOptions:
    target: str
    args: list[str] = field(default_factory=list)
    container_id: str = ""
    tty: bool = False
    interactive: bool = False
    env: list[str] = field(default_factory=list)
    cwd: str = ""
    keep: bool = False
    detach: bool = False
    lazy: bool = False
    insecure_registries: list[str] = field(default_factory=list)
    creds: str = ""
    timeout: float = 60.0


async def _pull(c: Client, image: str, cid: str, o: RunOptions) -> agent_pb2.PullImageResponse:
    req = agent_pb2.PullImageRequest(image=image, container_id=cid, source_creds=o.creds, lazy=o.lazy,
                                     insecure_registries=o.insecure_registries)
    return await c.call(SVC, "PullImage", req, agent_pb2.PullImageResponse, timeout=max(o.timeout, 600))


async def build_create_request(c: Client, o: RunOptions, cid: str) -> agent_pb2.CreateContainerRequest:
    target = o.target
    if os.path.isfile(os.path.join(target, "config.json")):
        with open(os.path.join(target, "config.json")) as f:
            cfg = json.load(f)
        root = cfg.setdefault("root", {}).get("path", "rootfs")
        cfg["root"]["path"] = root if root.startswith("/") else os.path.abspath(os.path.join(target, root))
        spec = specconv.spec_from_oci(cfg)
        if o.args:
            del spec.Process.Args[:]
            spec.Process.Args.extend(o.args)
        spec.Process.Terminal = o.tty or spec.Process.Terminal
        spec.Process.Env.extend(o.env)
        if o.cwd:
            spec.Process.Cwd = o.cwd
    elif os.path.isdir(target):
        if not o.args:
            raise ValueError(f"{target}: a rootfs directory needs a command after --")
        spec = default_spec(os.path.abspath(target), o.args, terminal=o.tty, env=DEFAULT_ENV + o.env, cwd=o.cwd or "/")
    else:
        pulled = await _pull(c, target, cid, o)
        if not pulled.rootfs:
            raise TTRPCError(Code.INTERNAL, f"pull of {target} returned no rootfs")
        image_cfg = json.loads(pulled.runtime_config_json or "{}")
        proc = image_cfg.get("process", {})
        args = o.args or proc.get("args") or ["/bin/sh"]
        env = list(proc.get("env") or DEFAULT_ENV) + o.env
        spec = default_spec(pulled.rootfs, args, terminal=o.tty, env=env, cwd=o.cwd or proc.get("cwd") or "/")
        user = proc.get("user") or {}
        spec.Process.User.UID = int(user.get("uid", 0))
        spec.Process.User.GID = int(user.get("gid", 0))
        spec.Process.User.AdditionalGids.extend(int(g) for g in user.get("additionalGids", []) or [])
        spec.Annotations.update(image_cfg.get("annotations", {}) or {})
        spec.Annotations["io.sandbox-agent.image"] = target
        spec.Annotations["io.sandbox-agent.image-digest"] = pulled.manifest_digest
    return agent_pb2.CreateContainerRequest(container_id=cid, OCI=spec)


async def stream_output(c: Client, cid: str, exec_id: str, method: str, out) -> None:
    """Copy a process's stdout or stderr to our own until EOF (an empty read)."""
    req = agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=READ_CHUNK)
    while True:
        try:
            r = await c.call(SVC, method, req, agent_pb2.ReadStreamResponse)
        except TTRPCError as exc:
            if exc.code in (Code.NOT_FOUND, Code.UNAVAILABLE):
                return
            raise
        if not r.data:
            return
        out.write(r.data)
        out.flush()


async def forward_stdin(c: Client, cid: str, exec_id: str, tty: bool) -> None:
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                data = os.read(fd, 65536)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(fd)
                continue
            if not data:
                break
            await c.call(SVC, "WriteStdin", agent_pb2.WriteStreamRequest(container_id=cid, exec_id=exec_id, data=data),
                         agent_pb2.WriteStreamResponse)
        if not tty:
            await c.call(SVC, "CloseStdin", agent_pb2.CloseStdinRequest(container_id=cid, exec_id=exec_id), Empty)
    except TTRPCError:
        pass  # the process is gone or closed its stdin: nothing more to forward
    finally:
        os.set_blocking(fd, True)


async def resize_on_winch(c: Client, cid: str, exec_id: str) -> None:
    import shutil

    async def send():
        size = shutil.get_terminal_size()
        try:
            await c.call(SVC, "TtyWinResize", agent_pb2.TtyWinResizeRequest(
                container_id=cid, exec_id=exec_id, row=size.lines, column=size.columns), Empty)
        except TTRPCError:
            pass

    await send()
    with trio.open_signal_receiver(signal.SIGWINCH) as sigs:
        async for _ in sigs:
            await send()


class _RawTerminal:
    def __enter__(self):
        import termios
        import tty

        self.fd = sys.stdin.fileno()
        self.saved = termios.tcgetattr(self.fd) if os.isatty(self.fd) else None
        if self.saved is not None:
            tty.setraw(self.fd)
        return self

    def __exit__(self, *exc):
        import termios

        if self.saved is not None:
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)


async def attach(c: Client, cid: str, exec_id: str, *, tty: bool, interactive: bool) -> int:
    """Stream a started process's stdio until it exits; return its exit code."""
    code = 0
    async with trio.open_nursery() as n:
        n.start_soon(stream_output, c, cid, exec_id, "ReadStdout", sys.stdout.buffer)
        if not tty:
            n.start_soon(stream_output, c, cid, exec_id, "ReadStderr", sys.stderr.buffer)
        aux = trio.CancelScope()

        async def aux_tasks():
            with aux:
                async with trio.open_nursery() as an:
                    if interactive:
                        an.start_soon(forward_stdin, c, cid, exec_id, tty)
                    if tty and os.isatty(sys.stdin.fileno()):
                        an.start_soon(resize_on_winch, c, cid, exec_id)
        n.start_soon(aux_tasks)
        r = await c.call(SVC, "WaitProcess", agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id),
                         agent_pb2.WaitProcessResponse)
        code = r.status
        aux.cancel()  # the output readers finish by themselves at EOF
    return code


async def run(addr: str, o: RunOptions) -> int:
    cid = o.container_id or "ctr-" + secrets.token_hex(6)
    async with open_client(addr) as c:
        req = await build_create_request(c, o, cid)
        await c.call(SVC, "CreateContainer", req, Empty, timeout=o.timeout)
        try:
            await c.call(SVC, "StartContainer", agent_pb2.StartContainerRequest(container_id=cid), Empty, timeout=o.timeout)
            if o.detach:
                print(cid)
                return 0
            if o.tty:
                with _RawTerminal():
                    return await attach(c, cid, "", tty=True, interactive=True)
            return await attach(c, cid, "", tty=False, interactive=o.interactive)
        finally:
            if not o.keep and not o.detach:
                with trio.CancelScope(shield=True):
                    try:
                        await c.call(SVC, "RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid, timeout=10),
                                     Empty, timeout=30)
                    except TTRPCError as exc:
                        print(f"agentctl: removing {cid}: {exc}", file=sys.stderr)


async def exec_(addr: str, cid: str, args: list[str], *, tty: bool, interactive: bool, env: list[str], cwd: str,
                exec_id: str = "") -> int:
    exec_id = exec_id or "exec-" + secrets.token_hex(6)
    proc = oci_pb2.Process(Terminal=tty, Args=args, Env=DEFAULT_ENV + env, Cwd=cwd or "/")
    async with open_client(addr) as c:
        await c.call(SVC, "ExecProcess", agent_pb2.ExecProcessRequest(container_id=cid, exec_id=exec_id, process=proc),
                     Empty, timeout=60)
        if tty:
            with _RawTerminal():
                return await attach(c, cid, exec_id, tty=True, interactive=True)
        return await attach(c, cid, exec_id, tty=False, interactive=interactive)


async def logs(addr: str, cid: str, exec_id: str) -> int:
    async with open_client(addr) as c:
        async with trio.open_nursery() as n:
            n.start_soon(stream_output, c, cid, exec_id, "ReadStdout", sys.stdout.buffer)
            n.start_soon(stream_output, c, cid, exec_id, "ReadStderr", sys.stderr.buffer)
    return 0


async def wait(addr: str, cid: str, exec_id: str) -> int:
    async with open_client(addr) as c:
        r = await c.call(SVC, "WaitProcess", agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id),
                         agent_pb2.WaitProcessResponse)
    print(r.status)
    return r.status


async def simple(addr: str, method: str, request, response_cls=Empty, timeout: float | None = 60):
    async with open_client(addr) as c:
        return await c.call(SVC, method, request, response_cls, timeout=timeout)


def parse_signal(text: str) -> int:
    if text.isdigit():
        return int(text)
    name = text.upper()
    if not name.startswith("SIG"):
        name = "SIG" + name
    try:
        return int(signal.Signals[name])
    except KeyError:
        raise ValueError(f"unknown signal {text!r}") from None
