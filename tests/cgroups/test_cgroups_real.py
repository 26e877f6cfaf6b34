"""cgroups on this host's real hierarchies, as root: limits bite, stats move, nothing is left."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import uuid

import pytest

from agent.launcher import cgroups as cg

pytestmark = [pytest.mark.root]

if os.geteuid() != 0:
    pytest.skip("needs root to create cgroups", allow_module_level=True)

LAYOUT = cg.detect_layout()
if LAYOUT.mode == "legacy" and not LAYOUT.v1 or (not LAYOUT.v1 and LAYOUT.unified is None):
    pytest.skip("no cgroup file system mounted", allow_module_level=True)


def has(ctl: str) -> bool:
    """The controller is usable here: a v1 hierarchy, or offered at the cgroup2 root."""
    if ctl in LAYOUT.v1:
        return True
    if LAYOUT.unified is None:
        return False
    with open(f"{LAYOUT.unified.mountpoint}/cgroup.controllers") as f:
        return ctl in f.read().split()


@pytest.fixture
def cgroup():
    """A fresh cgroup below our own (relative cgroupsPath); destroyed and checked afterwards."""
    made: list[cg.Cgroup] = []

    def make(resources: dict | None = None) -> cg.Cgroup:
        c = cg.open_cgroup(f"sa-test-{uuid.uuid4().hex[:12]}", "unused")
        c.create()
        made.append(c)
        if resources is not None:
            c.apply(resources)
        return c

    yield make
    for c in made:
        c.destroy(kill=True)
        left = [d for d in c.paths().values() if os.path.exists(d)]
        assert left == [], f"destroy left {left}"


class Child:
    """A Python child that waits for 'go' on stdin, so it joins the cgroup before it acts."""

    def __init__(self, code: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c",
             "import sys\nsys.stdin.readline()\n" + code],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def go(self) -> None:
        self.proc.stdin.write(b"go\n")
        self.proc.stdin.flush()

    def wait(self, timeout: float = 30) -> tuple[int, str, str]:
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out.decode(), err.decode()

    def readline(self, timeout: float = 10) -> str:
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        assert r, "child printed nothing"
        return self.proc.stdout.readline().decode()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            f.close()


def prints_nothing_for(child: "Child", secs: float) -> bool:
    """After draining what was already written, the child stays silent for ``secs``."""
    time.sleep(0.05)  # output written just before a freeze may still be in flight
    fd = child.proc.stdout.fileno()
    os.set_blocking(fd, False)
    try:
        try:
            while os.read(fd, 65536):
                pass
        except BlockingIOError:
            pass
        time.sleep(secs)
        try:
            return not os.read(fd, 65536)
        except BlockingIOError:
            return True
    finally:
        os.set_blocking(fd, True)


def restore_controller(subtree_control: str, ctl: str) -> None:
    """Disable a controller a test enabled, unless some other cgroup now relies on it (EBUSY)."""
    try:
        with open(subtree_control, "w") as f:
            f.write("-" + ctl)
    except OSError:
        pass


def read(path: str) -> str:
    with open(path) as f:
        return f.read().strip()


def test_create_add_pid_and_destroy_leaves_nothing(cgroup):
    c = cgroup()
    for ctl, d in c.paths().items():
        assert os.path.isdir(d), f"{ctl} dir {d} missing"
    child = Child("import time; time.sleep(60)")
    try:
        c.add_pid(child.proc.pid)
        assert c.pids() == [child.proc.pid]
        with open(f"/proc/{child.proc.pid}/cgroup") as f:
            own = cg.parse_proc_cgroup(f.read())
        for ctl in LAYOUT.v1:
            assert own[ctl] == c.cgroup_paths[ctl]
        if LAYOUT.unified is not None:
            assert own[""] == c.cgroup_paths[""]
        c.destroy(kill=True)
        assert child.proc.wait(10) == -signal.SIGKILL
        assert not any(os.path.exists(d) for d in c.paths().values())
    finally:
        child.close()


@pytest.mark.skipif(not has("memory"), reason="no memory controller on this host")
def test_memory_limit_oom_kill_is_counted(cgroup):
    limit = 32 << 20
    c = cgroup({"memory": {"limit": limit, "swap": limit}})
    stats = c.stats()["memory_stats"]
    assert stats["usage"]["limit"] == limit
    assert c.oom_kills() == 0
    child = Child("b = b'x' * (256 << 20)\nprint('survived')")
    try:
        c.add_pid(child.proc.pid)
        child.go()
        rc, out, _ = child.wait()
        assert rc == -signal.SIGKILL and "survived" not in out
        assert c.oom_kills() == 1
        assert c.stats()["memory_stats"]["usage"]["max_usage"] > limit * 3 // 4
    finally:
        child.close()


@pytest.mark.skipif(not has("pids"), reason="no pids controller on this host")
def test_pids_limit_refuses_forks(cgroup):
    c = cgroup({"pids": {"limit": 4}})
    child = Child(
        "import os, time\n"
        "n = 0\n"
        "for i in range(10):\n"
        "    try:\n"
        "        pid = os.fork()\n"
        "    except BlockingIOError:\n"
        "        break\n"
        "    if pid == 0:\n"
        "        time.sleep(30); os._exit(0)\n"
        "    n += 1\n"
        "print(n, flush=True)\n"
        "time.sleep(30)\n")
    try:
        c.add_pid(child.proc.pid)
        child.go()
        assert int(child.readline()) == 3  # the parent plus three children make four
        st = c.stats()["pids_stats"]
        assert st == {"current": 4, "limit": 4}
        assert len(c.pids()) == 4
    finally:
        c.kill(signal.SIGKILL)
        child.close()


@pytest.mark.skipif(not has("cpu"), reason="no cpu controller on this host")
def test_cpu_quota_shares_and_cpuset_written(cgroup):
    c = cgroup({"cpu": {"shares": 512, "quota": 20000, "period": 50000, "cpus": "0",
                        "mems": "0"}})
    if LAYOUT.mode == "unified":
        d = c.paths()[""]
        assert read(f"{d}/cpu.max") == "20000 50000"
        assert read(f"{d}/cpu.weight") == str(cg.shares_to_weight(512))
        assert read(f"{d}/cpuset.cpus") == "0"
    else:
        assert read(f"{c.paths()['cpu']}/cpu.cfs_quota_us") == "20000"
        assert read(f"{c.paths()['cpu']}/cpu.cfs_period_us") == "50000"
        assert read(f"{c.paths()['cpu']}/cpu.shares") == "512"
        assert read(f"{c.paths()['cpuset']}/cpuset.cpus") == "0"
    # a later, smaller period with a quota above it needs the quota written first
    c.apply({"cpu": {"quota": 5000, "period": 10000}})
    if LAYOUT.mode != "unified":
        assert read(f"{c.paths()['cpu']}/cpu.cfs_period_us") == "10000"


@pytest.mark.skipif(not has("cpu"), reason="no cpu controller on this host")
def test_cpu_quota_throttles_and_stats_move(cgroup):
    c = cgroup({"cpu": {"quota": 10000, "period": 100000, "cpus": "0"}})
    before = c.stats()["cpu_stats"]
    child = Child(
        "import time\n"
        "end = time.monotonic() + 0.5\n"
        "while time.monotonic() < end: pass\n"
        "print('done', flush=True)\n"
        "time.sleep(30)\n")
    try:
        c.add_pid(child.proc.pid)
        child.go()
        assert child.readline() == "done\n"
        after = c.stats()["cpu_stats"]
        used = after["cpu_usage"]["total_usage"] - before["cpu_usage"]["total_usage"]
        # 10% of one CPU over 0.5 s of wall time: far below the 0.5 s a free loop would get
        assert 0 < used < 200_000_000
        assert after["throttling_data"]["throttled_periods"] > 0
        assert after["throttling_data"]["throttled_time"] > 0
        if after["cpu_usage"]["percpu_usage"]:
            assert sum(after["cpu_usage"]["percpu_usage"]) == after["cpu_usage"]["total_usage"]
        assert c.stats()["memory_stats"]["usage"]["usage"] > 0
    finally:
        child.close()


def test_freeze_stops_and_thaw_resumes(cgroup):
    c = cgroup()
    child = Child(
        "import time\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1; print(i, flush=True); time.sleep(0.01)\n")
    try:
        c.add_pid(child.proc.pid)
        child.go()
        child.readline()
        c.freeze()
        assert c.frozen()
        assert prints_nothing_for(child, 0.3)
        c.thaw()
        assert not c.frozen()
        assert child.readline().strip().isdigit()
    finally:
        if c.frozen():
            c.thaw()  # a frozen child cannot die, close() would wait forever
        child.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_kill_reaches_every_process(cgroup, sig):
    c = cgroup()
    child = Child(
        "import os, time\n"
        "for i in range(3):\n"
        "    if os.fork() == 0:\n"
        "        time.sleep(60); os._exit(0)\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n")
    try:
        c.add_pid(child.proc.pid)
        child.go()
        assert child.readline() == "ready\n"
        assert len(c.pids()) == 4
        c.kill(sig)
        assert child.proc.wait(10) == -sig
        deadline = time.monotonic() + 10
        while c.pids() and time.monotonic() < deadline:
            time.sleep(0.01)  # orphans are reaped by init; gone from the cgroup soon after
        assert c.pids() == []
    finally:
        child.close()


@pytest.mark.skipif("devices" not in LAYOUT.v1, reason="no v1 devices controller (cgroup2 "
                    "device control needs eBPF, not loaded by this module)")
def test_devices_deny_all_keeps_defaults(cgroup):
    c = cgroup({"devices": [{"allow": False, "access": "rwm"}]})
    child = Child(
        "import os\n"
        "os.close(os.open('/dev/null', os.O_RDWR))\n"
        "try:\n"
        "    os.open('/dev/kmsg', os.O_RDONLY)\n"
        "    print('kmsg opened')\n"
        "except PermissionError:\n"
        "    print('kmsg denied')\n")
    try:
        c.add_pid(child.proc.pid)
        child.go()
        rc, out, err = child.wait()
        assert rc == 0, err
        assert out.strip() == "kmsg denied"
        listing = read(f"{c.paths()['devices']}/devices.list").splitlines()
        assert "c 1:3 rwm" in listing and "a *:* rwm" not in listing
    finally:
        child.close()


def _first_disk() -> str | None:
    with open("/proc/partitions") as f:
        for line in f.read().splitlines()[2:]:
            major, minor, _, name = line.split()
            if os.path.exists(f"/sys/block/{name}") and not name.startswith(("loop", "zram",
                                                                                "ram")):
                return f"{major}:{minor}"
    return None


@pytest.mark.skipif(not has("blkio") and not has("io"), reason="no blkio/io controller")
@pytest.mark.skipif(_first_disk() is None, reason="no block device")
def test_blkio_throttle_written(cgroup):
    dev = _first_disk()
    major, minor = (int(x) for x in dev.split(":"))
    c = cgroup({"blockIO": {
        "throttleReadBpsDevice": [{"major": major, "minor": minor, "rate": 1 << 20}],
        "throttleWriteIOPSDevice": [{"major": major, "minor": minor, "rate": 50}]}})
    if LAYOUT.mode == "unified":
        io_max = read(f"{c.paths()['']}/io.max")
        assert "rbps=1048576" in io_max and "wiops=50" in io_max
    else:
        d = c.paths()["blkio"]
        assert read(f"{d}/blkio.throttle.read_bps_device") == f"{dev} 1048576"
        assert read(f"{d}/blkio.throttle.write_iops_device") == f"{dev} 50"
    assert isinstance(c.stats()["blkio_stats"]["io_service_bytes_recursive"], list)


@pytest.mark.skipif(not has("hugetlb"), reason="no hugetlb controller on this host")
def test_hugetlb_limit_written(cgroup):
    root_ctl = f"{LAYOUT.unified.mountpoint}/cgroup.subtree_control" if LAYOUT.unified else None
    before = read(root_ctl).split() if root_ctl else []
    try:
        c = cgroup({"hugepageLimits": [{"pageSize": "2MB", "limit": 8 << 20}]})
        if "hugetlb" in LAYOUT.v1:
            assert read(f"{c.paths()['hugetlb']}/hugetlb.2MB.limit_in_bytes") == str(8 << 20)
        else:
            assert read(f"{c.paths()['']}/hugetlb.2MB.max") == str(8 << 20)
            assert c.stats()["hugetlb_stats"]["2MB"]["usage"] == 0
        c.destroy()
    finally:
        # Hybrid host: enabling hugetlb on cgroup2 touched the root; put it back as it was.
        if root_ctl and "hugetlb" not in before and "hugetlb" in read(root_ctl).split():
            restore_controller(root_ctl, "hugetlb")


@pytest.mark.skipif(LAYOUT.unified is None, reason="no cgroup2 mount")
def test_unified_key_written_on_cgroup2_dir(cgroup):
    c = cgroup({"unified": {"cgroup.max.descendants": "3"}})
    assert read(f"{c.paths()['']}/cgroup.max.descendants") == "3"


def test_error_names_file_and_value(cgroup):
    c = cgroup()
    with pytest.raises(cg.CgroupError) as e:
        c.apply({"unified": {"nosuch.file": "1"}})
    assert f"{c.paths()['']}/nosuch.file" in str(e.value) and "'1'" in str(e.value)


@pytest.mark.skipif(LAYOUT.unified is None, reason="no cgroup2 mount")
def test_cgroup2_device_filter_is_enforced_and_replaced():
    """The pure-v2 path (eBPF device filter) on this host's cgroup2 mount: a layout that sees
    only cgroup2 makes the module take its unified-mode route."""
    layout = cg.Layout(unified=LAYOUT.unified, own={"": LAYOUT.own.get("", "/")})
    c = cg.open_cgroup(f"sa-test-{uuid.uuid4().hex[:12]}", "x", layout=layout)
    root_ctl = f"{LAYOUT.unified.mountpoint}/cgroup.subtree_control"
    before = set(read(root_ctl).split())
    probe = ("import os\n"
             "os.close(os.open('/dev/null', os.O_RDWR))\n"
             "try:\n"
             "    os.close(os.open('/dev/kmsg', os.O_RDONLY)); print('kmsg opened')\n"
             "except PermissionError:\n"
             "    print('kmsg denied')\n")
    try:
        c.create()
        c.apply({"devices": [{"allow": False, "access": "rwm"}]})
        assert not any(i.startswith("devices") for i in c.ignored)
        for expect in ("kmsg denied", "kmsg opened"):
            child = Child(probe)
            try:
                c.add_pid(child.proc.pid)
                child.go()
                rc, out, err = child.wait()
                assert rc == 0, err
                assert out.strip() == expect
            finally:
                child.close()
            # re-apply: the new program replaces the old one instead of stacking on it
            c.apply({"devices": [{"allow": False, "access": "rwm"},
                                 {"allow": True, "type": "c", "major": 1, "minor": 11,
                                  "access": "r"}]})
    finally:
        c.destroy(kill=True)
        for ctl in set(read(root_ctl).split()) - before:
            restore_controller(root_ctl, ctl)
    assert not os.path.exists(c.paths()[""])


def test_kill_of_a_paused_container_keeps_it_paused(cgroup):
    c = cgroup()
    child = Child("import time; print('up', flush=True); time.sleep(60)")
    try:
        c.add_pid(child.proc.pid)
        child.go()
        assert child.readline() == "up\n"
        c.freeze()
        c.kill(signal.SIGTERM)
        assert c.frozen()
        time.sleep(0.1)
        assert child.proc.poll() is None  # the signal waits until the thaw
        c.thaw()
        assert child.proc.wait(10) == -signal.SIGTERM
    finally:
        if c.frozen():
            c.thaw()
        child.close()


def test_stats_fill_kata_cgroup_stats_message(cgroup):
    """The dict's shape is the agent API's CgroupStats: it must load field by field."""
    from google.protobuf import json_format

    from agent.protos import agent_pb2

    c = cgroup({"pids": {"limit": 50}})
    child = Child("import time; x = b'y' * (8 << 20); print('up', flush=True); time.sleep(30)")
    try:
        c.add_pid(child.proc.pid)
        child.go()
        assert child.readline() == "up\n"
        stats = c.stats()
        msg = json_format.ParseDict(stats, agent_pb2.CgroupStats())
        assert msg.pids_stats.current == 1 and msg.pids_stats.limit == 50
        if has("memory"):
            assert msg.memory_stats.usage.usage >= 8 << 20
        if has("cpu"):
            assert msg.cpu_stats.cpu_usage.total_usage > 0
    finally:
        child.close()


@pytest.mark.skipif(LAYOUT.unified is None, reason="no cgroup2 mount")
def test_cgroup2_only_freeze_kill_and_destroy():
    """Freezer, cgroup.kill and removal as a pure-v2 guest uses them, on this host's cgroup2."""
    layout = cg.Layout(unified=LAYOUT.unified, own={"": LAYOUT.own.get("", "/")})
    c = cg.open_cgroup(f"sa-test-{uuid.uuid4().hex[:12]}", "x", layout=layout)
    root_ctl = f"{LAYOUT.unified.mountpoint}/cgroup.subtree_control"
    before = set(read(root_ctl).split())
    child = Child("import os, time\n"
                  "if os.fork() == 0:\n"
                  "    time.sleep(60); os._exit(0)\n"
                  "i = 0\n"
                  "while True:\n"
                  "    i += 1; print(i, flush=True); time.sleep(0.01)\n")
    try:
        c.create()
        assert set(c.paths()) == {""}
        c.add_pid(child.proc.pid)
        child.go()
        child.readline()
        deadline = time.monotonic() + 5
        while len(c.pids()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(c.pids()) == 2
        c.freeze()
        assert c.frozen() and read(f"{c.paths()['']}/cgroup.freeze") == "1"
        assert prints_nothing_for(child, 0.3)
        c.thaw()
        assert not c.frozen()
        child.readline()
        c.kill(signal.SIGKILL)  # through cgroup.kill: the grandchild goes too
        assert child.proc.wait(10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while c.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert c.pids() == []
        c.destroy()
        assert not os.path.exists(c.paths()[""])
    finally:
        child.close()
        c.destroy(kill=True)
        for ctl in set(read(root_ctl).split()) - before:
            restore_controller(root_ctl, ctl)


@pytest.mark.skipif("memory" not in LAYOUT.v1, reason="v1 memory files (cgroup2 has no "
                    "swappiness or OOM-killer switch)")
def test_v1_memory_extras_written(cgroup):
    c = cgroup({"memory": {"limit": 64 << 20, "reservation": 32 << 20, "swappiness": 0,
                           "disableOOMKiller": True, "kernel": 1 << 20}})
    d = c.paths()["memory"]
    assert read(f"{d}/memory.soft_limit_in_bytes") == str(32 << 20)
    assert read(f"{d}/memory.swappiness") == "0"
    assert "oom_kill_disable 1" in read(f"{d}/memory.oom_control").splitlines()
    assert any(i.startswith("memory.kernel") for i in c.ignored)
    # raising the limit later, swap included, needs memsw written first: must not fail
    c.apply({"memory": {"limit": 128 << 20, "swap": 256 << 20}})
    assert read(f"{d}/memory.limit_in_bytes") == str(128 << 20)
    assert read(f"{d}/memory.memsw.limit_in_bytes") == str(256 << 20)
    c.apply({"memory": {"limit": 16 << 20, "swap": 16 << 20}})
    assert read(f"{d}/memory.memsw.limit_in_bytes") == str(16 << 20)
