"""Init's record of what it started: containers, their processes, exit statuses.

Because init reaps every process of the sandbox, a pid in this table whose status is still
unknown cannot have been reused: signalling it is safe. Statuses of processes reaped before
the launcher told init their pid (a short exec can exit first) are parked in ``unclaimed``
(bounded) and attached when the pid is registered.
"""
from __future__ import annotations

import os

from .record import field, record

UNCLAIMED_CAP = 4096


def exit_code(status: int) -> int:
    """Shell-style code of a wait status: the exit code, or 128 + the killing signal."""
    if os.WIFEXITED(status):
        return os.WEXITSTATUS(status)
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return 255


@record
class Proc:
    pid: int
    container_id: str
    exec_id: str = ""           # "" = the container's first process
    status: int | None = None   # raw wait status once reaped

    def as_dict(self) -> dict:
        d = {"pid": self.pid, "container_id": self.container_id, "exec_id": self.exec_id,
             "exited": self.status is not None}
        if self.status is not None:
            d["status"] = self.status
            d["exit_code"] = exit_code(self.status)
        return d


@record
class Container:
    container_id: str
    bundle: str
    pid: int | None = None
    started: bool = False
    execs: set[str] = field(default_factory=set)


class ProcessTable:
    def __init__(self) -> None:
        self.procs: dict[int, Proc] = {}
        self.containers: dict[str, Container] = {}
        # Insertion-ordered (a plain dict: collections costs PID 1 ~0.4 MB): oldest first.
        self.unclaimed: dict[int, int] = {}

    def add_container(self, cid: str, bundle: str) -> Container:
        if cid in self.containers:
            raise KeyError(f"container {cid!r} already exists")
        c = self.containers[cid] = Container(cid, bundle)
        return c

    def register(self, pid: int, cid: str, exec_id: str = "") -> Proc:
        """Record a process init started. Picks up its status if it was already reaped."""
        p = Proc(pid, cid, exec_id, self.unclaimed.pop(pid, None))
        self.procs[pid] = p
        c = self.containers[cid]
        if exec_id:
            c.execs.add(exec_id)
        else:
            c.pid = pid
        return p

    def reaped(self, pid: int, status: int) -> Proc | None:
        """Note a reaped child; returns the table entry if it is one of ours."""
        p = self.procs.get(pid)
        if p is not None and p.status is None:
            p.status = status
            return p
        self.unclaimed.pop(pid, None)  # a reused pid goes to the young end
        self.unclaimed[pid] = status
        while len(self.unclaimed) > UNCLAIMED_CAP:
            del self.unclaimed[next(iter(self.unclaimed))]
        return None

    def live(self, pid: int) -> Proc | None:
        """The entry of a process init started and has not reaped, else None."""
        p = self.procs.get(pid)
        return p if p is not None and p.status is None else None

    def release(self, pid: int) -> bool:
        p = self.procs.get(pid)
        if p is None or p.status is None:
            return False
        del self.procs[pid]
        c = self.containers.get(p.container_id)
        if c is not None and p.exec_id:
            c.execs.discard(p.exec_id)
        return True

    def remove_container(self, cid: str) -> None:
        self.containers.pop(cid, None)
        for pid in [p.pid for p in self.procs.values() if p.container_id == cid]:
            del self.procs[pid]

    def live_pids(self) -> list[int]:
        return [p.pid for p in self.procs.values() if p.status is None]

    def dump(self) -> dict:
        return {
            "containers": [{"container_id": c.container_id, "bundle": c.bundle, "pid": c.pid,
                            "started": c.started, "execs": sorted(c.execs)}
                           for c in self.containers.values()],
            "processes": [p.as_dict() for p in self.procs.values()],
        }
