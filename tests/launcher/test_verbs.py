"""pause / resume / update / ps: the runc verbs the agent's PauseContainer, ResumeContainer and
UpdateContainer call, on real cgroups (v1 freezer or cgroup.freeze; memory, pids, cpu)."""
from __future__ import annotations

import json
import os
import time

import pytest

from agent.launcher import cgroups, cli

from .conftest import needs_busybox, needs_root

COUNTER = "while :; do echo x >> /tmp/count; sleep 0.02; done"


def _size(b) -> int:
    try:
        return os.path.getsize(os.path.join(b.rootfs, "tmp", "count"))
    except FileNotFoundError:
        return 0


def _grows(b, within: float = 2.0) -> bool:
    start = _size(b)
    end = time.monotonic() + within
    while time.monotonic() < end:
        time.sleep(0.05)
        if _size(b) > start:
            return True
    return False


def _cg(b, cid: str) -> cgroups.Cgroup:
    return cgroups.open_cgroup(b.config["linux"].get("cgroupsPath"), cid)


def _file(cg: cgroups.Cgroup, ctl: str, v1: str, v2: str) -> str:
    d = cg._dir_for(ctl)
    assert d is not None, ctl
    for name in (v1, v2):
        if os.path.exists(f"{d}/{name}"):
            with open(f"{d}/{name}") as f:
                return f.read().strip()
    raise AssertionError(f"neither {v1} nor {v2} in {d}")


def _started(runtime, b) -> str:
    cid, _ = runtime.create(b)
    runtime.cmd("start", cid)
    assert _grows(b), "the container never ran"
    return cid


@needs_root
@needs_busybox
def test_pause_freezes_and_resume_thaws(runtime, make_bundle):
    b = make_bundle(["sh", "-c", COUNTER])
    cid = _started(runtime, b)
    runtime.cmd("pause", cid)
    assert runtime.state(cid)["status"] == "paused"
    cg = _cg(b, cid)
    assert cg.frozen()
    pid = runtime.state(cid)["pid"]
    with open(f"/proc/{pid}/status") as f:
        st = next(line for line in f if line.startswith("State:"))
    assert st.split()[1] in ("D", "S"), st  # v1 freezer shows D, cgroup.freeze shows S
    time.sleep(0.1)  # a write in flight when the freeze landed
    assert not _grows(b, 0.5), "a paused container went on writing"
    # runc's rules: no second pause, no exec, no plain delete
    p = runtime.cmd("pause", cid, check=False)
    assert p.returncode == 1 and "paused" in p.stderr
    p = runtime.cmd("exec", cid, "true", check=False)
    assert p.returncode != 0 and "paused" in p.stderr
    p = runtime.cmd("delete", cid, check=False)
    assert p.returncode == 1
    runtime.cmd("resume", cid)
    assert runtime.state(cid)["status"] == "running"
    assert not cg.frozen()
    assert _grows(b)
    p = runtime.cmd("resume", cid, check=False)
    assert p.returncode == 1 and "not paused" in p.stderr
    runtime.cmd("exec", cid, "true")


@needs_root
@needs_busybox
def test_delete_force_of_paused_container(runtime, make_bundle):
    """A frozen process cannot die of SIGKILL until thawed: delete must not hang on it."""
    b = make_bundle(["sh", "-c", COUNTER])
    cid = _started(runtime, b)
    pid = runtime.state(cid)["pid"]
    runtime.cmd("pause", cid)
    dirs = list(_cg(b, cid).paths().values())
    t = time.monotonic()
    runtime.cmd("delete", "--force", cid)
    assert time.monotonic() - t < 4
    assert not os.path.exists(f"/proc/{pid}/status") or "Z" in open(f"/proc/{pid}/stat").read()
    assert not any(os.path.exists(d) for d in dirs)
    assert os.listdir(runtime.root) == []


@needs_root
@needs_busybox
def test_update_from_flags_file_and_stdin(runtime, make_bundle, tmp_path):
    b = make_bundle(["sleep", "100"])
    b.config["linux"]["resources"] = {"memory": {"limit": 64 << 20}, "pids": {"limit": 50}}
    cid, _ = runtime.create(b)
    cg = _cg(b, cid)
    mem = ("memory", "memory.limit_in_bytes", "memory.max")
    assert int(_file(cg, *mem)) == 64 << 20
    runtime.cmd("update", "--memory", "96m", "--pids-limit", "20", cid)
    assert int(_file(cg, *mem)) == 96 << 20
    assert _file(cg, "pids", "pids.max", "pids.max") == "20"
    res = tmp_path / "res.json"
    res.write_text(json.dumps({"memory": {"limit": 80 << 20},
                               "cpu": {"quota": 50000, "period": 100000}}))
    runtime.cmd("update", "--resources", str(res), cid)
    assert int(_file(cg, *mem)) == 80 << 20
    quota = _file(cg, "cpu", "cpu.cfs_quota_us", "cpu.max").split()[0]
    assert quota == "50000"
    runtime.cmd("update", "-r", "-", cid, input=json.dumps({"pids": {"limit": 7}}).encode())
    assert _file(cg, "pids", "pids.max", "pids.max") == "7"
    # the start of the container is not affected by the update of its limits
    runtime.cmd("start", cid)
    assert runtime.state(cid)["status"] == "running"


@needs_root
@needs_busybox
def test_update_pids_limit_is_enforced(runtime, make_bundle):
    b = make_bundle(["sleep", "100"])
    cid = runtime.create(b)[0]
    runtime.cmd("start", cid)
    n_before = len(json.loads(runtime.cmd("ps", "--format", "json", cid).stdout))
    # room for the exec'd shell and one child (exec briefly needs two processes as well)
    runtime.cmd("update", "--pids-limit", str(n_before + 2), cid)
    p = runtime.cmd("exec", cid, "sh", "-c", "sleep 1 & sleep 1 & wait; echo done", check=False)
    assert p.returncode != 0 and "can't fork" in p.stderr and "done" not in p.stdout, p
    runtime.cmd("update", "--pids-limit", "-1", cid)
    p = runtime.cmd("exec", cid, "sh", "-c", "sleep 0.1 & wait; echo done")
    assert p.stdout == "done\n"


@needs_root
@needs_busybox
def test_update_refusals(runtime, make_bundle, tmp_path):
    b = make_bundle(["true"])
    cid, _ = runtime.create(b)
    p = runtime.cmd("update", "--memory", "lots", cid, check=False)
    assert p.returncode == 2 and "--memory" in p.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    p = runtime.cmd("update", "-r", str(bad), cid, check=False)
    assert p.returncode == 1 and "JSON object" in p.stderr
    runtime.cmd("start", cid)
    end = time.monotonic() + 5
    while runtime.state(cid)["status"] != "stopped" and time.monotonic() < end:
        time.sleep(0.02)
    p = runtime.cmd("update", "--memory", "64m", cid, check=False)
    assert p.returncode == 1 and "stopped" in p.stderr
    p = runtime.cmd("pause", cid, check=False)
    assert p.returncode == 1 and "stopped" in p.stderr


@needs_root
@needs_busybox
def test_ps_lists_the_container_processes(runtime, make_bundle):
    b = make_bundle(["sh", "-c", "sleep 100 & sleep 100 & wait"])
    cid, _ = runtime.create(b)
    runtime.cmd("start", cid)
    end = time.monotonic() + 5
    while True:
        pids = json.loads(runtime.cmd("ps", "--format", "json", cid).stdout)
        if len(pids) >= 3 or time.monotonic() > end:
            break
        time.sleep(0.02)
    assert runtime.state(cid)["pid"] in pids and len(pids) == 3
    assert runtime.cmd("ps", cid).stdout.split() == [str(p) for p in pids]


# --- parsing, no root needed --------------------------------------------------------------------

@pytest.mark.parametrize("text,want", [("1024", 1024), ("64m", 64 << 20), ("64M", 64 << 20),
                                       ("2g", 2 << 30), ("1.5k", 1536), ("10mb", 10 << 20),
                                       ("-1", -1), ("7b", 7)])
def test_parse_bytes(text, want):
    assert cli.parse_bytes("--memory", text) == want


@pytest.mark.parametrize("text", ["", "m", "12q", "-5", "1..2k"])
def test_parse_bytes_rejects(text):
    with pytest.raises(cli.UsageError, match="--memory"):
        cli.parse_bytes("--memory", text)


def test_update_flags_over_file(tmp_path):
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"memory": {"limit": 1, "swap": 5}, "cpu": {"shares": 2}}))
    vals = {"--resources": "resources", "-r": "resources"}
    vals.update({k: k for k in cli._UPDATE_FLAGS})
    a = cli.parse(["-r", str(f), "--memory", "2k", "--cpu-quota=300", "--cpuset-cpus", "0-1",
                   "c1"], vals, {})
    assert cli.update_resources(a) == {"memory": {"limit": 2048, "swap": 5},
                                       "cpu": {"shares": 2, "quota": 300, "cpus": "0-1"}}
    a = cli.parse(["--pids-limit", "x", "c1"], vals, {})
    with pytest.raises(cli.UsageError, match="--pids-limit"):
        cli.update_resources(a)
