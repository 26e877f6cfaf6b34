"""Start the kernel's cgroup-migration lock on its slow transition early, in the background.

Every write to a ``cgroup.procs`` file takes ``cgroup_threadgroup_rwsem`` for writing. That is a
per-CPU rwsem whose readers (fork, exit) run lock-free, so the first writer after a quiet spell
waits one RCU grace period (6-20 ms measured here) for them to switch to the slow path; writers
that follow within about one more grace period are fast. ``create`` moves its first container
process into the cgroup only after reading the config and making the cgroup directories, with
nothing to do while it waits.

So the launcher starts a thread at the very beginning that moves the launcher into the cgroup it
is already in (a no-op migration that still takes the lock) and repeats that every 2 ms until
the real attach is done (:func:`stop`), keeping the lock in its writer-friendly state: the
grace period then passes while the interpreter imports and parses instead of on the critical
path. The thread gives up after 2 s, and on any error opening the file.
"""
from __future__ import annotations

import os

_stop = False
_owner = 0  # pid of the process whose thread runs (a fork must start its own)
_PERIOD = 0.002
_LIMIT = 1000  # iterations: 2 s


def _own_procs_file() -> str | None:
    try:
        with open("/proc/self/cgroup", "rb") as f:
            lines = f.read().decode().splitlines()
    except OSError:
        return None
    cands = []
    for line in lines:
        hid, _, rest = line.partition(":")
        ctls, _, path = rest.partition(":")
        path = path.rstrip("/")
        if hid == "0":
            cands += [f"/sys/fs/cgroup/unified{path}/cgroup.procs",
                      f"/sys/fs/cgroup{path}/cgroup.procs"]
        elif ctls in ("pids", "memory", "cpu,cpuacct", "cpu"):
            cands.append(f"/sys/fs/cgroup/{ctls}{path}/cgroup.procs")
    for c in cands:
        if os.path.exists(c):
            return c
    return None


def _loop(path: str) -> None:
    import time
    pid = str(os.getpid()).encode()
    for _ in range(_LIMIT):
        if _stop:
            return
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return
        try:
            os.write(fd, pid)
        except OSError:
            pass  # the lock was taken before the move was refused: still useful
        finally:
            os.close(fd)
        time.sleep(_PERIOD)


def start() -> None:
    """Begin warming (once per process; a fork does not inherit the thread)."""
    global _owner, _stop
    if _owner == os.getpid() or os.geteuid() != 0:
        return
    _owner, _stop = os.getpid(), False
    path = _own_procs_file()
    if path is None:
        return
    import _thread
    _thread.start_new_thread(_loop, (path,))


def stop() -> None:
    global _stop
    _stop = True
