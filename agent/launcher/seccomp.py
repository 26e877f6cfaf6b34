"""OCI ``linux.seccomp`` -> a libseccomp filter loaded into the calling process.

The spec object is first checked and turned into a :class:`FilterPlan` (plain data, no
libseccomp), so every mistake in it is reported before anything is loaded: an unknown action,
operator, architecture or flag is an error naming it. Unknown *syscall names* are skipped, as
runc does, because profiles list syscalls of newer kernels and other architectures.

libseccomp is reached through ``pyseccomp``, imported (and libseccomp loaded) when this module
is imported, because the launcher installs the filter after pivot_root, where neither the Python
packages nor the host's libraries can be found any more. The import is kept cheap (~6 ms, most
of it the ``typing`` module pyseccomp needs; its ``ctypes.util`` lookup, ~13 ms, is avoided), and
the launcher imports this module only when a spec has ``linux.seccomp``.

Two ways to load a filter: :func:`install` does everything at once; :func:`prepare` checks and
builds it early (errors reach the caller before the container is set up) and
:meth:`Prepared.load` loads it as the very last step before exec.
"""

from __future__ import annotations

import errno as _errno
import sys

__all__ = [
    "SeccompError",
    "FilterPlan",
    "Rule",
    "ACTIONS",
    "OPERATORS",
    "ARCHES",
    "FLAGS",
    "plan",
    "prepare",
    "Prepared",
    "install",
    "allow_list",
]


class SeccompError(Exception):
    """The seccomp object is invalid or could not be loaded; the message says which part."""


# Action bases as the kernel/libseccomp encode them; ERRNO and TRACE carry a 16-bit datum.
_ACT_KILL_THREAD = 0x00000000
_ACT_KILL_PROCESS = 0x80000000
_ACT_TRAP = 0x00030000
_ACT_ERRNO = 0x00050000
_ACT_NOTIFY = 0x7FC00000
_ACT_TRACE = 0x7FF00000
_ACT_LOG = 0x7FFC0000
_ACT_ALLOW = 0x7FFF0000

ACTIONS = {
    "SCMP_ACT_KILL": _ACT_KILL_THREAD,
    "SCMP_ACT_KILL_THREAD": _ACT_KILL_THREAD,
    "SCMP_ACT_KILL_PROCESS": _ACT_KILL_PROCESS,
    "SCMP_ACT_TRAP": _ACT_TRAP,
    "SCMP_ACT_ERRNO": _ACT_ERRNO,
    "SCMP_ACT_TRACE": _ACT_TRACE,
    "SCMP_ACT_ALLOW": _ACT_ALLOW,
    "SCMP_ACT_LOG": _ACT_LOG,
    "SCMP_ACT_NOTIFY": _ACT_NOTIFY,
}

OPERATORS = {
    "SCMP_CMP_NE": 1,
    "SCMP_CMP_LT": 2,
    "SCMP_CMP_LE": 3,
    "SCMP_CMP_EQ": 4,
    "SCMP_CMP_GE": 5,
    "SCMP_CMP_GT": 6,
    "SCMP_CMP_MASKED_EQ": 7,
}

# AUDIT_ARCH_* values: ELF machine | 64-bit | little-endian (| MIPS n32 convention).
_LE, _64, _N32 = 0x40000000, 0x80000000, 0x20000000
ARCHES = {
    "SCMP_ARCH_X86": 3 | _LE,
    "SCMP_ARCH_X86_64": 62 | _64 | _LE,
    "SCMP_ARCH_X32": 62 | _LE,
    "SCMP_ARCH_ARM": 40 | _LE,
    "SCMP_ARCH_AARCH64": 183 | _64 | _LE,
    "SCMP_ARCH_MIPS": 8,
    "SCMP_ARCH_MIPS64": 8 | _64,
    "SCMP_ARCH_MIPS64N32": 8 | _64 | _N32,
    "SCMP_ARCH_MIPSEL": 8 | _LE,
    "SCMP_ARCH_MIPSEL64": 8 | _64 | _LE,
    "SCMP_ARCH_MIPSEL64N32": 8 | _64 | _LE | _N32,
    "SCMP_ARCH_PPC": 20,
    "SCMP_ARCH_PPC64": 21 | _64,
    "SCMP_ARCH_PPC64LE": 21 | _64 | _LE,
    "SCMP_ARCH_S390": 22,
    "SCMP_ARCH_S390X": 22 | _64,
    "SCMP_ARCH_PARISC": 15,
    "SCMP_ARCH_PARISC64": 15 | _64,
    "SCMP_ARCH_RISCV64": 243 | _64 | _LE,
}

# Spec flag -> libseccomp filter attribute (SCMP_FLTATR_*) that makes libseccomp pass it.
FLAGS = {
    "SECCOMP_FILTER_FLAG_TSYNC": 4,  # CTL_TSYNC
    "SECCOMP_FILTER_FLAG_LOG": 6,  # CTL_LOG
    "SECCOMP_FILTER_FLAG_SPEC_ALLOW": 7,  # CTL_SSB
    "SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV": 10,  # CTL_WAITKILL, libseccomp >= 2.6
}
_ATTR_CTL_NNP = 3
_ATTR_API_SYSRAWRC = 9


class Rule:
    """One libseccomp rule: action for syscall ``name`` when every condition holds."""

    __slots__ = ("name", "action", "conditions")

    def __init__(self, name: str, action: int,
                 conditions: tuple[tuple[int, int, int, int], ...] = ()) -> None:
        self.name = name
        self.action = action
        # (argument index, operator, datum_a, datum_b) as libseccomp's scmp_arg_cmp
        self.conditions = conditions

    def __repr__(self) -> str:
        return f"Rule({self.name!r}, {self.action:#x}, {self.conditions!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Rule) and (self.name, self.action, self.conditions) == (
            other.name, other.action, other.conditions)


class FilterPlan:
    """Everything needed to build the filter, checked, without touching libseccomp."""

    __slots__ = ("default_action", "arches", "flag_attrs", "rules", "uses_notify",
                 "listener_path", "listener_metadata")

    def __init__(self, default_action: int, arches: list[int], flag_attrs: list[tuple[str, int]],
                 rules: list[Rule], listener_path: str | None = None,
                 listener_metadata: str | None = None) -> None:
        self.default_action = default_action
        self.arches = arches
        self.flag_attrs = flag_attrs
        self.rules = rules
        self.uses_notify = any((r.action & 0xFFFF0000) == _ACT_NOTIFY for r in rules)
        self.listener_path = listener_path
        self.listener_metadata = listener_metadata

    def allows_plainly(self, name: str) -> bool:
        """Whether syscall ``name`` is allowed (or only logged) whatever its arguments."""
        ok = (_ACT_ALLOW, _ACT_LOG)
        mine = [r for r in self.rules if r.name == name]
        if not mine:
            return self.default_action in ok
        return all(r.action in ok for r in mine) and (
            self.default_action in ok or any(not r.conditions for r in mine))


def _action(name: object, errno_ret: object, where: str) -> int:
    if not isinstance(name, str) or name not in ACTIONS:
        raise SeccompError(f"{where}: unknown seccomp action {name!r} "
                           f"(expected one of {', '.join(ACTIONS)})")
    base = ACTIONS[name]
    if base in (_ACT_ERRNO, _ACT_TRACE):
        if errno_ret is None:
            errno_ret = _errno.EPERM
        if not isinstance(errno_ret, int) or isinstance(errno_ret, bool) \
                or not 0 <= errno_ret <= 0xFFFF:
            raise SeccompError(f"{where}: errnoRet {errno_ret!r} is not an integer in 0..65535")
        return base | errno_ret
    if errno_ret is not None:
        # runc refuses this too: the value would silently do nothing.
        raise SeccompError(f"{where}: errnoRet {errno_ret!r} given for {name}, which returns "
                           "no errno")
    return base


def _u64(v: object, where: str) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**64:
        raise SeccompError(f"{where}: {v!r} is not an unsigned 64-bit integer")
    return v


def _conditions(args: list, where: str) -> list[tuple[tuple[int, int, int, int], ...]]:
    """The rule(s) one syscall entry's ``args`` produce.

    libseccomp ANDs the comparisons of one rule but allows only one per argument index. When a
    spec compares the same argument twice, each comparison becomes a rule of its own (an OR),
    which is how runc reads such profiles.
    """
    conds = []
    for i, a in enumerate(args):
        w = f"{where}.args[{i}]"
        if not isinstance(a, dict):
            raise SeccompError(f"{w}: {a!r} is not an object")
        idx = a.get("index")
        if not isinstance(idx, int) or isinstance(idx, bool) or not 0 <= idx <= 5:
            raise SeccompError(f"{w}: index {idx!r} is not 0..5")
        op = a.get("op")
        if op not in OPERATORS:
            raise SeccompError(f"{w}: unknown operator {op!r} "
                               f"(expected one of {', '.join(OPERATORS)})")
        conds.append((idx, OPERATORS[op], _u64(a.get("value", 0), f"{w}.value"),
                       _u64(a.get("valueTwo", 0), f"{w}.valueTwo")))
    if not conds:
        return [()]
    if len({c[0] for c in conds}) == len(conds):
        return [tuple(conds)]
    return [(c,) for c in conds]


def plan(seccomp: dict) -> FilterPlan:
    """Check an OCI ``linux.seccomp`` object and turn it into a :class:`FilterPlan`."""
    if not isinstance(seccomp, dict):
        raise SeccompError(f"linux.seccomp must be an object, got {type(seccomp).__name__}")
    default = _action(seccomp.get("defaultAction"), seccomp.get("defaultErrnoRet"),
                      "linux.seccomp.defaultAction")
    if default == _ACT_NOTIFY:
        raise SeccompError("linux.seccomp.defaultAction: SCMP_ACT_NOTIFY cannot be the default "
                           "(the notifying process itself could not run)")
    arches = []
    for a in seccomp.get("architectures") or []:
        if a not in ARCHES:
            raise SeccompError(f"linux.seccomp.architectures: unknown architecture {a!r} "
                               f"(expected one of {', '.join(ARCHES)})")
        arches.append(ARCHES[a])
    flags = []
    for f in seccomp.get("flags") or []:
        if f not in FLAGS:
            raise SeccompError(f"linux.seccomp.flags: unknown flag {f!r} "
                               f"(expected one of {', '.join(FLAGS)})")
        flags.append((f, FLAGS[f]))
    rules: list[Rule] = []
    for n, sc in enumerate(seccomp.get("syscalls") or []):
        where = f"linux.seccomp.syscalls[{n}]"
        if not isinstance(sc, dict):
            raise SeccompError(f"{where}: {sc!r} is not an object")
        names = sc.get("names")
        if not isinstance(names, list) or not names or \
                not all(isinstance(x, str) and x for x in names):
            raise SeccompError(f"{where}: names must be a non-empty list of syscall names, "
                               f"got {names!r}")
        action = _action(sc.get("action"), sc.get("errnoRet"), f"{where}.action")
        conds = _conditions(sc.get("args") or [], where)
        if action == default:
            continue  # libseccomp refuses rules equal to the default; they change nothing
        for name in names:
            for c in conds:
                rules.append(Rule(name, action, c))
    return FilterPlan(default, arches, flags, rules, seccomp.get("listenerPath"),
                      seccomp.get("listenerMetadata"))


def _import_pyseccomp():
    """Import pyseccomp without paying for ``ctypes.util``.

    pyseccomp looks its libraries up with ``ctypes.util.find_library``, whose import pulls in
    subprocess, tempfile and shutil (~13 ms here). The sonames are fixed, so while pyseccomp is
    imported a small stand-in answers for them; anything else goes to the real lookup.
    """
    if "pyseccomp" in sys.modules:
        return sys.modules["pyseccomp"]
    import ctypes

    if "ctypes.util" in sys.modules:
        import pyseccomp
        return pyseccomp
    known = {"c": "libc.so.6", "seccomp": "libseccomp.so.2"}
    try:
        for soname in known.values():
            ctypes.CDLL(soname)
    except OSError:
        import pyseccomp  # unusual system: let the real lookup find the libraries
        return pyseccomp

    import types

    def find_library(name: str) -> str | None:
        if name in known:
            return known[name]
        del sys.modules["ctypes.util"]
        import ctypes.util as real
        return real.find_library(name)

    stand_in = types.ModuleType("ctypes.util")
    stand_in.find_library = find_library  # type: ignore[attr-defined]
    sys.modules["ctypes.util"] = stand_in
    had_attr = hasattr(ctypes, "util")
    ctypes.util = stand_in  # type: ignore[attr-defined]
    try:
        import pyseccomp
    finally:
        if sys.modules.get("ctypes.util") is stand_in:
            del sys.modules["ctypes.util"]
        if not had_attr and getattr(ctypes, "util", None) is stand_in:
            del ctypes.util  # a later "import ctypes.util" must load the real module
    return pyseccomp


def build(p: FilterPlan, *, set_no_new_privs: bool = False):
    """A ``pyseccomp.SyscallFilter`` for the plan, not yet loaded."""
    ps = _ps
    try:
        flt = ps.SyscallFilter(p.default_action)
    except OSError as e:
        raise SeccompError(f"libseccomp refused default action {p.default_action:#x}: "
                           f"{e.strerror}") from None
    # no_new_privs is the spec's own switch (process.noNewPrivileges), not libseccomp's to set.
    flt.set_attr(_ATTR_CTL_NNP, 1 if set_no_new_privs else 0)
    try:
        # Kernel errors as they are (EACCES, ...) rather than libseccomp's blanket ECANCELED.
        flt.set_attr(_ATTR_API_SYSRAWRC, 1)
    except OSError:
        pass
    for arch in p.arches:
        try:
            flt.add_arch(arch)
        except OSError as e:
            if e.errno != _errno.EEXIST:  # the native arch is always there already
                raise SeccompError(f"libseccomp refused architecture {arch:#x}: "
                                   f"{e.strerror}") from None
    for name, attr in p.flag_attrs:
        try:
            flt.set_attr(attr, 1)
        except OSError as e:
            raise SeccompError(f"seccomp flag {name} is not supported by this libseccomp/kernel "
                               f"({e.strerror})") from None
    resolve = ps._libseccomp.seccomp_syscall_resolve_name
    cmp_t = ps._ArgCmp
    add = ps._libseccomp.seccomp_rule_add_array
    for r in p.rules:
        nr = resolve(r.name.encode())
        if nr == -1:  # __NR_SCMP_ERROR: no such syscall on any arch of this filter
            continue
        arr = (cmp_t * len(r.conditions))()
        for i, (idx, op, a, b) in enumerate(r.conditions):
            arr[i].arg, arr[i].op, arr[i].datum_a, arr[i].datum_b = idx, op, a, b
        rc = add(flt._filter, r.action, nr, len(r.conditions), arr)
        if rc < 0:
            raise SeccompError(f"libseccomp refused rule {r.name} action={r.action:#x} "
                               f"args={list(r.conditions)}: {_strerror(-rc)}")
    return flt


_ps = _import_pyseccomp()


def _strerror(e: int) -> str:
    import os
    return os.strerror(e)


class Prepared:
    """A built, not yet loaded filter. Keep it alive until :meth:`load` has run."""

    def __init__(self, p: FilterPlan, flt) -> None:
        self.plan = p
        self._filter = flt

    def load(self) -> int | None:
        """Load into the calling process; the notify listener fd (ours to close) or None."""
        try:
            self._filter.load()
        except OSError as e:
            hint = ""
            if e.errno == _errno.EACCES:
                hint = " (no CAP_SYS_ADMIN and no_new_privs unset)"
            raise SeccompError(f"loading the seccomp filter failed: {e.strerror}{hint}") from None
        if not self.plan.uses_notify:
            return None
        import os
        fd = _ps._libseccomp.seccomp_notify_fd(self._filter._filter)
        if fd < 0:
            raise SeccompError(f"seccomp filter loaded but no notify fd: {os.strerror(-fd)}")
        # libseccomp closes its copy when the filter context is released; hand out our own.
        return os.dup(fd)


def prepare(seccomp: dict, *, set_no_new_privs: bool = False) -> Prepared:
    """Check ``linux.seccomp`` and build the filter without loading it.

    Without ``set_no_new_privs`` loading needs CAP_SYS_ADMIN (the launcher holds it until
    exec); an unprivileged caller sets no_new_privs first or passes True.
    """
    p = plan(seccomp)
    return Prepared(p, build(p, set_no_new_privs=set_no_new_privs))


def install(seccomp: dict, *, set_no_new_privs: bool = False) -> int | None:
    """Check, build and load the filter into the calling process (all threads with TSYNC).

    Returns a new file descriptor for the user-notification listener when a rule uses
    SCMP_ACT_NOTIFY (the caller owns and closes it), else None.
    """
    return prepare(seccomp, set_no_new_privs=set_no_new_privs).load()


def allow_list(names: list[str], default_errno: int = _errno.EPERM) -> dict:
    """An OCI seccomp object allowing exactly ``names``; anything else fails with ``default_errno``.

    Covers the native architecture and its 32-bit companions so a compat syscall cannot be
    used to go around the list.
    """
    names = sorted(set(names))
    if not names:
        raise SeccompError("allow_list needs at least one syscall name")
    return {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": default_errno,
        "architectures": _native_arches(),
        "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"}],
    }


def _native_arches() -> list[str]:
    import os
    m = os.uname().machine
    return {
        "x86_64": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "aarch64": ["SCMP_ARCH_AARCH64", "SCMP_ARCH_ARM"],
        "ppc64le": ["SCMP_ARCH_PPC64LE"],
        "s390x": ["SCMP_ARCH_S390X", "SCMP_ARCH_S390"],
        "riscv64": ["SCMP_ARCH_RISCV64"],
    }.get(m, [])
