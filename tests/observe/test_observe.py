"""Prometheus text, JSON logs, the event ring: formats checked strictly, values real."""
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import time

import pytest

from agent import observe
from agent.observe import EventRecord, Exposition, JsonLogger, SocketSink

# One line of the text format 0.0.4, strictly.
NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\\\|\\"|\\n)*"'
VALUE = r"(?:[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|NaN|[+-]Inf)"
SAMPLE_RE = re.compile(rf"({NAME})(?:\{{({LABEL}(?:,{LABEL})*)?\}})? ({VALUE})")
HELP_RE = re.compile(rf"# HELP ({NAME}) (.*)")
TYPE_RE = re.compile(rf"# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)")
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_exposition(text: str) -> dict[str, dict]:
    """A small strict parser: every family has HELP then TYPE before its samples, samples
    of one family are contiguous, no family appears twice, every line matches."""
    assert text.endswith("\n")
    fams: dict[str, dict] = {}
    current = None
    for n, line in enumerate(text[:-1].split("\n"), 1):
        if m := HELP_RE.fullmatch(line):
            assert m[1] not in fams, f"line {n}: family {m[1]} repeated"
            current = fams[m[1]] = {"help": m[2], "type": None, "samples": []}
            continue
        if m := TYPE_RE.fullmatch(line):
            assert current is fams.get(m[1]) and current["type"] is None, f"line {n}"
            current["type"] = m[2]
            continue
        m = SAMPLE_RE.fullmatch(line)
        assert m, f"line {n} is not a valid sample: {line!r}"
        name = m[1]
        base = name
        assert current is not None and base in fams and fams[base] is current, \
            f"line {n}: sample {name} outside its family block"
        assert current["type"] is not None, f"line {n}: sample before TYPE"
        labels = {k: v.replace("\\n", "\n").replace('\\"', '"').replace("\\\\", "\\")
                  for k, v in LABEL_RE.findall(m[2] or "")}
        current["samples"].append((labels, float(m[3])))
    return fams


def test_label_escaping_and_strict_format():
    ex = Exposition()
    nasty = 'a"b\\c\nd'
    ex.add("demo_value", "gauge", "Help with \\ and\nnewline.", 1.5, {"who": nasty})
    ex.add("demo_value", "gauge", "Help with \\ and\nnewline.", float("nan"), {"who": "x"})
    ex.add("demo_total", "counter", "A counter.", 7)
    ex.add("9bad-name", "gauge", "Renamed.", float("inf"))
    text = ex.render()
    fams = parse_exposition(text)
    assert fams["demo_value"]["samples"][0] == ({"who": nasty}, 1.5)
    assert math.isnan(fams["demo_value"]["samples"][1][1])
    assert fams["demo_value"]["help"] == "Help with \\\\ and\\nnewline."
    assert fams["demo_total"]["type"] == "counter"
    assert fams["_9bad_name"]["samples"] == [({}, math.inf)]
    with pytest.raises(ValueError):
        ex.add("demo_total", "gauge", "conflict", 1)


def test_agent_metrics_are_real():
    child = subprocess.Popen([sys.executable, "-c", "import time; x = b'y' * (8 << 20); "
                              "print('ready', flush=True); time.sleep(30)"],
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout.readline() == b"ready\n"
        stats = {"daemon": observe.process_stats(os.getpid()),
                 "init": observe.process_stats(child.pid)}
        text = observe.render_metrics(stats, {
            "ctr-1": {"memory": {"usage": 1234, "limit": 5678},
                      "cpu": {"usage_total": 99, "per_cpu": [40, 59]},
                      "pids": {"current": 3}, "note": "not a number"},
        })
    finally:
        child.kill()
        child.wait()
    fams = parse_exposition(text)
    rss = {l["process"]: v for l, v in
           fams["sandbox_agent_process_resident_memory_bytes"]["samples"]}
    assert rss["init"] > 8 << 20  # the child holds an 8 MiB buffer
    assert rss["daemon"] > 0
    pss = {l["process"]: v for l, v in
           fams["sandbox_agent_process_proportional_memory_bytes"]["samples"]}
    assert 0 < pss["init"] <= rss["init"] * 1.01
    cpu = fams["sandbox_agent_process_cpu_seconds_total"]
    assert cpu["type"] == "counter"
    assert {(l["process"], l["mode"]) for l, _ in cpu["samples"]} == \
        {(p, m) for p in ("init", "daemon") for m in ("user", "system")}
    with open("/proc/meminfo") as f:
        memtotal_kb = int(f.readline().split()[1])
    mem = {l["item"]: v for l, v in fams["sandbox_guest_meminfo_bytes"]["samples"]}
    assert mem["MemTotal"] == memtotal_kb * 1024
    loads = {l["period"]: v for l, v in fams["sandbox_guest_load"]["samples"]}
    assert set(loads) == {"1m", "5m", "15m"} and all(v >= 0 for v in loads.values())
    assert fams["sandbox_container_memory_usage"]["samples"] == [({"container_id": "ctr-1"},
                                                                   1234)]
    per_cpu = fams["sandbox_container_cpu_per_cpu"]["samples"]
    assert per_cpu == [({"container_id": "ctr-1", "index": "0"}, 40),
                       ({"container_id": "ctr-1", "index": "1"}, 59)]
    assert not any("note" in name for name in fams)


def test_process_stats_parses_odd_command_names(tmp_path):
    proc = tmp_path / "proc"
    (proc / "77").mkdir(parents=True)
    fields = ["S"] + ["0"] * 50
    fields[11], fields[12], fields[17], fields[21] = "250", "50", "3", "100"
    (proc / "77" / "stat").write_text("77 (a (b) c) " + " ".join(fields) + "\n")
    st = observe.process_stats(77, proc=str(proc))
    tck = os.sysconf("SC_CLK_TCK")
    assert st["utime_seconds"] == 250 / tck and st["stime_seconds"] == 50 / tck
    assert st["threads"] == 3 and st["rss_bytes"] == 100 * os.sysconf("SC_PAGE_SIZE")
    assert "pss_bytes" not in st


def test_json_log_lines():
    buf = io.StringIO()
    log = JsonLogger("daemon", "info", stream=buf)
    log.debug("hidden")
    log.info("container started", container_id="c1", pid=42)
    log.error("quote \" and newline\n inside", weird=object())
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2
    recs = [json.loads(line) for line in lines]
    assert recs[0]["msg"] == "container started" and recs[0]["level"] == "info"
    assert recs[0]["source"] == "daemon"
    assert recs[0]["fields"] == {"container_id": "c1", "pid": 42}
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", recs[0]["time"])
    assert recs[1]["msg"].endswith("inside") and "object" in recs[1]["fields"]["weird"]


def test_socket_sink_buffers_until_a_reader_connects(tmp_path):
    path = str(tmp_path / "log.sock")
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(1)
    sink = SocketSink(lst, backlog=3)
    log = JsonLogger("init", "debug", sink=sink)
    for i in range(5):
        log.info("before", i=i)  # nobody listening: only the last 3 are kept
    reader = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    reader.connect(path)
    log.info("after")
    reader.settimeout(2)
    data = b""
    while data.count(b"\n") < 4:
        data += reader.recv(65536)
    recs = [json.loads(x) for x in data.splitlines()]
    assert [r["fields"].get("i") for r in recs] == [2, 3, 4, None]
    assert recs[-1]["msg"] == "after"
    reader.close()
    log.info("reader gone")  # must not raise
    log.info("still fine")
    sink.close()


def test_event_ring():
    rec = EventRecord(capacity=3)
    rec.record("created", "c1")
    rec.record("started", "c1", pid=10)
    rec.record("exec_started", "c1", exec_id="e1", pid=11)
    rec.record("exited", "c1", exec_id="e1", pid=11, exit_code=0)
    rec.record("oom", "c2", count=1)
    evs = rec.since(0)
    assert [e.kind for e in evs] == ["exec_started", "exited", "oom"]
    assert rec.dropped_before() == 3
    assert [e.seq for e in rec.since(4)] == [5]
    assert [e.kind for e in rec.since(0, container_id="c1")] == ["exec_started", "exited"]
    d = evs[1].as_dict()
    assert d["exit_code"] == 0 and d["exec_id"] == "e1"
    json.dumps(d)
    with pytest.raises(ValueError):
        rec.record("exploded", "c1")
    with pytest.raises(ValueError):
        EventRecord(0)
