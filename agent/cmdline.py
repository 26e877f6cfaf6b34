"""The agent's settings from the kernel command line.

PID 1 reads ``/proc/cmdline`` once at boot. Words are split the way the kernel's
``next_arg()`` does it (lib/cmdline.c): whitespace separates words unless inside double
quotes; a quote opening a word or a value is dropped together with the matching quote at
the end; ``--`` ends the kernel's own parameters (what follows goes to init as argv, and is
ignored here). As for kernel module parameters, ``-`` and ``_`` in a key are equivalent.

Parameters understood (Kata's names where Kata has one):

==============================  =============  ==========================================
key                             default        meaning
==============================  =============  ==========================================
agent.server_addr               vsock://-1:1024  where the daemon serves ttRPC
                                               (``vsock://CID:PORT``, ``unix:///path``,
                                               ``unix://@name``, ``serial:///dev/...``)
agent.log                       info           log level: trace debug info warn error
                                               critical (``warning`` and ``fatal`` too)
agent.log_vport                 0              vsock port for JSON logs; 0 = console
agent.container_pipe_size       0              F_SETPIPE_SZ for container stdio pipes;
                                               0 = the kernel's default
agent.hotplug_timeout           3              seconds to wait for a hot-plugged device
agent.debug_console             off            flag (no value, or a boolean): start a
                                               shell on the console
agent.debug_console_vport       0              vsock port for the debug console
agent.devmode                   off            flag: Kata's development mode (accepted)
--- ours ----------------------------------------------------------------------------------
agent.daemon_uid                65534          uid the comms daemon drops to
agent.daemon_gid                65534          gid the comms daemon drops to
agent.run_dir                   /run/sandbox-agent  the sandbox's run directory: bundles,
                                               storages, process files; every path the
                                               daemon names must lie under it
agent.channel                   (none)         virtio-serial port name, shorthand for
                                               ``server_addr=serial:///dev/virtio-ports/NAME``
agent.modules                   (none)         comma-separated kernel module files
                                               (absolute paths) PID 1 loads at boot, in order
agent.oci_runtime               oci-launcher   the OCI runtime binary init forks for
                                               create/start/exec/kill/delete (runc CLI)
agent.restart_backoff_max       5              seconds: cap of the daemon restart backoff
agent.seccomp                   on             boolean: install the daemon's syscall filter
agent.zygote                    on             boolean: with our launcher as the runtime,
                                               run its commands in forks of a warm
                                               launcher process (agent.privsep.zygote)
                                               instead of a new interpreter each
==============================  =============  ==========================================

Booleans accept 1/0, true/false, yes/no, on/off. An unknown ``agent.*`` key is logged and
ignored (a newer runtime may pass keys this agent does not know); a known key with a bad
value raises :class:`CmdlineError` naming the key. Keys of other subsystems (``console=``,
``quiet`` ...) are not ours and are skipped silently.
"""
from __future__ import annotations

import sys

from .privsep.record import field, record, replace

PREFIX = "agent."
DEFAULT_SERVER_ADDR = "vsock://-1:1024"
LOG_LEVELS = ("trace", "debug", "info", "warn", "warning", "error", "critical", "fatal")
_TRUE = {"1", "true", "yes", "on", "y"}
_FALSE = {"0", "false", "no", "off", "n"}


class CmdlineError(ValueError):
    """A known ``agent.*`` parameter has a value that cannot be used."""

    def __init__(self, key: str, value: str | None, why: str):
        self.key, self.value = key, value
        super().__init__(f"kernel command line: {PREFIX}{key}={value!r}: {why}")


@record(frozen=True)
class AgentConfig:
    server_addr: str = DEFAULT_SERVER_ADDR
    log_level: str = "info"
    log_vport: int = 0
    container_pipe_size: int = 0
    hotplug_timeout: float = 3.0
    debug_console: bool = False
    debug_console_vport: int = 0
    devmode: bool = False
    daemon_uid: int = 65534
    daemon_gid: int = 65534
    run_dir: str = "/run/sandbox-agent"
    modules: tuple[str, ...] = ()
    oci_runtime: str = "oci-launcher"
    restart_backoff_max: float = 5.0
    seccomp: bool = True
    zygote: bool = True
    # Keys we did not understand, kept so the caller can log them once logging is up.
    ignored: tuple[str, ...] = field(default=(), compare=False)


def split_kernel_words(text: str) -> list[tuple[str, str | None]]:
    """Split a kernel command line into (param, value) pairs like lib/cmdline.c's next_arg().

    ``value`` is None for a bare word (no ``=``). Stops at a bare ``--``.
    """
    out: list[tuple[str, str | None]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            break
        quoted = text[i] == '"'
        if quoted:
            i += 1
        start, in_quote, equals = i, quoted, -1
        while i < n and (in_quote or not text[i].isspace()):
            if equals < 0 and text[i] == "=":
                equals = i
            if text[i] == '"':
                in_quote = not in_quote
            i += 1
        word = text[start:i]
        i += 1
        if equals < 0:
            param, value = word, None
            if quoted and param.endswith('"'):
                param = param[:-1]
        else:
            param, value = text[start:equals], word[equals - start + 1:]
            if value.startswith('"'):
                value = value[1:]
                if value.endswith('"'):
                    value = value[:-1]
            elif quoted and value.endswith('"'):
                value = value[:-1]
        if param == "--" and value is None:
            break
        out.append((param, value))
    return out


def _int(key: str, value: str | None, lo: int = 0, hi: int = 2**32 - 1) -> int:
    if value is None:
        raise CmdlineError(key, value, "needs a value")
    try:
        v = int(value, 0)
    except ValueError:
        raise CmdlineError(key, value, "not an integer") from None
    if not lo <= v <= hi:
        raise CmdlineError(key, value, f"out of range {lo}..{hi}")
    return v


def _float(key: str, value: str | None) -> float:
    if value is None:
        raise CmdlineError(key, value, "needs a value")
    try:
        v = float(value)
    except ValueError:
        raise CmdlineError(key, value, "not a number") from None
    if not (v >= 0 and v < 1e9):
        raise CmdlineError(key, value, "must be a non-negative number of seconds")
    return v


def _bool(key: str, value: str | None) -> bool:
    if value is None:  # a bare flag such as "agent.debug_console"
        return True
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise CmdlineError(key, value, "not a boolean (1/0, true/false, yes/no, on/off)")


def _str(key: str, value: str | None) -> str:
    if not value:
        raise CmdlineError(key, value, "needs a non-empty value")
    return value


def _server_addr(key: str, value: str | None) -> str:
    v = _str(key, value)
    if not v.startswith(("vsock://", "unix://", "serial://")):
        raise CmdlineError(key, value, "scheme must be vsock://, unix:// or serial://")
    return v


def _log(key: str, value: str | None) -> str:
    v = _str(key, value).lower()
    if v not in LOG_LEVELS:
        raise CmdlineError(key, value, f"not a log level ({', '.join(LOG_LEVELS)})")
    return {"warning": "warn", "fatal": "critical"}.get(v, v)


def _abspath(key: str, value: str | None) -> str:
    v = _str(key, value)
    if not v.startswith("/") or "\x00" in v or "/../" in v + "/":
        raise CmdlineError(key, value, "must be an absolute path without '..'")
    return v.rstrip("/") or "/"


def _modules(key: str, value: str | None) -> tuple[str, ...]:
    parts = tuple(p for p in _str(key, value).split(",") if p)
    for p in parts:
        _abspath(key, p)
    return parts


def _channel(key: str, value: str | None) -> str:
    v = _str(key, value)
    if "/" in v or v in (".", ".."):
        raise CmdlineError(key, value, "must be a virtio-serial port name, not a path")
    return "serial:///dev/virtio-ports/" + v


_PARSERS = {
    "server_addr": ("server_addr", _server_addr),
    "log": ("log_level", _log),
    "log_vport": ("log_vport", _int),
    "container_pipe_size": ("container_pipe_size", lambda k, v: _int(k, v, 0, 1 << 30)),
    "hotplug_timeout": ("hotplug_timeout", _float),
    "debug_console": ("debug_console", _bool),
    "debug_console_vport": ("debug_console_vport", _int),
    "devmode": ("devmode", _bool),
    "daemon_uid": ("daemon_uid", lambda k, v: _int(k, v, 1, 2**32 - 2)),
    "daemon_gid": ("daemon_gid", lambda k, v: _int(k, v, 1, 2**32 - 2)),
    "run_dir": ("run_dir", _abspath),
    "modules": ("modules", _modules),
    "oci_runtime": ("oci_runtime", _str),
    "restart_backoff_max": ("restart_backoff_max", _float),
    "seccomp": ("seccomp", _bool),
    "zygote": ("zygote", _bool),
    "channel": ("server_addr", _channel),
}


def parse(text: str, base: AgentConfig | None = None) -> AgentConfig:
    """Build an :class:`AgentConfig` from command line text, over ``base`` (or defaults).

    Later occurrences of a key win, as with the kernel. ``agent.server_addr`` wins over
    ``agent.channel`` whatever the order, since it is the more explicit of the two.
    """
    values: dict[str, object] = {}
    ignored: list[str] = []
    explicit_addr = False
    for param, value in split_kernel_words(text):
        if not param.startswith(PREFIX):
            continue
        key = param[len(PREFIX):].replace("-", "_")
        entry = _PARSERS.get(key)
        if entry is None:
            ignored.append(param if value is None else f"{param}={value}")
            continue
        attr, conv = entry
        if key == "channel" and explicit_addr:
            continue
        values[attr] = conv(key, value)
        explicit_addr = explicit_addr or key == "server_addr"
    cfg = replace(base or AgentConfig(), **values)
    return replace(cfg, ignored=tuple(ignored))


def read(path: str = "/proc/cmdline", base: AgentConfig | None = None) -> AgentConfig:
    """Parse the running kernel's command line."""
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        cfg = parse(f.read(), base)
    for word in cfg.ignored:
        print(f"agent: ignoring unknown kernel parameter {word!r}", file=sys.stderr)
    return cfg
