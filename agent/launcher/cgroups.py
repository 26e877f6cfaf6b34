"""Control groups for containers: create, limit, account, freeze, kill and remove.

Works on the three layouts Linux offers:

* ``unified``: pure cgroup2 (what our guest VM boots with);
* ``legacy``: only v1 hierarchies, one per controller (or co-mounted, e.g. ``cpu,cpuacct``);
* ``hybrid``: v1 hierarchies for the resource controllers plus a cgroup2 mount (usually at
  ``/sys/fs/cgroup/unified``) used for grouping, ``cgroup.kill``/``cgroup.freeze``, and for any
  controller the kernel offers there that no v1 hierarchy holds (e.g. hugetlb on some hosts).

Resources come in the OCI ``linux.resources`` shape, which is v1-shaped: shares, memory+swap
totals, blkio weights. On cgroup2 they are converted the way runc does it so that a spec gives
the same container on both.

Device control: on v1 the ``devices`` controller takes the rules directly. On cgroup2 the
rules are compiled into a small eBPF program (BPF_PROG_TYPE_CGROUP_DEVICE) that is attached
to the container's cgroup2 directory, replacing the one a previous ``apply`` attached; the
last matching rule decides, as with v1, and a device no rule matches is denied.

All file access goes through :class:`CgroupFS`, so the logic can run against a plain
directory tree in tests (``CgroupFS(create_files=True)``); the bpf(2) calls of the cgroup2
device filter are the only direct system calls.
"""

from __future__ import annotations

import errno
import os
import _signal  # not `signal`: it imports enum (~5 ms of launcher start-up)
import time

__all__ = [
    "CgroupError",
    "CgroupFS",
    "Layout",
    "Mount",
    "Cgroup",
    "DEFAULT_PARENT",
    "DEFAULT_ALLOWED_DEVICES",
    "detect_layout",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "open_cgroup",
    "shares_to_weight",
    "blkio_weight_to_io_weight",
    "swap_v1_to_v2",
    "v1_writes",
    "v2_writes",
    "device_program",
]

DEFAULT_PARENT = "/sandbox-agent"

# Unlimited as the kernel prints it in v1 files, and the value stats report for "max".
_V1_UNLIMITED = 0x7FFFFFFFFFFFF000
_MAX_U64 = 2**64 - 1

# Devices every container may use whatever its spec says, as runc grants them: mknod of any
# node, the standard character devices, the pty multiplexer and slaves, the console, tun.
DEFAULT_ALLOWED_DEVICES: list[dict] = [
    {"allow": True, "type": "c", "major": None, "minor": None, "access": "m"},
    {"allow": True, "type": "b", "major": None, "minor": None, "access": "m"},
    {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},  # null
    {"allow": True, "type": "c", "major": 1, "minor": 8, "access": "rwm"},  # random
    {"allow": True, "type": "c", "major": 1, "minor": 7, "access": "rwm"},  # full
    {"allow": True, "type": "c", "major": 5, "minor": 0, "access": "rwm"},  # tty
    {"allow": True, "type": "c", "major": 1, "minor": 5, "access": "rwm"},  # zero
    {"allow": True, "type": "c", "major": 1, "minor": 9, "access": "rwm"},  # urandom
    {"allow": True, "type": "c", "major": 5, "minor": 1, "access": "rwm"},  # console
    {"allow": True, "type": "c", "major": 136, "minor": None, "access": "rwm"},  # pts/*
    {"allow": True, "type": "c", "major": 5, "minor": 2, "access": "rwm"},  # ptmx
    {"allow": True, "type": "c", "major": 10, "minor": 200, "access": "rwm"},  # net/tun
]

# v1 controllers this module drives (named hierarchies such as name=systemd are left alone).
V1_CONTROLLERS = (
    "cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids",
    "hugetlb", "net_cls", "net_prio", "perf_event", "rdma", "misc",
)


class CgroupError(Exception):
    """A cgroup operation failed; the message names the file, the value and the reason."""


# --------------------------------------------------------------------------------------------
# Thin system-call layer


class CgroupFS:
    """The only place that touches the file system or sends signals.

    With ``create_files=True`` writes create missing files, so a temporary directory can stand
    in for cgroupfs; on the real cgroupfs a missing file means a controller is not available.
    """

    def __init__(self, create_files: bool = False) -> None:
        self.create_files = create_files

    def read(self, path: str) -> str:
        with open(path, "rb") as f:
            return f.read().decode()

    def write(self, path: str, value: str) -> None:
        flags = os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC
        if self.create_files:
            flags |= os.O_CREAT
        fd = os.open(path, flags, 0o644)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def mkdir(self, path: str) -> None:
        os.mkdir(path, 0o755)

    def rmdir(self, path: str) -> None:
        os.rmdir(path)

    def subdirs(self, path: str) -> list[str]:
        try:
            with os.scandir(path) as it:
                return [e.path for e in it if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return []

    def kill(self, pid: int, sig: int) -> None:
        os.kill(pid, sig)


# --------------------------------------------------------------------------------------------
# Layout discovery


class Mount:
    """One cgroup mount: where it is, which hierarchy path it shows at its top."""

    # A plain class, not a dataclass: importing dataclasses costs the launcher ~8 ms.
    __slots__ = ("mountpoint", "root")

    def __init__(self, mountpoint: str, root: str = "/") -> None:
        self.mountpoint = mountpoint
        self.root = root

    def __repr__(self) -> str:
        return f"Mount({self.mountpoint!r}, root={self.root!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mount) and (self.mountpoint, self.root) == (other.mountpoint,
                                                                             other.root)


class Layout:
    """Where the hierarchies are and where the calling process sits in each.

    ``v1`` maps controller name -> mount; co-mounted controllers share one Mount.
    ``unified`` is the cgroup2 mount or None. ``own`` maps controller name (``""`` for cgroup2)
    -> the caller's cgroup path, used for relative ``cgroupsPath`` values.
    """

    __slots__ = ("v1", "unified", "own")

    def __init__(self, v1: dict[str, Mount] | None = None, unified: Mount | None = None,
                 own: dict[str, str] | None = None) -> None:
        self.v1: dict[str, Mount] = v1 or {}
        self.unified = unified
        self.own: dict[str, str] = own or {}

    def __repr__(self) -> str:
        return f"Layout(v1={self.v1!r}, unified={self.unified!r}, own={self.own!r})"

    @property
    def mode(self) -> str:
        if not self.v1:
            return "unified"
        return "hybrid" if self.unified is not None else "legacy"


def _unescape_mountinfo(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(s):
        if s[i] == "\\" and s[i + 1:i + 4].isdigit() and len(s[i + 1:i + 4]) == 3:
            out.append(chr(int(s[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(s[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> tuple[dict[str, Mount], Mount | None]:
    """cgroup mounts from /proc/self/mountinfo text: (v1 controller -> mount, cgroup2 mount).

    When a hierarchy is mounted more than once, the first mount under /sys/fs/cgroup wins, else
    the first one seen.
    """
    v1: dict[str, Mount] = {}
    unified: Mount | None = None
    for line in text.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 7:
            continue
        sep = fields.index("-")
        if sep + 3 > len(fields):
            continue
        fstype = fields[sep + 1]
        root, mountpoint = _unescape_mountinfo(fields[3]), _unescape_mountinfo(fields[4])
        mount = Mount(mountpoint=mountpoint, root=root)
        preferred = mountpoint.startswith("/sys/fs/cgroup")
        if fstype == "cgroup2":
            if unified is None or (preferred
                                   and not unified.mountpoint.startswith("/sys/fs/cgroup")):
                unified = mount
        elif fstype == "cgroup":
            opts = fields[sep + 3].split(",")
            for ctl in opts:
                if ctl not in V1_CONTROLLERS:
                    continue
                cur = v1.get(ctl)
                if cur is None or (preferred and not cur.mountpoint.startswith("/sys/fs/cgroup")):
                    v1[ctl] = mount
    return v1, unified


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup text -> controller -> path; the cgroup2 entry is under ``""``."""
    own: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, ctls, path = parts
        if ctls == "":
            own[""] = path
        else:
            for ctl in ctls.split(","):
                own[ctl] = path
    return own


def detect_layout(fs: CgroupFS | None = None, proc: str = "/proc/self") -> Layout:
    fs = fs or CgroupFS()
    v1, unified = parse_mountinfo(fs.read(f"{proc}/mountinfo"))
    own = parse_proc_cgroup(fs.read(f"{proc}/cgroup"))
    return Layout(v1=v1, unified=unified, own=own)


# --------------------------------------------------------------------------------------------
# Conversions between the v1-shaped spec and cgroup2


def shares_to_weight(shares: int) -> int:
    """cpu.shares [2, 262144] -> cpu.weight [1, 10000], linearly, as runc 1.1 does (0 = unset)."""
    if shares == 0:
        return 0
    shares = min(max(shares, 2), 262144)
    return 1 + ((shares - 2) * 9999) // 262142


def blkio_weight_to_io_weight(weight: int) -> int:
    """blkio.weight [10, 1000] -> io.weight [1, 10000] (0 = unset)."""
    if weight == 0:
        return 0
    return 1 + (weight - 10) * 9999 // 990


def swap_v1_to_v2(swap: int | None, memory: int | None) -> int | None:
    """OCI ``memory.swap`` is memory+swap (v1 memsw); cgroup2 limits swap alone.

    Returns the memory.swap.max value: None = leave unset, -1 = "max".
    """
    swap = swap or 0
    memory = memory or 0
    if memory == -1 and swap == 0:
        return -1  # unlimited memory asked: unlimited swap too, as v1 would behave
    if swap == 0:
        return None
    if swap == -1:
        return -1
    if memory in (0, -1):
        raise CgroupError(f"memory.swap={swap} needs a memory.limit as well (got {memory})")
    if memory < 0:
        raise CgroupError(f"invalid memory.limit {memory}")
    if swap < memory:
        raise CgroupError(f"memory.swap={swap} (memory+swap) is below memory.limit={memory}")
    return swap - memory


def _max_or(v: int) -> str:
    return "max" if v < 0 else str(v)


def _dev(d: dict, what: str) -> str:
    try:
        return f"{int(d['major'])}:{int(d['minor'])}"
    except (KeyError, TypeError, ValueError):
        raise CgroupError(f"{what} entry needs integer major and minor: {d!r}") from None


def _hugepage_key(size: str) -> str:
    # The spec's pageSize ("2MB", "1GB", "64KB") is already the name the kernel uses.
    s = size.strip()
    if not s or not s[:-2].isdigit() or s[-2:] not in ("KB", "MB", "GB"):
        raise CgroupError(f"hugepageLimits pageSize {size!r} is not like '2MB' or '1GB'")
    return s


def _device_rule(d: dict) -> tuple[str, str]:
    """An OCI device cgroup rule -> (file, line) for the v1 devices controller."""
    typ = d.get("type") or "a"
    if typ not in ("a", "b", "c"):
        raise CgroupError(f"devices rule type {typ!r} is not one of a, b, c: {d!r}")
    access = d.get("access") or "rwm"
    if not access or set(access) - set("rwm"):
        raise CgroupError(f"devices rule access {access!r} is not a subset of 'rwm': {d!r}")
    major = "*" if d.get("major") in (None, -1) else str(int(d["major"]))
    minor = "*" if d.get("minor") in (None, -1) else str(int(d["minor"]))
    target = "devices.allow" if d.get("allow") else "devices.deny"
    if typ == "a":
        # The kernel only takes the bare "a" form; it means every device, every access.
        return target, "a"
    return target, f"{typ} {major}:{minor} {access}"


# A write plan is a list of (controller, file, value). Controller "" means the cgroup2 dir.
Write = tuple[str, str, str]


def v1_writes(res: dict, devices_defaults: bool = True) -> tuple[list[Write], list[str]]:
    """Files to write for the v1 hierarchies, in order; and what was ignored (with why).

    Memory/swap ordering that depends on the current limit is handled by the caller.
    """
    w: list[Write] = []
    ignored: list[str] = []

    mem = res.get("memory") or {}
    if mem.get("reservation") is not None:
        w.append(("memory", "memory.soft_limit_in_bytes", _max_or(mem["reservation"])))
    if mem.get("kernel") is not None:
        ignored.append("memory.kernel: deprecated, kernel memory is not limited separately")
    if mem.get("kernelTCP") is not None:
        w.append(("memory", "memory.kmem.tcp.limit_in_bytes", _max_or(mem["kernelTCP"])))
    if mem.get("swappiness") is not None:
        sw = int(mem["swappiness"])
        if not 0 <= sw <= 100:
            raise CgroupError(f"memory.swappiness {sw} is outside 0..100")
        w.append(("memory", "memory.swappiness", str(sw)))
    if mem.get("disableOOMKiller"):
        w.append(("memory", "memory.oom_control", "1"))

    cpu = res.get("cpu") or {}
    if cpu.get("shares"):
        w.append(("cpu", "cpu.shares", str(int(cpu["shares"]))))
    elif cpu.get("weight"):
        ignored.append("cpu.weight: v2 only, set cpu.shares for v1")
    if cpu.get("period"):
        w.append(("cpu", "cpu.cfs_period_us", str(int(cpu["period"]))))
    if cpu.get("quota"):
        w.append(("cpu", "cpu.cfs_quota_us", str(int(cpu["quota"]))))
    if cpu.get("burst") is not None:
        w.append(("cpu", "cpu.cfs_burst_us", str(int(cpu["burst"]))))
    # rt_period before rt_runtime: the runtime must fit in the period.
    if cpu.get("realtimePeriod"):
        w.append(("cpu", "cpu.rt_period_us", str(int(cpu["realtimePeriod"]))))
    if cpu.get("realtimeRuntime"):
        w.append(("cpu", "cpu.rt_runtime_us", str(int(cpu["realtimeRuntime"]))))
    if cpu.get("idle") is not None:
        w.append(("cpu", "cpu.idle", str(int(cpu["idle"]))))
    if cpu.get("cpus"):
        w.append(("cpuset", "cpuset.cpus", cpu["cpus"]))
    if cpu.get("mems"):
        w.append(("cpuset", "cpuset.mems", cpu["mems"]))

    pids = res.get("pids") or {}
    if pids.get("limit"):
        w.append(("pids", "pids.max", _max_or(int(pids["limit"]))))

    bio = res.get("blockIO") or {}
    if bio.get("weight"):
        w.append(("blkio", "blkio.weight", str(int(bio["weight"]))))
    if bio.get("leafWeight"):
        w.append(("blkio", "blkio.leaf_weight", str(int(bio["leafWeight"]))))
    for wd in bio.get("weightDevice") or []:
        dev = _dev(wd, "blockIO.weightDevice")
        if wd.get("weight"):
            w.append(("blkio", "blkio.weight_device", f"{dev} {int(wd['weight'])}"))
        if wd.get("leafWeight"):
            w.append(("blkio", "blkio.leaf_weight_device", f"{dev} {int(wd['leafWeight'])}"))
    for key, fname in (
        ("throttleReadBpsDevice", "blkio.throttle.read_bps_device"),
        ("throttleWriteBpsDevice", "blkio.throttle.write_bps_device"),
        ("throttleReadIOPSDevice", "blkio.throttle.read_iops_device"),
        ("throttleWriteIOPSDevice", "blkio.throttle.write_iops_device"),
    ):
        for td in bio.get(key) or []:
            w.append(("blkio", fname, f"{_dev(td, 'blockIO.' + key)} {int(td['rate'])}"))

    for hp in res.get("hugepageLimits") or []:
        key = _hugepage_key(hp.get("pageSize", ""))
        w.append(("hugetlb", f"hugetlb.{key}.limit_in_bytes", str(int(hp["limit"]))))

    if "devices" in res:
        rules = list(res.get("devices") or [])
        if devices_defaults:
            rules += DEFAULT_ALLOWED_DEVICES
        for rule in rules:
            fname, line = _device_rule(rule)
            w.append(("devices", fname, line))

    net = res.get("network") or {}
    if net.get("classID") is not None:
        w.append(("net_cls", "net_cls.classid", str(int(net["classID"]))))
    for prio in net.get("priorities") or []:
        w.append(("net_prio", "net_prio.ifpriomap", f"{prio['name']} {int(prio['priority'])}"))

    for name, limits in (res.get("rdma") or {}).items():
        parts = [name]
        if limits.get("hcaHandles") is not None:
            parts.append(f"hca_handle={int(limits['hcaHandles'])}")
        if limits.get("hcaObjects") is not None:
            parts.append(f"hca_object={int(limits['hcaObjects'])}")
        w.append(("rdma", "rdma.max", " ".join(parts)))

    if res.get("unified"):
        # Placed on the cgroup2 dir when the layout has one; the caller refuses otherwise.
        for k, v in res["unified"].items():
            w.append(("", _unified_key(k), str(v)))
    return w, ignored


def _unified_key(k: str) -> str:
    if "/" in k or k in ("", ".", "..") or "." not in k:
        raise CgroupError(f"unified key {k!r} is not a cgroup file name like 'memory.high'")
    return k


def v2_writes(res: dict) -> tuple[list[Write], list[str]]:
    """Files to write in the cgroup2 directory, in order; and what was ignored (with why)."""
    w: list[Write] = []
    ignored: list[str] = []

    mem = res.get("memory") or {}
    swap = swap_v1_to_v2(mem.get("swap"), mem.get("limit"))
    if swap is not None:
        w.append(("memory", "memory.swap.max", _max_or(swap)))
    if mem.get("limit"):
        w.append(("memory", "memory.max", _max_or(int(mem["limit"]))))
    if mem.get("reservation"):
        w.append(("memory", "memory.low", _max_or(int(mem["reservation"]))))
    for key, why in (
        ("kernel", "deprecated, kernel memory is not limited separately"),
        ("kernelTCP", "no cgroup2 equivalent"),
        ("swappiness", "no cgroup2 equivalent"),
        ("disableOOMKiller", "cgroup2 cannot disable the OOM killer"),
    ):
        if mem.get(key) not in (None, False):
            ignored.append(f"memory.{key}: {why}")

    cpu = res.get("cpu") or {}
    weight = cpu.get("weight") or shares_to_weight(int(cpu.get("shares") or 0))
    if weight:
        w.append(("cpu", "cpu.weight", str(int(weight))))
    if cpu.get("quota") or cpu.get("period"):
        quota = int(cpu.get("quota") or 0)
        value = str(quota) if quota > 0 else "max"
        if cpu.get("period"):
            value += f" {int(cpu['period'])}"
        w.append(("cpu", "cpu.max", value))
    if cpu.get("burst") is not None:
        w.append(("cpu", "cpu.max.burst", str(int(cpu["burst"]))))
    if cpu.get("idle") is not None:
        w.append(("cpu", "cpu.idle", str(int(cpu["idle"]))))
    if cpu.get("realtimeRuntime") or cpu.get("realtimePeriod"):
        raise CgroupError(
            "cpu.realtimeRuntime/realtimePeriod: cgroup2 has no realtime bandwidth control "
            f"(asked runtime={cpu.get('realtimeRuntime')}, period={cpu.get('realtimePeriod')})")
    if cpu.get("cpus"):
        w.append(("cpuset", "cpuset.cpus", cpu["cpus"]))
    if cpu.get("mems"):
        w.append(("cpuset", "cpuset.mems", cpu["mems"]))

    pids = res.get("pids") or {}
    if pids.get("limit"):
        w.append(("pids", "pids.max", _max_or(int(pids["limit"]))))

    bio = res.get("blockIO") or {}
    # io.bfq.weight takes the blkio range unchanged; io.weight is chosen by the caller when the
    # bfq file is missing (marked "io.weight?").
    if bio.get("weight"):
        w.append(("io", "io.weight?", str(int(bio["weight"]))))
    if bio.get("leafWeight"):
        ignored.append("blockIO.leafWeight: no cgroup2 equivalent")
    for wd in bio.get("weightDevice") or []:
        if wd.get("weight"):
            dev = _dev(wd, "blockIO.weightDevice")
            w.append(("io", "io.weight?", f"{dev} {int(wd['weight'])}"))
    for key, knob in (
        ("throttleReadBpsDevice", "rbps"),
        ("throttleWriteBpsDevice", "wbps"),
        ("throttleReadIOPSDevice", "riops"),
        ("throttleWriteIOPSDevice", "wiops"),
    ):
        for td in bio.get(key) or []:
            rate = int(td["rate"])
            dev = _dev(td, "blockIO." + key)
            w.append(("io", "io.max", f"{dev} {knob}={rate if rate else 'max'}"))

    for hp in res.get("hugepageLimits") or []:
        key = _hugepage_key(hp.get("pageSize", ""))
        w.append(("hugetlb", f"hugetlb.{key}.max", str(int(hp["limit"]))))

    for name, limits in (res.get("rdma") or {}).items():
        parts = [name]
        if limits.get("hcaHandles") is not None:
            parts.append(f"hca_handle={int(limits['hcaHandles'])}")
        if limits.get("hcaObjects") is not None:
            parts.append(f"hca_object={int(limits['hcaObjects'])}")
        w.append(("rdma", "rdma.max", " ".join(parts)))

    net = res.get("network") or {}
    if net:
        ignored.append("network: net_cls/net_prio exist only in cgroup v1")

    # Unified values go last so they can override anything converted above, as runc does.
    for k, v in (res.get("unified") or {}).items():
        w.append((k.split(".", 1)[0], _unified_key(k), str(v)))
    return w, ignored


# --------------------------------------------------------------------------------------------
# The cgroup of one container


def _resolve(cgroups_path: str | None, container_id: str, own: str) -> str:
    if cgroups_path is None or cgroups_path == "":
        if not container_id or "/" in container_id or container_id in (".", ".."):
            raise CgroupError(f"container id {container_id!r} cannot name a cgroup")
        path = f"{DEFAULT_PARENT}/{container_id}"
    elif cgroups_path.startswith("/"):
        path = cgroups_path
    else:
        # Relative paths hang below the caller's own cgroup in that hierarchy, as in runc.
        path = f"{own.rstrip('/')}/{cgroups_path}"
    # normpath of an absolute path cannot climb above "/", so ".." stays inside the hierarchy.
    path = os.path.normpath(path)
    if path.startswith("//"):
        path = "/" + path.lstrip("/")
    if path == "/":
        raise CgroupError(f"cgroupsPath {cgroups_path!r} resolves to the hierarchy root")
    return path


def _host_dir(mount: Mount, path: str) -> str:
    root = mount.root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        # The mount shows a subtree (cgroup namespace or bind mount): strip what it hides.
        path = path[len(root):] or "/"
    return mount.mountpoint.rstrip("/") + path


class Cgroup:
    """One container's cgroup across every hierarchy of the layout."""

    def __init__(self, path_by_ctl: dict[str, str], layout: Layout, fs: CgroupFS,
                 cgroup_paths: dict[str, str]) -> None:
        self._dirs = path_by_ctl
        self.layout = layout
        self.fs = fs
        # Path inside each hierarchy (as /proc/<pid>/cgroup shows it); relative cgroupsPath
        # values can differ per hierarchy, so ``path`` is the cgroup2 one when there is one.
        self.cgroup_paths = cgroup_paths
        self.path = cgroup_paths.get("") or next(iter(cgroup_paths.values()))
        # Spec fields this layout cannot honour, with the reason (for logs and the caller).
        self.ignored: list[str] = []

    # -- paths ---------------------------------------------------------------------------

    def paths(self) -> dict[str, str]:
        return dict(self._dirs)

    @property
    def mode(self) -> str:
        return self.layout.mode

    def _unified(self) -> str | None:
        return self._dirs.get("")

    def _dir_for(self, ctl: str) -> str | None:
        """Directory that holds controller ``ctl``'s files ("" = the cgroup2 dir)."""
        if ctl == "":
            return self._unified()
        if ctl in self.layout.v1:
            return self._dirs.get(ctl)
        if self.layout.mode == "unified":
            return self._unified()
        if self.layout.unified is not None and ctl in self._v2_offered():
            return self._unified()  # hybrid: a controller only cgroup2 has (e.g. hugetlb)
        return None

    def _v2_offered(self) -> list[str]:
        top = self.layout.unified.mountpoint.rstrip("/")
        return (self._read(f"{top}/cgroup.controllers") or "").split()

    def self_attach_targets(self) -> tuple[list[str], str | None]:
        """How a process can put itself into this cgroup without the global lock a write to
        ``cgroup.procs`` takes (and its RCU grace period, cgwarm.py): the v1 ``tasks`` files
        to write "0" (this thread; the whole process when it is single-threaded) into, and
        the cgroup2 directory to be created in with clone3(CLONE_INTO_CGROUP)."""
        tasks = [f"{d}/tasks" for d in self._unique_dirs() if d != self._dirs.get("")]
        return tasks, self._dirs.get("")

    def _unique_dirs(self) -> list[str]:
        seen: list[str] = []
        for d in self._dirs.values():
            if d not in seen:
                seen.append(d)
        return seen

    def _primary(self) -> str:
        """Where membership is read from: cgroup2 dir if any, else a v1 dir."""
        if "" in self._dirs:
            return self._dirs[""]
        for ctl in ("pids", "freezer", "memory", "cpu"):
            if ctl in self._dirs:
                return self._dirs[ctl]
        return next(iter(self._dirs.values()))

    # -- file helpers --------------------------------------------------------------------

    def _write(self, path: str, value: str) -> None:
        try:
            self.fs.write(path, value)
        except FileNotFoundError:
            raise CgroupError(
                f"cannot write {value!r} to {path}: the file does not exist "
                "(controller not available or not enabled for this cgroup)") from None
        except OSError as e:
            raise CgroupError(f"cannot write {value!r} to {path}: {e.strerror}") from None

    def _read(self, path: str) -> str | None:
        try:
            return self.fs.read(path)
        except OSError:
            return None

    def _read_int(self, path: str, default: int = 0) -> int:
        s = self._read(path)
        if s is None:
            return default
        s = s.strip()
        if s == "max":
            return _MAX_U64
        try:
            return int(s)
        except ValueError:
            return default

    def _read_kv(self, path: str) -> dict[str, int]:
        out: dict[str, int] = {}
        for line in (self._read(path) or "").splitlines():
            parts = line.split()
            if len(parts) == 2:
                try:
                    out[parts[0]] = int(parts[1])
                except ValueError:
                    pass
        return out

    # -- lifecycle -----------------------------------------------------------------------

    def create_unified(self) -> None:
        """Make only the cgroup2 directory (with its controllers enabled on pure v2), so that
        a process can be created in it (clone3 CLONE_INTO_CGROUP) before :meth:`create` makes
        the rest. Controllers are enabled while the subtree is still empty: then the kernel
        need not take its global migration lock (which would wait an RCU grace period)."""
        if "" not in self._dirs:
            return
        top = self.layout.unified.mountpoint.rstrip("/")
        self._mkdirs(top, self._dirs[""])
        if self.layout.mode == "unified":
            self._enable_controllers(top, self._dirs[""], None)

    def create(self) -> None:
        """Make the directories (and parents) in every hierarchy; idempotent."""
        for ctl, d in self._dirs.items():
            mount = self.layout.unified if ctl == "" else self.layout.v1[ctl]
            self._mkdirs(mount.mountpoint.rstrip("/"), d)
            if ctl == "cpuset":
                self._fill_cpuset(mount.mountpoint.rstrip("/"), d)
        if self.layout.mode == "unified" and "" in self._dirs:
            top = self.layout.unified.mountpoint.rstrip("/")
            self._enable_controllers(top, self._dirs[""], None)

    def _mkdirs(self, top: str, d: str) -> None:
        # The parents (/sandbox-agent) usually exist: try the leaf alone first.
        try:
            self.fs.mkdir(d)
            return
        except FileExistsError:
            return
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CgroupError(f"cannot create cgroup directory {d}: {e.strerror}") from None
        rel = os.path.relpath(d, top)
        cur = top
        for part in rel.split("/"):
            cur = f"{cur}/{part}"
            try:
                self.fs.mkdir(cur)
            except FileExistsError:
                pass
            except OSError as e:
                raise CgroupError(f"cannot create cgroup directory {cur}: {e.strerror}") from None

    def _fill_cpuset(self, top: str, d: str) -> None:
        # A new v1 cpuset starts with empty cpus/mems and refuses tasks until they are set:
        # copy them down from the nearest ancestor that has them.
        chain = [d]
        while chain[-1] != top and len(chain[-1]) > len(top):
            chain.append(os.path.dirname(chain[-1]))
        chain.reverse()
        for parent, child in zip(chain, chain[1:]):
            for f in ("cpuset.cpus", "cpuset.mems"):
                cur = (self._read(f"{child}/{f}") or "").strip()
                if cur:
                    continue
                val = (self._read(f"{parent}/{f}") or "").strip()
                if val:
                    self._write(f"{child}/{f}", val)

    def _enable_controllers(self, top: str, d: str, wanted: set[str] | None) -> None:
        """Enable controllers in every ancestor's subtree_control down to ``d``'s parent.

        ``wanted`` None = everything the ancestor offers (pure v2 create, as runc does).
        A controller the kernel refuses (e.g. a parent that holds processes) is skipped; the
        later write to its file then reports what is missing.
        """
        chain = []
        cur = os.path.dirname(d)
        while len(cur) >= len(top):
            chain.append(cur)
            if cur == top:
                break
            cur = os.path.dirname(cur)
        for anc in reversed(chain):
            offered = (self._read(f"{anc}/cgroup.controllers") or "").split()
            enabled = set((self._read(f"{anc}/cgroup.subtree_control") or "").split())
            todo = [c for c in offered if c not in enabled and (wanted is None or c in wanted)]
            if not todo:
                continue
            try:
                self.fs.write(f"{anc}/cgroup.subtree_control", " ".join("+" + c for c in todo))
            except OSError:
                for c in todo:
                    try:
                        self.fs.write(f"{anc}/cgroup.subtree_control", "+" + c)
                    except OSError:
                        pass

    def add_pid(self, pid: int) -> None:
        for d in self._unique_dirs():
            self._write(f"{d}/cgroup.procs", str(pid))

    def pids(self) -> list[int]:
        out: set[int] = set()
        stack = [self._primary()]
        while stack:
            d = stack.pop()
            text = self._read(f"{d}/cgroup.procs")
            if text is None:
                continue
            out.update(int(x) for x in text.split())
            stack.extend(self.fs.subdirs(d))
        return sorted(out)

    # -- resources -----------------------------------------------------------------------

    def apply(self, resources: dict, *, devices_defaults: bool = True) -> None:
        """Write OCI ``linux.resources`` into the cgroup.

        ``devices_defaults`` appends :data:`DEFAULT_ALLOWED_DEVICES` after the spec's device
        rules, so /dev/null and friends stay usable whatever the spec denies first.
        """
        resources = resources or {}
        if self.layout.mode == "unified":
            writes, ignored = v2_writes(resources)
            self.ignored.extend(ignored)
            if "devices" in resources:
                rules = list(resources.get("devices") or [])
                if devices_defaults:
                    rules += DEFAULT_ALLOWED_DEVICES
                # Compiled before any write so a bad rule changes nothing.
                program = device_program(rules)
            self._apply_v2(writes)
            if "devices" in resources:
                self._attach_device_program(program)
            return
        writes, ignored = v1_writes(resources, devices_defaults)
        self.ignored.extend(ignored)
        mem = resources.get("memory") or {}
        self._apply_v1_memory(mem)
        for ctl, fname, value in writes:
            if ctl == "" and self._unified() is None:
                raise CgroupError(f"unified resource {fname}={value!r}: no cgroup2 hierarchy "
                                  "on this host (legacy cgroup v1 only)")
            d = self._dir_for(ctl)
            if d is None:
                raise CgroupError(f"cannot set {fname}={value!r}: the {ctl} controller is not "
                                  "mounted on this host")
            if ctl == "hugetlb" and ctl not in self.layout.v1:
                # Hybrid host offering hugetlb only on cgroup2: use the v2 file name.
                self._enable_v2(ctl)
                fname = fname.replace(".limit_in_bytes", ".max")
            if ctl == "cpu" and fname == "cpu.cfs_period_us":
                self._write_period_v1(d, value, resources.get("cpu") or {})
                continue
            if ctl == "blkio" and fname in ("blkio.weight", "blkio.weight_device"):
                bfq = fname.replace("blkio.", "blkio.bfq.")
                if not self.fs.exists(f"{d}/{fname}") and self.fs.exists(f"{d}/{bfq}"):
                    fname = bfq
            if ctl == "hugetlb" and fname.endswith(".limit_in_bytes"):
                rsvd = fname.replace(".limit_in_bytes", ".rsvd.limit_in_bytes")
                if self.fs.exists(f"{d}/{rsvd}"):
                    self._write(f"{d}/{rsvd}", value)
            self._write(f"{d}/{fname}", value)

    def _write_period_v1(self, d: str, period: str, cpu: dict) -> None:
        # Shrinking the period below the current quota fails with EINVAL until the quota is
        # lowered: write the quota first in that case (it is rewritten right after anyway).
        try:
            self.fs.write(f"{d}/cpu.cfs_period_us", period)
        except OSError as e:
            if e.errno != errno.EINVAL or not cpu.get("quota"):
                raise CgroupError(f"cannot write {period!r} to {d}/cpu.cfs_period_us: "
                                  f"{e.strerror}") from None
            self._write(f"{d}/cpu.cfs_quota_us", str(int(cpu["quota"])))
            self._write(f"{d}/cpu.cfs_period_us", period)

    def _apply_v1_memory(self, mem: dict) -> None:
        limit = mem.get("limit")
        swap = mem.get("swap")
        if limit is None and swap is None:
            return
        d = self._dir_for("memory")
        if d is None:
            raise CgroupError(f"cannot set memory.limit={limit} swap={swap}: the memory "
                              "controller is not mounted on this host")
        lim_f, sw_f = f"{d}/memory.limit_in_bytes", f"{d}/memory.memsw.limit_in_bytes"
        limit = int(limit or 0)
        swap = int(swap or 0)
        if limit == -1 and swap == 0 and self.fs.exists(sw_f):
            swap = -1
        if swap and not self.fs.exists(sw_f):
            raise CgroupError(f"memory.swap={swap}: {sw_f} does not exist "
                              "(swap accounting disabled in this kernel)")
        # memsw must stay >= limit at every step, so the order depends on where we come from.
        swap_first = False
        if limit and swap:
            cur = self._read_int(lim_f, _V1_UNLIMITED)
            swap_first = swap == -1 or cur < swap
        order = [(sw_f, swap), (lim_f, limit)] if swap_first else [(lim_f, limit), (sw_f, swap)]
        for path, v in order:
            if v:
                self._write(path, str(v))

    def _enable_v2(self, ctl: str) -> None:
        top = self.layout.unified.mountpoint.rstrip("/")
        self._enable_controllers(top, self._unified(), {ctl})

    def _apply_v2(self, writes: list[Write]) -> None:
        d = self._unified()
        if d is None:
            raise CgroupError("no cgroup2 directory for this cgroup")
        needed = {ctl for ctl, _, _ in writes if ctl not in ("", "cgroup")}
        if needed:
            self._enable_controllers(self.layout.unified.mountpoint.rstrip("/"), d, needed)
        for ctl, fname, value in writes:
            if fname == "io.weight?":
                if self.fs.exists(f"{d}/io.bfq.weight"):
                    fname = "io.bfq.weight"
                else:
                    fname = "io.weight"
                    parts = value.split()
                    parts[-1] = str(blkio_weight_to_io_weight(int(parts[-1])))
                    value = " ".join(parts)
            if fname == "memory.swap.max" and value == "max" and not self.fs.exists(f"{d}/{fname}"):
                continue  # no swap accounting: "unlimited" is already true
            self._write(f"{d}/{fname}", value)

    def _attach_device_program(self, program: bytes) -> None:
        d = self._unified()
        try:
            fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise CgroupError(f"cannot open cgroup {d} to attach the device filter: "
                              f"{e.strerror}") from None
        try:
            old = _bpf_query_device_progs(fd)
            prog = _bpf_load_device_prog(program)
            try:
                _bpf_attach(fd, prog)
            finally:
                os.close(prog)  # the attachment keeps the program alive
            # Detach the previous filters only now: in between both apply (the stricter wins),
            # so there is no window without device control.
            for pid_ in old:
                _bpf_detach_by_id(fd, pid_)
        except OSError as e:
            raise CgroupError(f"device filter on {d}: {e.strerror}") from None
        finally:
            os.close(fd)

    # -- freezer -------------------------------------------------------------------------

    def _freezer(self) -> tuple[str, str] | None:
        """('v1', dir) or ('v2', dir) for the freezer to use, None if there is none."""
        if "freezer" in self.layout.v1 and "freezer" in self._dirs:
            return "v1", self._dirs["freezer"]
        u = self._unified()
        if u is not None and self.fs.exists(f"{u}/cgroup.freeze"):
            return "v2", u
        return None

    def freeze(self, timeout: float = 10.0) -> None:
        self._set_frozen(True, timeout)

    def thaw(self, timeout: float = 10.0) -> None:
        self._set_frozen(False, timeout)

    def _set_frozen(self, frozen: bool, timeout: float) -> None:
        fz = self._freezer()
        if fz is None:
            raise CgroupError(f"cgroup {self.path}: no freezer (no v1 freezer, no cgroup.freeze)")
        kind, d = fz
        deadline = time.monotonic() + timeout
        delay = 0.001
        if kind == "v1":
            want = "FROZEN" if frozen else "THAWED"
            path = f"{d}/freezer.state"
            while True:
                self._write(path, want)
                state = (self._read(path) or "").strip()
                if state == want:
                    return
                if time.monotonic() > deadline:
                    raise CgroupError(f"{path} stayed {state!r} after writing {want!r} "
                                      f"for {timeout}s")
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        path = f"{d}/cgroup.freeze"
        self._write(path, "1" if frozen else "0")
        while True:
            events = self._read_kv(f"{d}/cgroup.events")
            if events.get("frozen", int(frozen)) == int(frozen):
                return
            if time.monotonic() > deadline:
                raise CgroupError(f"{d}/cgroup.events shows frozen={events.get('frozen')} "
                                  f"{timeout}s after writing {int(frozen)} to {path}")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def frozen(self) -> bool:
        fz = self._freezer()
        if fz is None:
            return False
        kind, d = fz
        if kind == "v1":
            return (self._read(f"{d}/freezer.state") or "").strip() == "FROZEN"
        return self._read_kv(f"{d}/cgroup.events").get("frozen") == 1

    # -- signals -------------------------------------------------------------------------

    def kill(self, sig: int = _signal.SIGKILL, timeout: float = 10.0) -> None:
        """Send ``sig`` to every process in the cgroup and its descendants.

        SIGKILL uses cgroup.kill where the kernel has it (atomic, follows forks). Otherwise the
        cgroup is frozen while signalling so a fork cannot slip a new process past the loop,
        then thawed so the processes can act on the signal.
        """
        u = self._unified()
        if sig == _signal.SIGKILL and u is not None and self.fs.exists(f"{u}/cgroup.kill"):
            self._write(f"{u}/cgroup.kill", "1")
            return
        froze = False
        # A paused container stays paused: only freeze (and thaw) when it is running now.
        if self._freezer() is not None and not self.frozen():
            try:
                self.freeze(timeout)
                froze = True
            except CgroupError:
                froze = False
        try:
            for pid in self.pids():
                try:
                    self.fs.kill(pid, sig)
                except ProcessLookupError:
                    pass
        finally:
            if froze:
                self.thaw(timeout)

    # -- accounting ----------------------------------------------------------------------

    def oom_kills(self) -> int:
        """How many processes the OOM killer took in this cgroup."""
        d = self._dir_for("memory")
        if d is None:
            return 0
        if self.layout.mode == "unified" or "memory" not in self.layout.v1:
            return self._read_kv(f"{d}/memory.events").get("oom_kill", 0)
        return self._read_kv(f"{d}/memory.oom_control").get("oom_kill", 0)

    def stats(self) -> dict:
        """Counters shaped like Kata's ``CgroupStats`` message (field names in snake_case)."""
        if self.layout.mode == "unified":
            return self._stats_v2()
        return self._stats_v1()

    def _stats_v1(self) -> dict:
        tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        cpu: dict = {"cpu_usage": {}, "throttling_data": {}}
        acct = self._dir_for("cpuacct")
        if acct is not None:
            st = self._read_kv(f"{acct}/cpuacct.stat")
            cpu["cpu_usage"] = {
                "total_usage": self._read_int(f"{acct}/cpuacct.usage"),
                "percpu_usage": [int(x) for x in
                                 (self._read(f"{acct}/cpuacct.usage_percpu") or "").split()],
                "usage_in_kernelmode": st.get("system", 0) * tick_ns,
                "usage_in_usermode": st.get("user", 0) * tick_ns,
            }
        c = self._dir_for("cpu")
        if c is not None:
            st = self._read_kv(f"{c}/cpu.stat")
            cpu["throttling_data"] = {
                "periods": st.get("nr_periods", 0),
                "throttled_periods": st.get("nr_throttled", 0),
                "throttled_time": st.get("throttled_time", 0),
            }

        memory: dict = {}
        m = self._dir_for("memory")
        if m is not None:
            def entry(prefix: str) -> dict:
                return {
                    "usage": self._read_int(f"{m}/{prefix}usage_in_bytes"),
                    "max_usage": self._read_int(f"{m}/{prefix}max_usage_in_bytes"),
                    "failcnt": self._read_int(f"{m}/{prefix}failcnt"),
                    "limit": self._read_int(f"{m}/{prefix}limit_in_bytes"),
                }
            mstat = self._read_kv(f"{m}/memory.stat")
            memory = {
                "cache": mstat.get("total_cache", mstat.get("cache", 0)),
                "usage": entry("memory."),
                "swap_usage": entry("memory.memsw."),
                "kernel_usage": entry("memory.kmem."),
                "use_hierarchy": self._read_int(f"{m}/memory.use_hierarchy") == 1,
                "stats": mstat,
            }

        blkio: dict = {}
        b = self._dir_for("blkio")
        if b is not None:
            for key, fname in (
                ("io_service_bytes_recursive", "blkio.throttle.io_service_bytes_recursive"),
                ("io_serviced_recursive", "blkio.throttle.io_serviced_recursive"),
            ):
                blkio[key] = _parse_blkio(self._read(f"{b}/{fname}") or "")

        hugetlb: dict = {}
        h = self._dir_for("hugetlb")
        if h is not None:
            v1 = "hugetlb" in self.layout.v1
            for size in self._hugepage_sizes():
                if v1:
                    hugetlb[size] = {
                        "usage": self._read_int(f"{h}/hugetlb.{size}.usage_in_bytes"),
                        "max_usage": self._read_int(f"{h}/hugetlb.{size}.max_usage_in_bytes"),
                        "failcnt": self._read_int(f"{h}/hugetlb.{size}.failcnt"),
                    }
                elif self.fs.exists(f"{h}/hugetlb.{size}.current"):
                    hugetlb[size] = self._hugetlb_v2(h, size)
        return {
            "cpu_stats": cpu,
            "memory_stats": memory,
            "pids_stats": self._pids_stats(self._dir_for("pids")),
            "blkio_stats": blkio,
            "hugetlb_stats": hugetlb,
        }

    def _hugetlb_v2(self, d: str, size: str) -> dict:
        return {
            "usage": self._read_int(f"{d}/hugetlb.{size}.current"),
            "max_usage": 0,  # cgroup2 keeps no peak for hugetlb
            "failcnt": self._read_kv(f"{d}/hugetlb.{size}.events").get("max", 0),
        }

    def _pids_stats(self, d: str | None) -> dict:
        if d is None:
            return {}
        limit = self._read_int(f"{d}/pids.max")
        return {"current": self._read_int(f"{d}/pids.current"),
                "limit": 0 if limit == _MAX_U64 else limit}

    def _hugepage_sizes(self) -> list[str]:
        sizes = []
        try:
            names = os.listdir("/sys/kernel/mm/hugepages")
        except OSError:
            return sizes
        for n in sorted(names):
            kb = int(n.split("-")[1].rstrip("kB"))
            if kb >= 1024 * 1024:
                sizes.append(f"{kb // (1024 * 1024)}GB")
            elif kb >= 1024:
                sizes.append(f"{kb // 1024}MB")
            else:
                sizes.append(f"{kb}KB")
        return sizes

    def _stats_v2(self) -> dict:
        d = self._unified()
        st = self._read_kv(f"{d}/cpu.stat")
        cpu = {
            "cpu_usage": {
                "total_usage": st.get("usage_usec", 0) * 1000,
                "percpu_usage": [],  # cgroup2 does not split usage per CPU
                "usage_in_kernelmode": st.get("system_usec", 0) * 1000,
                "usage_in_usermode": st.get("user_usec", 0) * 1000,
            },
            "throttling_data": {
                "periods": st.get("nr_periods", 0),
                "throttled_periods": st.get("nr_throttled", 0),
                "throttled_time": st.get("throttled_usec", 0) * 1000,
            },
        }
        mstat = self._read_kv(f"{d}/memory.stat")
        mem_cur = self._read_int(f"{d}/memory.current")
        swap_cur = self._read_int(f"{d}/memory.swap.current")
        mem_max = self._read_int(f"{d}/memory.max", _MAX_U64)
        swap_max = self._read_int(f"{d}/memory.swap.max", _MAX_U64)
        memory = {
            "cache": mstat.get("file", 0),
            "usage": {
                "usage": mem_cur,
                "max_usage": self._read_int(f"{d}/memory.peak"),
                "failcnt": self._read_kv(f"{d}/memory.events").get("max", 0),
                "limit": mem_max,
            },
            # Reported as memory+swap, the v1 meaning the stats consumers expect.
            "swap_usage": {
                "usage": mem_cur + swap_cur,
                "max_usage": 0,
                "failcnt": self._read_kv(f"{d}/memory.swap.events").get("max", 0),
                "limit": _MAX_U64 if _MAX_U64 in (mem_max, swap_max) else mem_max + swap_max,
            },
            "kernel_usage": {"usage": mstat.get("kernel", 0), "max_usage": 0, "failcnt": 0,
                             "limit": 0},
            "use_hierarchy": True,
            "stats": mstat,
        }
        blkio = {"io_service_bytes_recursive": [], "io_serviced_recursive": []}
        for line in (self._read(f"{d}/io.stat") or "").splitlines():
            parts = line.split()
            if not parts or ":" not in parts[0]:
                continue
            major, minor = (int(x) for x in parts[0].split(":"))
            kv = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
            for key, op, kind in (("rbytes", "Read", "io_service_bytes_recursive"),
                                  ("wbytes", "Write", "io_service_bytes_recursive"),
                                  ("rios", "Read", "io_serviced_recursive"),
                                  ("wios", "Write", "io_serviced_recursive")):
                if key in kv:
                    blkio[kind].append({"major": major, "minor": minor, "op": op,
                                        "value": int(kv[key])})
        hugetlb = {size: self._hugetlb_v2(d, size) for size in self._hugepage_sizes()
                   if self.fs.exists(f"{d}/hugetlb.{size}.current")}
        return {
            "cpu_stats": cpu,
            "memory_stats": memory,
            "pids_stats": self._pids_stats(d),
            "blkio_stats": blkio,
            "hugetlb_stats": hugetlb,
        }

    # -- removal -------------------------------------------------------------------------

    def destroy(self, kill: bool = False, timeout: float = 10.0) -> None:
        """Remove the cgroup directories (children first); with ``kill``, SIGKILL everyone first.

        Directories that still hold processes cannot be removed; after ``timeout`` that is an
        error naming the directory and the pids left.
        """
        if kill:
            self.kill(_signal.SIGKILL)
            if self.frozen():
                self.thaw(timeout)  # frozen tasks cannot die, so the dirs would stay busy
        deadline = time.monotonic() + timeout
        delay = 0.001
        for d in self._unique_dirs():
            while True:
                try:
                    self._rmtree(d)
                    break
                except OSError as e:
                    if e.errno != errno.EBUSY or time.monotonic() > deadline:
                        left = self._read(f"{d}/cgroup.procs") or ""
                        raise CgroupError(f"cannot remove cgroup {d}: {e.strerror}"
                                          f" (processes left: {left.split() or 'none'})") from None
                    # Killed processes leave their cgroup only once reaped by the kernel.
                    time.sleep(delay)
                    delay = min(delay * 2, 0.05)

    def _rmtree(self, d: str) -> None:
        # rmdir first: a container's cgroup rarely has children, and listing a v1 directory
        # (dozens of control files) for each hierarchy costs more than the rmdir itself.
        try:
            self.fs.rmdir(d)
            return
        except FileNotFoundError:
            return
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                raise
            subs = self.fs.subdirs(d)
            if not subs:
                raise  # processes still inside: the caller waits and retries
        for sub in subs:
            self._rmtree(sub)
        try:
            self.fs.rmdir(d)
        except FileNotFoundError:
            pass


# --------------------------------------------------------------------------------------------
# cgroup2 device control: an eBPF program built from the rules, loaded with bpf(2)

_BPF_PROG_LOAD, _BPF_PROG_ATTACH, _BPF_PROG_DETACH = 5, 8, 9
_BPF_PROG_GET_FD_BY_ID, _BPF_PROG_QUERY = 13, 16
_BPF_PROG_TYPE_CGROUP_DEVICE, _BPF_CGROUP_DEVICE, _BPF_F_ALLOW_MULTI = 15, 6, 2
_SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}
_DEV_TYPE = {"b": 1, "c": 2}  # BPF_DEVCG_DEV_BLOCK / _CHAR
_DEV_ACC = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_MKNOD / _READ / _WRITE


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return (code.to_bytes(1, "little") + ((src << 4) | dst).to_bytes(1, "little")
            + off.to_bytes(2, "little", signed=True) + imm.to_bytes(4, "little", signed=True))


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def device_program(rules: list[dict]) -> bytes:
    """eBPF instructions deciding device access like the v1 controller would for ``rules``.

    Registers: r2 = device type, r3 = requested access bits, r4 = major, r5 = minor (from the
    bpf_cgroup_dev_ctx in r1). Rules are tested last to first; the first that matches returns
    its verdict; no match returns 0 (deny).
    """
    ldxw, and_k, rsh_k, mov_k, mov_x, jne_k, exit_ = 0x61, 0x57, 0x77, 0xB7, 0xBF, 0x55, 0x95
    head = [
        _insn(ldxw, 2, 1, 0), _insn(and_k, 2, imm=0xFFFF),
        _insn(ldxw, 3, 1, 0), _insn(rsh_k, 3, imm=16),
        _insn(ldxw, 4, 1, 4), _insn(ldxw, 5, 1, 8),
    ]
    blocks: list[list[tuple]] = []
    for rule in reversed(rules):
        _device_rule(rule)  # the same checks (and messages) as for v1
        typ = rule.get("type") or "a"
        access = 0
        for ch in rule.get("access") or "rwm":
            access |= _DEV_ACC[ch]
        major = rule.get("major")
        minor = rule.get("minor")
        if typ == "a":
            access, major, minor = 7, None, None  # "a" is every device, every access
        checks: list[tuple] = []
        if typ != "a":
            checks.append(("jne", 2, _DEV_TYPE[typ]))
        if access != 7:
            checks.append(("mov", 6, 3))
            checks.append(("and", 6, _s32(~access)))
            checks.append(("jne", 6, 0))
        if major not in (None, -1):
            checks.append(("jne", 4, int(major)))
        if minor not in (None, -1):
            checks.append(("jne", 5, int(minor)))
        checks.append(("ret", 1 if rule.get("allow") else 0))
        blocks.append(checks)
        if not checks[:-1]:
            break  # matches everything: rules before it can never be reached
    body: list[bytes] = []
    unconditional = bool(blocks) and len(blocks[-1]) == 1
    for checks in blocks:
        size = sum(2 if c[0] == "ret" else 1 for c in checks)
        pos = 0
        for c in checks:
            if c[0] == "jne":
                # jump to the next block: offset counts instructions after this one
                body.append(_insn(jne_k, c[1], off=size - pos - 1, imm=c[2]))
                pos += 1
            elif c[0] == "mov":
                body.append(_insn(mov_x, c[1], c[2]))
                pos += 1
            elif c[0] == "and":
                body.append(_insn(and_k, c[1], imm=c[2]))
                pos += 1
            else:
                body.append(_insn(mov_k, 0, imm=c[1]))
                body.append(_insn(exit_))
                pos += 2
    # The verifier rejects unreachable code: no default verdict after a catch-all rule.
    tail = [] if unconditional else [_insn(mov_k, 0, imm=0), _insn(exit_)]
    return b"".join(head + body + tail)


_libc = None


def _bpf(cmd: int, attr: bytearray) -> int:
    global _libc
    import ctypes
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    nr = _SYS_BPF.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, "bpf(2) syscall number unknown for this architecture")
    buf = (ctypes.c_char * len(attr)).from_buffer(attr)
    rc = _libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), buf, ctypes.c_uint(len(attr)))
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def _bpf_load_device_prog(program: bytes) -> int:
    import ctypes
    insns = ctypes.create_string_buffer(program, len(program))
    lic = ctypes.create_string_buffer(b"Apache-2.0")
    log = ctypes.create_string_buffer(16384)
    attr = bytearray(144)

    def fill(level: int) -> None:
        attr[0:4] = _BPF_PROG_TYPE_CGROUP_DEVICE.to_bytes(4, "little")
        attr[4:8] = (len(program) // 8).to_bytes(4, "little")
        attr[8:16] = ctypes.addressof(insns).to_bytes(8, "little")
        attr[16:24] = ctypes.addressof(lic).to_bytes(8, "little")
        attr[24:28] = level.to_bytes(4, "little")
        attr[28:32] = (len(log) if level else 0).to_bytes(4, "little")
        attr[32:40] = (ctypes.addressof(log) if level else 0).to_bytes(8, "little")
        attr[48:64] = b"sa_devices".ljust(16, b"\0")

    fill(0)
    try:
        return _bpf(_BPF_PROG_LOAD, attr)
    except OSError as e:
        if e.errno != errno.EACCES and e.errno != errno.EINVAL:
            raise
        fill(1)  # once more with the verifier's log, to say why
        try:
            return _bpf(_BPF_PROG_LOAD, attr)
        except OSError as e2:
            raise OSError(e2.errno, f"{e2.strerror}; verifier: "
                          f"{log.value.decode(errors='replace').strip()[-300:]}") from None


def _bpf_attach(cgroup_fd: int, prog_fd: int) -> None:
    attr = bytearray(144)
    attr[0:4] = cgroup_fd.to_bytes(4, "little")
    attr[4:8] = prog_fd.to_bytes(4, "little")
    attr[8:12] = _BPF_CGROUP_DEVICE.to_bytes(4, "little")
    attr[12:16] = _BPF_F_ALLOW_MULTI.to_bytes(4, "little")
    _bpf(_BPF_PROG_ATTACH, attr)


def _bpf_query_device_progs(cgroup_fd: int) -> list[int]:
    """Ids of the device programs attached directly to this cgroup."""
    import ctypes
    ids = (ctypes.c_uint32 * 64)()
    attr = bytearray(144)
    attr[0:4] = cgroup_fd.to_bytes(4, "little")
    attr[4:8] = _BPF_CGROUP_DEVICE.to_bytes(4, "little")
    attr[16:24] = ctypes.addressof(ids).to_bytes(8, "little")
    attr[24:28] = (64).to_bytes(4, "little")
    _bpf(_BPF_PROG_QUERY, attr)
    return list(ids[:int.from_bytes(attr[24:28], "little")])


def _bpf_detach_by_id(cgroup_fd: int, prog_id: int) -> None:
    attr = bytearray(144)
    attr[0:4] = prog_id.to_bytes(4, "little")
    prog_fd = _bpf(_BPF_PROG_GET_FD_BY_ID, attr)
    try:
        attr = bytearray(144)
        attr[0:4] = cgroup_fd.to_bytes(4, "little")
        attr[4:8] = prog_fd.to_bytes(4, "little")
        attr[8:12] = _BPF_CGROUP_DEVICE.to_bytes(4, "little")
        _bpf(_BPF_PROG_DETACH, attr)
    finally:
        os.close(prog_fd)


def _parse_blkio(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 3 or ":" not in parts[0]:
            continue  # the "Total N" line
        major, minor = (int(x) for x in parts[0].split(":"))
        out.append({"major": major, "minor": minor, "op": parts[1], "value": int(parts[2])})
    return out


def open_cgroup(cgroups_path: str | None, container_id: str, *, layout: Layout | None = None,
                fs: CgroupFS | None = None) -> Cgroup:
    """The cgroup a container with OCI ``linux.cgroupsPath`` = ``cgroups_path`` uses.

    Absolute paths are relative to each hierarchy's root; relative paths to the caller's own
    cgroup in that hierarchy; None puts the container at ``/sandbox-agent/<id>``. Nothing is
    created until :meth:`Cgroup.create`.
    """
    fs = fs or CgroupFS()
    layout = layout or detect_layout(fs)
    if not layout.v1 and layout.unified is None:
        raise CgroupError("no cgroup file system is mounted (neither v1 nor cgroup2)")
    dirs: dict[str, str] = {}
    paths: dict[str, str] = {}
    for ctl, mount in layout.v1.items():
        paths[ctl] = _resolve(cgroups_path, container_id, layout.own.get(ctl, "/"))
        dirs[ctl] = _host_dir(mount, paths[ctl])
    if layout.unified is not None:
        paths[""] = _resolve(cgroups_path, container_id, layout.own.get("", "/"))
        dirs[""] = _host_dir(layout.unified, paths[""])
    return Cgroup(dirs, layout, fs, paths)
