"""Typed view of an OCI runtime bundle's config.json (runtime-spec 1.x, Linux parts).

Parsing checks types and the rules the spec states (absolute paths, known namespace types,
...) and raises :class:`SpecError` naming the field, e.g. ``process.cwd: must be absolute``.
Plain classes with ``__slots__`` instead of dataclasses: importing dataclasses (typing,
inspect) costs the launcher ~15 ms per start on the project machines.
``linux.resources`` and ``linux.seccomp`` stay raw dicts: their consumers (cgroups.py,
seccomp.py) take the OCI JSON objects as they are.
"""
from __future__ import annotations

from .. import jsonlite

NAMESPACE_TYPES = ("pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time")
HOOK_KINDS = ("prestart", "createRuntime", "createContainer", "startContainer",
              "poststart", "poststop")


class SpecError(ValueError):
    """config.json (or process.json) breaks the runtime spec; the message names the field."""


class _Obj:
    __slots__: tuple[str, ...] = ()

    def __init__(self, **kw: object) -> None:
        for k in self.__slots__:
            setattr(self, k, kw.get(k))

    def __repr__(self) -> str:
        inner = ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__)
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        return type(self) is type(other) and all(
            getattr(self, k) == getattr(other, k) for k in self.__slots__)


class User(_Obj):
    """process.user: numeric ids; umask None means 'leave as inherited' (runc uses 0022)."""
    __slots__ = ("uid", "gid", "umask", "additional_gids")
    uid: int
    gid: int
    umask: int | None
    additional_gids: list[int]


class Rlimit(_Obj):
    __slots__ = ("type", "soft", "hard")
    type: str
    soft: int
    hard: int


class Capabilities(_Obj):
    """Capability names per set; None = set not given (left empty, as runc does)."""
    __slots__ = ("bounding", "effective", "inheritable", "permitted", "ambient")
    bounding: list[str]
    effective: list[str]
    inheritable: list[str]
    permitted: list[str]
    ambient: list[str]


class Process(_Obj):
    __slots__ = ("terminal", "console_size", "user", "args", "env", "cwd", "capabilities",
                 "rlimits", "no_new_privileges", "oom_score_adj", "apparmor_profile",
                 "selinux_label")
    terminal: bool
    console_size: tuple[int, int] | None
    user: User
    args: list[str]
    env: list[str]
    cwd: str
    capabilities: Capabilities | None
    rlimits: list[Rlimit]
    no_new_privileges: bool
    oom_score_adj: int | None
    apparmor_profile: str | None
    selinux_label: str | None


class Mount(_Obj):
    __slots__ = ("destination", "type", "source", "options")
    destination: str
    type: str | None
    source: str | None
    options: list[str]


class Hook(_Obj):
    __slots__ = ("path", "args", "env", "timeout")
    path: str
    args: list[str] | None
    env: list[str] | None
    timeout: int | None


class Namespace(_Obj):
    __slots__ = ("type", "path")
    type: str
    path: str | None


class IdMapping(_Obj):
    __slots__ = ("container_id", "host_id", "size")
    container_id: int
    host_id: int
    size: int


class Device(_Obj):
    __slots__ = ("type", "path", "major", "minor", "file_mode", "uid", "gid")
    type: str
    path: str
    major: int
    minor: int
    file_mode: int | None
    uid: int | None
    gid: int | None


class Linux(_Obj):
    __slots__ = ("namespaces", "uid_mappings", "gid_mappings", "devices", "cgroups_path",
                 "resources", "rootfs_propagation", "seccomp", "sysctl", "masked_paths",
                 "readonly_paths", "time_offsets", "personality")
    namespaces: list[Namespace]
    uid_mappings: list[IdMapping]
    gid_mappings: list[IdMapping]
    devices: list[Device]
    cgroups_path: str | None
    resources: dict | None
    rootfs_propagation: str | None
    seccomp: dict | None
    sysctl: dict[str, str]
    masked_paths: list[str]
    readonly_paths: list[str]
    time_offsets: dict | None
    personality: dict | None

    def namespace(self, kind: str) -> Namespace | None:
        for ns in self.namespaces:
            if ns.type == kind:
                return ns
        return None


class Spec(_Obj):
    __slots__ = ("oci_version", "root_path", "root_readonly", "mounts", "process", "hostname",
                 "domainname", "hooks", "annotations", "linux", "raw")
    oci_version: str
    root_path: str
    root_readonly: bool
    mounts: list[Mount]
    process: Process | None
    hostname: str | None
    domainname: str | None
    hooks: dict[str, list[Hook]]
    annotations: dict[str, str]
    linux: Linux
    raw: dict


# --- field readers --------------------------------------------------------------------------

def _get(d: dict, key: str, where: str, kind: type | tuple, default: object = None,
         required: bool = False) -> object:
    if key not in d or d[key] is None:
        if required:
            raise SpecError(f"{where}.{key}: required field is missing")
        return default
    v = d[key]
    if kind is int and isinstance(v, bool) or not isinstance(v, kind):
        name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SpecError(f"{where}.{key}: expected {name}, got {type(v).__name__} {v!r}")
    return v


def _obj(d: dict, key: str, where: str, required: bool = False) -> dict:
    return _get(d, key, where, dict, {}, required)  # type: ignore[return-value]


def _strs(d: dict, key: str, where: str, default: list | None = None) -> list[str] | None:
    v = _get(d, key, where, list, default)
    if v is None:
        return None
    for i, s in enumerate(v):  # type: ignore[union-attr]
        if not isinstance(s, str):
            raise SpecError(f"{where}.{key}[{i}]: expected str, got {s!r}")
    return list(v)  # type: ignore[arg-type]


def _uint(d: dict, key: str, where: str, default: int | None = None,
          required: bool = False, bits: int = 32) -> int | None:
    v = _get(d, key, where, int, default, required)
    if v is not None and not (0 <= v < (1 << bits)):  # type: ignore[operator]
        raise SpecError(f"{where}.{key}: {v} is out of range for uint{bits}")
    return v  # type: ignore[return-value]


def parse_user(d: dict, where: str) -> User:
    gids = _get(d, "additionalGids", where, list, [])
    for i, g in enumerate(gids):  # type: ignore[arg-type]
        if isinstance(g, bool) or not isinstance(g, int) or g < 0:
            raise SpecError(f"{where}.additionalGids[{i}]: expected uint32, got {g!r}")
    return User(uid=_uint(d, "uid", where, 0), gid=_uint(d, "gid", where, 0),
                umask=_uint(d, "umask", where), additional_gids=list(gids))  # type: ignore


def parse_process(d: dict, where: str = "process", need_args: bool = True) -> Process:
    args = _strs(d, "args", where, [])
    if need_args and not args:
        raise SpecError(f"{where}.args: must name at least the program to run")
    cwd = _get(d, "cwd", where, str, "/")
    if not cwd.startswith("/"):  # type: ignore[union-attr]
        raise SpecError(f"{where}.cwd: must be an absolute path, got {cwd!r}")
    caps = None
    if d.get("capabilities") is not None:
        c = _obj(d, "capabilities", where)
        w = f"{where}.capabilities"
        caps = Capabilities(**{k: _strs(c, k, w) for k in Capabilities.__slots__})
    rlimits = []
    for i, r in enumerate(_get(d, "rlimits", where, list, [])):  # type: ignore[arg-type]
        w = f"{where}.rlimits[{i}]"
        if not isinstance(r, dict):
            raise SpecError(f"{w}: expected object, got {r!r}")
        rlimits.append(Rlimit(type=_get(r, "type", w, str, required=True),
                              soft=_uint(r, "soft", w, required=True, bits=64),
                              hard=_uint(r, "hard", w, required=True, bits=64)))
    env = _strs(d, "env", where, [])
    for i, e in enumerate(env):  # type: ignore[arg-type]
        if "=" not in e:
            raise SpecError(f"{where}.env[{i}]: expected NAME=value, got {e!r}")
    size = None
    if d.get("consoleSize") is not None:
        cs = _obj(d, "consoleSize", where)
        size = (_uint(cs, "height", f"{where}.consoleSize", 0),
                _uint(cs, "width", f"{where}.consoleSize", 0))
    oom = _get(d, "oomScoreAdj", where, int)
    if oom is not None and not -1000 <= oom <= 1000:  # type: ignore[operator]
        raise SpecError(f"{where}.oomScoreAdj: {oom} is outside -1000..1000")
    return Process(terminal=_get(d, "terminal", where, bool, False), console_size=size,
                   user=parse_user(_obj(d, "user", where), f"{where}.user"), args=args, env=env,
                   cwd=cwd, capabilities=caps, rlimits=rlimits,
                   no_new_privileges=_get(d, "noNewPrivileges", where, bool, False),
                   oom_score_adj=oom, apparmor_profile=_get(d, "apparmorProfile", where, str),
                   selinux_label=_get(d, "selinuxLabel", where, str))


def _mappings(d: dict, key: str, where: str) -> list[IdMapping]:
    out = []
    for i, m in enumerate(_get(d, key, where, list, [])):  # type: ignore[arg-type]
        w = f"{where}.{key}[{i}]"
        if not isinstance(m, dict):
            raise SpecError(f"{w}: expected object, got {m!r}")
        out.append(IdMapping(container_id=_uint(m, "containerID", w, required=True),
                             host_id=_uint(m, "hostID", w, required=True),
                             size=_uint(m, "size", w, required=True)))
    return out


def parse_linux(d: dict) -> Linux:
    w = "linux"
    nss: list[Namespace] = []
    for i, n in enumerate(_get(d, "namespaces", w, list, [])):  # type: ignore[arg-type]
        wn = f"{w}.namespaces[{i}]"
        if not isinstance(n, dict):
            raise SpecError(f"{wn}: expected object, got {n!r}")
        t = _get(n, "type", wn, str, required=True)
        if t not in NAMESPACE_TYPES:
            raise SpecError(f"{wn}.type: unknown namespace type {t!r}")
        if any(x.type == t for x in nss):
            raise SpecError(f"{wn}.type: namespace {t!r} is listed twice")
        p = _get(n, "path", wn, str)
        if p is not None and not p.startswith("/"):  # type: ignore[union-attr]
            raise SpecError(f"{wn}.path: must be an absolute path, got {p!r}")
        nss.append(Namespace(type=t, path=p))
    devices = []
    for i, dv in enumerate(_get(d, "devices", w, list, [])):  # type: ignore[arg-type]
        wd = f"{w}.devices[{i}]"
        if not isinstance(dv, dict):
            raise SpecError(f"{wd}: expected object, got {dv!r}")
        t = _get(dv, "type", wd, str, required=True)
        if t not in ("c", "b", "u", "p"):
            raise SpecError(f"{wd}.type: expected c, b, u or p, got {t!r}")
        path = _get(dv, "path", wd, str, required=True)
        if not path.startswith("/"):  # type: ignore[union-attr]
            raise SpecError(f"{wd}.path: must be an absolute path, got {path!r}")
        need = t != "p"
        devices.append(Device(type=t, path=path, major=_get(dv, "major", wd, int, 0, need),
                              minor=_get(dv, "minor", wd, int, 0, need),
                              file_mode=_uint(dv, "fileMode", wd), uid=_uint(dv, "uid", wd),
                              gid=_uint(dv, "gid", wd)))
    sysctl = _get(d, "sysctl", w, dict, {})
    for k, v in sysctl.items():  # type: ignore[union-attr]
        if not isinstance(v, str):
            raise SpecError(f"{w}.sysctl.{k}: expected str, got {v!r}")
    prop = _get(d, "rootfsPropagation", w, str)
    if prop is not None and prop not in ("private", "rprivate", "slave", "rslave", "shared",
                                         "rshared", "unbindable", "runbindable"):
        raise SpecError(f"{w}.rootfsPropagation: unknown propagation {prop!r}")
    masked = _strs(d, "maskedPaths", w, [])
    ro = _strs(d, "readonlyPaths", w, [])
    for key, paths in (("maskedPaths", masked), ("readonlyPaths", ro)):
        for i, p in enumerate(paths):  # type: ignore[arg-type]
            if not p.startswith("/"):
                raise SpecError(f"{w}.{key}[{i}]: must be an absolute path, got {p!r}")
    return Linux(namespaces=nss, uid_mappings=_mappings(d, "uidMappings", w),
                 gid_mappings=_mappings(d, "gidMappings", w), devices=devices,
                 cgroups_path=_get(d, "cgroupsPath", w, str),
                 resources=_get(d, "resources", w, dict),
                 rootfs_propagation=prop, seccomp=_get(d, "seccomp", w, dict),
                 sysctl=dict(sysctl), masked_paths=masked, readonly_paths=ro,  # type: ignore
                 time_offsets=_get(d, "timeOffsets", w, dict),
                 personality=_get(d, "personality", w, dict))


def parse_hooks(d: dict) -> dict[str, list[Hook]]:
    out: dict[str, list[Hook]] = {k: [] for k in HOOK_KINDS}
    for kind in HOOK_KINDS:
        for i, h in enumerate(_get(d, kind, "hooks", list, [])):  # type: ignore[arg-type]
            w = f"hooks.{kind}[{i}]"
            if not isinstance(h, dict):
                raise SpecError(f"{w}: expected object, got {h!r}")
            path = _get(h, "path", w, str, required=True)
            if not path.startswith("/"):  # type: ignore[union-attr]
                raise SpecError(f"{w}.path: must be an absolute path, got {path!r}")
            t = _get(h, "timeout", w, int)
            if t is not None and t <= 0:  # type: ignore[operator]
                raise SpecError(f"{w}.timeout: must be positive, got {t}")
            out[kind].append(Hook(path=path, args=_strs(h, "args", w), env=_strs(h, "env", w),
                                  timeout=t))
    return out


def parse_spec(doc: object) -> Spec:
    if not isinstance(doc, dict):
        raise SpecError(f"config: expected a JSON object, got {type(doc).__name__}")
    ver = _get(doc, "ociVersion", "config", str, required=True)
    core = ver.split("-", 1)[0].split("+", 1)[0].split(".")
    if len(core) != 3 or not all(p.isdigit() for p in core) or core[0] != "1":
        raise SpecError(f"ociVersion: {ver!r} is not a 1.x.y runtime-spec version")
    root = _obj(doc, "root", "config", required=True)
    rpath = _get(root, "path", "root", str, required=True)
    mounts = []
    for i, m in enumerate(_get(doc, "mounts", "config", list, [])):  # type: ignore[arg-type]
        w = f"mounts[{i}]"
        if not isinstance(m, dict):
            raise SpecError(f"{w}: expected object, got {m!r}")
        dest = _get(m, "destination", w, str, required=True)
        if not dest.startswith("/"):  # type: ignore[union-attr]
            raise SpecError(f"{w}.destination: must be an absolute path, got {dest!r}")
        mounts.append(Mount(destination=dest, type=_get(m, "type", w, str),
                            source=_get(m, "source", w, str), options=_strs(m, "options", w, [])))
    proc = None
    if doc.get("process") is not None:
        proc = parse_process(_obj(doc, "process", "config"))
    ann = _get(doc, "annotations", "config", dict, {})
    for k, v in ann.items():  # type: ignore[union-attr]
        if not isinstance(v, str):
            raise SpecError(f"annotations.{k}: expected str, got {v!r}")
    return Spec(oci_version=ver, root_path=rpath,
                root_readonly=_get(root, "readonly", "root", bool, False), mounts=mounts,
                process=proc, hostname=_get(doc, "hostname", "config", str),
                domainname=_get(doc, "domainname", "config", str),
                hooks=parse_hooks(_obj(doc, "hooks", "config")), annotations=dict(ann),
                linux=parse_linux(_obj(doc, "linux", "config")), raw=doc)


def load_spec(path: str) -> Spec:
    """Read and parse a config.json; errors name the file."""
    try:
        with open(path, "rb") as f:
            doc = jsonlite.loads(f.read())
    except FileNotFoundError:
        raise SpecError(f"{path}: no such file (is --bundle a bundle directory?)") from None
    except ValueError as e:
        raise SpecError(f"{path}: not valid JSON: {e}") from None
    try:
        return parse_spec(doc)
    except SpecError as e:
        raise SpecError(f"{path}: {e}") from None
