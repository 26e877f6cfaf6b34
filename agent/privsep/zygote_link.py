"""Init's side of the warm launcher (agent.privsep.zygote): start it, supervise it, hand it
runtime commands, turn its worker exit reports into job completions.

Kept light (init imports it): wire, os, select, time.

A command goes to the zygote only once it has said it is ready; before that, after it died,
or while a restart backs off, :meth:`ZygoteLink.spawn` raises :class:`ZygoteUnavailable` and
the caller runs the CLI instead, so a missing or broken zygote costs speed, never function.
Init waits for the fork's answer (a millisecond) without returning to its loop, so a worker's
exit report cannot arrive before init knows the worker's pid.
"""
from __future__ import annotations

import os
import select
import time

from . import wire

# A zygote not ready after this is killed and restarted. Generous: on one emulated CPU busy
# with containers its imports can take a minute, and killing it throws that work away
# (commands run in new processes meanwhile, so waiting costs nothing).
READY_TIMEOUT = 120.0
# The zygote starts at nice 19 (set by init right after starting it) so that its warm-up does
# not slow the daemon's own start; after this long init gives it init's priority back. Left at
# 19 on a CPU kept busy by containers it got ~1.5% of it and was not ready after minutes (seen
# in a guest under load), so every command kept paying for a new interpreter.
LOW_PRIORITY_FOR = 5.0
LOW_PRIORITY = 19
# Init's priority, handed to the zygote: what it restores before its first fork, whatever
# priority it has by then, so that workers and containers never inherit the low one.
ENV_PRIORITY = "_SANDBOX_AGENT_ZYGOTE_PRIORITY"
REPLY_TIMEOUT = 5.0     # waiting for a fork's answer; a zygote that overruns it is killed
BACKOFF_START, BACKOFF_MAX, STABLE_AFTER = 0.5, 30.0, 10.0
LOST_STATUS = 255 << 8  # waitpid status reported for a worker whose zygote died with it
# the verbs named in the debug line of a command's worker (the launcher's, the puller's)
COMMANDS = ("create", "start", "exec", "kill", "delete", "state", "run", "pull", "snapshot",
            "unsnapshot")


class ZygoteUnavailable(Exception):
    """The zygote cannot take a command now; nothing was started: use the CLI."""


class ZygoteLost(OSError):
    """The zygote failed after receiving a command: whether it ran is unknown."""


def boot_argv(python: str, paths: list[str], init_pid: int, kind: str = "launcher") -> list[str]:
    """The zygote's command line; ``kind``: ``launcher`` (runtime commands) or ``puller``
    (the puller's image jobs), see agent.privsep.zygote.KINDS."""
    boot = (f"import sys;sys.path[:0]={paths!r};"
            "from agent.privsep.zygote import main;main()")
    return [python, "-I", "-S", "-c", boot, str(init_pid), kind]


class ZygoteLink:
    def __init__(self, argv: list[str], log, env: dict | None = None,
                 first_start: float | None = 0.0, ready_timeout: float = READY_TIMEOUT,
                 low_priority_for: float = LOW_PRIORITY_FOR, name: str = "warm launcher") -> None:
        """``first_start``: seconds until the first start, unless :meth:`wanted_now` comes
        first (init calls it at the daemon's first request, as the daemon starts serving);
        None: only when wanted."""
        self.argv, self.log, self.env = argv, log, env
        self.name = name  # in log lines and errors
        self.pid: int | None = None
        self.sock = None
        self.ready = False
        self.ready_timeout = ready_timeout
        self.low_priority_for = low_priority_for
        self.raised = False  # its priority was raised back to init's (see LOW_PRIORITY_FOR)
        # A kill was sent and the death is not reaped yet: nothing is due until it is (a
        # dying zygote is not "still not ready", which would kill it again on every tick).
        self.killed = False
        self.started_at = 0.0
        # monotonic time of the next start; None = none due
        self.restart_at: float | None = (None if first_start is None
                                         else time.monotonic() + first_start)
        self.wanted = True                    # False once init stops it for good
        self.backoff = BACKOFF_START
        self.restarts = 0
        self.workers: set[int] = set()       # forked for us, exit not yet reported
        self.exits: list[tuple[int, int]] = []  # (pid, status) waiting for init to act on
        self._id = 0

    # ---- life cycle ----------------------------------------------------------------------
    def start(self) -> None:
        import _signal as signal
        self.restart_at = None
        mine, theirs = wire.socketpair()
        src = os.dup(theirs.fileno())  # >= 3 already (0-2 are taken), close-on-exec
        theirs.close()
        null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
        prio = os.getpriority(os.PRIO_PROCESS, 0)
        env = dict(self.env if self.env is not None else os.environ, **{ENV_PRIORITY: str(prio)})
        try:
            self.pid = os.posix_spawn(
                self.argv[0], self.argv, env,
                file_actions=[(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1),
                              (os.POSIX_SPAWN_DUP2, src, 3)],
                setsigdef=(signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                           signal.SIGPIPE),
                setsigmask=())
        except OSError as e:
            mine.close()
            self.started_at = time.monotonic()
            self.log.error(f"cannot start the {self.name}; commands run in new processes",
                           argv=self.argv[:1], error=str(e))
            self._schedule_restart()
            return
        finally:
            os.close(src)
            os.close(null)
        try:
            os.setpriority(os.PRIO_PROCESS, self.pid, max(prio, LOW_PRIORITY))
        except OSError:
            pass  # already gone: reaped soon
        mine.setblocking(False)
        self.sock, self.ready, self.started_at = mine, False, time.monotonic()
        self.killed = self.raised = False
        self.log.info(f"{self.name} started", pid=self.pid)

    def _schedule_restart(self) -> None:
        if time.monotonic() - self.started_at >= STABLE_AFTER:
            self.backoff = BACKOFF_START
        self.restart_at = time.monotonic() + self.backoff
        self.restarts += 1
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)

    def wanted_now(self) -> None:
        """Start at the next tick if it was never started (see __init__)."""
        if self.pid is None and self.started_at == 0.0 and self.wanted:
            now = time.monotonic()
            self.restart_at = now if self.restart_at is None else min(self.restart_at, now)

    def wake_at(self) -> float | None:
        """When init's loop must call :meth:`tick` next."""
        if self.pid is None:
            return self.restart_at
        if self.ready or self.killed:
            return None
        due = self.started_at + self.ready_timeout
        if not self.raised:
            due = min(due, self.started_at + self.low_priority_for)
        return due

    def tick(self, now: float) -> None:
        if self.pid is None:
            if self.restart_at is not None and now >= self.restart_at:
                self.start()
            return
        if self.ready or self.killed:
            return
        if not self.raised and now >= self.started_at + self.low_priority_for:
            self.raised = True
            try:
                os.setpriority(os.PRIO_PROCESS, self.pid, os.getpriority(os.PRIO_PROCESS, 0))
            except OSError as e:  # gone meanwhile (reaped soon), or no CAP_SYS_NICE
                self.log.debug(f"cannot raise the {self.name}'s priority", error=str(e))
        if now >= self.started_at + self.ready_timeout:
            self.log.error(f"{self.name} not ready in time; killing it",
                           pid=self.pid, timeout=self.ready_timeout)
            self._kill()

    def _kill(self) -> None:
        if self.pid is not None:
            self.killed = True
            try:
                os.kill(self.pid, 9)
            except OSError:
                pass
        self._close()

    def _close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        self.ready = False

    def exited(self, status: int) -> None:
        """Init reaped the zygote. Its workers that are still alive were reparented to init,
        which reaps them as its own; one already gone, whose report died with the zygote, is
        reported as failed."""
        self.log.warn(f"{self.name} exited; commands run in new processes until it is back",
                      pid=self.pid, status=status)
        self.pid, self.killed = None, False
        self._close()
        for pid in list(self.workers):
            try:
                os.kill(pid, 0)  # alive, or a zombie of init's that reap() will collect
            except ProcessLookupError:
                self.workers.discard(pid)
                self.exits.append((pid, LOST_STATUS))
            except OSError:
                pass
        if self.wanted:
            self._schedule_restart()

    def stop(self) -> None:
        """Stop it for good (init is shutting down)."""
        self.wanted, self.restart_at = False, None
        self._kill()

    def adopted(self, pid: int) -> None:
        """Init reaped a worker itself (reparented after the zygote died)."""
        self.workers.discard(pid)

    # ---- messages ----------------------------------------------------------------------
    def _on_packet(self, pkt: wire.Packet, want: int = 0):
        pkt.close_fds()  # the zygote sends none; never keep what it should not have sent
        m = pkt.msg
        if m["t"] == "ev" and m.get("ev") == "exit":
            pid, status = m.get("pid"), m.get("status")
            if isinstance(pid, int) and isinstance(status, int) and pid in self.workers:
                self.workers.discard(pid)
                self.exits.append((pid, status))
        elif m["t"] == "ev" and m.get("ev") == "ready":
            self.ready = True
            self.log.info(f"{self.name} ready", pid=self.pid,
                          preload_failed=m.get("failed") or None)
        elif m["t"] == "ev":
            self.log.warn(f"{self.name} says", msg=str(m.get("msg", m))[:500])
        elif m["t"] == "rep" and m.get("id") == want:
            return m
        return None

    def read(self) -> None:
        """Take what the zygote sent (init's loop saw its socket readable); exits are queued
        in :attr:`exits`."""
        for _ in range(64):
            if self.sock is None:
                return
            try:
                pkt = wire.recv_packet(self.sock)
            except BlockingIOError:
                return
            except (wire.ProtocolError, OSError) as e:
                self.log.error(f"{self.name} channel broken; killing it", error=str(e))
                self._kill()
                return
            if pkt is None:
                self._close()  # it is exiting; reap() will tell
                return
            self._on_packet(pkt)

    def take_exits(self) -> list[tuple[int, int]]:
        out, self.exits = self.exits, []
        return out

    def spawn(self, argv: list[str], stdio: list[int | None]) -> int:
        """Run the launcher CLI with ``argv`` (no program name) in a forked worker with
        ``stdio`` as its 0, 1, 2 (None = /dev/null); returns the worker's pid. The exit
        status arrives later through :attr:`exits`."""
        if self.sock is None or not self.ready:
            raise ZygoteUnavailable(f"the {self.name} is not running")
        self._id += 1
        rid = self._id
        null = None
        fds = []
        for fd in stdio:
            if fd is None:
                if null is None:
                    null = os.open("/dev/null", os.O_RDWR | os.O_CLOEXEC)
                fd = null
            fds.append(fd)
        try:
            self.sock.setblocking(True)
            self.sock.settimeout(REPLY_TIMEOUT)
            try:
                wire.send_packet(self.sock, {"t": "req", "id": rid, "op": "run",
                                             "args": {"argv": argv}}, fds)
            except OSError as e:  # not sent, so not run
                self._kill()
                raise ZygoteUnavailable(f"sending to the {self.name}: {e}") from None
            deadline = time.monotonic() + REPLY_TIMEOUT
            while True:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                    self.log.error(f"{self.name} did not answer; killing it", pid=self.pid)
                    self._kill()
                    raise ZygoteLost(f"the {self.name} did not answer in "
                                        f"{REPLY_TIMEOUT} s")
                try:
                    pkt = wire.recv_packet(self.sock)
                except ConnectionResetError:
                    # The zygote's end closed with data unread, and init sends one request at
                    # a time: it died without reading this one, so nothing ran.
                    self._kill()
                    raise ZygoteUnavailable(f"the {self.name} died before reading the "
                                            "command") from None
                except (wire.ProtocolError, OSError) as e:
                    self._kill()
                    raise ZygoteLost(f"{self.name} channel: {e}") from None
                if pkt is None:
                    self._close()
                    raise ZygoteLost(f"the {self.name} exited while starting the command")
                rep = self._on_packet(pkt, rid)
                if rep is None:
                    continue
                if not rep.get("ok"):
                    err = rep.get("error") or {}
                    raise ZygoteLost(f"{self.name}: {err.get('msg')}")
                pid = rep["result"]["pid"]
                self.workers.add(pid)
                self.log.debug("command in a warm worker", pid=pid, zygote=self.pid,
                               command=next((w for w in argv if w in COMMANDS), "?"))
                return pid
        finally:
            if null is not None:
                os.close(null)
            if self.sock is not None:
                self.sock.setblocking(False)
