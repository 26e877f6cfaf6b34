"""The five capability sets of the container process (bounding, effective, permitted,
inheritable, ambient).

Order matters and follows the kernel's rules: the bounding set is reduced while CAP_SETPCAP is
still effective; capset() can only shrink permitted; an ambient capability must be in both
permitted and inheritable when it is raised.
"""
from __future__ import annotations

from . import syscalls

NAMES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_FOWNER", "CAP_FSETID",
    "CAP_KILL", "CAP_SETGID", "CAP_SETUID", "CAP_SETPCAP", "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE", "CAP_NET_BROADCAST", "CAP_NET_ADMIN", "CAP_NET_RAW",
    "CAP_IPC_LOCK", "CAP_IPC_OWNER", "CAP_SYS_MODULE", "CAP_SYS_RAWIO", "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE", "CAP_SYS_PACCT", "CAP_SYS_ADMIN", "CAP_SYS_BOOT", "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE", "CAP_SYS_TIME", "CAP_SYS_TTY_CONFIG", "CAP_MKNOD", "CAP_LEASE",
    "CAP_AUDIT_WRITE", "CAP_AUDIT_CONTROL", "CAP_SETFCAP", "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN", "CAP_SYSLOG", "CAP_WAKE_ALARM", "CAP_BLOCK_SUSPEND", "CAP_AUDIT_READ",
    "CAP_PERFMON", "CAP_BPF", "CAP_CHECKPOINT_RESTORE",
)
NUMBERS = {n: i for i, n in enumerate(NAMES)}
CAP_SETPCAP = 8
CAP_SYS_ADMIN = 21


_last_cap: int | None = None


def last_cap() -> int:
    """Highest capability number the running kernel knows (read once per process)."""
    global _last_cap
    if _last_cap is None:
        try:
            with open("/proc/sys/kernel/cap_last_cap") as f:
                _last_cap = int(f.read())
        except OSError:
            _last_cap = len(NAMES) - 1
    return _last_cap


def mask(names: list[str] | None, where: str = "capabilities") -> int:
    """Bit mask of capability names; unknown names are an error naming the set.

    Names the kernel does not know (newer than it) are dropped, as runc does, so one config
    works across kernel versions.
    """
    m = 0
    top = last_cap()
    for n in names or ():
        num = NUMBERS.get(n.upper() if n.upper().startswith("CAP_") else "CAP_" + n.upper())
        if num is None:
            raise ValueError(f"{where}: unknown capability {n!r}")
        if num <= top:
            m |= 1 << num
    return m


class CapSets:
    """Resolved masks of the five sets."""
    __slots__ = ("bounding", "effective", "permitted", "inheritable", "ambient")

    def __init__(self, caps: object | None) -> None:
        if caps is None:  # no capabilities object: the process keeps none
            self.bounding = self.effective = self.permitted = 0
            self.inheritable = self.ambient = 0
            return
        for k in self.__slots__:
            setattr(self, k, mask(getattr(caps, k), f"process.capabilities.{k}"))


def drop_bounding(sets: CapSets, sc: syscalls.Linux) -> None:
    """Drop from the bounding set every capability not in sets.bounding."""
    for c in range(last_cap() + 1):
        if not sets.bounding >> c & 1:
            try:
                sc.prctl(syscalls.PR_CAPBSET_DROP, c)
            except OSError as e:
                # EINVAL: capability unknown to the kernel; nothing to drop.
                if e.errno != 22:
                    raise


def apply_final(sets: CapSets, sc: syscalls.Linux) -> None:
    """Set effective/permitted/inheritable, then the ambient set."""
    sc.capset(sets.effective, sets.permitted, sets.inheritable)
    sc.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    for c in range(last_cap() + 1):
        if sets.ambient >> c & 1:
            try:
                sc.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_RAISE, c)
            except OSError as e:
                # EPERM: not in permitted+inheritable; runc ignores this too, the kernel would
                # clear it at exec anyway.
                if e.errno != 1:
                    raise


def check_obtainable(sets: CapSets, sc: syscalls.Linux) -> None:
    """Fail early (at create, not at start) when the spec asks for capabilities this process
    does not hold, e.g. CAP_SYS_RESOURCE on a host that dropped it from every bounding set."""
    _eff, perm, _inh = sc.capget()
    missing = (sets.permitted | sets.effective | sets.ambient) & ~perm
    if missing:
        names = [NAMES[i] if i < len(NAMES) else str(i) for i in range(64) if missing >> i & 1]
        raise PermissionError(1, f"process.capabilities: {', '.join(names)} not available to "
                                 "the launcher (not in its permitted/bounding set)")
