"""The CLI's progress renderers."""
from __future__ import annotations

import io
import json

from puller.cli_progress import Bars, JsonLines


def test_json_lines():
    out = io.StringIO()
    p = JsonLines(out)
    p({"event": "layer", "layer": "sha256:" + "a" * 64, "status": "done", "bytes": 5, "total": 5})
    p({"event": "done"})
    lines = [json.loads(l) for l in out.getvalue().splitlines()]
    assert lines[0]["status"] == "done" and lines[1] == {"event": "done"}


def test_bars_redraw_in_place():
    out = io.StringIO()
    bars = Bars(out, width=10)
    a, b = "sha256:" + "a" * 64, "sha256:" + "b" * 64
    bars({"event": "layer", "layer": a, "status": "downloading", "bytes": 50, "total": 100})
    bars({"event": "layer", "layer": b, "status": "downloading", "bytes": 0, "total": 100})
    bars({"event": "layer", "layer": a, "status": "done", "bytes": 100, "total": 100})
    text = out.getvalue()
    assert "[#####.....]" in text and "[##########]" in text
    assert "\x1b[2F" in text  # moved up over the two bars before redrawing
    assert text.rstrip("\n").split("\n")[-2].endswith("done")
