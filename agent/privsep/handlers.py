"""Init's side of each operation: check it against the sandbox's state, then act.

Slow work runs in a child so init's loop never blocks: the OCI runtime (``create``,
``start``, ``exec``, ``kill``, ``delete``: runc's CLI, our ``agent.oci_launcher`` by default)
is spawned with posix_spawn, or, for our launcher, forked by the warm launcher
(agent.privsep.zygote); a netlink job is a forked worker. Either becomes a :class:`Job`
that init completes when it reaps the child. Mounts are single system calls and run inline.
"""
from __future__ import annotations

import _signal
import _socket
import fcntl
import os
import sys

from .. import jsonlite
from . import ops, sysc
from .record import field, record
from .state import ProcessTable
from .wire import MAX_PACKET
from .zygote_link import ZygoteLink, ZygoteUnavailable

MSG_CMSG_CLOEXEC = 0x40000000


class OpError(Exception):
    """An operation init refused or that failed; ``field`` names the culprit if there is one."""

    def __init__(self, field: str, msg: str):
        self.field, self.msg = field, msg
        super().__init__(f"{field}: {msg}" if field else msg)


@record
class Reply:
    result: dict
    fds: list[int] = field(default_factory=list)


@record
class Job:
    """A child whose end answers one request."""
    pid: int
    finish: Callable[["Job"], Reply]
    out_r: int | None = None          # pipe the child reports on (net worker)
    out: bytearray = field(default_factory=bytearray)
    console: _socket.socket | None = None
    console_path: str | None = None
    master_fd: int | None = None
    status: int | None = None
    close_after: list[int] = field(default_factory=list)
    timeout: float | None = None      # seconds before init kills it; None = init's default
    deadline: float = 0.0             # monotonic; init kills a child that outlives it
    killed: bool = False

    @property
    def done(self) -> bool:
        return self.status is not None and self.out_r is None and self.console is None


LAUNCHER_NAMES = ("oci-launcher", "agent.oci_launcher")


def launcher_paths() -> list[str]:
    """sys.path for our launcher started with -I -S: site (and an editable install's finder)
    costs more than the launcher's own imports, so the paths it needs are given directly."""
    pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    paths = [pkg_root]
    for p in sys.path:
        if p and p not in paths and os.path.isdir(p):
            paths.append(p)
    return paths


def runtime_argv(name: str) -> list[str]:
    """The OCI runtime command line prefix; ours runs from this interpreter."""
    if name in LAUNCHER_NAMES:
        boot = (f"import sys;sys.path[:0]={launcher_paths()!r};"
                "from agent.oci_launcher import main;sys.exit(main())")
        return [sys.executable, "-I", "-S", "-c", boot]
    return [name]


def _reset_child_signals() -> None:
    _signal.set_wakeup_fd(-1)
    for s in (_signal.SIGCHLD, _signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGPIPE):
        _signal.signal(s, _signal.SIG_DFL)


def _mount(source, target, fstype, flags: int, data, remount_ro: bool) -> None:
    sysc.mount(source, target, fstype, flags, data)
    if remount_ro:  # a bind ignores MS_RDONLY until remounted
        sysc.mount(None, target, None, flags | 32, None)  # MS_REMOUNT


STATE_DIR = ".oci-state"   # root's: runtime state, pid files, console sockets
DAEMON_DIR = "daemon"       # the daemon's: bundles and process files it writes


class Sandbox:
    """The run dir is root's (so the daemon cannot rename what init keeps there); the
    daemon writes beneath ``<run_dir>/daemon``; init's runtime state is in
    ``<run_dir>/.oci-state`` (0700), which no request may name."""

    def __init__(self, run_dir: str, runtime: str = "oci-launcher",
                 table: ProcessTable | None = None, daemon_ids: tuple[int, int] | None = None,
                 resolv_conf: str = "/etc/resolv.conf"):
        self.run_dir = os.path.realpath(run_dir)
        self.resolv_conf = resolv_conf
        os.chmod(self.run_dir, 0o755)
        self.state_dir = os.path.join(self.run_dir, STATE_DIR)
        os.makedirs(self.state_dir, mode=0o700, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        self.daemon_dir = os.path.join(self.run_dir, DAEMON_DIR)
        os.makedirs(self.daemon_dir, mode=0o700, exist_ok=True)
        if daemon_ids is not None and os.geteuid() == 0:
            os.chown(self.daemon_dir, *daemon_ids)
        self.runtime = runtime_argv(runtime)
        # The warm launcher (init sets it when the runtime is ours); None = always the CLI.
        self.zygote: ZygoteLink | None = None
        # The same for the puller's image jobs (agent.privsep.imageops); None = a new process.
        self.puller_zygote: ZygoteLink | None = None
        self.kept: dict[int, dict[str, int]] = {}  # pid -> role -> the daemon's end of its stdio
        self.table = table or ProcessTable()
        self._seq = 0

    # ---- helpers ---------------------------------------------------------------------
    def _tmp(self, what: str) -> str:
        self._seq += 1
        return os.path.join(self.state_dir, f"{what}.{os.getpid()}.{self._seq}")

    def _rt_args(self, log: str | None, *args: str) -> list[str]:
        """A runtime command line without the program: the CLI's and the zygote's argv."""
        argv = ["--root", os.path.join(self.state_dir, "root")]
        if log:
            argv += ["--log", log, "--log-format", "json"]
        return argv + list(args)

    def _rt(self, log: str | None, *args: str) -> list[str]:
        return self.runtime + self._rt_args(log, *args)

    def _spawn_runtime(self, log: str | None, args: list[str],
                       stdio: list[int | None]) -> int:
        """Run one runtime command: in a warm launcher worker when there is one ready (its
        exit comes back through the zygote's channel), else the CLI."""
        if self.zygote is not None:
            try:
                return self.zygote.spawn(self._rt_args(log, *args), stdio)
            except ZygoteUnavailable:
                pass
        return self._spawn(self._rt(log, *args), stdio)

    def _spawn(self, argv: list[str], stdio: list[int | None], env: dict | None = None) -> int:
        """posix_spawn ``argv`` with the given fds as 0, 1, 2 (None = /dev/null), in init's
        environment plus ``env``."""
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        # Copies at >= 10 first: a source that is itself 0, 1 or 2 would otherwise be
        # overwritten by an earlier dup2 of the chain.
        srcs = [fcntl.fcntl(null if fd is None else fd, fcntl.F_DUPFD_CLOEXEC, 10)
                for fd in stdio]
        try:
            actions = [(os.POSIX_SPAWN_DUP2, fd, i) for i, fd in enumerate(srcs)]
            return os.posix_spawnp(argv[0], argv, {**os.environ, **env} if env else os.environ,
                                   file_actions=actions,
                                   setsigdef=(_signal.SIGCHLD, _signal.SIGPIPE, _signal.SIGTERM,
                                              _signal.SIGINT, _signal.SIGHUP),
                                   setsigmask=())
        finally:
            for fd in srcs + [null]:
                os.close(fd)

    @staticmethod
    def _log_error(log: str) -> str:
        """The last error the runtime logged (runc's JSON log: {"level","msg",...})."""
        try:
            with open(log, errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            return "no log"
        msgs = []
        for line in lines:
            try:
                rec = jsonlite.loads(line)
            except ValueError:
                rec = None
            if isinstance(rec, dict):
                if rec.get("level") in ("error", "fatal", "panic"):
                    msgs.append(str(rec.get("msg")))
            elif line.strip():
                msgs.append(line.strip())
        return (msgs[-1] if msgs else (lines[-1] if lines else "no message"))[:2000]

    def _console(self, job_path: str) -> _socket.socket:
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.bind(job_path)
        s.listen(1)
        return s

    def accept_console(self, job: Job) -> None:
        """The runtime connects to the console socket and sends the pty master."""
        assert job.console is not None
        fd, _ = job.console._accept()  # _socket's accept: a close-on-exec fd
        conn = _socket.socket(fileno=fd)
        try:
            conn.settimeout(5)
            _, anc, _, _ = conn.recvmsg(4096, _socket.CMSG_SPACE(4), MSG_CMSG_CLOEXEC)
            for level, kind, data in anc:
                if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS and len(data) >= 4:
                    job.master_fd = int.from_bytes(data[:4], "little")
                    for i in range(4, len(data) - len(data) % 4, 4):
                        os.close(int.from_bytes(data[i:i + 4], "little"))
        finally:
            conn.close()
            self.close_console(job)

    @staticmethod
    def close_console(job: Job) -> None:
        if job.console is not None:
            job.console.close()
            job.console = None
        if job.console_path:
            try:
                os.unlink(job.console_path)
            except OSError:
                pass
            job.console_path = None

    def _run_process_job(self, kind: str, argv_tail: list[str], cid: str, exec_id: str,
                         terminal: bool, stdio: ops.Stdio, fds: list[int],
                         on_ok: Callable[[int], None], on_fail: Callable[[], None],
                         keep: tuple[str, ...] = ()) -> Job:
        pid_file, log = self._tmp("pid"), self._tmp("log")
        console = console_path = None
        args = [kind]
        if kind == "create":
            args += ["--bundle", argv_tail[0]]
        else:
            args += ["--detach", "--process", argv_tail[0]]
        args += ["--pid-file", pid_file]
        if terminal:
            console_path = self._tmp("console")
            console = self._console(console_path)
            args += ["--console-socket", console_path]
        kept_fds = dict(zip(keep, fds[stdio.count:]))  # the daemon's ends, held for a restart
        fds = fds[:stdio.count]
        it = iter(fds)
        child_stdio = [next(it) if stdio.stdin else None, next(it) if stdio.stdout else None,
                       next(it) if stdio.stderr else None]
        try:
            pid = self._spawn_runtime(log, args + [cid], child_stdio)
        except OSError as e:
            if console is not None:
                console.close()
                os.unlink(console_path)
            for fd in kept_fds.values():
                os.close(fd)
            on_fail()
            raise OpError("", f"cannot run the OCI runtime {self.runtime[0]!r}: {e}") from None

        def finish(job: Job) -> Reply:
            ok = False
            try:
                if job.status != 0:
                    if job.master_fd is not None:
                        os.close(job.master_fd)
                    on_fail()
                    raise OpError("", f"runtime {kind} of {cid!r} failed (status "
                                      f"{job.status}): {self._log_error(log)}")
                try:
                    with open(pid_file) as f:
                        cpid = int(f.read().strip())
                except (OSError, ValueError) as e:
                    on_fail()
                    raise OpError("", f"runtime {kind} of {cid!r} left no pid file: {e}")
                proc = self.table.register(cpid, cid, exec_id)
                on_ok(cpid)
                if job.master_fd is not None:
                    kept_fds["tty"] = os.dup(job.master_fd)
                self.kept[cpid] = kept_fds
                ok = True
                res = {"pid": cpid}
                if proc.status is not None:
                    res["already_exited"] = True
                return Reply(res, [job.master_fd] if job.master_fd is not None else [])
            finally:
                if not ok:
                    for fd in kept_fds.values():
                        os.close(fd)
                for p in (pid_file, log):
                    try:
                        os.unlink(p)
                    except OSError:
                        pass
        for fd in fds:  # the runtime has its copies; init holding one would delay EOF
            os.close(fd)
        return Job(pid, finish, console=console, console_path=console_path)

    def _simple_runtime_job(self, args: list[str], what: str,
                            on_ok: Callable[[], dict] = dict) -> Job:
        log = self._tmp("log")
        pid = self._spawn_runtime(log, args, [None, None, None])

        def finish(job: Job) -> Reply:
            try:
                if job.status != 0:
                    raise OpError("", f"runtime {what} failed (status {job.status}): "
                                      f"{self._log_error(log)}")
                return Reply(on_ok())
            finally:
                try:
                    os.unlink(log)
                except OSError:
                    pass
        return Job(pid, finish)

    def _container(self, cid: str):
        c = self.table.containers.get(cid)
        if c is None:
            raise OpError("container_id", f"no container {cid!r} was launched by init")
        return c

    # ---- operations ------------------------------------------------------------------
    def _not_state(self, op) -> None:
        for name in ("bundle", "process", "source", "target"):
            path = getattr(op, name, None)
            if isinstance(path, str) and (path == self.state_dir or
                                          path.startswith(self.state_dir + "/")):
                raise OpError(name, f"{path!r} is init's runtime state, not the daemon's")

    def handle(self, op, fds: list[int]) -> Reply | Job:
        """Act on a validated operation. Raises OpError; fds are consumed either way."""
        try:
            if type(op).__module__.endswith(".imageops"):
                from . import imageops
                return imageops.handle(self, op, fds)
            self._not_state(op)
            return getattr(self, "op_" + type(op).__name__.lower())(op, fds)
        except BaseException:
            for fd in fds:
                try:
                    os.close(fd)
                except OSError:
                    pass
            raise

    def op_launch(self, op: ops.Launch, fds: list[int]) -> Job:
        if op.container_id in self.table.containers:
            raise OpError("container_id", f"container {op.container_id!r} already exists")
        self.table.add_container(op.container_id, op.bundle)
        return self._run_process_job(
            "create", [op.bundle], op.container_id, "", op.terminal, op.stdio, fds,
            on_ok=lambda pid: None,
            on_fail=lambda: self.table.containers.pop(op.container_id, None), keep=op.keep)

    def op_start(self, op: ops.Start, fds: list[int]) -> Job:
        c = self._container(op.container_id)
        if c.started:
            raise OpError("container_id", f"container {op.container_id!r} already started")

        def ok() -> dict:
            c.started = True
            return {"pid": c.pid}
        return self._simple_runtime_job(["start", op.container_id], f"start of "
                                        f"{op.container_id!r}", ok)

    def op_exec(self, op: ops.Exec, fds: list[int]) -> Job:
        c = self._container(op.container_id)
        if c.pid is None or self.table.live(c.pid) is None:
            raise OpError("container_id", f"container {op.container_id!r} is not running")
        if op.exec_id in c.execs:
            raise OpError("exec_id", f"exec {op.exec_id!r} already exists in "
                                     f"{op.container_id!r}")
        c.execs.add(op.exec_id)
        return self._run_process_job(
            "exec", [op.process], op.container_id, op.exec_id, op.terminal, op.stdio, fds,
            on_ok=lambda pid: None, on_fail=lambda: c.execs.discard(op.exec_id), keep=op.keep)

    def op_signal(self, op: ops.Signal, fds: list[int]) -> Reply:
        if self.table.live(op.pid) is None:
            raise OpError("pid", f"{op.pid} is not a running process init started")
        os.kill(op.pid, op.signal)
        return Reply({})

    def op_kill(self, op: ops.Kill, fds: list[int]) -> Job:
        self._container(op.container_id)
        args = ["kill"] + (["--all"] if op.all else []) + [op.container_id, str(op.signal)]
        return self._simple_runtime_job(args, f"kill of {op.container_id!r}")

    def op_delete(self, op: ops.Delete, fds: list[int]) -> Job:
        self._container(op.container_id)

        def ok() -> dict:
            for p in [p.pid for p in self.table.procs.values() if p.container_id == op.container_id]:
                self._drop_kept(p)
            self.table.remove_container(op.container_id)
            return {}
        args = ["delete"] + (["--force"] if op.force else []) + [op.container_id]
        return self._simple_runtime_job(args, f"delete of {op.container_id!r}", ok)

    def op_sethostname(self, op: ops.SetHostname, fds: list[int]) -> Reply:
        try:
            sysc.in_child(sysc.sethostname, op.hostname)  # ctypes stays out of init
        except OSError as e:
            raise OpError("hostname", str(e)) from None
        return Reply({})

    def op_writeresolv(self, op: ops.WriteResolv, fds: list[int]) -> Reply:
        # Written beside and renamed over, so a reader never sees half a file.
        tmp = self.resolv_conf + ".agent-tmp"
        try:
            with open(tmp, "w") as f:
                f.write("".join(line + "\n" for line in op.lines))
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, self.resolv_conf)
        except OSError as e:
            raise OpError("lines", f"writing {self.resolv_conf}: {e}") from None
        return Reply({"path": self.resolv_conf})

    def _drop_kept(self, pid: int) -> None:
        for fd in self.kept.pop(pid, {}).values():
            try:
                os.close(fd)
            except OSError:
                pass

    def op_table(self, op: ops.Table, fds: list[int]) -> Reply:
        dump = self.table.dump()
        dump["kept"] = sorted(self.kept)  # pids whose stdio ends init holds: ask with "kept"
        return Reply(dump)

    def op_kept(self, op: ops.Kept, fds: list[int]) -> Reply:
        """Copies of the stdio ends init keeps for the pids (fd indices into the packet)."""
        out_fds: list[int] = []
        stdio: dict[str, dict[str, int]] = {}
        for pid in op.pids:
            for role, fd in self.kept.get(pid, {}).items():
                stdio.setdefault(str(pid), {})[role] = len(out_fds)
                out_fds.append(os.dup(fd))  # init closes what it sends; it keeps the originals
        return Reply({"stdio": stdio}, out_fds)

    def op_initstats(self, op: ops.InitStats, fds: list[int]) -> Reply:
        from ..observe import process_stats
        out = process_stats(os.getpid())
        for name, z in (("zygote", self.zygote), ("puller_zygote", self.puller_zygote)):
            if z is not None and z.pid is not None:
                try:  # the warm processes' memory is a cost of their design: beside init's
                    out[name] = process_stats(z.pid)
                except OSError:
                    pass
        return Reply(out)

    def op_release(self, op: ops.Release, fds: list[int]) -> Reply:
        if not self.table.release(op.pid):
            raise OpError("pid", f"{op.pid} is not an exited process in the table")
        self._drop_kept(op.pid)
        return Reply({})

    def op_mount(self, op: ops.Mount, fds: list[int]) -> Reply:
        flags, data = 0, []
        for o in op.options:
            if o in ops.MOUNT_FLAGS:
                flags |= ops.MOUNT_FLAGS[o]
            else:
                data.append(o)
        if op.fstype == "bind":
            flags |= ops.MOUNT_FLAGS["bind"]
            if not os.path.exists(op.target):
                if os.path.isdir(op.source):
                    os.makedirs(op.target, exist_ok=True)
                else:
                    open(op.target, "a").close()
        try:
            # In a short-lived child (sysc.in_child): ctypes stays out of init.
            sysc.in_child(_mount, op.source, op.target,
                          None if op.fstype == "bind" else op.fstype, flags,
                          ",".join(data) or None, op.fstype == "bind" and bool(flags & 1))
        except OSError as e:
            raise OpError("", str(e)) from None
        return Reply({"target": op.target})

    def op_umount(self, op: ops.Umount, fds: list[int]) -> Reply:
        try:
            sysc.in_child(sysc.umount, op.target, sysc.MNT_DETACH)
        except OSError as e:
            raise OpError("target", str(e)) from None
        return Reply({})

    def op_net(self, op: ops.Net, fds: list[int]) -> Job:
        r, w = os.pipe2(os.O_CLOEXEC)
        pid = os.fork()
        if pid == 0:  # the worker: imports pyroute2, does one job, reports, exits
            code = 0
            try:
                _reset_child_signals()
                os.close(r)
                try:
                    from . import netjob
                    out = {"ok": True, "result": netjob.run(op.action, op.args)}
                except ops.ValidationError as e:
                    out = {"ok": False, "field": e.field, "msg": e.msg}
                except Exception as e:  # noqa: BLE001 - reported to the daemon
                    out = {"ok": False, "field": "", "msg": f"{type(e).__name__}: {e}"}
                data = jsonlite.dumps(out).encode()
                if len(data) > MAX_PACKET - 1024:
                    data = jsonlite.dumps({"ok": False, "field": "", "msg":
                                       f"result of {len(data)} bytes too large"}).encode()
                view = memoryview(data)
                while view:
                    view = view[os.write(w, view):]
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        os.close(w)
        os.set_blocking(r, False)

        def finish(job: Job) -> Reply:
            try:
                out = jsonlite.loads(bytes(job.out))
            except ValueError:
                raise OpError("", f"network worker died (status {job.status})") from None
            if not out.get("ok"):
                raise OpError(str(out.get("field", "")), str(out.get("msg", "")))
            return Reply(out["result"])
        return Job(pid, finish, out_r=r)
