"""Observability of the agent: Prometheus metrics, structured JSON logs, lifecycle events.

Light on imports (init uses the logger): os, time and jsonlite at module level;
collections and socket only where a sink or an event ring is made.

* Metrics: :func:`render_metrics` gives the Prometheus text exposition format (0.0.4) with
  ``# HELP``/``# TYPE`` per family and escaped label values: per agent process (init, daemon)
  RSS and PSS from ``/proc/PID/smaps_rollup``, CPU seconds from ``/proc/PID/stat``, threads;
  the guest's meminfo and loadavg; per-container figures flattened from a cgroup stats dict.
* Logs: :class:`JsonLogger` writes one JSON object per line, ``{"time", "level", "source",
  "msg", "fields"}``, to a stream (the console) or a :class:`SocketSink` (the vsock log port
  of ``agent.log_vport``: the agent listens, the host connects, as with Kata).
* Events: :class:`EventRecord`, a bounded ring of container/process lifecycle events with
  sequence numbers, so a reader can ask for what happened since the last one it saw.
"""
from __future__ import annotations

import os
import sys
import time

from . import jsonlite
from .privsep.record import asdict, field, record

# ---------------------------------------------------------------------------------------------
# Logs

LEVELS = {"trace": 5, "debug": 10, "info": 20, "warn": 30, "error": 40, "critical": 50}


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z"


class SocketSink:
    """Log lines to whoever connects to a listening socket (vsock in a guest).

    Never blocks the logger: it accepts lazily, drops a slow or gone reader, and keeps the
    last ``backlog`` lines for the next one to connect.
    """

    def __init__(self, listener: socket.socket, backlog: int = 1000):
        self.listener = listener
        self.listener.setblocking(False)
        self.conn: socket.socket | None = None
        from collections import deque  # init imports this module; a sink is rare there
        self.pending: deque[bytes] = deque(maxlen=backlog)

    @classmethod
    def vsock(cls, port: int) -> "SocketSink":
        import socket
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        s.bind((0xFFFFFFFF, port))
        s.listen(1)
        return cls(s)

    def write(self, line: bytes) -> None:
        if self.conn is None:
            try:
                self.conn, _ = self.listener.accept()
                self.conn.setblocking(False)
            except OSError:  # nobody connected yet (BlockingIOError) or listener trouble
                self.pending.append(line)
                return
        data = b"".join(self.pending) + line
        self.pending.clear()
        try:
            sent = self.conn.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._drop()
            sent = 0
        rest = data[sent:]
        if rest and sent and self.conn is not None and data[sent - 1:sent] != b"\n":
            # Finish the line cut in the middle, briefly blocking, so the reader never sees
            # half a JSON object followed by another one.
            head, _, rest = rest.partition(b"\n")
            try:
                self.conn.settimeout(0.05)
                self.conn.sendall(head + b"\n")
                self.conn.setblocking(False)
            except OSError:
                self._drop()
        for ln in rest.splitlines(keepends=True):
            self.pending.append(ln)

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.conn = None

    def close(self) -> None:
        self._drop()
        self.listener.close()


class JsonLogger:
    def __init__(self, source: str, level: str = "info", stream=None,
                 sink: SocketSink | None = None):
        self.source = source
        self.threshold = LEVELS.get(level, 20)
        self.stream = stream
        self.sink = sink

    def enabled(self, level: str) -> bool:
        return LEVELS[level] >= self.threshold

    def log(self, level: str, msg: str, **fields) -> None:
        if LEVELS[level] < self.threshold:
            return
        rec = {"time": _rfc3339(time.time()), "level": level, "source": self.source,
               "msg": msg, "fields": fields}
        line = jsonlite.dumps(rec, default=repr, ensure_ascii=False,
                              separators=(", ", ": "), allow_nan=True) + "\n"
        if self.sink is not None:
            self.sink.write(line.encode())
            return
        stream = self.stream or sys.stderr
        try:
            stream.write(line)
            stream.flush()
        except (OSError, ValueError):
            pass  # a closed console must not take the agent down

    def trace(self, msg: str, **f) -> None:
        self.log("trace", msg, **f)

    def debug(self, msg: str, **f) -> None:
        self.log("debug", msg, **f)

    def info(self, msg: str, **f) -> None:
        self.log("info", msg, **f)

    def warn(self, msg: str, **f) -> None:
        self.log("warn", msg, **f)

    def error(self, msg: str, **f) -> None:
        self.log("error", msg, **f)


# ---------------------------------------------------------------------------------------------
# Events

EVENT_KINDS = frozenset({"created", "started", "exec_started", "exited", "oom", "paused",
                         "resumed", "removed", "daemon_restarted"})


@record(frozen=True)
class Event:
    seq: int
    time: float
    kind: str
    container_id: str = ""
    exec_id: str = ""
    pid: int = 0
    exit_code: int | None = None
    detail: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


class EventRecord:
    """A bounded ring of lifecycle events; the oldest fall off first."""

    def __init__(self, capacity: int = 1024):
        if capacity < 1:
            raise ValueError(f"event record capacity must be >= 1, got {capacity}")
        from collections import deque
        self.ring: deque[Event] = deque(maxlen=capacity)
        self.seq = 0

    def record(self, kind: str, container_id: str = "", *, exec_id: str = "", pid: int = 0,
               exit_code: int | None = None, **detail) -> Event:
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r} (known: {sorted(EVENT_KINDS)})")
        self.seq += 1
        ev = Event(self.seq, time.time(), kind, container_id, exec_id, pid, exit_code, detail)
        self.ring.append(ev)
        return ev

    def since(self, seq: int = 0, container_id: str | None = None) -> list[Event]:
        """Events after sequence number ``seq`` still in the ring (oldest first)."""
        return [e for e in self.ring if e.seq > seq
                and (container_id is None or e.container_id == container_id)]

    def dropped_before(self) -> int:
        """The first sequence number still held (a reader behind it missed events)."""
        return self.ring[0].seq if self.ring else self.seq + 1


# ---------------------------------------------------------------------------------------------
# Figures from /proc

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def process_stats(pid: int, proc: str = "/proc") -> dict:
    """RSS/PSS bytes, CPU seconds (user, system), threads of one process."""
    out: dict = {}
    with open(f"{proc}/{pid}/stat", "rb") as f:
        raw = f.read().decode(errors="replace")
    # The command name may hold spaces and parens: fields start after the last ')'.
    rest = raw[raw.rindex(")") + 2:].split()
    out["utime_seconds"] = int(rest[11]) / _CLK_TCK
    out["stime_seconds"] = int(rest[12]) / _CLK_TCK
    out["threads"] = int(rest[17])
    out["rss_bytes"] = int(rest[21]) * _PAGE
    try:
        with open(f"{proc}/{pid}/smaps_rollup") as f:
            for line in f:
                key, _, val = line.partition(":")
                parts = val.split()
                if key in ("Rss", "Pss") and len(parts) == 2 and parts[1] == "kB":
                    out[key.lower() + "_bytes"] = int(parts[0]) * 1024
    except OSError:
        pass  # another uid's process without ptrace read access: stat figures only
    return out


def meminfo(path: str = "/proc/meminfo") -> dict[str, tuple[int, str]]:
    """``{name: (value, unit)}``, unit "bytes" for kB lines (converted) or "" for counts."""
    out = {}
    with open(path) as f:
        for line in f:
            key, _, val = line.partition(":")
            parts = val.split()
            if not parts:
                continue
            if len(parts) == 2 and parts[1] == "kB":
                out[key] = (int(parts[0]) * 1024, "bytes")
            else:
                out[key] = (int(parts[0]), "")
    return out


def loadavg(path: str = "/proc/loadavg") -> dict:
    with open(path) as f:
        a, b, c, tasks, _ = f.read().split()
    running, total = tasks.split("/")
    return {"1m": float(a), "5m": float(b), "15m": float(c), "running": int(running),
            "total": int(total)}


# ---------------------------------------------------------------------------------------------
# Prometheus text format

NAME_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_:")


def escape_label(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(v: str) -> str:
    return v.replace("\\", "\\\\").replace("\n", "\\n")


def metric_name(raw: str) -> str:
    name = "".join(c if c in NAME_OK else "_" for c in raw)
    return "_" + name if not name or name[0].isdigit() else name


def format_value(v: float) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(float(v))


class Exposition:
    """Families in order of first use; each family's samples stay together, as required."""

    def __init__(self) -> None:
        self.families: dict[str, tuple[str, str, list[tuple[dict, float]]]] = {}

    def add(self, name: str, kind: str, help_: str, value: float,
            labels: dict[str, str] | None = None) -> None:
        if kind not in ("gauge", "counter", "untyped"):
            raise ValueError(f"metric {name!r}: unsupported type {kind!r}")
        name = metric_name(name)
        fam = self.families.setdefault(name, (kind, help_, []))
        if fam[0] != kind:
            raise ValueError(f"metric {name!r} declared as {fam[0]} and {kind}")
        fam[2].append((labels or {}, value))

    def render(self) -> str:
        lines = []
        for name, (kind, help_, samples) in self.families.items():
            lines.append(f"# HELP {name} {escape_help(help_)}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                if labels:
                    lab = ",".join(f'{metric_name(k)}="{escape_label(str(v))}"'
                                   for k, v in labels.items())
                    lines.append(f"{name}{{{lab}}} {format_value(value)}")
                else:
                    lines.append(f"{name} {format_value(value)}")
        return "\n".join(lines) + "\n"


def _flatten(prefix: str, obj, out: list[tuple[str, dict, float]], idx: dict) -> None:
    if isinstance(obj, bool) or isinstance(obj, (int, float)):
        out.append((prefix, dict(idx), obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}_{k}" if prefix else str(k), v, out, idx)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten(prefix, v, out, {**idx, "index": str(i)})


def add_agent_process(ex: Exposition, role: str, stats: dict) -> None:
    lab = {"process": role}
    if "rss_bytes" in stats:
        ex.add("sandbox_agent_process_resident_memory_bytes", "gauge",
               "Resident set size of an agent process.", stats["rss_bytes"], lab)
    if "pss_bytes" in stats:
        ex.add("sandbox_agent_process_proportional_memory_bytes", "gauge",
               "Proportional set size (smaps_rollup Pss) of an agent process.",
               stats["pss_bytes"], lab)
    for mode in ("user", "system"):
        key = ("utime" if mode == "user" else "stime") + "_seconds"
        if key in stats:
            ex.add("sandbox_agent_process_cpu_seconds_total", "counter",
                   "CPU time of an agent process.", stats[key], {**lab, "mode": mode})
    if "threads" in stats:
        ex.add("sandbox_agent_process_threads", "gauge", "Threads of an agent process.",
               stats["threads"], lab)
    if "python_modules" in stats:
        ex.add("sandbox_agent_process_python_modules", "gauge",
               "Modules in an agent process's sys.modules (deferred ones included).",
               stats["python_modules"], lab)
    for name, state in sorted(stats.get("deferred_modules", {}).items()):
        ex.add("sandbox_agent_process_deferred_module", "gauge",
               "A module whose code an agent process defers until first use: 1 in the state "
               "it is in (deferred: never run; loaded: ran after all; eager: imported before "
               "deferral began; absent: never imported).",
               1, {**lab, "module": name, "state": state})


def render_metrics(agent: dict[str, dict] | None = None,
                   containers: dict[str, dict] | None = None,
                   proc: str = "/proc") -> str:
    """The text exposition for GetMetrics.

    ``agent``: role -> :func:`process_stats` dict (the daemon cannot read init's smaps, so
    init's figures arrive through the privsep channel). ``containers``: container id -> a
    cgroup stats dict (nested; numeric leaves become gauges, list items get an index label).
    """
    ex = Exposition()
    for role, stats in (agent or {}).items():
        add_agent_process(ex, role, stats)
    for key, (value, unit) in meminfo(f"{proc}/meminfo").items():
        if unit == "bytes":
            ex.add("sandbox_guest_meminfo_bytes", "gauge", "Guest /proc/meminfo, in bytes.",
                   value, {"item": key})
        else:
            ex.add("sandbox_guest_meminfo_count", "gauge",
                   "Guest /proc/meminfo lines that are counts.", value, {"item": key})
    la = loadavg(f"{proc}/loadavg")
    for period in ("1m", "5m", "15m"):
        ex.add("sandbox_guest_load", "gauge", "Guest load average.", la[period],
               {"period": period})
    ex.add("sandbox_guest_tasks", "gauge", "Guest scheduling entities.", la["running"],
           {"state": "running"})
    ex.add("sandbox_guest_tasks", "gauge", "Guest scheduling entities.", la["total"],
           {"state": "total"})
    for cid, stats in (containers or {}).items():
        flat: list[tuple[str, dict, float]] = []
        _flatten("", stats, flat, {})
        for path, idx, value in flat:
            ex.add("sandbox_container_" + path, "gauge", f"Container cgroup figure {path}.",
                   value, {"container_id": cid, **idx})
    return ex.render()
