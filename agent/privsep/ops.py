"""The typed operations the daemon may ask of init, and their validation.

Each operation is a frozen record (agent.privsep.record) built from a request's ``args``
by :func:`parse`, which checks every field's type and its meaning against the sandbox
(paths must resolve under the run dir). A failure raises :class:`ValidationError` naming
the field, which init sends back as the error reply. What cannot be checked from the
message alone (is this pid one init started, does this container exist) is checked by the
handler against init's state.
"""
from __future__ import annotations

import os
import stat

from .record import fields, record

# Character classes instead of regular expressions: init imports this module, and ``re``
# (with enum and functools) costs it ~1.3 MB. The patterns each check replaces are given
# beside it; tests/init/test_zygote_unit.py checks them against ``re`` on generated input.
_DIGITS = frozenset("0123456789")
_ALNUM = _DIGITS | frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
_ID_REST = _ALNUM | frozenset("_.+-")
_NAME = _ALNUM | frozenset("_.-")
_OPT_VALUE = _NAME | frozenset(":/@+")
_HOST_REST = _ALNUM | frozenset(".-")
_RESOLV = (  # (keyword and space, allowed characters, shortest, longest)
    ("nameserver ", _DIGITS | frozenset("ABCDEFabcdefghijklmnopqrstuvwxyz.:%"), 2, 64),
    ("search ", _ALNUM | frozenset(". _-"), 1, 1000),
    ("domain ", _ALNUM | frozenset(". _-"), 1, 1000),
    ("options ", _ALNUM | frozenset(":. _-"), 1, 200),
    ("sortlist ", _DIGITS | frozenset("./ "), 1, 200),
)


def _only(s: str, allowed: frozenset, lo: int, hi: int) -> bool:
    return lo <= len(s) <= hi and all(c in allowed for c in s)


def valid_id(v: str) -> bool:
    """``[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}``"""
    return v[:1] in _ALNUM and _only(v[1:], _ID_REST, 0, 127)


def valid_name(v: str) -> bool:
    """``[A-Za-z0-9_.-]{1,64}``: a virtiofs/9p tag, a tmpfs or overlay source name."""
    return _only(v, _NAME, 1, 64)


def valid_data_option(o: str) -> bool:
    """``[A-Za-z0-9_.-]{1,64}(=[A-Za-z0-9_.:/@+-]{0,4096})?``"""
    key, eq, val = o.partition("=")
    return _only(key, _NAME, 1, 64) and (not eq or _only(val, _OPT_VALUE, 0, 4096))


def valid_hostname(v: str) -> bool:
    """``[A-Za-z0-9]([A-Za-z0-9.-]{0,62})?``"""
    return v[:1] in _ALNUM and _only(v[1:], _HOST_REST, 0, 62)


def valid_resolv_line(ln: str) -> bool:
    """``nameserver [0-9A-Fa-f.:%a-z]{2,64}``, ``(search|domain) [A-Za-z0-9. _-]{1,1000}``,
    ``options [A-Za-z0-9:. _-]{1,200}`` or ``sortlist [0-9./ ]{1,200}``"""
    return any(ln.startswith(kw) and _only(ln[len(kw):], ok, lo, hi)
               for kw, ok, lo, hi in _RESOLV)


MAX_SIGNAL = 64
FSTYPES = frozenset({"bind", "virtiofs", "9p", "ext4", "xfs", "btrfs", "erofs", "squashfs",
                     "vfat", "tmpfs", "overlay"})
# mount(2) flags a storage may ask for; anything else in "options" must be a data option.
MOUNT_FLAGS = {
    "ro": 1, "rw": 0, "nosuid": 2, "nodev": 4, "noexec": 8, "sync": 16, "dirsync": 128,
    "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21, "strictatime": 1 << 24,
    "bind": 4096, "rbind": 4096 | 16384,
}
MAX_RESOLV_LINES = 64
NET_ACTIONS = frozenset({"list_interfaces", "list_routes", "update_interface",
                         "update_routes", "add_arp_neighbors"})


class ValidationError(ValueError):
    """A request field that init will not act on. ``field`` names it, dotted for nesting."""

    def __init__(self, field: str, msg: str):
        self.field, self.msg = field, msg
        super().__init__(f"{field}: {msg}")


@record(frozen=True)
class Stdio:
    """Which of the child's stdin/stdout/stderr come as fds (in that order); the rest get
    /dev/null. A terminal process gets none: init answers with the pty master instead."""
    stdin: bool = False
    stdout: bool = False
    stderr: bool = False

    @property
    def count(self) -> int:
        return self.stdin + self.stdout + self.stderr


@record(frozen=True)
class Launch:
    """Create a container (OCI runtime ``create``): its process waits for Start."""
    container_id: str
    bundle: str
    terminal: bool = False
    stdio: Stdio = Stdio()
    keep: tuple[str, ...] = ()  # roles of the extra fds: the daemon's own ends, kept by init


@record(frozen=True)
class Start:
    container_id: str


@record(frozen=True)
class Exec:
    """Run another process in a container, from an OCI process.json under the run dir."""
    container_id: str
    exec_id: str
    process: str
    terminal: bool = False
    stdio: Stdio = Stdio()
    keep: tuple[str, ...] = ()


@record(frozen=True)
class Signal:
    """Signal one process init started (a container's first process or an exec)."""
    pid: int
    signal: int


@record(frozen=True)
class Kill:
    """Signal a container through the runtime; ``all`` = every process in it."""
    container_id: str
    signal: int
    all: bool = False


@record(frozen=True)
class Delete:
    container_id: str
    force: bool = False


@record(frozen=True)
class Table:
    """Dump the process table (a restarted daemon rebuilds its state from it)."""


@record(frozen=True)
class Kept:
    """The stdio ends init keeps for these pids (a restarted daemon takes them back); few
    pids per request, as a packet carries at most wire.MAX_FDS fds."""
    pids: tuple[int, ...]


@record(frozen=True)
class Release:
    """Forget an exited process's status once the daemon has delivered it."""
    pid: int


@record(frozen=True)
class Mount:
    source: str
    target: str
    fstype: str
    options: tuple[str, ...] = ()


@record(frozen=True)
class Umount:
    target: str


@record(frozen=True)
class Net:
    """A netlink job, run by a forked worker (see agent.privsep.netjob)."""
    action: str
    args: dict


@record(frozen=True)
class InitStats:
    """Init's own memory and CPU figures (the daemon may not read init's /proc files)."""


@record(frozen=True)
class SetHostname:
    hostname: str


@record(frozen=True)
class WriteResolv:
    """CreateSandbox's DNS: lines of resolv.conf (nameserver, search, domain, options)."""
    lines: tuple[str, ...]


@record(frozen=True)
class Shutdown:
    """Stop every container, sync, power off (exit outside a VM)."""


OPS: dict[str, type] = {
    "launch": Launch, "start": Start, "exec": Exec, "signal": Signal, "kill": Kill,
    "delete": Delete, "table": Table, "kept": Kept, "release": Release, "mount": Mount, "umount": Umount,
    "net": Net, "init_stats": InitStats, "shutdown": Shutdown,
    "set_hostname": SetHostname, "write_resolv": WriteResolv,
}


def _get(args: dict, name: str, kind: type, default=None, required: bool = True):
    if name not in args:
        if required:
            raise ValidationError(name, "missing")
        return default
    v = args[name]
    if kind is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ValidationError(name, f"must be an integer, got {type(v).__name__}")
    if not isinstance(v, kind):
        raise ValidationError(name, f"must be {kind.__name__}, got {type(v).__name__}")
    return v


def check_id(name: str, v: str) -> str:
    if not valid_id(v):
        raise ValidationError(name, f"{v[:80]!r} is not a valid id ([A-Za-z0-9][A-Za-z0-9_.+-]"
                                    "{0,127})")
    return v


def under(name: str, path: str, root: str, must_exist: bool = True) -> str:
    """Resolve ``path`` (symlinks included) and require it to lie inside ``root``.

    Returns the resolved path, which is what init acts on (not the name the daemon gave).
    """
    if not path.startswith("/") or "\x00" in path:
        raise ValidationError(name, f"{path[:200]!r} must be an absolute path")
    real = os.path.realpath(path)
    root_real = os.path.realpath(root)
    if real != root_real and not real.startswith(root_real.rstrip("/") + "/"):
        raise ValidationError(name, f"{path[:200]!r} resolves outside the sandbox run dir "
                                    f"{root_real}")
    if must_exist and not os.path.exists(real):
        raise ValidationError(name, f"{path[:200]!r} does not exist")
    return real


def _signal(args: dict) -> int:
    sig = _get(args, "signal", int)
    if not 1 <= sig <= MAX_SIGNAL:
        raise ValidationError("signal", f"{sig} is not a signal number 1..{MAX_SIGNAL}")
    return sig


def _pid(args: dict) -> int:
    pid = _get(args, "pid", int)
    if not 1 < pid < 2**22 + 1:
        raise ValidationError("pid", f"{pid} is not a valid pid")
    return pid


KEEP_ROLES = ("stdin", "stdout", "stderr")


def _keep(args: dict) -> tuple[str, ...]:
    """The daemon's ends of a process's stdio, handed to init for safekeeping so that a
    restarted daemon gets them back (a container writing while no daemon runs blocks on a
    full pipe instead of dying of SIGPIPE). They follow the child's fds in the packet."""
    roles = _get(args, "keep", list, [], required=False)
    for i, r in enumerate(roles):
        if r not in KEEP_ROLES:
            raise ValidationError(f"keep[{i}]", f"{str(r)[:20]!r} is not one of {', '.join(KEEP_ROLES)}")
    if len(set(roles)) != len(roles):
        raise ValidationError("keep", "a role is named twice")
    return tuple(roles)


def _stdio(args: dict, terminal: bool, nfds: int) -> Stdio:
    raw = _get(args, "stdio", dict, {}, required=False)
    flags = {}
    for k in ("stdin", "stdout", "stderr"):
        v = raw.get(k, False)
        if not isinstance(v, bool):
            raise ValidationError(f"stdio.{k}", "must be a boolean")
        flags[k] = v
    extra = set(raw) - set(flags)
    if extra:
        raise ValidationError("stdio", f"unknown keys {sorted(extra)}")
    st = Stdio(**flags)
    if terminal and st.count:
        raise ValidationError("stdio", "a terminal process takes no stdio fds")
    if st.count != nfds:
        raise ValidationError("stdio", f"names {st.count} fds but the request carries {nfds}")
    return st


def _mount_options(fstype: str, opts: list, run_dir: str) -> tuple[str, ...]:
    out = []
    for i, o in enumerate(opts):
        if not isinstance(o, str):
            raise ValidationError(f"options[{i}]", "must be a string")
        if o in MOUNT_FLAGS:
            out.append(o)
            continue
        if not valid_data_option(o):
            raise ValidationError(f"options[{i}]", f"{o[:100]!r} is not a mount option")
        key, _, val = o.partition("=")
        if fstype == "overlay" and key in ("lowerdir", "upperdir", "workdir"):
            for j, p in enumerate(val.split(":")):
                under(f"options[{i}].{key}[{j}]", p, run_dir)
        out.append(o)
    return tuple(out)


def parse(op: str, args: object, nfds: int, run_dir: str):
    """Build the typed operation ``op`` from ``args``; ``nfds`` = fds the packet carried."""
    if isinstance(op, str) and op not in OPS and isinstance(args, dict):
        from . import imageops  # image and runtime-state operations live there
        if op in imageops.OPS:
            if nfds:
                raise ValidationError("fds", f"op {op!r} takes no file descriptors, got {nfds}")
            return imageops.parse(op, args)
    if not isinstance(op, str) or op not in OPS:
        raise ValidationError("op", f"unknown operation {str(op)[:64]!r} "
                                    f"(known: {', '.join(sorted(OPS))})")
    if not isinstance(args, dict):
        raise ValidationError("args", "must be an object")
    known = set(fields(OPS[op]))
    extra = set(args) - known
    if extra:
        raise ValidationError(sorted(extra)[0][:64], f"unknown field for op {op!r}")
    takes_fds = op in ("launch", "exec")
    if nfds and not takes_fds:
        raise ValidationError("fds", f"op {op!r} takes no file descriptors, got {nfds}")

    if op == "launch":
        terminal = _get(args, "terminal", bool, False, required=False)
        keep = _keep(args)
        return Launch(
            container_id=check_id("container_id", _get(args, "container_id", str)),
            bundle=under("bundle", _get(args, "bundle", str), run_dir),
            terminal=terminal, stdio=_stdio(args, terminal, nfds - len(keep)), keep=keep)
    if op == "exec":
        terminal = _get(args, "terminal", bool, False, required=False)
        process = under("process", _get(args, "process", str), run_dir)
        if not stat.S_ISREG(os.stat(process).st_mode):
            raise ValidationError("process", f"{process!r} is not a regular file")
        keep = _keep(args)
        return Exec(
            container_id=check_id("container_id", _get(args, "container_id", str)),
            exec_id=check_id("exec_id", _get(args, "exec_id", str)),
            process=process, terminal=terminal, stdio=_stdio(args, terminal, nfds - len(keep)), keep=keep)
    if op in ("start",):
        return Start(check_id("container_id", _get(args, "container_id", str)))
    if op == "signal":
        return Signal(pid=_pid(args), signal=_signal(args))
    if op == "kill":
        return Kill(check_id("container_id", _get(args, "container_id", str)), _signal(args),
                    _get(args, "all", bool, False, required=False))
    if op == "delete":
        return Delete(check_id("container_id", _get(args, "container_id", str)),
                      _get(args, "force", bool, False, required=False))
    if op == "release":
        return Release(_pid(args))
    if op == "kept":
        pids = _get(args, "pids", list)
        if not 1 <= len(pids) <= 2 or not all(isinstance(p, int) and not isinstance(p, bool) and 1 < p <= 2**22
                                              for p in pids):
            raise ValidationError("pids", "must list 1 or 2 pids")
        return Kept(tuple(pids))
    if op == "mount":
        fstype = _get(args, "fstype", str)
        if fstype not in FSTYPES:
            raise ValidationError("fstype", f"{fstype[:64]!r} not allowed "
                                            f"(allowed: {', '.join(sorted(FSTYPES))})")
        source = _get(args, "source", str)
        if fstype == "bind":
            source = under("source", source, run_dir)
        elif fstype in ("virtiofs", "9p", "tmpfs", "overlay"):
            if not valid_name(source):
                raise ValidationError("source", f"{source[:64]!r} is not a tag/name")
        else:
            if not source.startswith("/dev/") or not os.path.exists(source) \
                    or not stat.S_ISBLK(os.stat(source).st_mode):
                raise ValidationError("source", f"{source[:200]!r} is not a block device")
        target = under("target", _get(args, "target", str), run_dir,
                       must_exist=fstype != "bind")  # a bind target is made to match
        if not os.path.isdir(target) and fstype != "bind":
            raise ValidationError("target", f"{target!r} is not a directory")
        opts = _get(args, "options", list, [], required=False)
        return Mount(source, target, fstype, _mount_options(fstype, opts, run_dir))
    if op == "umount":
        return Umount(under("target", _get(args, "target", str), run_dir))
    if op == "net":
        action = _get(args, "action", str)
        if action not in NET_ACTIONS:
            raise ValidationError("action", f"unknown network action {action[:64]!r}")
        return Net(action, _get(args, "args", dict, {}, required=False))
    if op == "set_hostname":
        name = _get(args, "hostname", str)
        if not valid_hostname(name):
            raise ValidationError("hostname", f"{name[:80]!r} is not a host name "
                                              "(letters, digits, '.', '-'; at most 63)")
        return SetHostname(name)
    if op == "write_resolv":
        lines = _get(args, "lines", list)
        if len(lines) > MAX_RESOLV_LINES:
            raise ValidationError("lines", f"{len(lines)} lines; at most {MAX_RESOLV_LINES}")
        for i, ln in enumerate(lines):
            if not isinstance(ln, str) or not valid_resolv_line(ln):
                raise ValidationError(f"lines[{i}]", f"{str(ln)[:80]!r} is not a resolv.conf "
                                                     "line this agent writes")
        return WriteResolv(tuple(lines))
    return OPS[op]()  # table, init_stats, shutdown: no fields
