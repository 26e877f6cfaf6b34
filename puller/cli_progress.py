"""Progress output for the CLI: one bar per layer on a terminal, JSON lines otherwise."""
from __future__ import annotations

import json
import sys
import threading
from typing import TextIO


class JsonLines:
    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        with self._lock:
            self.out.write(json.dumps(event, sort_keys=True) + "\n")
            self.out.flush()

    def close(self) -> None:
        pass


class Bars:
    """Redraws one line per layer in place using ANSI cursor movement."""

    def __init__(self, out: TextIO = sys.stderr, width: int = 30) -> None:
        self.out = out
        self.width = width
        self.rows: dict[str, tuple[str, int, int]] = {}
        self.drawn = 0
        self._lock = threading.Lock()

    def __call__(self, event: dict) -> None:
        with self._lock:
            if event.get("event") == "layer":
                self.rows[event["layer"]] = (event["status"], int(event.get("bytes", 0)), int(event.get("total", 0)))
                self._draw()
            elif event.get("event") == "done":
                self._draw()

    def _draw(self) -> None:
        if self.drawn:
            self.out.write(f"\x1b[{self.drawn}F")
        for layer, (status, done, total) in self.rows.items():
            frac = done / total if total else 1.0
            fill = int(frac * self.width)
            self.out.write(f"\x1b[2K{layer[7:19]} [{'#' * fill}{'.' * (self.width - fill)}] "
                           f"{done / 1e6:7.1f}/{total / 1e6:.1f} MB {status}\n")
        self.drawn = len(self.rows)
        self.out.flush()

    def close(self) -> None:
        pass
