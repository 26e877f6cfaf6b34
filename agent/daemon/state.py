"""The daemon's view of the sandbox: containers, their processes and stdio.

The daemon keeps what it needs to answer the host (stdio ends, exit codes, waiting RPCs);
init keeps what it needs to act (pids it started, statuses it reaped). After a daemon
restart this state is rebuilt from init's table; stdio ends of processes started by the
previous daemon are gone with it, and those streams read as closed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import trio

from .stdio import Stream


class Status(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    STOPPED = "stopped"
    PAUSED = "paused"


@dataclass
class Process:
    container_id: str
    exec_id: str  # "" for the container's first process
    pid: int = 0
    stdin: Stream | None = None
    stdout: Stream | None = None
    stderr: Stream | None = None
    tty: Stream | None = None  # pty master: stdin and stdout both
    exit_code: int | None = None
    exited: trio.Event = field(default_factory=trio.Event)

    def set_exit(self, code: int) -> None:
        if self.exit_code is None:
            self.exit_code = code
        self.exited.set()

    def close_stdio(self) -> None:
        for s in (self.stdin, self.stdout, self.stderr, self.tty):
            if s is not None:
                s.close()


@dataclass
class Container:
    container_id: str
    bundle: str
    cgroups_path: str
    init: Process
    status: Status = Status.CREATED
    execs: dict[str, Process] = field(default_factory=dict)
    mounts: list[str] = field(default_factory=list)  # storage mount points to undo on removal
    oom_seen: int = 0

    def process(self, exec_id: str) -> Process | None:
        return self.init if not exec_id else self.execs.get(exec_id)

    def all_processes(self) -> list[Process]:
        return [self.init, *self.execs.values()]


@dataclass
class Sandbox:
    sandbox_id: str = ""
    hostname: str = ""
    dns: list[str] = field(default_factory=list)
    resolv_conf: str = ""
    created: bool = False
    containers: dict[str, Container] = field(default_factory=dict)
    by_pid: dict[int, Process] = field(default_factory=dict)
    oom_events: trio.MemorySendChannel | None = None
