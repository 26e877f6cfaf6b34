"""grpc.AgentService: the container lifecycle over the Kata agent API.

The daemon validates each request, keeps the host-facing stdio ends and exit codes, and
asks init (agent.privsep) for everything that needs privilege: launching and starting a
container through the OCI runtime, exec, signals, mounts, network changes. Errors carry the
gRPC code a Kata runtime expects (NOT_FOUND for an unknown container or exec,
INVALID_ARGUMENT for a malformed id, ALREADY_EXISTS, FAILED_PRECONDITION) and say what
was wrong.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import signal as signal_mod
import shutil
import stat as st
import sys

import trio
from google.protobuf import empty_pb2, json_format

from agent import __version__, observe
from agent.launcher.cgroups import open_cgroup
from agent.privsep.client import InitClient, InitError, InitGone
from agent.protos import agent_pb2, types_pb2
from agent.ttrpc import CallContext, Code, TTRPCError
from agent.ttrpc.server import Encoded, bytes_field

from agent import specconv
from . import deferred
from .state import Container, Process, Sandbox, Status
from .stdio import Stream, StreamClosed, make_pipe, set_winsize

log = logging.getLogger("agent.daemon")

ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}\Z")
EMPTY = empty_pb2.Empty
# ReadStreamResponse's one field, `bytes data = 1` (a test holds it to the descriptor)
READ_STREAM_DATA = 1
STORAGE_DRIVERS = ("local", "ephemeral", "bind", "virtio-fs", "virtiofs", "blk", "virtio-blk", "scsi", "9p",
                   "image_guest_pull")


def _bad(msg: str) -> TTRPCError:
    return TTRPCError(Code.INVALID_ARGUMENT, msg)


def check_id(what: str, value: str, *, allow_empty: bool = False) -> str:
    if allow_empty and value == "":
        return value
    if not ID_RE.match(value):
        raise _bad(f"{what} {value[:80]!r} is not valid: 1-128 characters of [A-Za-z0-9_.+-], "
                   "starting with a letter or digit")
    return value


def _init_error(exc: Exception, what: str) -> TTRPCError:
    if isinstance(exc, InitGone):
        return TTRPCError(Code.UNAVAILABLE, f"{what}: init is not reachable: {exc}")
    if isinstance(exc, InitError):
        code = Code.INVALID_ARGUMENT if exc.field else Code.INTERNAL
        return TTRPCError(code, f"{what}: {exc}")
    return TTRPCError(Code.INTERNAL, f"{what}: {exc}")


class AgentService:
    SERVICE = "grpc.AgentService"

    def __init__(self, init: InitClient, run_dir: str, *, pipe_size: int = 0,
                 events: observe.EventRecord | None = None) -> None:
        self.init = init
        self.run_dir = run_dir
        self.pipe_size = pipe_size
        self.sb = Sandbox()
        self.events = events or observe.EventRecord()
        self._early_exits: dict[int, int] = {}
        self._oom_send, self._oom_recv = trio.open_memory_channel(math.inf)
        self._destroying = False
        self._snapshots: dict[str, str] = {}  # container id -> rootfs made by PullImage
        os.makedirs(self.containers_dir, exist_ok=True)

    @property
    def containers_dir(self) -> str:
        return os.path.join(self.run_dir, "containers")

    # ---- background tasks ---------------------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Rebuild state from init's table, then follow its events and watch for OOM kills."""
        await self.restore()
        async with trio.open_nursery() as n:
            n.start_soon(self._follow_events)
            n.start_soon(self._watch_oom)
            task_status.started()

    async def restore(self) -> None:
        """After a daemon restart: containers and processes init knows, with their statuses."""
        try:
            rep = await self.init.call("table")
        except (InitError, InitGone) as exc:
            log.warning("cannot read init's process table: %s", exc)
            return
        table = rep.result
        # the stdio ends init kept for us, two processes per request (fds per packet are capped)
        kept: dict[str, dict[str, int]] = {}
        fds: list[int] = []
        pids = [p for p in table.get("kept", []) if isinstance(p, int)]
        for i in range(0, len(pids), 2):
            try:
                part = await self.init.call("kept", {"pids": pids[i:i + 2]})
            except (InitError, InitGone) as exc:
                log.warning("cannot take back stdio of %s: %s", pids[i:i + 2], exc)
                continue
            for pid, roles in part.result.get("stdio", {}).items():
                kept[pid] = {role: len(fds) + idx for role, idx in roles.items()}
            fds.extend(part.fds)
        for c in table.get("containers", []):
            cid = c["container_id"]
            if cid in self.sb.containers:
                continue
            init_proc = Process(cid, "", c.get("pid") or 0)
            bundle = c["bundle"]
            cont = Container(cid, bundle, self._cgroups_path_of(bundle, cid), init_proc,
                             Status.RUNNING if c.get("started") else Status.CREATED)
            self.sb.containers[cid] = cont
            if init_proc.pid:
                self.sb.by_pid[init_proc.pid] = init_proc
        for p in table.get("processes", []):
            cont = self.sb.containers.get(p["container_id"])
            if cont is None:
                continue
            proc = cont.process(p["exec_id"])
            if proc is None:
                proc = Process(cont.container_id, p["exec_id"], p["pid"])
                cont.execs[p["exec_id"]] = proc
            proc.pid = p["pid"]
            self.sb.by_pid[proc.pid] = proc
            for role, idx in kept.get(str(proc.pid), {}).items():
                if role in ("stdin", "stdout", "stderr", "tty") and 0 <= idx < len(fds) and fds[idx] >= 0:
                    setattr(proc, role, Stream(fds[idx], tty=role == "tty"))
                    fds[idx] = -1
            if p.get("exited"):
                self._exited(proc, p["exit_code"])
        for fd in fds:  # ends of processes we no longer track
            if fd >= 0:
                os.close(fd)
        if table.get("containers"):
            log.info("restored %d containers from init", len(table["containers"]))

    def _cgroups_path_of(self, bundle: str, cid: str) -> str:
        try:
            with open(os.path.join(bundle, "config.json")) as f:
                return json.load(f).get("linux", {}).get("cgroupsPath") or f"/sandbox-agent/{cid}"
        except (OSError, ValueError):
            return f"/sandbox-agent/{cid}"

    async def _follow_events(self) -> None:
        async for ev in self.init.events:
            if ev.get("ev") == "exit":
                pid, code = ev.get("pid"), ev.get("exit_code")
                proc = self.sb.by_pid.get(pid)
                if proc is None:
                    self._early_exits[pid] = code
                else:
                    self._exited(proc, code)
            elif ev.get("ev") == "error":
                log.warning("init reports: %s", ev.get("msg"))

    def _exited(self, proc: Process, code: int) -> None:
        if proc.exited.is_set():
            return
        proc.set_exit(code)
        cont = self.sb.containers.get(proc.container_id)
        if cont is not None and proc is cont.init:
            cont.status = Status.STOPPED
        self.events.record("exited", proc.container_id, exec_id=proc.exec_id, pid=proc.pid, exit_code=code)

    async def _watch_oom(self) -> None:
        while True:
            await trio.sleep(0.2)
            for cont in list(self.sb.containers.values()):
                try:
                    n = open_cgroup(cont.cgroups_path, cont.container_id).oom_kills()
                except Exception:  # noqa: BLE001 - a cgroup that is gone or unreadable has no news
                    continue
                if n > cont.oom_seen:
                    cont.oom_seen = n
                    self.events.record("oom", cont.container_id)
                    self._oom_send.send_nowait(cont.container_id)

    # ---- lookups -----------------------------------------------------------------------
    def _container(self, cid: str) -> Container:
        check_id("container_id", cid)
        c = self.sb.containers.get(cid)
        if c is None:
            raise TTRPCError(Code.NOT_FOUND, f"container {cid!r} does not exist")
        return c

    def _process(self, cid: str, exec_id: str) -> tuple[Container, Process]:
        c = self._container(cid)
        check_id("exec_id", exec_id, allow_empty=True)
        p = c.process(exec_id)
        if p is None:
            raise TTRPCError(Code.NOT_FOUND, f"exec {exec_id!r} does not exist in container {cid!r}")
        return c, p

    # ---- stdio set-up ------------------------------------------------------------------
    def _stdio_for(self, proc: Process, terminal: bool) -> tuple[dict, list[int]]:
        """Pipes for a new process: the daemon keeps the host ends; returns the flags and
        the child ends to hand to init (closed here once init has them)."""
        if terminal:
            return {}, []
        in_r, in_w = make_pipe(self.pipe_size)
        out_r, out_w = make_pipe(self.pipe_size)
        err_r, err_w = make_pipe(self.pipe_size)
        proc.stdin, proc.stdout, proc.stderr = Stream(in_w), Stream(out_r), Stream(err_r)
        return {"stdin": True, "stdout": True, "stderr": True}, [in_r, out_w, err_w]

    async def _spawn(self, op: str, args: dict, proc: Process, terminal: bool, what: str) -> None:
        stdio, child_fds = self._stdio_for(proc, terminal)
        # copies of our output ends go to init too: a daemon restarted after a crash gets them
        # back, and meanwhile the pipes stay open (a writer blocks, it does not get SIGPIPE).
        # Not stdin's: a copy of its write end elsewhere would keep CloseStdin from giving EOF.
        keep = [(role, os.dup(s.fd)) for role, s in (("stdout", proc.stdout), ("stderr", proc.stderr))
                if s is not None]
        args = dict(args, terminal=terminal, stdio=stdio, keep=[r for r, _ in keep])
        try:
            rep = await self.init.call(op, args, fds=child_fds + [fd for _, fd in keep])
        except (InitError, InitGone) as exc:
            proc.close_stdio()
            raise _init_error(exc, what) from None
        finally:
            for fd in child_fds + [fd for _, fd in keep]:
                os.close(fd)
        if terminal:
            if not rep.fds:
                proc.close_stdio()
                raise TTRPCError(Code.INTERNAL, f"{what}: the runtime returned no terminal")
            proc.tty = Stream(rep.fds[0], tty=True)
            for fd in rep.fds[1:]:
                os.close(fd)
        else:
            for fd in rep.fds:
                os.close(fd)
        proc.pid = rep.result["pid"]
        self.sb.by_pid[proc.pid] = proc
        if proc.pid in self._early_exits:
            self._exited(proc, self._early_exits.pop(proc.pid))
        elif rep.result.get("already_exited"):
            await self._refresh_exit(proc)

    async def _refresh_exit(self, proc: Process) -> None:
        table = (await self.init.call("table")).result
        for p in table.get("processes", []):
            if p["pid"] == proc.pid and p.get("exited"):
                self._exited(proc, p["exit_code"])

    # ---- storages ------------------------------------------------------------------------
    async def _mount_storages(self, storages, owner: str) -> list[str]:
        done: list[str] = []
        try:
            for i, st in enumerate(storages):
                done.append(await self._mount_storage(st, f"storages[{i}]", owner))
        except BaseException:
            for target in reversed(done):
                await self._umount(target)
            raise
        return done

    async def _mount_storage(self, st: agent_pb2.Storage, where: str, owner: str) -> str:
        driver = st.driver
        if driver not in STORAGE_DRIVERS:
            raise _bad(f"{where}.driver {driver!r} is not supported (supported: {', '.join(STORAGE_DRIVERS)})")
        if not st.mount_point.startswith("/"):
            raise _bad(f"{where}.mount_point {st.mount_point!r} must be an absolute path")
        target = st.mount_point
        if driver == "local":
            # a directory the containers of the sandbox share, created by the agent
            mode = 0o777
            for opt in st.options:
                if opt.startswith("mode="):
                    try:
                        mode = int(opt[5:], 8)
                    except ValueError:
                        raise _bad(f"{where}.options {opt!r}: mode must be octal") from None
            os.makedirs(target, exist_ok=True)
            os.chmod(target, mode & 0o7777)
            return ""
        os.makedirs(target, exist_ok=True)
        if driver == "ephemeral":
            fstype, source = "tmpfs", "tmpfs"
        elif driver == "bind":
            fstype, source = "bind", st.source
        elif driver in ("virtio-fs", "virtiofs"):
            fstype, source = "virtiofs", st.source
        elif driver == "9p":
            fstype, source = "9p", st.source
        else:  # block devices
            fstype, source = st.fstype or "ext4", st.source
        try:
            await self.init.call("mount", {"source": source, "target": target, "fstype": fstype,
                                           "options": [o for o in st.options if o]})
        except (InitError, InitGone) as exc:
            raise _init_error(exc, f"{where} ({driver} {source!r} on {target!r})") from None
        return target

    async def _umount(self, target: str) -> None:
        if not target:
            return
        try:
            await self.init.call("umount", {"target": target})
        except (InitError, InitGone) as exc:
            log.warning("umount %s: %s", target, exc)

    # ---- sandbox -------------------------------------------------------------------------
    async def CreateSandbox(self, ctx: CallContext, req: agent_pb2.CreateSandboxRequest) -> EMPTY:
        if self.sb.created:
            raise TTRPCError(Code.ALREADY_EXISTS, f"sandbox {self.sb.sandbox_id!r} already created")
        if req.sandbox_id:
            check_id("sandbox_id", req.sandbox_id)
        for i, d in enumerate(req.dns):
            if "\n" in d or len(d) > 512:
                raise _bad(f"dns[{i}] {d[:60]!r} is not a resolv.conf line")
        mounts = await self._mount_storages(req.storages, "sandbox")
        self.sb.sandbox_id, self.sb.hostname, self.sb.dns = req.sandbox_id, req.hostname, list(req.dns)
        try:
            if req.hostname:
                await self.init.call("set_hostname", {"hostname": req.hostname})
            if req.dns:
                res = (await self.init.call("write_resolv", {"lines": list(req.dns)})).result
                self.sb.resolv_conf = res.get("path", "")
        except (InitError, InitGone) as exc:
            for target in reversed(mounts):
                await self._umount(target)
            raise _init_error(exc, "create sandbox") from None
        self.sb.created = True
        self._sandbox_mounts = mounts
        return EMPTY()

    async def DestroySandbox(self, ctx: CallContext, req: agent_pb2.DestroySandboxRequest) -> EMPTY:
        self._destroying = True
        for cid in list(self.sb.containers):
            try:
                await self._remove(self.sb.containers[cid], timeout=10)
            except TTRPCError as exc:
                log.warning("destroy sandbox: removing %s: %s", cid, exc)
        for target in getattr(self, "_sandbox_mounts", []):
            await self._umount(target)
        # init stops what is left and powers the VM off (or exits on a development host);
        # answer first, so the host sees the call succeed before the channel goes away.
        async def shutdown_soon():
            await trio.sleep(0.2)
            try:
                await self.init.call("shutdown")
            except (InitError, InitGone):
                pass
        trio.lowlevel.spawn_system_task(shutdown_soon)
        return EMPTY()

    # ---- containers ----------------------------------------------------------------------
    async def CreateContainer(self, ctx: CallContext, req: agent_pb2.CreateContainerRequest) -> EMPTY:
        cid = check_id("container_id", req.container_id)
        if self._destroying:
            raise TTRPCError(Code.FAILED_PRECONDITION, "the sandbox is being destroyed")
        if cid in self.sb.containers:
            raise TTRPCError(Code.ALREADY_EXISTS, f"container {cid!r} already exists")
        if not req.HasField("OCI"):
            raise _bad(f"container {cid!r}: the request carries no OCI spec")
        spec = specconv.spec_to_oci(req.OCI)
        if "process" not in spec or not spec["process"].get("args"):
            raise _bad(f"container {cid!r}: OCI.Process.Args is empty")
        root = spec["root"]["path"]
        if not root.startswith("/") and not any(st.driver == "image_guest_pull" for st in req.storages):
            raise _bad(f"container {cid!r}: OCI.Root.Path {root!r} must be an absolute path")
        linux = spec.setdefault("linux", {})
        linux.setdefault("cgroupsPath", f"/sandbox-agent/{cid}")
        if req.sandbox_pidns:
            linux["namespaces"] = [ns for ns in linux.get("namespaces", []) if ns.get("type") != "pid"]
        bundle = os.path.join(self.containers_dir, cid)
        try:
            os.mkdir(bundle, 0o711)
        except FileExistsError:
            shutil.rmtree(bundle, ignore_errors=True)
            os.mkdir(bundle, 0o711)
        mounts: list[str] = []
        pulled = [st for st in req.storages if st.driver == "image_guest_pull"]
        others = [st for st in req.storages if st.driver != "image_guest_pull"]
        try:
            for st in pulled:
                spec["root"]["path"] = await self._guest_pull(cid, st, spec["root"]["path"])
            mounts = await self._mount_storages(others, cid)
            with open(os.path.join(bundle, "config.json"), "w") as f:
                json.dump(spec, f)
            proc = Process(cid, "")
            cont = Container(cid, bundle, linux["cgroupsPath"], proc, mounts=mounts)
            self.sb.containers[cid] = cont  # reserve the id while init works
            try:
                await self._spawn("launch", {"container_id": cid, "bundle": bundle}, proc,
                                  bool(spec["process"].get("terminal")), f"create container {cid!r}")
            except BaseException:
                del self.sb.containers[cid]
                raise
        except BaseException:
            for target in reversed(mounts):
                await self._umount(target)
            shutil.rmtree(bundle, ignore_errors=True)
            if pulled and self._snapshots.pop(cid, None) is not None:
                try:
                    await self.init.call("unsnapshot", {"container_id": cid})
                except (InitError, InitGone):
                    pass
            raise
        self.events.record("created", cid, pid=proc.pid)
        return EMPTY()

    async def StartContainer(self, ctx: CallContext, req: agent_pb2.StartContainerRequest) -> EMPTY:
        c = self._container(req.container_id)
        if c.status != Status.CREATED:
            raise TTRPCError(Code.FAILED_PRECONDITION,
                             f"container {c.container_id!r} is {c.status.value}, not created")
        try:
            await self.init.call("start", {"container_id": c.container_id})
        except (InitError, InitGone) as exc:
            raise _init_error(exc, f"start container {c.container_id!r}") from None
        if c.status == Status.CREATED:
            c.status = Status.RUNNING
        self.events.record("started", c.container_id, pid=c.init.pid)
        return EMPTY()

    async def ExecProcess(self, ctx: CallContext, req: agent_pb2.ExecProcessRequest) -> EMPTY:
        c = self._container(req.container_id)
        exec_id = check_id("exec_id", req.exec_id)
        if exec_id in c.execs:
            raise TTRPCError(Code.ALREADY_EXISTS, f"exec {exec_id!r} already exists in {c.container_id!r}")
        if c.status != Status.RUNNING:
            raise TTRPCError(Code.FAILED_PRECONDITION,
                             f"container {c.container_id!r} is {c.status.value}, not running")
        if not req.HasField("process") or not req.process.Args:
            raise _bad(f"exec {exec_id!r}: process.Args is empty")
        pdoc = specconv.process(req.process)
        path = os.path.join(c.bundle, f"exec-{exec_id}.json")
        with open(path, "w") as f:
            json.dump(pdoc, f)
        proc = Process(c.container_id, exec_id)
        c.execs[exec_id] = proc
        try:
            await self._spawn("exec", {"container_id": c.container_id, "exec_id": exec_id, "process": path},
                              proc, bool(pdoc.get("terminal")), f"exec {exec_id!r} in {c.container_id!r}")
        except BaseException:
            c.execs.pop(exec_id, None)
            raise
        finally:
            try:
                os.unlink(path)
            except OSError:
                pass
        self.events.record("exec_started", c.container_id, exec_id=exec_id, pid=proc.pid)
        return EMPTY()

    async def SignalProcess(self, ctx: CallContext, req: agent_pb2.SignalProcessRequest) -> EMPTY:
        c, p = self._process(req.container_id, req.exec_id)
        sig = req.signal
        if not 1 <= sig <= 64:
            raise _bad(f"signal {sig} is not a signal number 1..64")
        if p.exited.is_set():
            return EMPTY()  # nothing left to signal; Kata's shim kills exited containers on delete
        try:
            if not req.exec_id and sig == signal_mod.SIGKILL:
                # the whole container: every process in its cgroup, as `kill --all`
                await self.init.call("kill", {"container_id": c.container_id, "signal": sig, "all": True})
            elif not p.pid:
                raise TTRPCError(Code.FAILED_PRECONDITION, f"process {req.exec_id!r} has no pid yet")
            else:
                await self.init.call("signal", {"pid": p.pid, "signal": sig})
        except InitError as exc:
            if p.exited.is_set():
                return EMPTY()
            raise _init_error(exc, f"signal {sig} to {c.container_id!r}/{req.exec_id!r}") from None
        except InitGone as exc:
            raise _init_error(exc, "signal") from None
        return EMPTY()

    async def WaitProcess(self, ctx: CallContext, req: agent_pb2.WaitProcessRequest) -> agent_pb2.WaitProcessResponse:
        c, p = self._process(req.container_id, req.exec_id)
        await p.exited.wait()
        return agent_pb2.WaitProcessResponse(status=p.exit_code)

    async def RemoveContainer(self, ctx: CallContext, req: agent_pb2.RemoveContainerRequest) -> EMPTY:
        c = self._container(req.container_id)
        await self._remove(c, timeout=req.timeout or None)
        return EMPTY()

    async def _remove(self, c: Container, timeout: float | None) -> None:
        cid = c.container_id
        live = [p for p in c.all_processes() if p.pid and not p.exited.is_set()]
        if live:
            try:
                await self.init.call("kill", {"container_id": cid, "signal": 9, "all": True})
            except InitError as exc:
                log.info("remove %s: kill: %s", cid, exc)
            except InitGone as exc:
                raise _init_error(exc, f"remove {cid!r}") from None
            with trio.move_on_after(timeout if timeout else math.inf) as scope:
                for p in live:
                    await p.exited.wait()
            if scope.cancelled_caught:
                raise TTRPCError(Code.DEADLINE_EXCEEDED,
                                 f"remove {cid!r}: processes still running after {timeout}s")
        try:
            await self.init.call("delete", {"container_id": cid, "force": True})
        except InitError as exc:
            log.info("remove %s: delete: %s", cid, exc)
        except InitGone as exc:
            raise _init_error(exc, f"remove {cid!r}") from None
        for target in reversed(c.mounts):
            await self._umount(target)
        if self._snapshots.pop(cid, None) is not None:
            try:
                await self.init.call("unsnapshot", {"container_id": cid})
            except (InitError, InitGone) as exc:
                log.warning("remove %s: rootfs snapshot: %s", cid, exc)
        for p in c.all_processes():
            p.close_stdio()
            self.sb.by_pid.pop(p.pid, None)
            if p.pid:
                try:
                    await self.init.call("release", {"pid": p.pid})
                except (InitError, InitGone):
                    pass
        shutil.rmtree(c.bundle, ignore_errors=True)
        self.sb.containers.pop(cid, None)
        self.events.record("removed", cid)

    async def UpdateContainer(self, ctx: CallContext, req: agent_pb2.UpdateContainerRequest) -> EMPTY:
        c = self._container(req.container_id)
        if not req.HasField("resources"):
            raise _bad(f"update {c.container_id!r}: no resources in the request")
        resources = specconv.resources(req.resources)
        try:
            await self.init.call("update", {"container_id": c.container_id, "resources": resources})
        except (InitError, InitGone) as exc:
            raise _init_error(exc, f"update {c.container_id!r}") from None
        return EMPTY()

    async def PauseContainer(self, ctx: CallContext, req: agent_pb2.PauseContainerRequest) -> EMPTY:
        c = self._container(req.container_id)
        if c.status != Status.RUNNING:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"container {c.container_id!r} is {c.status.value}, not running")
        try:
            await self.init.call("pause", {"container_id": c.container_id})
        except (InitError, InitGone) as exc:
            raise _init_error(exc, f"pause {c.container_id!r}") from None
        c.status = Status.PAUSED
        self.events.record("paused", c.container_id)
        return EMPTY()

    async def ResumeContainer(self, ctx: CallContext, req: agent_pb2.ResumeContainerRequest) -> EMPTY:
        c = self._container(req.container_id)
        if c.status != Status.PAUSED:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"container {c.container_id!r} is {c.status.value}, not paused")
        try:
            await self.init.call("resume", {"container_id": c.container_id})
        except (InitError, InitGone) as exc:
            raise _init_error(exc, f"resume {c.container_id!r}") from None
        c.status = Status.RUNNING if not c.init.exited.is_set() else Status.STOPPED
        self.events.record("resumed", c.container_id)
        return EMPTY()

    async def SetGuestDateTime(self, ctx: CallContext, req: agent_pb2.SetGuestDateTimeRequest) -> EMPTY:
        if req.Sec < 0 or not 0 <= req.Usec < 1_000_000:
            raise _bad(f"set time: {req.Sec}s {req.Usec}us is not a valid time")
        try:
            await self.init.call("set_time", {"sec": req.Sec, "usec": req.Usec})
        except (InitError, InitGone) as exc:
            raise _init_error(exc, "set guest time") from None
        return EMPTY()

    async def PullImage(self, ctx: CallContext, req: agent_pb2.PullImageRequest) -> agent_pb2.PullImageResponse:
        """Our extension: pull an image inside the sandbox (the puller runs as a confined
        helper job of init) and, with a container id, make its rootfs snapshot."""
        if not req.image or len(req.image) > 512:
            raise _bad(f"pull: image reference {req.image[:80]!r} is empty or too long")
        try:
            from puller.reference import parse_reference

            parse_reference(req.image)
        except Exception as exc:  # noqa: BLE001 - any parse failure is the caller's input
            raise _bad(f"pull: {req.image[:200]!r} is not an image reference: {exc}") from None
        if req.container_id:
            check_id("container_id", req.container_id)
            if req.container_id in self._snapshots:
                raise TTRPCError(Code.ALREADY_EXISTS, f"container {req.container_id!r} already has a rootfs")
        try:
            pulled = (await self.init.call("pull", {"image": req.image, "platform": req.platform,
                                                    "insecure": list(req.insecure_registries),
                                                    "creds": req.source_creds, "lazy": req.lazy})).result
        except (InitError, InitGone) as exc:
            raise _init_error(exc, f"pull {req.image!r}") from None
        resp = agent_pb2.PullImageResponse(image_ref=pulled.get("reference", req.image),
                                           manifest_digest=pulled.get("manifest_digest", ""),
                                           lazy=bool(pulled.get("lazy")))
        if req.container_id:
            try:
                snap = (await self.init.call("snapshot", {"image": req.image,
                                                          "container_id": req.container_id})).result
            except (InitError, InitGone) as exc:
                raise _init_error(exc, f"rootfs of {req.image!r} for {req.container_id!r}") from None
            self._snapshots[req.container_id] = snap["rootfs"]
            resp.rootfs = snap["rootfs"]
            resp.lazy = bool(snap.get("lazy", resp.lazy))
            resp.runtime_config_json = json.dumps(snap.get("config", {}))
        return resp

    async def _guest_pull(self, cid: str, st: agent_pb2.Storage, root: str) -> str:
        """Kata's `image_guest_pull` storage: the image named by `source` is pulled inside the
        sandbox and becomes the container's rootfs. Options (ours): `insecure=HOST:PORT`
        (plain HTTP), `lazy`, `platform=OS/ARCH`. Returns the rootfs path to use."""
        image = st.source
        insecure, lazy, platform = [], False, ""
        for opt in list(st.options) + list(st.driver_options):
            key, _, val = opt.partition("=")
            if key in ("insecure", "insecure_registry"):
                insecure.append(val)
            elif key == "lazy":
                lazy = val in ("", "1", "true", "yes")
            elif key == "platform":
                platform = val
        req = agent_pb2.PullImageRequest(image=image, container_id=cid, insecure_registries=insecure,
                                         lazy=lazy, platform=platform)
        resp = await self.PullImage(None, req)
        if root not in ("", "rootfs") and st.mount_point and root != st.mount_point \
                and not root.startswith(st.mount_point.rstrip("/") + "/"):
            raise _bad(f"container {cid!r}: image_guest_pull storage mounts at {st.mount_point!r} "
                       f"but OCI.Root.Path is {root!r}")
        return resp.rootfs

    # ---- stdio ---------------------------------------------------------------------------
    async def _read(self, req: agent_pb2.ReadStreamRequest, which: str) -> Encoded:
        _, p = self._process(req.container_id, req.exec_id)
        stream = p.tty if p.tty is not None else getattr(p, which)
        if stream is None or (which == "stderr" and p.tty is not None):
            return bytes_field(READ_STREAM_DATA, [])  # no such stream: EOF
        # ReadStreamResponse{data} encoded here, around the buffers as read: the bulk path
        return bytes_field(READ_STREAM_DATA, await stream.read_parts(req.len or 32 * 1024))

    async def ReadStdout(self, ctx: CallContext, req: agent_pb2.ReadStreamRequest) -> Encoded:
        return await self._read(req, "stdout")

    async def ReadStderr(self, ctx: CallContext, req: agent_pb2.ReadStreamRequest) -> Encoded:
        return await self._read(req, "stderr")

    async def WriteStdin(self, ctx: CallContext, req: agent_pb2.WriteStreamRequest) -> agent_pb2.WriteStreamResponse:
        _, p = self._process(req.container_id, req.exec_id)
        stream = p.tty or p.stdin
        if stream is None:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"{req.container_id}/{req.exec_id}: stdin is closed")
        try:
            n = await stream.write(req.data)
        except StreamClosed:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"{req.container_id}/{req.exec_id}: stdin is closed") from None
        except BrokenPipeError:
            raise TTRPCError(Code.FAILED_PRECONDITION,
                             f"{req.container_id}/{req.exec_id}: the process closed its stdin") from None
        return agent_pb2.WriteStreamResponse(len=n)

    async def CloseStdin(self, ctx: CallContext, req: agent_pb2.CloseStdinRequest) -> EMPTY:
        _, p = self._process(req.container_id, req.exec_id)
        if p.tty is not None:
            # a terminal has no separate stdin to close: send EOF (^D) as a user would
            try:
                await p.tty.write(b"\x04")
            except (StreamClosed, OSError):
                pass
        elif p.stdin is not None:
            p.stdin.close()
            p.stdin = None
        return EMPTY()

    async def TtyWinResize(self, ctx: CallContext, req: agent_pb2.TtyWinResizeRequest) -> EMPTY:
        _, p = self._process(req.container_id, req.exec_id)
        if p.tty is None or p.tty.fd is None:
            raise TTRPCError(Code.FAILED_PRECONDITION, f"{req.container_id}/{req.exec_id} has no terminal")
        set_winsize(p.tty.fd, req.row, req.column)
        return EMPTY()

    # ---- observation ---------------------------------------------------------------------
    def _cgroup_stats(self, c: Container) -> dict:
        return open_cgroup(c.cgroups_path, c.container_id).stats()

    async def StatsContainer(self, ctx: CallContext, req: agent_pb2.StatsContainerRequest) -> agent_pb2.StatsContainerResponse:
        c = self._container(req.container_id)
        try:
            stats = await trio.to_thread.run_sync(self._cgroup_stats, c)
        except Exception as exc:  # noqa: BLE001
            raise TTRPCError(Code.INTERNAL, f"stats of {c.container_id!r}: {exc}") from None
        resp = agent_pb2.StatsContainerResponse()
        json_format.ParseDict(stats, resp.cgroup_stats, ignore_unknown_fields=True)
        return resp

    async def GetOOMEvent(self, ctx: CallContext, req: agent_pb2.GetOOMEventRequest) -> agent_pb2.OOMEvent:
        cid = await self._oom_recv.receive()
        return agent_pb2.OOMEvent(container_id=cid)

    async def GetMetrics(self, ctx: CallContext, req: agent_pb2.GetMetricsRequest) -> agent_pb2.Metrics:
        daemon = observe.process_stats(os.getpid())
        daemon["python_modules"] = len(sys.modules)
        daemon["deferred_modules"] = deferred.status()
        agent_stats = {"daemon": daemon}
        try:
            agent_stats["init"] = dict((await self.init.call("init_stats")).result)
            for warm in ("zygote", "puller_zygote"):  # init's warm processes, each on its own
                if isinstance(agent_stats["init"].get(warm), dict):
                    agent_stats[warm] = agent_stats["init"].pop(warm)
        except (InitError, InitGone):
            pass
        containers = {}
        for c in list(self.sb.containers.values()):
            try:
                containers[c.container_id] = await trio.to_thread.run_sync(self._cgroup_stats, c)
            except Exception:  # noqa: BLE001 - a container mid-removal has no cgroup
                continue
        text = observe.render_metrics(agent_stats, containers)
        return agent_pb2.Metrics(metrics=text)

    async def GetGuestDetails(self, ctx: CallContext, req: agent_pb2.GuestDetailsRequest) -> agent_pb2.GuestDetailsResponse:
        resp = agent_pb2.GuestDetailsResponse()
        if req.mem_block_size:
            try:
                with open("/sys/devices/system/memory/block_size_bytes") as f:
                    resp.mem_block_size_bytes = int(f.read().strip(), 16)
            except (OSError, ValueError):
                pass
        resp.support_mem_hotplug_probe = False
        d = resp.agent_details
        d.version = __version__
        d.init_daemon = os.getppid() == 1
        d.storage_handlers.extend(STORAGE_DRIVERS)
        d.supports_seccomp = True
        d.extra_features.extend(["pull-image"])
        return resp

    async def CopyFile(self, ctx: CallContext, req: agent_pb2.CopyFileRequest) -> EMPTY:
        """Write a chunk of a file the host copies in (Kata sends files of shared dirs this
        way when virtio-fs is off). Only beneath the sandbox's run dir."""
        if not req.path.startswith("/") or "\0" in req.path:
            raise _bad(f"copy file: path {req.path[:200]!r} must be absolute")
        path = os.path.normpath(req.path)
        base = os.path.realpath(self.run_dir)

        def inside(p: str) -> bool:
            return p == base or p.startswith(base + "/")

        if not inside(path):
            raise TTRPCError(Code.PERMISSION_DENIED, f"copy file: {req.path[:200]!r} is outside {base}")
        # the deepest part that exists must resolve inside too: a symlink planted in the run
        # dir cannot carry the copy out of it
        anc = os.path.dirname(path)
        while not os.path.lexists(anc):
            anc = os.path.dirname(anc)
        if not inside(os.path.realpath(anc)):
            raise TTRPCError(Code.PERMISSION_DENIED, f"copy file: {req.path[:200]!r} resolves outside {base}")
        os.makedirs(os.path.dirname(path), mode=req.dir_mode or 0o750, exist_ok=True)
        if not inside(os.path.realpath(os.path.dirname(path))):
            raise TTRPCError(Code.PERMISSION_DENIED, f"copy file: {req.path[:200]!r} resolves outside {base}")
        mode = req.file_mode
        if st.S_ISDIR(mode):
            os.makedirs(path, mode=mode & 0o7777, exist_ok=True)
            return EMPTY()
        if st.S_ISLNK(mode):
            target = req.data.decode("utf-8", "replace")
            tmp = path + ".tmp-link"
            os.symlink(target, tmp)
            os.replace(tmp, path)
            return EMPTY()
        if req.offset < 0 or req.file_size < 0 or req.offset + len(req.data) > req.file_size:
            raise _bad(f"copy file {path}: chunk at {req.offset}+{len(req.data)} exceeds file_size {req.file_size}")
        tmp = path + ".tmp-copy"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_TRUNC if req.offset == 0 else 0),
                     (mode & 0o7777) or 0o644)
        try:
            os.pwrite(fd, req.data, req.offset)
        finally:
            os.close(fd)
        if req.offset + len(req.data) >= req.file_size:
            os.chmod(tmp, (mode & 0o7777) or 0o644)
            os.replace(tmp, path)
        return EMPTY()

    # ---- network -------------------------------------------------------------------------
    async def _net(self, action: str, args: dict) -> dict:
        try:
            return (await self.init.call("net", {"action": action, "args": args})).result
        except (InitError, InitGone) as exc:
            raise _init_error(exc, action.replace("_", " ")) from None

    @staticmethod
    def _to_dict(msg) -> dict:
        return json_format.MessageToDict(msg, preserving_proto_field_name=True, use_integers_for_enums=True)

    async def UpdateInterface(self, ctx: CallContext, req: agent_pb2.UpdateInterfaceRequest) -> types_pb2.Interface:
        if not req.HasField("interface"):
            raise _bad("update interface: no interface in the request")
        res = await self._net("update_interface", {"interface": self._to_dict(req.interface)})
        return json_format.ParseDict(res.get("interface", {}), types_pb2.Interface(), ignore_unknown_fields=True)

    async def UpdateRoutes(self, ctx: CallContext, req: agent_pb2.UpdateRoutesRequest) -> agent_pb2.Routes:
        res = await self._net("update_routes", {"routes": [self._to_dict(r) for r in req.routes.Routes]})
        out = agent_pb2.Routes()
        for r in res.get("routes", []):
            json_format.ParseDict(r, out.Routes.add(), ignore_unknown_fields=True)
        return out

    async def ListInterfaces(self, ctx: CallContext, req: agent_pb2.ListInterfacesRequest) -> agent_pb2.Interfaces:
        res = await self._net("list_interfaces", {})
        out = agent_pb2.Interfaces()
        for i in res.get("interfaces", []):
            json_format.ParseDict(i, out.Interfaces.add(), ignore_unknown_fields=True)
        return out

    async def ListRoutes(self, ctx: CallContext, req: agent_pb2.ListRoutesRequest) -> agent_pb2.Routes:
        res = await self._net("list_routes", {})
        out = agent_pb2.Routes()
        for r in res.get("routes", []):
            json_format.ParseDict(r, out.Routes.add(), ignore_unknown_fields=True)
        return out

    async def AddARPNeighbors(self, ctx: CallContext, req: agent_pb2.AddARPNeighborsRequest) -> EMPTY:
        await self._net("add_arp_neighbors",
                        {"neighbors": [self._to_dict(n) for n in req.neighbors.ARPNeighbors]})
        return EMPTY()
