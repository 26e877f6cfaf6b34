"""The daemon's heap after start-up: give back what importing left behind.

Importing compiles or unmarshals a few MiB of code, and the temporary objects of that work
(parser and compiler arenas when a module has no .pyc, import-system bookkeeping) are freed
into malloc's heap, which keeps the pages. :func:`settle`, called once everything is imported,
collects the garbage cycles, moves the survivors (modules, classes, functions: they live as
long as the process) out of the collector's sight, and asks glibc to return free pages to the
kernel. Nothing here is needed for correctness; each step is skipped where unavailable.
"""

from __future__ import annotations

import gc
import sys
from dataclasses import dataclass

M_ARENA_MAX = -8  # mallopt(3)


@dataclass(frozen=True)
class Settled:
    collected: int   # objects freed by the final collection
    frozen: int      # objects moved to the permanent generation
    trimmed: bool    # malloc_trim(0) reported memory given back


def _libc():
    # ctypes only if something already loaded it (trio does): importing it here just to trim
    # would cost more than the trim gives back.
    ctypes = sys.modules.get("ctypes")
    if ctypes is None:
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def limit_arenas(n: int = 1) -> bool:
    """One malloc arena for every thread: the daemon's few worker threads (trio's thread
    cache) do little allocation and never in parallel with much else, and each extra arena
    keeps its own free pages. Call before the first thread starts."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(M_ARENA_MAX, n))


def settle() -> Settled:
    """Collect, freeze and trim; call once start-up is over (after confinement is fine:
    malloc_trim needs only brk, madvise and munmap, which the seccomp allow-list has)."""
    collected = gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    libc = _libc()
    trimmed = False
    if libc is not None and hasattr(libc, "malloc_trim"):
        trimmed = bool(libc.malloc_trim(0))
    return Settled(collected, frozen, trimmed)
