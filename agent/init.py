"""PID 1 of the guest, or a child subreaper of the same design outside a VM.

Init holds every privilege and never reads a byte from the host: the comms daemon does that,
confined, and asks init for privileged work over the privsep channel (agent.privsep). Init

* as PID 1 mounts /proc, /sys, /dev, /dev/pts, /dev/shm, /run and cgroup2, loads the kernel
  modules named on the command line, reads its settings from the kernel command line;
* reaps every orphan (SIGCHLD woken select loop, waitpid(-1, WNOHANG)) and keeps the exit
  status of each container process it started until the daemon releases it;
* starts the daemon with its end of a socketpair on fd 3 and the host endpoint on fd 4, and
  restarts it with exponential backoff when it dies: containers keep running, and the new
  daemon asks for the process table;
* runs each operation the daemon asks for after checking it (agent.privsep.ops/handlers);
  with our launcher as the runtime, its commands run in forks of the warm launcher
  (agent.privsep.zygote), a second child init starts, restarts and falls back from to the
  launcher's CLI;
* on ``shutdown`` or a fatal error stops the containers, syncs and powers off (exits outside
  a VM).

It imports little (no trio, no protobuf; not even re, json, socket, signal, enum, collections
or ctypes: see privsep.jsonlite, privsep.sysc.in_child) to start fast and stay small.
"""
from __future__ import annotations

import _signal as signal  # the enum-free core of `signal` (same names, plain ints)
import errno
import fcntl
import os
import select
import sys
import time

from . import cmdline
from .cmdline import AgentConfig
from .observe import JsonLogger, SocketSink
from . import jsonlite
from .privsep import ops, sysc, wire
from .privsep.handlers import LAUNCHER_NAMES, Job, OpError, Reply, Sandbox, launcher_paths
from .privsep.listen import open_endpoint, parse_address
from .privsep.record import asdict, field, record, replace
from .privsep.state import exit_code
from .privsep.zygote_link import ZygoteLink, boot_argv

ENV_PRIVSEP_FD = "SANDBOX_AGENT_PRIVSEP_FD"
ENV_LISTEN_FD = "SANDBOX_AGENT_LISTEN_FD"
ENV_CONFIG = "SANDBOX_AGENT_CONFIG"
ENV_GENERATION = "SANDBOX_AGENT_DAEMON_GENERATION"
PRIVSEP_FD, LISTEN_FD = 3, 4
BACKOFF_START = 0.1
STABLE_AFTER = 10.0  # a daemon that lived this long resets the backoff
JOB_TIMEOUT = 60.0   # a runtime or network worker still running after this is killed
ZYGOTE_FIRST_START = 10.0  # seconds: start the warm launcher by then even if no request came

# (source, target, fstype, flags, data) mounted by PID 1 at boot.
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_RELATIME = 2, 4, 8, 1 << 21
BOOT_MOUNTS = [
    ("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("sysfs", "/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
    ("devtmpfs", "/dev", "devtmpfs", MS_NOSUID, "mode=0755"),
    ("devpts", "/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "mode=0620,ptmxmode=0666,gid=5"),
    ("shm", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777"),
    ("tmpfs", "/run", "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755"),
    # favordynmods: moving a process between cgroups (every exec into a running container,
    # every launcher that cannot create its child inside the cgroup) no longer waits an RCU
    # grace period for the global threadgroup lock, at a small cost to fork and exit. Kernels
    # before 6.0 refuse the option: boot_mounts then mounts without it.
    ("cgroup2", "/sys/fs/cgroup", "cgroup2", MS_NOSUID | MS_NODEV | MS_NOEXEC | MS_RELATIME,
     "favordynmods"),
]
OPTIONAL_DATA = {"favordynmods"}  # mount data a kernel may not know: retried without
# devtmpfs has no such links; /dev/ptmx (a node in devtmpfs) already resolves to the devpts
# mounted on /dev/pts on any kernel since 4.7.
DEV_LINKS = [("/proc/self/fd", "/dev/fd"), ("/proc/self/fd/0", "/dev/stdin"),
             ("/proc/self/fd/1", "/dev/stdout"), ("/proc/self/fd/2", "/dev/stderr")]


def _mountpoints() -> set[str]:
    try:
        with open("/proc/self/mountinfo") as f:
            return {line.split()[4].replace("\\040", " ") for line in f}
    except OSError:  # /proc is not mounted yet
        return set()


def boot_mounts(log: JsonLogger, mounts=BOOT_MOUNTS, root: str = "/") -> list[str]:
    """Mount the pseudo file systems a guest needs (beneath ``root``: tests use a temporary
    one); one already mounted is left alone. Returns the targets mounted."""
    done = []
    for source, target, fstype, flags, data in mounts:
        target = os.path.join(root, target.lstrip("/"))
        if target in _mountpoints():  # stacking a second proc or tmpfs would hide the first
            continue
        try:
            os.makedirs(target, exist_ok=True)
            try:
                sysc.mount(source, target, fstype, flags, data)
            except OSError as e:
                if e.errno != errno.EINVAL or data not in OPTIONAL_DATA:
                    raise
                log.info("mount option refused; mounting without it", target=target,
                         option=data)
                sysc.mount(source, target, fstype, flags, None)
            done.append(target)
        except OSError as e:
            if e.errno != errno.EBUSY:
                log.error("boot mount failed", target=target, fstype=fstype, error=str(e))
    for src, dst in DEV_LINKS:
        try:
            os.symlink(src, os.path.join(root, dst.lstrip("/")))
        except FileExistsError:
            pass
        except OSError as e:
            log.warn("cannot create a /dev link", link=dst, error=str(e))
    return done


def load_modules(paths: tuple[str, ...], log: JsonLogger) -> None:
    for path in paths:
        if not os.path.exists(path):
            log.warn("kernel module not present", path=path)
            continue
        try:
            sysc.finit_module(path)
        except OSError as e:
            if e.errno != errno.EEXIST:
                log.error("kernel module failed to load", path=path, error=str(e))


def _dup_high(fd: int) -> int:
    """A close-on-exec copy at >= 10, so dup2 onto 3/4 in the child cannot clobber a source."""
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)


@record
class DaemonSlot:
    argv: list[str]
    pid: int | None = None
    sock: object | None = None  # init's end of the channel (a _socket.socket)
    generation: int = 0
    started_at: float = 0.0
    backoff: float = BACKOFF_START
    restart_at: float | None = 0.0   # monotonic time of the next start; None = not wanted
    outbox: list[tuple[dict, list[int]]] = field(default_factory=list)
    restarts: int = 0


class Init:
    def __init__(self, cfg: AgentConfig, daemon_argv: list[str], *, vm: bool,
                 log: JsonLogger | None = None, listen_fd: int | None = None,
                 log_sink: SocketSink | None = None):
        self.cfg, self.vm = cfg, vm
        self.log = log or JsonLogger("init", cfg.log_level, sink=log_sink)
        # With a log port, the daemon's stderr (its JSON log lines) comes through a pipe
        # and init forwards it whole lines at a time: one reader sees both processes.
        self.log_sink = log_sink
        self._daemon_err: int | None = None
        self._err_buf = bytearray()
        os.makedirs(cfg.run_dir, mode=0o755, exist_ok=True)
        # Outside a VM the host's /etc/resolv.conf is not the sandbox's to write.
        resolv = "/etc/resolv.conf" if vm else os.path.join(cfg.run_dir, "resolv.conf")
        self.sandbox = Sandbox(cfg.run_dir, cfg.oci_runtime,
                               daemon_ids=(cfg.daemon_uid, cfg.daemon_gid),
                               resolv_conf=resolv)
        self.table = self.sandbox.table
        self.zygote: ZygoteLink | None = None
        if cfg.zygote and cfg.oci_runtime in LAUNCHER_NAMES:
            # Its warm-up (seconds of imports on one emulated CPU) waits until the daemon,
            # which starts at the same time, asks its first question: that is when the daemon
            # has finished its own imports and is about to serve.
            self.zygote = ZygoteLink(boot_argv(sys.executable, launcher_paths(), os.getpid()),
                                     self.log, first_start=ZYGOTE_FIRST_START)
            self.sandbox.zygote = self.zygote
        # The puller's image jobs (pull where there is no puller container, snapshot,
        # unsnapshot) in forks of a warm process too. It holds ~24 MiB in the guest (trio,
        # pyfuse3, the puller), so only a sandbox that pulls images pays for it: it starts at
        # the first image request, whose own jobs are still new processes.
        self.puller_zygote: ZygoteLink | None = None
        if cfg.zygote:
            self.puller_zygote = ZygoteLink(
                boot_argv(sys.executable, launcher_paths(), os.getpid(), "puller"), self.log,
                first_start=None, name="warm puller")
            self.sandbox.puller_zygote = self.puller_zygote
        self.zygotes = [z for z in (self.zygote, self.puller_zygote) if z is not None]
        self.daemon = DaemonSlot(daemon_argv)
        self.listen_fd = listen_fd
        self.jobs: dict[int, tuple[Job, int, int]] = {}  # pid -> (job, request id, generation)
        self.job_timeout = JOB_TIMEOUT
        self.stopping: str | None = None
        self.exit_status = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    # ---- daemon supervision ------------------------------------------------------------
    def _daemon_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env[ENV_PRIVSEP_FD] = str(PRIVSEP_FD)
        if self.listen_fd is not None:
            env[ENV_LISTEN_FD] = str(LISTEN_FD)
        cfg = asdict(self.cfg)
        cfg.pop("ignored", None)
        env[ENV_CONFIG] = jsonlite.dumps(cfg)
        env[ENV_GENERATION] = str(self.daemon.generation)
        return env

    def start_daemon(self) -> None:
        d = self.daemon
        d.restart_at = None
        mine, theirs = wire.socketpair()
        src = [_dup_high(theirs.fileno())]
        theirs.close()
        if self.listen_fd is not None:
            src.append(_dup_high(self.listen_fd))
        actions = [(os.POSIX_SPAWN_DUP2, fd, PRIVSEP_FD + i) for i, fd in enumerate(src)]
        err_w = None
        if self.log_sink is not None:
            err_r, err_w = os.pipe2(os.O_CLOEXEC)
            self._close_daemon_err()
            os.set_blocking(err_r, False)
            self._daemon_err = err_r
            actions.append((os.POSIX_SPAWN_DUP2, err_w, 2))
        d.generation += 1
        try:
            d.pid = os.posix_spawnp(d.argv[0], d.argv, self._daemon_env(), file_actions=actions,
                                   setsigdef=(signal.SIGCHLD, signal.SIGTERM, signal.SIGINT,
                                              signal.SIGHUP, signal.SIGPIPE))
        except OSError as e:
            mine.close()
            d.started_at = time.monotonic()  # a failed start is a short life: back off
            self.log.error("cannot start the daemon", argv=d.argv, error=str(e))
            self._schedule_restart()
            return
        finally:
            for fd in src + ([err_w] if err_w is not None else []):
                os.close(fd)
        mine.setblocking(False)
        d.sock, d.started_at = mine, time.monotonic()
        self.log.info("daemon started", pid=d.pid, generation=d.generation)

    def _schedule_restart(self) -> None:
        d = self.daemon
        if self.stopping:
            return
        lived = time.monotonic() - d.started_at
        if lived >= STABLE_AFTER:
            d.backoff = BACKOFF_START
        d.restart_at = time.monotonic() + d.backoff
        d.restarts += 1
        self.log.warn("daemon will restart", delay=round(d.backoff, 3), restarts=d.restarts)
        d.backoff = min(d.backoff * 2, max(self.cfg.restart_backoff_max, BACKOFF_START))

    def _close_daemon_err(self) -> None:
        if self._daemon_err is not None:
            os.close(self._daemon_err)
            self._daemon_err = None
        self._err_buf.clear()

    def _forward_daemon_log(self) -> None:
        try:
            data = os.read(self._daemon_err, 65536)
        except BlockingIOError:
            return
        if not data:
            if self._err_buf:
                self.log_sink.write(bytes(self._err_buf) + b"\n")
            self._close_daemon_err()
            return
        self._err_buf += data
        *lines, rest = self._err_buf.split(b"\n")
        for line in lines:
            self.log_sink.write(line[:65536] + b"\n")
        self._err_buf = bytearray(rest[-65536:])

    def _drop_channel(self) -> None:
        d = self.daemon
        if d.sock is not None:
            d.sock.close()
            d.sock = None
        for _, fds in d.outbox:
            for fd in fds:
                os.close(fd)
        d.outbox.clear()

    def _daemon_exited(self, status: int) -> None:
        self.log.warn("daemon exited", pid=self.daemon.pid, status=status,
                      exit_code=exit_code(status))
        self.daemon.pid = None
        self._drop_channel()
        self._schedule_restart()

    # ---- sending -----------------------------------------------------------------------
    def _send(self, msg: dict, fds: list[int] | None = None) -> None:
        """Queue a message for the daemon; without a daemon, drop it (closing its fds)."""
        d = self.daemon
        if d.sock is None:
            for fd in fds or ():
                os.close(fd)
            return
        d.outbox.append((msg, fds or []))
        self._flush()

    def _flush(self) -> None:
        d = self.daemon
        while d.outbox and d.sock is not None:
            msg, fds = d.outbox[0]
            try:
                wire.send_packet(d.sock, msg, fds)
            except BlockingIOError:
                return
            except wire.ProtocolError as e:  # our reply too large: say so instead
                for fd in fds:  # the error goes without them, or the same error repeats forever
                    os.close(fd)
                msg = {"t": "rep", "id": msg.get("id", 0), "ok": False,
                       "error": {"field": "", "msg": str(e)}} if msg["t"] == "rep" else None
                if msg is not None:
                    d.outbox[0] = (msg, [])
                    continue
                d.outbox.pop(0)
                continue
            except OSError as e:  # EPIPE and kin: the daemon is going; SIGCHLD will follow
                self.log.warn("daemon channel broken", error=str(e))
                self._drop_channel()
                return
            d.outbox.pop(0)
            for fd in fds:
                os.close(fd)

    def _reply_error(self, req_id: int, fld: str, msg: str) -> None:
        self._send({"t": "rep", "id": req_id, "ok": False, "error": {"field": fld, "msg": msg}})

    # ---- requests ----------------------------------------------------------------------
    def _on_packet(self, pkt: wire.Packet) -> None:
        msg = pkt.msg
        if msg["t"] != "req":
            pkt.close_fds()
            self._send({"t": "ev", "ev": "error",
                        "msg": f"init accepts only requests, got a {msg['t']!r} message"})
            return
        rid = msg["id"]
        if self.zygote is not None:
            self.zygote.wanted_now()
        if self.puller_zygote is not None and msg.get("op") in ("pull", "snapshot", "unsnapshot"):
            self.puller_zygote.wanted_now()
        try:
            op = ops.parse(msg.get("op"), msg.get("args", {}), len(pkt.fds), self.cfg.run_dir)
        except ops.ValidationError as e:
            pkt.close_fds()
            self._reply_error(rid, e.field, e.msg)
            return
        except Exception as e:  # noqa: BLE001 - a checker's bug must not take PID 1 down
            pkt.close_fds()
            self._reply_error(rid, "", f"checking the request: {type(e).__name__}: {e}")
            return
        if isinstance(op, ops.Shutdown):
            self._send({"t": "rep", "id": rid, "ok": True, "result": {}})
            self.stopping = "shutdown requested by the daemon"
            return
        try:
            res = self.sandbox.handle(op, pkt.fds)
        except OpError as e:
            self._reply_error(rid, e.field, e.msg)
            return
        except Exception as e:  # noqa: BLE001 - init must survive whatever one op does
            self.log.error("operation failed", op=msg.get("op"), error=repr(e))
            self._reply_error(rid, "", f"{type(e).__name__}: {e}")
            return
        if isinstance(res, Reply):
            self._send({"t": "rep", "id": rid, "ok": True, "result": res.result}, res.fds)
        else:
            res.deadline = time.monotonic() + (res.timeout or self.job_timeout)
            self.jobs[res.pid] = (res, rid, self.daemon.generation)

    def _read_daemon(self) -> None:
        d = self.daemon
        for _ in range(64):  # bounded so a chatty daemon cannot starve reaping
            if d.sock is None:
                return
            try:
                pkt = wire.recv_packet(d.sock)
            except BlockingIOError:
                return
            except wire.ProtocolError as e:
                self._send({"t": "ev", "ev": "error", "msg": f"bad packet: {e}"})
                continue
            except OSError as e:
                self.log.warn("daemon channel read failed", error=str(e))
                self._drop_channel()
                return
            if pkt is None:  # the daemon closed its end; its exit will be reaped
                self._drop_channel()
                return
            self._on_packet(pkt)

    # ---- jobs and reaping ----------------------------------------------------------------
    def _finish_job(self, pid: int) -> None:
        job, rid, gen = self.jobs.pop(pid)
        for fd in job.close_after:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            rep = job.finish(job)
        except OpError as e:
            if gen == self.daemon.generation:
                self._reply_error(rid, e.field, e.msg)
            return
        except Exception as e:  # noqa: BLE001
            self.log.error("job completion failed", error=repr(e))
            if gen == self.daemon.generation:
                self._reply_error(rid, "", f"{type(e).__name__}: {e}")
            return
        if gen == self.daemon.generation:
            self._send({"t": "rep", "id": rid, "ok": True, "result": rep.result}, rep.fds)
        else:
            # Asked by a daemon that has since died: tell its successor (a container it
            # launched now exists), which re-reads the table. Fds such as a pty master
            # had only that daemon to go to.
            for fd in rep.fds:
                os.close(fd)
            self._send({"t": "ev", "ev": "stale_reply", "generation": gen,
                        "result": rep.result})

    def _kill_overdue_jobs(self) -> None:
        now = time.monotonic()
        for pid, (job, _, _) in self.jobs.items():
            if not job.killed and job.status is None and now >= job.deadline:
                self.log.error("job overran its time; killing it", pid=pid,
                               timeout=self.job_timeout)
                job.killed = True
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass

    def _job_output(self, job: Job) -> None:
        try:
            data = os.read(job.out_r, 65536)
        except BlockingIOError:
            return
        if data and len(job.out) < wire.MAX_PACKET:
            job.out += data
            return
        if not data:
            os.close(job.out_r)
            job.out_r = None

    def _job_exited(self, pid: int, status: int) -> None:
        """A job's child ended: reaped by init, or reported by the warm launcher."""
        if pid not in self.jobs:
            return
        job = self.jobs[pid][0]
        job.status = status
        if job.console is not None:  # the runtime died before sending a pty
            self.sandbox.close_console(job)
        if job.done:
            self._finish_job(pid)

    def _zygote_exits(self) -> None:
        for z in self.zygotes:
            for pid, status in z.take_exits():
                self._job_exited(pid, status)

    def reap(self) -> None:
        for pid, status in sysc.reaped():
            if pid == self.daemon.pid:
                self._daemon_exited(status)
            elif (z := next((z for z in self.zygotes if z.pid == pid), None)) is not None:
                z.exited(status)
            elif pid in self.jobs:
                for z in self.zygotes:
                    z.adopted(pid)  # a worker orphaned by its zygote's death
                self._job_exited(pid, status)
            else:
                p = self.table.reaped(pid, status)
                if p is not None:
                    self._send({"t": "ev", "ev": "exit", **p.as_dict()})

    # ---- the loop ------------------------------------------------------------------------
    def _on_signal(self, signum, frame) -> None:
        if signum in (signal.SIGTERM, signal.SIGINT) and not self.vm:
            self.stopping = f"signal {signum}"

    def run(self) -> int:
        for s in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)
        signal.set_wakeup_fd(self._wake_w)
        try:
            self._loop()
        except Exception as e:  # noqa: BLE001 - PID 1 must not just die
            self.log.error("fatal error in init", error=repr(e))
            self.stopping = f"fatal: {e!r}"
            self.exit_status = 1
        self.log.info("stopping", reason=self.stopping)
        self.shutdown()
        return self.exit_status

    def _loop(self) -> None:
        d, zs = self.daemon, self.zygotes
        while not self.stopping:
            now = time.monotonic()
            if d.pid is None and d.restart_at is not None and now >= d.restart_at:
                self.start_daemon()
            for z in zs:
                z.tick(now)
            wake_at = [j.deadline for j, _, _ in self.jobs.values() if not j.killed]
            if d.pid is None and d.restart_at is not None:
                wake_at.append(d.restart_at)
            wake_at += [t for t in (z.wake_at() for z in zs) if t is not None]
            timeout = max(0.0, min(wake_at) - time.monotonic()) if wake_at else None
            rl = [self._wake_r]
            if self._daemon_err is not None:
                rl.append(self._daemon_err)
            rl += [z.sock for z in zs if z.sock is not None]
            wl = []
            if d.sock is not None:
                rl.append(d.sock)
                if d.outbox:
                    wl.append(d.sock)
            for job, _, _ in self.jobs.values():
                if job.out_r is not None:
                    rl.append(job.out_r)
                if job.console is not None:
                    rl.append(job.console)
            try:
                r, w, _ = select.select(rl, wl, [], timeout)
            except InterruptedError:
                continue
            if self._wake_r in r:
                sysc.drain(self._wake_r)
            if self._daemon_err is not None and self._daemon_err in r:
                self._forward_daemon_log()
            if d.sock is not None and d.sock in w:
                self._flush()
            for pid, (job, _, _) in list(self.jobs.items()):
                if job.console is not None and job.console in r:
                    try:
                        self.sandbox.accept_console(job)
                    except OSError as e:
                        self.log.warn("console socket failed", error=str(e))
                        self.sandbox.close_console(job)
                if job.out_r is not None and job.out_r in r:
                    self._job_output(job)
                if job.done:
                    self._finish_job(pid)
            for z in zs:
                if z.sock is not None and z.sock in r:
                    z.read()
            if d.sock is not None and d.sock in r:
                self._read_daemon()
            self._kill_overdue_jobs()
            self.reap()
            self._zygote_exits()

    # ---- stopping ------------------------------------------------------------------------
    def _wait_pid(self, pid: int, timeout: float) -> int | None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if got == pid:
                return status
            time.sleep(0.01)
        return None

    def shutdown(self) -> None:
        """Stop every container, stop the daemon, sync; power off as PID 1 in a VM."""
        self._flush_blocking()
        for z in self.zygotes:
            z.stop()  # the deletes below go through the CLI: init waits for them
        for pid in self.table.live_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        for cid in list(self.table.containers):
            try:
                pid = self.sandbox._spawn(self.sandbox._rt(None, "delete", "--force", cid),
                                          [None, None, None])
                self._wait_pid(pid, 10)
            except OSError as e:
                self.log.warn("runtime delete failed at shutdown", container_id=cid,
                              error=str(e))
        if self.daemon.pid is not None:
            try:
                os.kill(self.daemon.pid, signal.SIGKILL)
            except OSError:
                pass
            self._wait_pid(self.daemon.pid, 5)
            self.daemon.pid = None
        self._drop_channel()
        # Collect whatever is left (killed container processes, leftover jobs).
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.01)
        os.sync()
        if self.vm:
            self.log.info("powering off")
            sysc.in_child(sysc.reboot, sysc.RB_POWER_OFF)

    def _flush_blocking(self) -> None:
        d = self.daemon
        if d.sock is None or not d.outbox:
            return
        d.sock.settimeout(1.0)
        try:
            self._flush()
        except OSError:
            pass


def start_debug_consoles(cfg: AgentConfig, log: JsonLogger) -> list[int]:
    """Kata's agent.debug_console / agent.debug_console_vport: a root shell on the console, or
    one per connection to a vsock port. Each is its own self-supervising process
    (agent/debug_console.py), so PID 1 carries none of it and reaps it like any orphan."""
    targets = []
    if cfg.debug_console:
        targets.append(["console"])
    if cfg.debug_console_vport:
        targets.append(["listen", f"vsock://-1:{cfg.debug_console_vport}"])
    pids = []
    for t in targets:
        argv = [sys.executable, "-m", "agent.debug_console", *t]
        try:
            pids.append(os.posix_spawn(argv[0], argv, dict(os.environ), setsid=True,
                                       setsigdef=(signal.SIGCHLD, signal.SIGTERM, signal.SIGINT,
                                                  signal.SIGHUP, signal.SIGPIPE)))
            log.warn("debug console started: a root shell", where=" ".join(t), pid=pids[-1])
        except OSError as e:
            log.error("cannot start the debug console", where=" ".join(t), error=str(e))
    return pids


def default_daemon_argv() -> list[str]:
    return [sys.executable, "-m", "agent.daemon"]


# --option: (attribute, type, help); type bool = a flag. A hand-written parser: argparse
# (with re and gettext) would stay in init's memory, ~2 MB, for a dozen options.
OPTIONS = {
    "--server-addr": ("server_addr", str, "where the daemon serves ttRPC (env "
                      "AGENT_SERVER_ADDR)"),
    "--run-dir": ("run_dir", str, "the sandbox's run directory"),
    "--runtime": ("runtime", str, "OCI runtime binary (runc CLI); default our launcher"),
    "--daemon-cmd": ("daemon_cmd", str, "daemon command line (shell words); default "
                     "'python -m agent.daemon'"),
    "--daemon-uid": ("daemon_uid", int, "uid the daemon drops to"),
    "--daemon-gid": ("daemon_gid", int, "gid the daemon drops to"),
    "--log-level": ("log_level", str, "trace debug info warn error critical"),
    "--log-addr": ("log_addr", str, "unix:///path: serve JSON logs there (as agent.log_vport "
                   "does over vsock in a guest)"),
    "--no-seccomp": ("no_seccomp", bool, "no syscall filter in the daemon"),
    "--no-zygote": ("no_zygote", bool, "run every runtime command through the launcher CLI "
                    "(no warm launcher)"),
    "--job-timeout": ("job_timeout", float, "seconds a runtime or network worker may run "
                      "before init kills it"),
    "--subreaper": ("subreaper", bool, "act as a subreaper even when running as pid 1 "
                    "(tests in a pid ns)"),
}


class UsageError(ValueError):
    pass


class Args:
    def __init__(self) -> None:
        for dest, kind, _ in OPTIONS.values():
            setattr(self, dest, False if kind is bool else None)
        self.server_addr = os.environ.get("AGENT_SERVER_ADDR")
        self.job_timeout = JOB_TIMEOUT


def usage() -> str:
    # the guest's bytecode carries no docstrings (compiled with -OO)
    summary = (__doc__ or "").split("\n\n")[0]
    return ("usage: python -m agent.init [options]\n" + summary + "\n\n" +
            "".join(f"  {o}{'' if k is bool else ' ' + d.upper()}\n      {h}\n"
                    for o, (d, k, h) in OPTIONS.items()))


def _parse_args(argv: list[str]) -> Args:
    """``--opt VALUE``, ``--opt=VALUE``, flags; raises UsageError naming the culprit."""
    a = Args()
    i = 0
    while i < len(argv):
        name, eq, value = argv[i].partition("=")
        if name not in OPTIONS:
            raise UsageError(f"unknown argument {argv[i]!r}")
        dest, kind, _ = OPTIONS[name]
        if kind is bool:
            if eq:
                raise UsageError(f"{name} takes no value")
            setattr(a, dest, True)
        else:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"{name} needs a value")
                value = argv[i]
            try:
                setattr(a, dest, kind(value))
            except ValueError:
                raise UsageError(f"{name}: {value!r} is not a valid {kind.__name__}") from None
        i += 1
    return a


def _log_sink(cfg: AgentConfig, log_addr: str | None) -> SocketSink | None:
    if log_addr:
        path = parse_address(log_addr)
        if path.scheme != "unix":
            raise ValueError(f"--log-addr {log_addr!r}: only unix:// is supported")
        import socket  # only with a log port: SocketSink wants a full socket object
        return SocketSink(socket.socket(fileno=open_endpoint(path, backlog=1)))
    if cfg.log_vport:
        return SocketSink.vsock(cfg.log_vport)
    return None


def _boot_child(log: JsonLogger) -> None:
    """PID 1's boot in a child: the pseudo file systems, then the modules the command line
    names (an unreadable command line is reported by PID 1 itself, which reads it again)."""
    boot_mounts(log)
    try:
        cfg = cmdline.read()
    except (OSError, cmdline.CmdlineError):
        return
    load_modules(cfg.modules, log)


def _power_off() -> None:
    os.sync()
    sysc.in_child(sysc.reboot, sysc.RB_POWER_OFF)  # returns only if the reboot failed


def _reexec_lean(argv: list[str]) -> None:
    """Start again the way the guest starts init (``python -I -S``) when this interpreter ran
    site: site and an editable install's import hook would stay in this long-lived process's
    memory (~2.6 MB) for nothing. The paths are handed over explicitly; exec keeps the pid."""
    if sys.flags.no_site:
        return
    # the module's name first: `ps` cuts long command lines
    boot = ("import sys;init=lambda:__import__('agent.init',fromlist=['main']).main();"
            f"sys.path[:0]={launcher_paths()!r};sys.exit(init())")
    try:
        os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", boot, *argv])
    except OSError:
        pass  # carry on as we are: a few MB more, nothing else differs


def main(argv: list[str] | None = None) -> int:
    """``python -m agent.init [--server-addr ADDR] ...``: PID 1 in a VM, else a subreaper."""
    argv = sys.argv[1:] if argv is None else argv
    _reexec_lean(argv)
    for fd in (0, 1, 2):  # a closed stdio slot would be reused by the first fd opened
        try:
            os.fstat(fd)
        except OSError:
            try:
                os.open("/dev/null", os.O_RDWR)
            except OSError:  # no /dev yet (PID 1 before boot_mounts): nothing to fill with
                break
    if argv and argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    try:
        a = _parse_args(argv) if argv else None
    except UsageError as e:
        sys.stderr.write(f"agent.init: {e}\n{usage()}")
        return 2
    vm = os.getpid() == 1 and not (a and a.subreaper)
    log = JsonLogger("init", "info")
    if vm:
        # Mounts and modules need ctypes; a child does them so PID 1 never loads it (~1.2 MB).
        try:
            sysc.in_child(_boot_child, log)
        except (OSError, RuntimeError) as e:
            log.error("boot step failed", error=str(e))
        try:
            cfg = cmdline.read()
        except (OSError, cmdline.CmdlineError) as e:
            # Serving with a setting other than the one asked for would be worse than not
            # serving: say why on the console and stop the VM (a PID 1 crash is a panic).
            log.error("bad kernel command line; powering off", error=str(e))
            _power_off()
            return 1
    else:
        sysc.set_child_subreaper()
        if os.geteuid() == 0:
            # Its own UTS namespace: set_hostname names the sandbox, never the host.
            sysc.unshare(sysc.CLONE_NEWUTS)
        cfg = AgentConfig()
        if os.environ.get("AGENT_SERVER_ADDR"):
            cfg = replace(cfg, server_addr=os.environ["AGENT_SERVER_ADDR"])
    over: dict = {}
    if a is not None:
        for opt, key in (("server_addr", "server_addr"), ("run_dir", "run_dir"),
                         ("runtime", "oci_runtime"), ("daemon_uid", "daemon_uid"),
                         ("daemon_gid", "daemon_gid"), ("log_level", "log_level")):
            if getattr(a, opt) is not None:
                over[key] = getattr(a, opt)
        if a.no_seccomp:
            over["seccomp"] = False
        if a.no_zygote:
            over["zygote"] = False
    cfg = replace(cfg, **over)
    if a is not None and a.daemon_cmd:
        if any(c in a.daemon_cmd for c in "'\"\\"):
            import shlex  # quoting: worth shlex (and the re it imports) in init's memory
            daemon_argv = shlex.split(a.daemon_cmd)
        else:
            daemon_argv = a.daemon_cmd.split()
    else:
        daemon_argv = default_daemon_argv()
    try:
        sink = _log_sink(cfg, a.log_addr if a else None)
    except (OSError, ValueError) as e:
        log.error("cannot open the log port; logging to the console", error=str(e))
        sink = None
    log = JsonLogger("init", cfg.log_level, sink=sink)
    try:
        listen_fd = open_endpoint(parse_address(cfg.server_addr))
    except (OSError, ValueError) as e:
        log.error("cannot open the server endpoint", addr=cfg.server_addr, error=str(e))
        if vm:
            _power_off()
        return 1
    init = Init(cfg, daemon_argv, vm=vm, log=log, listen_fd=listen_fd, log_sink=sink)
    if vm:
        start_debug_consoles(cfg, log)
    if a is not None:
        init.job_timeout = a.job_timeout
    return init.run()


if __name__ == "__main__":
    sys.exit(main())
