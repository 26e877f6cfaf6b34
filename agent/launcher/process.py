"""The container process's own attributes: rlimits, oom score, identity, cwd, environment and
the program to execute."""
from __future__ import annotations

import os
import resource

from . import syscalls as S
from .spec import Process, Rlimit

RLIMITS = {
    "RLIMIT_CPU": 0, "RLIMIT_FSIZE": 1, "RLIMIT_DATA": 2, "RLIMIT_STACK": 3, "RLIMIT_CORE": 4,
    "RLIMIT_RSS": 5, "RLIMIT_NPROC": 6, "RLIMIT_NOFILE": 7, "RLIMIT_MEMLOCK": 8,
    "RLIMIT_AS": 9, "RLIMIT_LOCKS": 10, "RLIMIT_SIGPENDING": 11, "RLIMIT_MSGQUEUE": 12,
    "RLIMIT_NICE": 13, "RLIMIT_RTPRIO": 14, "RLIMIT_RTTIME": 15,
}
_INF = (1 << 64) - 1


def set_rlimits(rlimits: list[Rlimit]) -> None:
    for r in rlimits:
        num = RLIMITS.get(r.type)
        if num is None:
            raise ValueError(f"process.rlimits: unknown rlimit type {r.type!r}")
        soft = resource.RLIM_INFINITY if r.soft >= _INF else r.soft
        hard = resource.RLIM_INFINITY if r.hard >= _INF else r.hard
        try:
            resource.setrlimit(num, (soft, hard))
        except (OSError, ValueError) as e:
            raise OSError(getattr(e, "errno", None) or 1,
                          f"process.rlimits {r.type} soft={r.soft} hard={r.hard}: {e}") from None


def set_oom_score_adj(value: int | None) -> None:
    if value is None:
        return
    with open("/proc/self/oom_score_adj", "w") as f:
        f.write(str(value))


def switch_user(sc: S.Linux, proc: Process) -> None:
    """Groups, gid, uid, umask. PR_SET_KEEPCAPS keeps the permitted set across setuid so the
    final capability sets can still be applied afterwards."""
    u = proc.user
    sc.prctl(S.PR_SET_KEEPCAPS, 1)
    try:
        sc.setgroups(list(u.additional_gids))
    except PermissionError:
        # In a user namespace with setgroups denied only an empty list would be allowed.
        if u.additional_gids:
            raise
    sc.setresgid(u.gid)
    sc.setresuid(u.uid)
    sc.prctl(S.PR_SET_KEEPCAPS, 0)
    os.umask(u.umask if u.umask is not None else 0o022)


def env_dict(env: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for e in env:
        k, _, v = e.partition("=")
        out[k] = v
    return out


def find_executable(name: str, env: dict[str, str]) -> str:
    """args[0] resolved like execvp does, using the container's PATH (checked after pivot)."""
    if "/" in name:
        # Checked here, before "ready", so that create fails with the name (as runc's does)
        # rather than the program's exec failing after start.
        try:
            st = os.stat(name)
        except OSError as e:
            raise OSError(e.errno, f"executable {name!r}: {e.strerror}") from None
        if (st.st_mode & 0o170000) != 0o100000 or not os.access(name, os.X_OK):
            raise PermissionError(13, f"executable {name!r} is not an executable file")
        return name
    path = env.get("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    for d in path.split(":"):
        cand = os.path.join(d or ".", name)
        try:
            st = os.stat(cand)
        except OSError:
            continue
        if (st.st_mode & 0o170000) == 0o100000 and os.access(cand, os.X_OK):
            return cand
    raise FileNotFoundError(2, f"executable {name!r} not found in $PATH ({path})")


def check_cwd_inside() -> None:
    """The cwd must be reachable from our root: a cwd that leaked from the host (an fd to a
    host directory, CVE-2024-21626) shows up as a path not under "/" ("(unreachable)")."""
    try:
        cwd = os.getcwd()  # glibc reports an unreachable cwd as ENOENT
    except FileNotFoundError:
        cwd = "(unreachable)"
    if not cwd.startswith("/"):
        raise PermissionError(1, f"working directory {cwd!r} is outside the container root")


def close_fds_except(sc: S.Linux, keep: set[int]) -> None:
    """Close every fd >= 3 not in ``keep``: an inherited fd to a host directory must not be
    usable as a cwd (/proc/self/fd/N) or survive into the container (CVE-2024-21626)."""
    first = 3
    for fd in sorted(k for k in keep if k >= 3):
        if fd > first:
            sc.close_range(first, fd - 1)
        first = fd + 1
    sc.close_range(first, 0xFFFFFFFF)


def apparmor_enabled() -> bool:
    try:
        with open("/sys/module/apparmor/parameters/enabled") as f:
            return f.read().strip() == "Y"
    except OSError:
        return False


def set_apparmor_profile(profile: str | None) -> None:
    """Ask AppArmor to confine the program we are about to exec (takes effect at execve)."""
    if not profile or not apparmor_enabled():
        return
    for path in ("/proc/self/attr/apparmor/exec", "/proc/self/attr/exec"):
        try:
            with open(path, "w") as f:
                f.write(f"exec {profile}")
            return
        except FileNotFoundError:
            continue
        except OSError as e:
            raise OSError(e.errno, f"process.apparmorProfile {profile!r}: {e.strerror}") from None
