"""create / start / state / kill / delete / run / exec / list through the real CLI."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest

from .conftest import needs_busybox, needs_root

pytestmark = [needs_root, needs_busybox]


def wait_status(rt, cid, want, timeout=5.0):
    end = time.monotonic() + timeout
    while True:
        st = rt.state(cid)
        if st["status"] == want or time.monotonic() > end:
            return st
        time.sleep(0.02)


def test_create_start_state_delete(runtime, make_bundle, tmp_path):
    out = tmp_path / "out"
    b = make_bundle(["sh", "-c", "echo started > /tmp/mark; sleep 30"])
    b.config["annotations"] = {"org.test": "yes"}
    pidfile = tmp_path / "pid"
    cid, _ = runtime.create(b, None, "--pid-file", str(pidfile))
    st = runtime.state(cid)
    assert st["status"] == "created"
    assert st["id"] == cid and st["bundle"] == b.path
    assert st["annotations"] == {"org.test": "yes"} and st["ociVersion"]
    assert int(pidfile.read_text()) == st["pid"]
    # created: the process exists but has not executed the program yet
    assert not os.path.exists(os.path.join(b.rootfs, "tmp", "mark"))
    with open(f"/proc/{st['pid']}/cmdline", "rb") as f:
        assert b"sleep" not in f.read()
    # the launcher is gone: the container process is not its child
    runtime.cmd("start", cid)
    assert runtime.state(cid)["status"] == "running"
    end = time.monotonic() + 5
    while not os.path.exists(os.path.join(b.rootfs, "tmp", "mark")):
        assert time.monotonic() < end, "program did not run after start"
        time.sleep(0.02)
    p = runtime.cmd("start", cid, check=False)
    assert p.returncode != 0 and "not created" in p.stderr
    p = runtime.cmd("delete", cid, check=False)
    assert p.returncode != 0 and "running, not stopped" in p.stderr
    runtime.cmd("kill", cid, "KILL")
    assert wait_status(runtime, cid, "stopped")["status"] == "stopped"
    runtime.cmd("delete", cid)
    p = runtime.cmd("state", cid, check=False)
    assert p.returncode != 0 and "does not exist" in p.stderr
    assert not os.path.exists(os.path.join(runtime.root, cid))
    del out


def test_duplicate_id_and_missing_bundle(runtime, make_bundle, tmp_path):
    b = make_bundle(["sleep", "30"])
    cid, _ = runtime.create(b)
    _, p = runtime.create(b, cid, check=False)
    assert p.returncode != 0 and "already exists" in p.stderr
    assert runtime.state(cid)["status"] == "created"  # the first one is untouched
    p = runtime.cmd("create", "--bundle", str(tmp_path / "nope"), "x1", check=False)
    assert p.returncode != 0 and "config.json" in p.stderr
    assert not os.path.exists(os.path.join(runtime.root, "x1"))


def test_kill_signal_reaches_process(runtime, make_bundle):
    b = make_bundle(["sh", "-c", "trap 'echo got-usr1 > /tmp/sig; exit 0' USR1; "
                                 "while true; do sleep 0.05; done"])
    cid, _ = runtime.create(b)
    runtime.cmd("start", cid)
    time.sleep(0.2)
    runtime.cmd("kill", cid, "SIGUSR1")
    assert wait_status(runtime, cid, "stopped")["status"] == "stopped"
    with open(os.path.join(b.rootfs, "tmp", "sig")) as f:
        assert f.read().strip() == "got-usr1"
    p = runtime.cmd("kill", cid, "TERM", check=False)
    assert p.returncode != 0 and "not running" in p.stderr


def test_kill_all_and_delete_force(runtime, make_bundle):
    b = make_bundle(["sh", "-c", "sleep 100 & sleep 100 & wait"])
    b.config["linux"]["namespaces"] = [n for n in b.config["linux"]["namespaces"]
                                       if n["type"] != "pid"]
    cid, _ = runtime.create(b)
    runtime.cmd("start", cid)
    time.sleep(0.3)
    pids = [int(x) for x in runtime.cmd("ps", cid).stdout.split()]
    assert len(pids) >= 3
    runtime.cmd("kill", "--all", cid, "9")
    end = time.monotonic() + 5
    while any(os.path.exists(f"/proc/{p}/status") and "Z" not in
              open(f"/proc/{p}/status").read().split("State:")[1][:5] for p in pids):
        assert time.monotonic() < end, "kill --all left processes"
        time.sleep(0.02)
    runtime.cmd("delete", cid)


def test_delete_force_running(runtime, make_bundle):
    b = make_bundle(["sleep", "100"])
    cid, _ = runtime.create(b)
    runtime.cmd("start", cid)
    pid = runtime.state(cid)["pid"]
    runtime.cmd("delete", "--force", cid)
    end = time.monotonic() + 5
    while os.path.exists(f"/proc/{pid}") and "Z" not in open(f"/proc/{pid}/stat").read().split(
            ")")[1][:3]:
        assert time.monotonic() < end
        time.sleep(0.02)


def test_run_returns_exit_code_and_output(runtime, make_bundle):
    p = runtime.run(make_bundle(["sh", "-c", "echo out; echo err >&2; exit 7"]), check=False)
    assert p.returncode == 7
    assert p.stdout == "out\n" and "err\n" in p.stderr
    # PID 1 of a pid namespace ignores its own SIGTERM: run this one in the host pid namespace.
    b = make_bundle(["sh", "-c", "kill -TERM $$"])
    b.config["linux"]["namespaces"] = [{"type": "mount"}, {"type": "uts"}]
    p = runtime.run(b, check=False)
    assert p.returncode == 128 + signal.SIGTERM
    assert os.listdir(runtime.root) == []  # run deletes the container


def test_run_missing_program_fails_at_create(runtime, make_bundle):
    p = runtime.run(make_bundle(["/no/such/program"]), check=False)
    assert p.returncode != 0 and "/no/such/program" in p.stderr
    assert os.listdir(runtime.root) == []


def test_exec_in_running_container(runtime, make_bundle, tmp_path):
    b = make_bundle(["sh", "-c", "echo hi > /tmp/file; sleep 100"])
    b.config["hostname"] = "exec-host"
    cid, _ = runtime.create(b)
    runtime.cmd("start", cid)
    time.sleep(0.2)
    p = runtime.cmd("exec", cid, "sh", "-c", "cat /tmp/file; hostname; echo $$; exit 3",
                    check=False)
    assert p.returncode == 3, p.stderr
    lines = p.stdout.split()
    assert lines[:2] == ["hi", "exec-host"]
    assert int(lines[2]) > 1  # a new process in the container's pid namespace
    proc = {"args": ["sh", "-c", "id -u; pwd; echo $FOO"], "cwd": "/tmp",
            "env": ["PATH=/bin", "FOO=bar"], "user": {"uid": 65534, "gid": 65534}}
    pj = tmp_path / "process.json"
    pj.write_text(json.dumps(proc))
    p = runtime.cmd("exec", "--process", str(pj), cid)
    assert p.stdout.split() == ["65534", "/tmp", "bar"]


def test_list(runtime, make_bundle):
    b = make_bundle(["sleep", "30"])
    cid, _ = runtime.create(b)
    out = json.loads(runtime.cmd("list", "--format", "json").stdout)
    assert [(s["id"], s["status"]) for s in out] == [(cid, "created")]


def test_log_file_json(runtime, make_bundle, tmp_path):
    log = tmp_path / "log.json"
    p = runtime.cmd("--log", str(log), "--log-format", "json", "state", "nope", check=False)
    assert p.returncode == 1
    rec = json.loads(log.read_text().splitlines()[-1])
    assert rec["level"] == "error" and "nope" in rec["msg"]


def test_globals_runc_tools_pass_are_accepted(runtime, make_bundle):
    b = make_bundle(["true"])
    b.write()
    p = runtime.cmd("--systemd-cgroup", "--debug", "run", "--bundle", b.path,
                    runtime.new_id())
    assert p.returncode == 0


def test_events_stats(runtime, make_bundle):
    b = make_bundle(["sh", "-c", "sleep 100 & sleep 100"])
    b.config["linux"]["resources"] = {"memory": {"limit": 128 << 20}, "pids": {"limit": 50}}
    cid, _ = runtime.create(b)
    runtime.cmd("start", cid)
    time.sleep(0.2)
    ev = json.loads(runtime.cmd("events", "--stats", cid).stdout)
    assert ev["type"] == "stats" and ev["id"] == cid
    data = ev["data"]
    assert data["pids_stats"]["current"] >= 2, data["pids_stats"]
    assert data["memory_stats"]["usage"]["usage"] > 0
    assert data["oom_kills"] == 0


def test_memory_limit_oom_kill_is_counted(runtime, make_bundle):
    b = make_bundle(["sh", "-c", "dd if=/dev/zero of=/dev/null bs=96M count=1; echo survived"])
    b.config["linux"]["resources"] = {"memory": {"limit": 24 << 20, "swap": 24 << 20}}
    cid, _ = runtime.create(b)
    runtime.cmd("start", cid)
    assert wait_status(runtime, cid, "stopped", 10)["status"] == "stopped"
    data = json.loads(runtime.cmd("events", "--stats", cid).stdout)["data"]
    assert data["oom_kills"] >= 1
    runtime.cmd("delete", cid)
