"""The daemon's heap after start-up: give back what importing left behind.

Importing compiles or unmarshals a few MiB of code, and the temporary objects of that work
(parser and compiler arenas when a module has no .pyc, import-system bookkeeping) are freed
into malloc's heap, which keeps the pages. :func:`settle`, called once everything is imported,
collects the garbage cycles, moves the survivors (modules, classes, functions: they live as
long as the process) out of the collector's sight, and asks glibc to return free pages to the
kernel. Bulk traffic (ReadStdout moves MiBs per call) leaves the same kind of free pages
behind, so :class:`IdleTrim` trims again once the daemon has been quiet for a while after
serving. Nothing here is needed for correctness; each step is skipped where unavailable.
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


def trim() -> bool:
    """malloc_trim(0): free pages anywhere in the heap go back to the kernel."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None and hasattr(libc, "malloc_trim") else False


class IdleTrim:
    """Trim once after each burst of calls, when `quiet` seconds have passed without one.

    ``tick(calls, now)`` is given the server's call counter and the time, as often as suits
    (the daemon's housekeeping loop does it twice a second); it trims at most once per burst
    and says whether it did."""

    def __init__(self, quiet: float = 2.0, trim_fn=trim) -> None:
        self.quiet = quiet
        self._trim = trim_fn
        self._calls = 0
        self._last_change = 0.0
        self._dirty = False

    def tick(self, calls: int, now: float) -> bool:
        if calls != self._calls:
            self._calls = calls
            self._last_change = now
            self._dirty = True
            return False
        if self._dirty and now - self._last_change >= self.quiet:
            self._dirty = False
            self._trim()
            return True
        return False


def settle() -> Settled:
    """Collect, freeze and trim; call once start-up is over (after confinement is fine:
    malloc_trim needs only brk, madvise and munmap, which the seccomp allow-list has)."""
    collected = gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    return Settled(collected, frozen, trim())
