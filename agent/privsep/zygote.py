"""The warm launcher ("zygote"): a root child of init that has imported the OCI launcher once
and forks a worker per runtime command.

The same program serves a second kind, the warm puller (``KINDS``): its workers run
``puller.agentjob.main(argv)`` - init's image jobs (pull without a puller container, snapshot,
unsnapshot) - with trio, pyfuse3 and the puller imported once, so that a snapshot's FUSE
daemon is a fork of warm modules too. It is not re-executed from a sealed copy (below): its
workers never enter a container.

Why: init used to posix_spawn ``python -I -S -c <boot> create ...`` for every runtime command;
an interpreter start plus the launcher's imports cost ~25 ms per command, twice per container
(create, start). A fork of a process that already holds those modules costs ~1 ms.

What a worker does is exactly what the CLI process would do: it puts the three fds it was sent
on 0, 1, 2 and runs ``agent.launcher.cli.main(argv)`` with the same argv (``--root``, ``--log``,
``--pid-file``, ``--console-socket`` ...), so the state directory, log files, pid files,
console sockets and error messages are the CLI's, and ``state``/``delete`` through the CLI keep
working on what a worker created. The container process a worker starts is reparented to init
as before: neither the zygote nor its workers are subreapers.

CVE-2019-5736: a process that enters a container must never have a writable host executable
as /proc/self/exe. The zygote re-executes itself once, at start, from a sealed memfd copy of
the interpreter (or not at all when its executable is already sealed or on a read-only
mount). Its workers are forks, so they inherit that executable, and the launcher's own check
(launcher/selfexe.py) then lets it fork the container's first process without another copy.

Channel (agent.privsep.wire packets on fd 3, the zygote's only link to init):

* ``{"t": "req", "id": N, "op": "run", "args": {"argv": [...]}}`` + fds for stdin, stdout,
  stderr -> ``{"t": "rep", "id": N, "ok": true, "result": {"pid": P}}`` as soon as the worker
  is forked (or ``ok: false`` with the reason);
* ``{"t": "ev", "ev": "exit", "pid": P, "status": S}`` when a worker ends (S as from waitpid).

The zygote exits when init closes the channel, and is killed if init dies (PDEATHSIG).
"""
from __future__ import annotations

import os
import select
import signal
import sys

from . import sysc, wire
from .zygote_link import ENV_PRIORITY, LOW_PRIORITY

CHANNEL_FD = 3
MAX_ARGV = 64
# Every module the launcher's create/start/exec/kill/delete paths import, imported once here
# so a worker imports nothing. A module that fails to import is left to fail in the worker,
# with the CLI's own error, when a command needs it.
PRELOAD = ("agent.launcher.cli", "agent.launcher.container", "agent.launcher.init",
           "agent.launcher.spec", "agent.launcher.state", "agent.launcher.cgroups",
           "agent.launcher.seccomp", "agent.launcher.selfexe", "agent.launcher.console",
           "agent.launcher.hooks", "agent.jsonlite", "agent.launcher.rootfs",
           "agent.launcher.process", "agent.launcher.capabilities", "agent.launcher.sync",
           "agent.launcher.syscalls", "_pickle", "pyseccomp")
# The puller's jobs (puller.agentjob: pull, snapshot, unsnapshot), for the second zygote init
# runs: a snapshot worker forks the lazy FUSE daemon from these warm modules as well.
PRELOAD_PULLER = ("puller.agentjob", "puller.pull", "puller.store", "puller.snapshot",
                  "puller.storeconfig", "puller.auth", "puller.platform", "puller.registry",
                  "puller.imageconfig", "puller.lazy.cli", "puller.lazy.locate",
                  "puller.lazy.mount", "puller.lazy.daemon")
# kind -> (module whose main(argv) a worker runs, what to import first)
KINDS = {"launcher": ("agent.launcher.cli", PRELOAD), "puller": ("puller.agentjob", PRELOAD_PULLER)}


def check_request(msg: dict, nfds: int) -> list[str]:
    """The argv of a ``run`` request, or ValueError saying what is wrong with it."""
    if msg.get("op") != "run":
        raise ValueError(f"op: unknown operation {msg.get('op')!r}")
    args = msg.get("args")
    argv = args.get("argv") if isinstance(args, dict) else None
    if not isinstance(argv, list) or not argv or len(argv) > MAX_ARGV or \
            not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise ValueError(f"args.argv: must be 1..{MAX_ARGV} strings without NUL, got {argv!r}")
    if nfds != 3:
        raise ValueError(f"a run request carries 3 fds (stdin, stdout, stderr), got {nfds}")
    return argv


def preload(names=PRELOAD) -> list[str]:
    """Import the modules a worker will run; returns the names that failed (logged by the
    caller)."""
    import importlib
    failed = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - see PRELOAD
            failed.append(name)
    if "agent.launcher.syscalls" in names:
        try:
            from agent.launcher import syscalls
            syscalls.default()  # libc through ctypes, resolved once
        except Exception:  # noqa: BLE001
            failed.append("agent.launcher.syscalls.default")
    return failed


def _worker(argv: list[str], fds: list[int], entry: str = "agent.launcher.cli") -> int:
    """In the forked worker: stdio from init, then the CLI's own entry point."""
    for i, fd in enumerate(fds):
        os.dup2(fd, i)  # dup2 clears close-on-exec on 0, 1, 2
    for fd in fds:
        if fd > 2:
            os.close(fd)
    try:
        import importlib
        code = importlib.import_module(entry).main(argv)
    except SystemExit as e:  # as the interpreter ends: None is 0, a message goes to stderr
        code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, (int, type(None))):
            os.write(2, f"{e.code}\n".encode(errors="replace"))
    except BaseException as e:  # noqa: BLE001 - the CLI's contract: a line on stderr, status 1
        prog = "oci-launcher" if entry == "agent.launcher.cli" else entry
        os.write(2, f"{prog}: {type(e).__name__}: {e}\n".encode())
        code = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:  # noqa: BLE001
        pass
    return code if isinstance(code, int) else 0


class Zygote:
    def __init__(self, chan, entry: str = "agent.launcher.cli") -> None:
        self.chan = chan
        self.entry = entry
        self.workers: set[int] = set()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def _fork(self, argv: list[str], fds: list[int]) -> int:
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                # As a CLI process starts: default dispositions, but SIGPIPE ignored (Python's
                # own start-up does that; the launcher restores it for the container).
                signal.set_wakeup_fd(-1)
                for s in (signal.SIGCHLD, signal.SIGTERM):
                    signal.signal(s, signal.SIG_DFL)
                self.chan.close()  # a container must never reach the zygote
                os.close(self._wake_r)
                os.close(self._wake_w)
                code = _worker(argv, fds, self.entry)
            finally:
                os._exit(code)
        return pid

    def _on_request(self, pkt: wire.Packet) -> None:
        rid = pkt.msg.get("id", 0)
        try:
            try:
                argv = check_request(pkt.msg, len(pkt.fds))
            except ValueError as e:
                wire.send_packet(self.chan, {"t": "rep", "id": rid, "ok": False,
                                             "error": {"field": "", "msg": str(e)}})
                return
            try:
                pid = self._fork(argv, pkt.fds)
            except OSError as e:
                wire.send_packet(self.chan, {"t": "rep", "id": rid, "ok": False,
                                             "error": {"field": "", "msg": f"fork: {e}"}})
                return
            self.workers.add(pid)
            wire.send_packet(self.chan, {"t": "rep", "id": rid, "ok": True,
                                         "result": {"pid": pid}})
        finally:
            pkt.close_fds()  # the worker has its copies

    def _reap(self) -> None:
        for pid, status in sysc.reaped():
            self.workers.discard(pid)
            wire.send_packet(self.chan, {"t": "ev", "ev": "exit", "pid": pid, "status": status})

    def serve(self) -> int:
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.set_wakeup_fd(self._wake_w)
        while True:
            try:
                r, _, _ = select.select([self.chan, self._wake_r], [], [])
            except InterruptedError:
                continue
            if self._wake_r in r:
                sysc.drain(self._wake_r)
            self._reap()
            if self.chan in r:
                try:
                    pkt = wire.recv_packet(self.chan)
                except wire.ProtocolError as e:
                    wire.send_packet(self.chan, {"t": "ev", "ev": "error", "msg": str(e)})
                    continue
                if pkt is None:
                    return 0  # init closed the channel: it is stopping or replacing us
                if pkt.msg.get("t") != "req":
                    pkt.close_fds()
                    continue
                self._on_request(pkt)


def _protect_exe() -> None:
    """Re-execute from a sealed copy of the interpreter unless /proc/self/exe is already safe
    (see the module text). Returns only when it is."""
    from agent.launcher import selfexe
    if selfexe.exe_is_protected():
        os.environ.pop(selfexe._MARK, None)  # not for the workers' children to see
        return
    if os.environ.get(selfexe._MARK) == "1":
        raise RuntimeError("re-executed from a sealed memfd, yet /proc/self/exe is writable")
    fd = selfexe.sealed_copy("/proc/self/exe")
    selfexe.exec_sealed(fd, selfexe.boot_code("agent.privsep.zygote", "main"), sys.argv[1:])


def main() -> None:
    """Entry point: ``python -I -S -c <boot> INIT_PID [KIND]`` from init, the channel on fd 3;
    KIND (see KINDS) is ``launcher`` unless given."""
    kind = sys.argv[2] if len(sys.argv) > 2 else "launcher"
    if kind not in KINDS:
        sys.exit(f"zygote: unknown kind {kind!r}")
    entry, names = KINDS[kind]
    # Warming up (imports: seconds on one emulated CPU) must not slow the daemon starting
    # beside it, so it starts at the lowest priority (init sets it and raises it again after a
    # while, see zygote_link); the priority in ENV_PRIORITY is restored before the first fork,
    # or workers and containers would inherit the low one. Started by anyone else, it lowers
    # itself and restores what it had.
    if ENV_PRIORITY not in os.environ:
        os.environ[ENV_PRIORITY] = str(os.getpriority(os.PRIO_PROCESS, 0))
        os.setpriority(os.PRIO_PROCESS, 0, LOW_PRIORITY)
    from agent.oci_launcher import _add_site_packages
    _add_site_packages()  # pyseccomp, trio, pyfuse3 live in the venv's site-packages
    if kind == "launcher":  # its workers enter containers; the puller's never do
        _protect_exe()
    prio = os.environ.pop(ENV_PRIORITY)
    from . import sysc
    sysc.prctl(sysc.PR_SET_PDEATHSIG, signal.SIGKILL)  # never outlive init
    if len(sys.argv) > 1 and os.getppid() != int(sys.argv[1]):
        sys.exit(1)  # init died before the death signal was armed
    import socket
    chan = socket.socket(fileno=CHANNEL_FD)
    os.set_inheritable(CHANNEL_FD, False)
    failed = preload(names)
    os.setpriority(os.PRIO_PROCESS, 0, int(prio))  # raises (no CAP_SYS_NICE): init uses the CLI
    wire.send_packet(chan, {"t": "ev", "ev": "ready", "failed": failed})
    sys.exit(Zygote(chan, entry).serve())
