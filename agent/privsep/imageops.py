"""Init's operations for images and container state changes the runtime performs:
pull (the puller as a confined helper job), snapshot / unsnapshot of a pulled image as a
container's rootfs, update (resources), pause, resume, and setting the guest clock.

Kept apart from agent.privsep.ops so that the core operations stay small; init registers
these through :data:`OPS` and :func:`parse`, and runs them with :func:`handle`.
"""
from __future__ import annotations

import os
import sys

from .. import jsonlite
from .ops import _ALNUM, _DIGITS, ValidationError, _get, _only, check_id
from .record import record

# Character classes, not ``re``, for the same reason as in ops (init's memory); the patterns
# are beside each check, and tests/init/test_zygote_unit.py compares the two.
_REF_REST = _ALNUM | frozenset("._/:@+-")
_HOST_REST = _ALNUM | frozenset(".-")
_HEX_COLON = _DIGITS | frozenset("ABCDEFabcdef:")
_LOWER_DIGITS = _DIGITS | frozenset("abcdefghijklmnopqrstuvwxyz")


def valid_ref(v: str) -> bool:
    """``[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}``"""
    return v[:1] in _ALNUM and _only(v[1:], _REF_REST, 0, 511)


def valid_hostport(v: str) -> bool:
    """``[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?`` or ``\\[[0-9A-Fa-f:]+\\](:[0-9]{1,5})?``"""
    if v.startswith("["):
        addr, sep, rest = v[1:].partition("]")
        if not sep or not _only(addr, _HEX_COLON, 1, len(addr) or 1):
            return False
    else:
        host, sep, port = v.partition(":")
        if not (host[:1] in _ALNUM and _only(host[1:], _HOST_REST, 0, 252)):
            return False
        rest = sep + port
    return not rest or (rest[0] == ":" and _only(rest[1:], _DIGITS, 1, 5))


def valid_platform(v: str) -> bool:
    """``[a-z0-9]{1,32}/[a-z0-9_]{1,32}(/[a-z0-9]{1,16})?``"""
    parts = v.split("/")
    return 2 <= len(parts) <= 3 and _only(parts[0], _LOWER_DIGITS, 1, 32) and \
        _only(parts[1], _LOWER_DIGITS | {"_"}, 1, 32) and \
        (len(parts) == 2 or _only(parts[2], _LOWER_DIGITS, 1, 16))


def _pretty(obj) -> str:
    return jsonlite.dumps(obj, separators=(", ", ": "))  # json.dumps' default layout


IMAGES_DIR = "images"    # the store: blobs, layers, snapshot records
ROOTFS_DIR = "rootfs"
# A big image over a slow link takes a while; the puller bounds each request itself
# (a dead registry fails in seconds), this only stops a wedged job.
PULL_JOB_TIMEOUT = 1800.0
# The puller helper container's root file system, baked into the guest image (guest-image/
# stage.py): an interpreter and the puller, no agent code. Where it is missing (a development
# host) the puller runs as a self-confined job instead (puller.agentjob.confine_to_store).
PULLER_ROOTFS = "/opt/puller-rootfs"
PULLER_PYTHON = "/usr/bin/python3.11"
# What unpacking a rootfs needs: ownership, modes on others' files, setuid bits, device nodes
# and whiteouts, file capabilities, trusted.* xattrs (overlay opaque dirs; hence SYS_ADMIN,
# whose mount powers the seccomp profile below takes away again).
PULLER_CAPS = ["CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_MKNOD", "CAP_SETFCAP",
               "CAP_SYS_ADMIN"]
PULLER_DENIED_SYSCALLS = [
    "mount", "umount2", "pivot_root", "chroot", "move_mount", "open_tree", "fsopen", "fsmount", "fsconfig",
    "fspick", "mount_setattr", "unshare", "setns", "ptrace", "process_vm_readv", "process_vm_writev", "bpf",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load", "reboot", "swapon",
    "swapoff", "open_by_handle_at", "name_to_handle_at", "keyctl", "add_key", "request_key", "sethostname",
    "setdomainname", "settimeofday", "clock_settime", "quotactl", "perf_event_open", "userfaultfd", "iopl",
    "ioperm", "syslog", "acct", "vhangup",
]


def puller_container_config(store: str, args: list[str], env: list[str]) -> dict:
    """The OCI config of the puller helper container: its own read-only root, the image store
    the only writable place besides a tmpfs, the guest's network, few capabilities."""
    mounts = [
        {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=1m"]},
        {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "nodev", "size=64m"]},
        {"destination": "/store", "type": "bind", "source": store, "options": ["rbind", "rw", "nosuid"]},
    ]
    if os.path.exists("/etc/resolv.conf"):
        mounts.append({"destination": "/etc/resolv.conf", "type": "bind", "source": "/etc/resolv.conf",
                       "options": ["bind", "ro"]})
    return {
        "ociVersion": "1.0.2",
        "process": {"args": args, "env": env, "cwd": "/", "user": {"uid": 0, "gid": 0},
                    "capabilities": {k: PULLER_CAPS for k in ("bounding", "effective", "permitted")},
                    "noNewPrivileges": True},
        "root": {"path": PULLER_ROOTFS, "readonly": True},
        "hostname": "puller",
        "mounts": mounts,
        "linux": {
            # no network namespace: the puller uses the guest's network to reach the registry
            "namespaces": [{"type": t} for t in ("pid", "mount", "ipc", "uts")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/proc/sched_debug", "/sys/firmware"],
            "readonlyPaths": ["/proc/sys", "/proc/sysrq-trigger", "/proc/bus", "/proc/irq"],
            "seccomp": {"defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
                        "syscalls": [{"names": PULLER_DENIED_SYSCALLS, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]},
        },
    }    # <run_dir>/rootfs/<container id>: pulled images' rootfs mounts


@record(frozen=True)
class PullImage:
    image: str
    platform: str = ""
    insecure: tuple[str, ...] = ()
    creds: str = ""
    lazy: bool = False


@record(frozen=True)
class Snapshot:
    image: str
    container_id: str


@record(frozen=True)
class Unsnapshot:
    container_id: str


@record(frozen=True)
class Update:
    container_id: str
    resources: dict


@record(frozen=True)
class Pause:
    container_id: str


@record(frozen=True)
class Resume:
    container_id: str


@record(frozen=True)
class SetTime:
    sec: int
    usec: int


OPS: dict[str, type] = {"pull": PullImage, "snapshot": Snapshot, "unsnapshot": Unsnapshot, "update": Update,
                        "pause": Pause, "resume": Resume, "set_time": SetTime}


def _image(args: dict) -> str:
    ref = _get(args, "image", str)
    if not valid_ref(ref):
        raise ValidationError("image", f"{ref[:100]!r} is not an image reference")
    return ref


def parse(op: str, args: dict):
    if op == "pull":
        platform = _get(args, "platform", str, "", required=False)
        if platform and not valid_platform(platform):
            raise ValidationError("platform", f"{platform[:40]!r} is not os/arch[/variant]")
        insecure = _get(args, "insecure", list, [], required=False)
        for i, h in enumerate(insecure):
            if not isinstance(h, str) or not valid_hostport(h):
                raise ValidationError(f"insecure[{i}]", f"{str(h)[:80]!r} is not host[:port]")
        creds = _get(args, "creds", str, "", required=False)
        if len(creds) > 4096 or "\0" in creds or (creds and ":" not in creds):
            raise ValidationError("creds", "must be USER:PASSWORD")
        lazy = _get(args, "lazy", bool, False, required=False)
        return PullImage(_image(args), platform, tuple(insecure), creds, lazy)
    if op == "snapshot":
        return Snapshot(_image(args), check_id("container_id", _get(args, "container_id", str)))
    if op == "unsnapshot":
        return Unsnapshot(check_id("container_id", _get(args, "container_id", str)))
    if op == "update":
        res = _get(args, "resources", dict)
        if len(_pretty(res)) > 64 * 1024:
            raise ValidationError("resources", "too large")
        return Update(check_id("container_id", _get(args, "container_id", str)), res)
    if op in ("pause", "resume"):
        return OPS[op](check_id("container_id", _get(args, "container_id", str)))
    if op == "set_time":
        sec, usec = _get(args, "sec", int), _get(args, "usec", int)
        if sec < 0 or not 0 <= usec < 1_000_000:
            raise ValidationError("sec", f"{sec}.{usec:06d} is not a valid time")
        return SetTime(sec, usec)
    raise ValidationError("op", f"unknown operation {op!r}")


# ---- acting ------------------------------------------------------------------------------

def _puller_job(sandbox, args: list[str], what: str, env: dict | None = None):
    """``python -m puller.agentjob ARGS`` as a :func:`_json_job`: in a worker of the warm
    puller when it is ready and the job needs nothing in its environment (credentials travel
    there, and only to a process made for them); else a new process."""
    return _json_job(sandbox, [sys.executable, "-m", "puller.agentjob", *args], what, env,
                     warm=args if env is None else None)


def _json_job(sandbox, argv: list[str], what: str, env: dict | None = None,
              warm: list[str] | None = None):
    """A child whose stdout is one JSON answer; its stderr goes to a log read on failure.
    ``warm``: the argv for the warm puller's worker, tried first (see _puller_job)."""
    from .handlers import Job, OpError, Reply
    from .zygote_link import ZygoteUnavailable

    r, w = os.pipe2(os.O_CLOEXEC)
    log = sandbox._tmp("log")
    logfd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        pid = None
        if warm is not None and sandbox.puller_zygote is not None:
            try:
                pid = sandbox.puller_zygote.spawn(warm, [None, w, logfd])
            except ZygoteUnavailable:
                pass
        if pid is None:
            pid = sandbox._spawn(argv, [None, w, logfd], env)
    except BaseException:
        os.close(r)
        try:
            os.unlink(log)
        except OSError:
            pass
        raise
    finally:
        os.close(w)
        os.close(logfd)
    os.set_blocking(r, False)

    def finish(job) -> Reply:
        try:
            with open(log, errors="replace") as f:
                err = f.read()[-2000:].strip()
        except OSError:
            err = ""
        finally:
            try:
                os.unlink(log)
            except OSError:
                pass
        if job.status != 0:
            lines = [l for l in err.splitlines() if l.strip()]
            raise OpError("", f"{what} failed: {lines[-1] if lines else f'status {job.status}'}")
        try:
            return Reply(jsonlite.loads(bytes(job.out) or b"{}"))
        except ValueError:
            raise OpError("", f"{what}: unreadable answer") from None
    return Job(pid, finish, out_r=r)


def _pull_args(op: PullImage, store: str) -> list[str]:
    argv = ["pull", op.image, "--store", store]
    if op.platform:
        argv += ["--platform", op.platform]
    for h in op.insecure:
        argv += ["--plain-http", h]
    if op.lazy:
        argv.append("--lazy")
    return argv


def _pull_in_container(sandbox, op: PullImage, store: str):
    """The puller as a helper container run by the OCI runtime (`run`: create, start, wait);
    its stdout, the job's answer, comes through the runtime to init."""
    cid = os.path.basename(sandbox._tmp("puller"))  # unique within this init
    bundle = os.path.join(sandbox.state_dir, "bundles", cid)
    os.makedirs(bundle, mode=0o700)
    os.makedirs(store, exist_ok=True)
    args = [PULLER_PYTHON, "-I", "-m", "puller.agentjob"] + _pull_args(op, "/store") + ["--in-container"]
    env = ["PATH=/usr/bin:/bin", "HOME=/root"] + ([f"PULLER_CREDS={op.creds}"] if op.creds else [])
    cfg = puller_container_config(store, args, env)
    cfg["linux"]["cgroupsPath"] = f"/sandbox-agent/{cid}"
    fd = os.open(os.path.join(bundle, "config.json"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(_pretty(cfg))
    argv = sandbox._rt(None, "run", "--bundle", bundle, cid)
    job = _json_job(sandbox, argv, f"pull of {op.image} (puller container)")
    job.timeout = PULL_JOB_TIMEOUT
    inner = job.finish

    def finish(j):
        import shutil
        try:
            return inner(j)
        finally:
            shutil.rmtree(bundle, ignore_errors=True)
            # `run` deletes the container when it exits; a killed run may leave it behind.
            # Not waited for here (init's loop must not block): the reaper collects it.
            sandbox._spawn(sandbox._rt(None, "delete", "--force", cid), [None, None, None])
    job.finish = finish
    return job


def handle(sandbox, op, fds: list[int]):
    from .handlers import OpError, Reply

    store = os.path.join(sandbox.run_dir, IMAGES_DIR)
    if isinstance(op, PullImage):
        if os.path.isfile(PULLER_ROOTFS + PULLER_PYTHON):
            return _pull_in_container(sandbox, op, store)
        # credentials by environment, not argv: /proc/<pid>/cmdline is readable by anyone
        job = _puller_job(sandbox, _pull_args(op, store), f"pull of {op.image}",
                          {"PULLER_CREDS": op.creds} if op.creds else None)
        job.timeout = PULL_JOB_TIMEOUT
        return job
    if isinstance(op, Snapshot):
        dest = os.path.join(sandbox.run_dir, ROOTFS_DIR, op.container_id)
        os.makedirs(os.path.dirname(dest), mode=0o755, exist_ok=True)
        return _puller_job(sandbox, ["snapshot", op.image, "--store", store, "--dest", dest,
                                     "--id", op.container_id], f"snapshot of {op.image}")
    if isinstance(op, Unsnapshot):
        return _puller_job(sandbox, ["unsnapshot", op.container_id, "--store", store],
                           f"unsnapshot of {op.container_id}")
    if isinstance(op, Update):
        sandbox._container(op.container_id)
        path = sandbox._tmp("resources")
        with open(path, "w") as f:
            f.write(_pretty(op.resources))
        job = sandbox._simple_runtime_job(["update", "--resources", path, op.container_id],
                                          f"update of {op.container_id!r}")
        return job
    if isinstance(op, (Pause, Resume)):
        sandbox._container(op.container_id)
        verb = "pause" if isinstance(op, Pause) else "resume"
        return sandbox._simple_runtime_job([verb, op.container_id], f"{verb} of {op.container_id!r}")
    if isinstance(op, SetTime):
        import ctypes

        class timeval(ctypes.Structure):
            _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.settimeofday(ctypes.byref(timeval(op.sec, op.usec)), None) != 0:
            e = ctypes.get_errno()
            raise OpError("", f"settimeofday: {os.strerror(e)}")
        return Reply({})
    raise OpError("op", f"unhandled operation {type(op).__name__}")
