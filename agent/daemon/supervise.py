"""The daemon's start-up under init, and its view of the processes init runs for it.

:func:`start_from_env` reads what init hands a daemon it starts (the privsep socket on fd 3,
the host endpoint on fd 4, the agent config as JSON, the incarnation number), confines the
process (agent.daemon.confine) and returns a :class:`DaemonEnv`. Nothing from the host has
been read at that point.

:class:`ExitWatcher` keeps the exit status of every process init started, fed by init's
``exit`` events and, after a daemon restart, by init's process table: WaitProcess awaits
``wait(pid)`` whether the process ended before or after this daemon incarnation began.
"""
from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass

import trio

from .confine import Confinement, confine

ENV_PRIVSEP_FD = "SANDBOX_AGENT_PRIVSEP_FD"
ENV_LISTEN_FD = "SANDBOX_AGENT_LISTEN_FD"
ENV_CONFIG = "SANDBOX_AGENT_CONFIG"
ENV_GENERATION = "SANDBOX_AGENT_DAEMON_GENERATION"


@dataclass(frozen=True)
class DaemonEnv:
    privsep_fd: int
    listen_fd: int | None
    config: dict          # agent.cmdline.AgentConfig fields
    generation: int
    confinement: Confinement | None

    @property
    def server_addr(self) -> str:
        return self.config.get("server_addr", "")

    def listen_socket(self) -> socket.socket | None:
        """The endpoint init opened (None for a serial port: use ``listen_fd`` as a file)."""
        if self.listen_fd is None or self.server_addr.startswith("serial:"):
            return None
        return socket.socket(fileno=self.listen_fd)


def read_env(environ=os.environ) -> DaemonEnv:
    def fd(name: str, required: bool) -> int | None:
        v = environ.get(name)
        if v is None and not required:
            return None
        if v is None or not v.isdigit():
            raise RuntimeError(f"{name} must name an inherited fd, got {v!r}: "
                               "the daemon is started by agent.init")
        return int(v)
    try:
        cfg = json.loads(environ.get(ENV_CONFIG, "{}"))
    except ValueError as e:
        raise RuntimeError(f"{ENV_CONFIG} is not JSON: {e}") from None
    return DaemonEnv(fd(ENV_PRIVSEP_FD, True), fd(ENV_LISTEN_FD, False), cfg,
                     int(environ.get(ENV_GENERATION, "1")), None)


def start_from_env(environ=os.environ) -> DaemonEnv:
    """Read init's hand-over and confine this process (when it is root)."""
    env = read_env(environ)
    conf = None
    if os.geteuid() == 0:
        c = env.config
        conf = confine(c.get("daemon_uid", 65534), c.get("daemon_gid", 65534),
                       c.get("run_dir", "/run/sandbox-agent"), seccomp=c.get("seccomp", True))
    return DaemonEnv(env.privsep_fd, env.listen_fd, env.config, env.generation, conf)


class ExitWatcher:
    """pid -> exit code, with waiters. Feed it init's table and exit events."""

    def __init__(self) -> None:
        self.codes: dict[int, int] = {}
        self.owner: dict[int, tuple[str, str]] = {}   # pid -> (container id, exec id)
        self._events: dict[int, trio.Event] = {}

    def track(self, pid: int, container_id: str, exec_id: str = "") -> None:
        self.owner[pid] = (container_id, exec_id)

    def load_table(self, table: dict) -> None:
        """Adopt init's process table (what a restarted daemon asks for first)."""
        for p in table.get("processes", []):
            self.track(p["pid"], p["container_id"], p.get("exec_id", ""))
            if p.get("exited"):
                self._set(p["pid"], p["exit_code"])

    def on_event(self, ev: dict) -> None:
        if ev.get("ev") == "exit":
            self.track(ev["pid"], ev.get("container_id", ""), ev.get("exec_id", ""))
            self._set(ev["pid"], ev["exit_code"])

    def _set(self, pid: int, code: int) -> None:
        self.codes[pid] = code
        e = self._events.pop(pid, None)
        if e is not None:
            e.set()

    def exited(self, pid: int) -> int | None:
        return self.codes.get(pid)

    async def wait(self, pid: int) -> int:
        while pid not in self.codes:
            e = self._events.setdefault(pid, trio.Event())
            await e.wait()
        return self.codes[pid]

    def forget(self, pid: int) -> None:
        self.codes.pop(pid, None)
        self.owner.pop(pid, None)
