"""runc-compatible command line. A hand-written parser: argparse (with re and gettext) would
add ~10 ms to every launcher start."""
from __future__ import annotations

import os
import sys
import time

from .. import jsonlite

SIGNALS = {
    "HUP": 1, "INT": 2, "QUIT": 3, "ILL": 4, "TRAP": 5, "ABRT": 6, "IOT": 6, "BUS": 7,
    "FPE": 8, "KILL": 9, "USR1": 10, "SEGV": 11, "USR2": 12, "PIPE": 13, "ALRM": 14,
    "TERM": 15, "STKFLT": 16, "CHLD": 17, "CONT": 18, "STOP": 19, "TSTP": 20, "TTIN": 21,
    "TTOU": 22, "URG": 23, "XCPU": 24, "XFSZ": 25, "VTALRM": 26, "PROF": 27, "WINCH": 28,
    "IO": 29, "POLL": 29, "PWR": 30, "SYS": 31, "RTMIN": 34, "RTMAX": 64,
}

# Global flags other tools (containerd, podman, runtime-tools) pass to runc; harmless to ignore.
_GLOBAL_IGNORED_VALUE = {"--criu", "--rootless"}
_GLOBAL_IGNORED_FLAG = {"--debug", "--systemd-cgroup", "--no-new-keyring"}

USAGE = """usage: oci-launcher [--root DIR] [--log FILE] [--log-format text|json] COMMAND ...
commands:
  create --bundle DIR [--pid-file F] [--console-socket S] [--no-pivot] ID
  start ID | state ID | kill [--all] ID [SIGNAL] | delete [--force] ID
  run [--bundle DIR] [--pid-file F] [--console-socket S] [--no-pivot] [--detach] [--keep] ID
  exec [--process F | [--tty] [--cwd D] [--env K=V] [--user U[:G]] [--cap C] [--no-new-privs]
        -- ARGS] [--detach] [--pid-file F] [--console-socket S] ID [ARGS]
  pause ID | resume ID | list | ps ID | events --stats ID
  update [-r|--resources FILE|-] [--memory N] [--memory-swap N] [--memory-reservation N]
         [--cpu-shares N] [--cpu-quota N] [--cpu-period N] [--cpuset-cpus L]
         [--cpuset-mems L] [--pids-limit N] [--blkio-weight N] ID
"""

# runc update's flags: option -> (LinuxResources section, field, value kind)
_UPDATE_FLAGS = {
    "--memory": ("memory", "limit", "bytes"),
    "--memory-swap": ("memory", "swap", "bytes"),
    "--memory-reservation": ("memory", "reservation", "bytes"),
    "--kernel-memory": ("memory", "kernel", "bytes"),
    "--kernel-memory-tcp": ("memory", "kernelTCP", "bytes"),
    "--cpu-shares": ("cpu", "shares", "int"),
    "--cpu-share": ("cpu", "shares", "int"),
    "--cpu-quota": ("cpu", "quota", "int"),
    "--cpu-period": ("cpu", "period", "int"),
    "--cpu-rt-period": ("cpu", "realtimePeriod", "int"),
    "--cpu-rt-runtime": ("cpu", "realtimeRuntime", "int"),
    "--cpuset-cpus": ("cpu", "cpus", "str"),
    "--cpuset-mems": ("cpu", "mems", "str"),
    "--pids-limit": ("pids", "limit", "int"),
    "--blkio-weight": ("blockIO", "weight", "int"),
}
_UNITS = {"": 1, "b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(opt: str, v: str) -> int:
    """A size as runc's flags take it: a number of bytes, -1 (unlimited), or with a k/m/g/t
    suffix (powers of 1024, optional trailing "b")."""
    t = v.strip().lower()
    if t == "-1":
        return -1
    if t.endswith("b") and len(t) > 1 and not t[-2].isdigit():
        t = t[:-1]
    num, unit = (t[:-1], t[-1]) if t and t[-1] in _UNITS and not t[-1].isdigit() else (t, "")
    try:
        n = float(num)
    except ValueError:
        raise UsageError(f"{opt}: {v!r} is not a size (bytes, or with a k/m/g/t suffix)") from None
    if n < 0:
        raise UsageError(f"{opt}: {v!r} is negative (only -1, unlimited, is allowed)")
    return int(n * _UNITS[unit])


def update_resources(a: "Args") -> dict:
    """The LinuxResources object of an ``update`` command: the --resources file (or stdin for
    "-") if given, with the individual flags written over it."""
    res: dict = {}
    src = a.opts.get("resources")
    if src is not None:
        if src == "-":
            data = sys.stdin.buffer.read()
        else:
            with open(src, "rb") as f:  # type: ignore[arg-type]
                data = f.read()
        try:
            res = jsonlite.loads(data)  # type: ignore[assignment]
        except ValueError as e:
            raise ValueError(f"--resources {src}: not valid JSON ({e})") from None
        if not isinstance(res, dict):
            raise ValueError(f"--resources {src}: expected a JSON object "
                             "(LinuxResources)")
    for opt, (section, field, kind) in _UPDATE_FLAGS.items():
        v = a.opts.get(opt)
        if v is None:
            continue
        if kind == "bytes":
            val: object = parse_bytes(opt, str(v))
        elif kind == "int":
            try:
                val = int(str(v))
            except ValueError:
                raise UsageError(f"{opt}: {v!r} is not an integer") from None
        else:
            val = str(v)
        res.setdefault(section, {})[field] = val
    return res



class UsageError(Exception):
    pass


def parse_signal(s: str) -> int:
    if s.isdigit():
        n = int(s)
        if not 0 < n <= 64:
            raise UsageError(f"signal number {n} is out of range")
        return n
    name = s.upper()
    name = name[3:] if name.startswith("SIG") else name
    for base in ("RTMIN+", "RTMAX-"):
        if name.startswith(base) and name[6:].isdigit():
            return SIGNALS[base[:5]] + (1 if base[5] == "+" else -1) * int(name[6:])
    if name not in SIGNALS:
        raise UsageError(f"unknown signal {s!r}")
    return SIGNALS[name]


class Args:
    """Options of one command: flags map to values (True for boolean flags), positionals."""

    def __init__(self) -> None:
        self.opts: dict[str, object] = {}
        self.pos: list[str] = []


def parse(argv: list[str], value_opts: dict[str, str], flag_opts: dict[str, str],
          multi: set[str] = frozenset(), stop_at_positional: int = 0) -> Args:
    """value_opts/flag_opts map every accepted spelling to a canonical name."""
    a = Args()
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            a.pos.extend(argv[i + 1:])
            break
        if stop_at_positional and len(a.pos) >= stop_at_positional:
            a.pos.extend(argv[i:])
            break
        if arg.startswith("-") and arg != "-":
            name, eq, val = arg.partition("=")
            if name in value_opts:
                if not eq:
                    i += 1
                    if i >= len(argv):
                        raise UsageError(f"option {name} needs a value")
                    val = argv[i]
                key = value_opts[name]
                if key in multi:
                    a.opts.setdefault(key, []).append(val)  # type: ignore[union-attr]
                else:
                    a.opts[key] = val
            elif name in flag_opts:
                a.opts[flag_opts[name]] = (val.lower() not in ("false", "0")) if eq else True
            else:
                raise UsageError(f"unknown option {arg!r}")
        else:
            a.pos.append(arg)
        i += 1
    return a


class Logger:
    def __init__(self, path: str | None, fmt: str) -> None:
        self.path, self.fmt = path, fmt

    def error(self, msg: str) -> None:
        if self.path:
            t = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            line = (jsonlite.dumps({"level": "error", "msg": msg, "time": t})
                    if self.fmt == "json" else f'time="{t}" level=error msg="{msg}"')
            try:
                with open(self.path, "a") as f:
                    f.write(line + "\n")
            except OSError:
                pass
        os.write(2, f"oci-launcher: {msg}\n".encode())


def _one_id(a: Args, cmd: str, extra_ok: int = 0) -> str:
    if not a.pos or len(a.pos) > 1 + extra_ok:
        raise UsageError(f"{cmd}: expected a container id, got {a.pos!r}")
    return a.pos[0]


_CREATE_VALUES = {"--bundle": "bundle", "-b": "bundle", "--pid-file": "pid_file",
                  "--console-socket": "console_socket", "--preserve-fds": "preserve_fds"}
_CREATE_FLAGS = {"--no-pivot": "no_pivot", "--no-new-keyring": "ignore"}


def _exec_process(a: Args, base: dict | None) -> dict:
    if "process" in a.opts:
        with open(a.opts["process"], "rb") as f:  # type: ignore[arg-type]
            return jsonlite.loads(f.read())  # type: ignore[return-value]
    args = a.pos[1:]
    if not args:
        raise UsageError("exec: give --process FILE or the command to run after the id")
    base = dict(base or {})
    p: dict = {"args": args, "cwd": a.opts.get("cwd", base.get("cwd", "/")),
               "env": list(base.get("env") or []) + list(a.opts.get("env", [])),
               "user": dict(base.get("user") or {"uid": 0, "gid": 0}),
               "terminal": bool(a.opts.get("tty", False)),
               "noNewPrivileges": bool(a.opts.get("no_new_privs",
                                                  base.get("noNewPrivileges", False))),
               "capabilities": base.get("capabilities"),
               "rlimits": base.get("rlimits") or []}
    if "user" in a.opts:
        u, _, g = str(a.opts["user"]).partition(":")
        p["user"] = {"uid": int(u), "gid": int(g or 0)}
    if "additional_gids" in a.opts:
        p["user"]["additionalGids"] = [int(x) for x in a.opts["additional_gids"]]  # type: ignore
    if "cap" in a.opts:
        caps = dict(p["capabilities"] or {})
        for k in ("bounding", "effective", "permitted", "ambient"):
            caps[k] = list(caps.get(k) or []) + list(a.opts["cap"])  # type: ignore[arg-type]
        p["capabilities"] = caps
    return p


def run_command(argv: list[str]) -> int:
    root = None
    log_path = None
    log_fmt = "text"
    i = 0
    while i < len(argv) and argv[i].startswith("-"):
        name, eq, val = argv[i].partition("=")
        if name in ("--root", "--log", "--log-format") or name in _GLOBAL_IGNORED_VALUE:
            if not eq:
                i += 1
                if i >= len(argv):
                    raise UsageError(f"option {name} needs a value")
                val = argv[i]
            if name == "--root":
                root = val
            elif name == "--log":
                log_path = val
            elif name == "--log-format":
                log_fmt = val
        elif name in _GLOBAL_IGNORED_FLAG:
            pass
        elif name in ("-h", "--help"):
            sys.stdout.write(USAGE)
            return 0
        elif name in ("-v", "--version"):
            sys.stdout.write("oci-launcher version 0.1.0\nspec: 1.0.2\n")
            return 0
        else:
            raise UsageError(f"unknown global option {argv[i]!r}")
        i += 1
    if i >= len(argv):
        raise UsageError("no command given")
    cmd, rest = argv[i], argv[i + 1:]
    log = Logger(log_path, log_fmt)
    from .container import Launcher
    L = Launcher(root)
    try:
        return _dispatch(L, cmd, rest)
    except UsageError:
        raise
    except Exception as e:  # noqa: BLE001 - every failure becomes one error line + status 1
        log.error(f"{cmd}: {e}")
        return 1


def _dispatch(L, cmd: str, rest: list[str]) -> int:
    if cmd == "create":
        a = parse(rest, _CREATE_VALUES, _CREATE_FLAGS)
        L.create(_one_id(a, cmd), str(a.opts.get("bundle", ".")), a.opts.get("pid_file"),
                 a.opts.get("console_socket"), bool(a.opts.get("no_pivot")))
        return 0
    if cmd == "run":
        a = parse(rest, _CREATE_VALUES, dict(_CREATE_FLAGS, **{
            "--detach": "detach", "-d": "detach", "--keep": "keep"}))
        return L.run(_one_id(a, cmd), str(a.opts.get("bundle", ".")), a.opts.get("pid_file"),
                     a.opts.get("console_socket"), bool(a.opts.get("no_pivot")),
                     bool(a.opts.get("detach")), bool(a.opts.get("keep")))
    if cmd == "start":
        L.start(_one_id(parse(rest, {}, {}), cmd))
        return 0
    if cmd == "state":
        sys.stdout.write(jsonlite.dumps(L.state(_one_id(parse(rest, {}, {}), cmd))) + "\n")
        return 0
    if cmd == "kill":
        a = parse(rest, {}, {"--all": "all", "-a": "all"})
        cid = _one_id(a, cmd, extra_ok=1)
        sig = parse_signal(a.pos[1]) if len(a.pos) > 1 else 15
        L.kill(cid, sig, bool(a.opts.get("all")))
        return 0
    if cmd == "delete":
        a = parse(rest, {}, {"--force": "force", "-f": "force"})
        L.delete(_one_id(a, cmd), bool(a.opts.get("force")))
        return 0
    if cmd == "exec":
        a = parse(rest, {"--process": "process", "-p": "process", "--cwd": "cwd",
                         "--env": "env", "-e": "env", "--user": "user", "-u": "user",
                         "--additional-gids": "additional_gids", "-g": "additional_gids",
                         "--cap": "cap", "-c": "cap", "--pid-file": "pid_file",
                         "--console-socket": "console_socket", "--process-label": "ignore",
                         "--apparmor": "ignore", "--preserve-fds": "preserve_fds"},
                  {"--tty": "tty", "-t": "tty", "--detach": "detach", "-d": "detach",
                   "--no-new-privs": "no_new_privs", "--ignore-paused": "ignore"},
                  multi={"env", "cap", "additional_gids"}, stop_at_positional=1)
        cid = a.pos[0] if a.pos else ""
        if not cid:
            raise UsageError("exec: expected a container id")
        rec = L.store.load(cid)
        proc = _exec_process(a, rec.get("process"))
        detach = bool(a.opts.get("detach"))
        code = L.exec(cid, proc, a.opts.get("pid_file"), a.opts.get("console_socket"), detach)
        return 0 if detach else code
    if cmd in ("pause", "resume"):
        cid = _one_id(parse(rest, {}, {}), cmd)
        L.pause(cid) if cmd == "pause" else L.resume(cid)
        return 0
    if cmd == "update":
        vals = {"--resources": "resources", "-r": "resources"}
        vals.update({k: k for k in _UPDATE_FLAGS})
        a = parse(rest, vals, {})
        cid = _one_id(a, cmd)
        L.update(cid, update_resources(a))
        return 0
    if cmd == "list":
        a = parse(rest, {"--format": "format", "-f": "format"}, {"--quiet": "q", "-q": "q"})
        states = L.list()
        if a.opts.get("format") == "json":
            sys.stdout.write(jsonlite.dumps(states) + "\n")
        elif a.opts.get("q"):
            sys.stdout.write("".join(s["id"] + "\n" for s in states))
        else:
            sys.stdout.write("ID\tPID\tSTATUS\tBUNDLE\tCREATED\n" + "".join(
                f"{s['id']}\t{s['pid']}\t{s['status']}\t{s['bundle']}\t{s['created']}\n"
                for s in states))
        return 0
    if cmd == "events":
        a = parse(rest, {"--interval": "interval"}, {"--stats": "stats"})
        cid = _one_id(a, cmd)
        if not a.opts.get("stats"):
            raise UsageError("events: only --stats (one snapshot) is supported")
        sys.stdout.write(jsonlite.dumps({"type": "stats", "id": cid,
                                         "data": L.stats(cid)}) + "\n")
        return 0
    if cmd == "ps":
        a = parse(rest, {"--format": "format", "-f": "format"}, {})
        cid = _one_id(a, cmd)
        rec = L.store.load(cid)
        from .container import _open_cgroup
        pids = _open_cgroup(rec.get("cgroupsPath"), cid).pids()
        sys.stdout.write(jsonlite.dumps(pids) + "\n" if a.opts.get("format") == "json"
                         else "".join(f"{p}\n" for p in pids))
        return 0
    raise UsageError(f"unknown command {cmd!r}")


def main(argv: list[str] | None = None) -> int:
    try:
        return run_command(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        os.write(2, f"oci-launcher: {e}\n{USAGE}".encode())
        return 2
