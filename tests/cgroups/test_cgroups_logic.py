"""cgroups logic without root: parsing, path resolution, conversions, writes on a fake tree."""

from __future__ import annotations

import os
import signal

import pytest

from agent.launcher import cgroups as cg
from agent.launcher.cgroups import CgroupError, CgroupFS, Layout, Mount

HYBRID_MOUNTINFO = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
90 80 0:32 /ctr /var/lib/x/memory rw,relatime - cgroup cgroup rw,memory
"""

UNIFIED_MOUNTINFO = """\
25 1 0:22 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime - cgroup2 cgroup2 rw
26 1 0:23 / /proc rw - proc proc rw
"""


class TreeFS(CgroupFS):
    """A temporary directory standing in for cgroupfs; records every write in order."""

    def __init__(self) -> None:
        super().__init__(create_files=True)
        self.writes: list[tuple[str, str]] = []
        self.killed: list[tuple[int, int]] = []

    def write(self, path: str, value: str) -> None:
        self.writes.append((path, value))
        super().write(path, value)

    def rmdir(self, path: str) -> None:
        # Real cgroupfs dirs hold only virtual files; here the files are real and must go first.
        for e in os.scandir(path):
            if e.is_file():
                os.unlink(e.path)
        os.rmdir(path)

    def kill(self, pid: int, sig: int) -> None:
        self.killed.append((pid, sig))


def put(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


@pytest.fixture
def v2tree(tmp_path):
    root = str(tmp_path / "cg2")
    put(f"{root}/cgroup.controllers", "cpuset cpu io memory hugetlb pids rdma misc\n")
    put(f"{root}/cgroup.subtree_control", "")
    layout = Layout(unified=Mount(root), own={"": "/agent"})
    return root, layout


@pytest.fixture
def v1tree(tmp_path):
    base = str(tmp_path / "cg1")
    mounts = {}
    for ctl in ("cpu", "cpuacct", "cpuset", "memory", "devices", "freezer", "blkio", "pids"):
        mounts[ctl] = Mount(f"{base}/{ctl}")
        os.makedirs(f"{base}/{ctl}")
    put(f"{base}/cpuset/cpuset.cpus", "0-3\n")
    put(f"{base}/cpuset/cpuset.mems", "0\n")
    os.makedirs(f"{base}/unified")
    layout = Layout(v1=mounts, unified=Mount(f"{base}/unified"),
                    own={c: "/" for c in mounts} | {"memory": "/outer", "": "/"})
    return base, layout


# -- discovery --------------------------------------------------------------------------------


def test_parse_mountinfo_hybrid_comounted_and_prefers_sys_fs_cgroup():
    v1, unified = cg.parse_mountinfo(HYBRID_MOUNTINFO)
    assert v1["cpu"] == Mount("/sys/fs/cgroup/cpu,cpuacct")
    assert v1["cpuacct"] is v1["cpu"]
    # the later bind mount of the memory hierarchy elsewhere does not replace the canonical one
    assert v1["memory"] == Mount("/sys/fs/cgroup/memory")
    assert "name=systemd" not in v1 and "systemd" not in v1
    assert unified == Mount("/sys/fs/cgroup/unified")
    assert Layout(v1=v1, unified=unified).mode == "hybrid"


def test_parse_mountinfo_unified_and_escaped_mountpoint():
    v1, unified = cg.parse_mountinfo(UNIFIED_MOUNTINFO)
    assert v1 == {} and unified == Mount("/sys/fs/cgroup")
    assert Layout(unified=unified).mode == "unified"
    v1, unified = cg.parse_mountinfo(
        "41 31 0:38 /sub /mnt/my\\040cg rw - cgroup2 cgroup2 rw\n")
    assert unified == Mount("/mnt/my cg", root="/sub")
    assert Layout(v1={"memory": Mount("/m")}).mode == "legacy"


def test_parse_proc_cgroup():
    own = cg.parse_proc_cgroup("4:memory:/a/b\n2:cpu,cpuacct:/c\n1:name=systemd:/s\n0::/u\n")
    assert own == {"memory": "/a/b", "cpu": "/c", "cpuacct": "/c", "name=systemd": "/s",
                   "": "/u"}


def test_detect_layout_of_this_process():
    layout = cg.detect_layout()
    assert layout.mode in ("unified", "hybrid", "legacy")
    assert layout.own  # /proc/self/cgroup always has an entry


# -- paths ------------------------------------------------------------------------------------


def test_paths_absolute_relative_and_default(v1tree):
    base, layout = v1tree
    c = cg.open_cgroup("/pods/c1", "c1", layout=layout, fs=TreeFS())
    assert c.paths()["memory"] == f"{base}/memory/pods/c1"
    assert c.paths()[""] == f"{base}/unified/pods/c1"
    # relative: below the caller's own cgroup, per hierarchy
    c = cg.open_cgroup("pods/c1", "c1", layout=layout, fs=TreeFS())
    assert c.paths()["memory"] == f"{base}/memory/outer/pods/c1"
    assert c.paths()["cpu"] == f"{base}/cpu/pods/c1"
    c = cg.open_cgroup(None, "abc", layout=layout, fs=TreeFS())
    assert c.paths()["pids"] == f"{base}/pids/sandbox-agent/abc"
    assert set(c.paths()) == set(layout.v1) | {""}


def test_paths_cannot_escape_hierarchy(v1tree):
    base, layout = v1tree
    c = cg.open_cgroup("/../../../etc", "x", layout=layout, fs=TreeFS())
    assert c.paths()["memory"] == f"{base}/memory/etc"
    c = cg.open_cgroup("../../../../x", "x", layout=layout, fs=TreeFS())
    assert c.paths()["memory"] == f"{base}/memory/x"
    with pytest.raises(CgroupError, match="hierarchy root"):
        cg.open_cgroup("/", "x", layout=layout, fs=TreeFS())
    with pytest.raises(CgroupError, match="'a/b'"):
        cg.open_cgroup(None, "a/b", layout=layout, fs=TreeFS())


def test_paths_mount_showing_a_subtree(tmp_path):
    layout = Layout(unified=Mount(str(tmp_path), root="/kubepods/pod1"),
                    own={"": "/kubepods/pod1"})
    c = cg.open_cgroup("ctr", "x", layout=layout, fs=TreeFS())
    assert c.paths()[""] == f"{tmp_path}/ctr"


# -- conversions ------------------------------------------------------------------------------


def test_shares_to_weight_matches_runc():
    assert cg.shares_to_weight(0) == 0
    assert cg.shares_to_weight(2) == 1
    assert cg.shares_to_weight(1024) == 39
    assert cg.shares_to_weight(262144) == 10000
    assert cg.shares_to_weight(10**9) == 10000


def test_blkio_weight_to_io_weight():
    assert cg.blkio_weight_to_io_weight(10) == 1
    assert cg.blkio_weight_to_io_weight(1000) == 10000
    assert cg.blkio_weight_to_io_weight(500) == 4950


def test_swap_conversion():
    assert cg.swap_v1_to_v2(None, None) is None
    assert cg.swap_v1_to_v2(0, -1) == -1
    assert cg.swap_v1_to_v2(-1, 100) == -1
    assert cg.swap_v1_to_v2(300, 100) == 200
    assert cg.swap_v1_to_v2(100, 100) == 0
    with pytest.raises(CgroupError, match="below memory.limit=100"):
        cg.swap_v1_to_v2(50, 100)
    with pytest.raises(CgroupError, match="needs a memory.limit"):
        cg.swap_v1_to_v2(50, None)


FULL = {
    "memory": {"limit": 100 << 20, "reservation": 50 << 20, "swap": 200 << 20, "kernel": 1,
               "swappiness": 10, "disableOOMKiller": True},
    "cpu": {"shares": 1024, "quota": 50000, "period": 100000, "realtimeRuntime": 0,
            "cpus": "0-1", "mems": "0", "idle": 0},
    "pids": {"limit": 32},
    "blockIO": {"weight": 500,
                "weightDevice": [{"major": 8, "minor": 0, "weight": 300}],
                "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}],
                "throttleWriteIOPSDevice": [{"major": 8, "minor": 16, "rate": 100}]},
    "hugepageLimits": [{"pageSize": "2MB", "limit": 4 << 20}],
    "devices": [{"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 10, "minor": 229, "access": "rw"}],
}


def test_v2_writes_full_spec():
    writes, ignored = cg.v2_writes(FULL)
    files = {f: v for _, f, v in writes if f != "io.weight?"}
    assert files["memory.max"] == str(100 << 20)
    assert files["memory.swap.max"] == str(100 << 20)  # 200M memsw - 100M memory
    assert files["memory.low"] == str(50 << 20)
    assert files["cpu.weight"] == "39"
    assert files["cpu.max"] == "50000 100000"
    assert files["cpuset.cpus"] == "0-1" and files["cpuset.mems"] == "0"
    assert files["pids.max"] == "32"
    assert files["hugetlb.2MB.max"] == str(4 << 20)
    io_max = [v for _, f, v in writes if f == "io.max"]
    assert io_max == ["8:0 rbps=1048576", "8:16 wiops=100"]
    assert [v for _, f, v in writes if f == "io.weight?"] == ["500", "8:0 300"]
    assert any(i.startswith("memory.swappiness") for i in ignored)
    assert any(i.startswith("memory.disableOOMKiller") for i in ignored)
    # the swap file comes before memory.max so a lower memory.max never meets an old swap cap
    order = [f for _, f, _ in writes]
    assert order.index("memory.swap.max") < order.index("memory.max")


def test_v2_writes_quota_and_period_forms():
    f = lambda cpu: [v for _, k, v in cg.v2_writes({"cpu": cpu})[0] if k == "cpu.max"]  # noqa: E731
    assert f({"quota": -1, "period": 20000}) == ["max 20000"]
    assert f({"period": 20000}) == ["max 20000"]
    assert f({"quota": 30000}) == ["30000"]
    assert f({}) == []
    with pytest.raises(CgroupError, match="realtime"):
        cg.v2_writes({"cpu": {"realtimeRuntime": 950000}})


def test_v2_unified_overrides_come_last_and_are_checked():
    writes, _ = cg.v2_writes({"memory": {"limit": 1000}, "unified": {"memory.max": "2000"}})
    assert [(f, v) for _, f, v in writes] == [("memory.max", "1000"), ("memory.max", "2000")]
    for bad in ("../../etc/passwd", "memorymax", ""):
        with pytest.raises(CgroupError, match="unified key"):
            cg.v2_writes({"unified": {bad: "1"}})


def test_v1_writes_full_spec():
    writes, ignored = cg.v1_writes(FULL)
    files = [(c, f, v) for c, f, v in writes]
    assert ("memory", "memory.soft_limit_in_bytes", str(50 << 20)) in files
    assert ("memory", "memory.swappiness", "10") in files
    assert ("memory", "memory.oom_control", "1") in files
    assert ("cpu", "cpu.shares", "1024") in files
    assert ("cpu", "cpu.cfs_quota_us", "50000") in files
    assert ("cpuset", "cpuset.cpus", "0-1") in files
    assert ("pids", "pids.max", "32") in files
    assert ("blkio", "blkio.weight", "500") in files
    assert ("blkio", "blkio.weight_device", "8:0 300") in files
    assert ("blkio", "blkio.throttle.read_bps_device", "8:0 1048576") in files
    assert ("blkio", "blkio.throttle.write_iops_device", "8:16 100") in files
    assert ("hugetlb", "hugetlb.2MB.limit_in_bytes", str(4 << 20)) in files
    dev = [(f, v) for c, f, v in writes if c == "devices"]
    assert dev[0] == ("devices.deny", "a")
    assert dev[1] == ("devices.allow", "c 10:229 rw")
    assert ("devices.allow", "c 1:3 rwm") in dev and ("devices.allow", "c 136:* rwm") in dev
    assert cg.v1_writes({"devices": []}, devices_defaults=False)[0] == []
    assert any(i.startswith("memory.kernel") for i in ignored)


@pytest.mark.parametrize("res, match", [
    ({"memory": {"swappiness": 101}}, "swappiness 101"),
    ({"devices": [{"allow": True, "type": "x"}]}, "type 'x'"),
    ({"devices": [{"allow": True, "type": "c", "access": "rwx"}]}, "access 'rwx'"),
    ({"hugepageLimits": [{"pageSize": "2M", "limit": 1}]}, "pageSize '2M'"),
    ({"blockIO": {"throttleReadBpsDevice": [{"major": 8, "rate": 1}]}}, "major and minor"),
])
def test_bad_values_are_named(res, match):
    with pytest.raises(CgroupError, match=match):
        cg.v1_writes(res)


# -- a fake v2 tree ---------------------------------------------------------------------------


def test_v2_create_enables_controllers_and_apply_writes(v2tree):
    root, layout = v2tree
    fs = TreeFS()
    c = cg.open_cgroup(None, "c1", layout=layout, fs=fs)
    c.create()
    d = f"{root}/sandbox-agent/c1"
    assert os.path.isdir(d)
    assert read(f"{root}/cgroup.subtree_control") == \
        "+cpuset +cpu +io +memory +hugetlb +pids +rdma +misc"
    put(f"{root}/sandbox-agent/cgroup.controllers", "cpu memory pids io\n")
    c.create()  # idempotent; now also enables the intermediate level
    assert read(f"{root}/sandbox-agent/cgroup.subtree_control") == "+cpu +memory +pids +io"
    c.apply({"memory": {"limit": 64 << 20, "swap": 64 << 20}, "cpu": {"shares": 2048},
             "pids": {"limit": -1}, "blockIO": {"weight": 1000},
             "unified": {"memory.high": "50000000"}})
    assert read(f"{d}/memory.max") == str(64 << 20)
    assert read(f"{d}/memory.swap.max") == "0"
    assert read(f"{d}/cpu.weight") == str(cg.shares_to_weight(2048))
    assert read(f"{d}/pids.max") == "max"
    assert read(f"{d}/io.weight") == "10000"  # no io.bfq.weight in the tree: converted
    assert read(f"{d}/memory.high") == "50000000"
    put(f"{d}/io.bfq.weight", "100\n")
    c.apply({"blockIO": {"weight": 1000}})
    assert read(f"{d}/io.bfq.weight") == "1000"  # bfq takes the blkio range as is
    c.add_pid(1234)
    assert read(f"{d}/cgroup.procs") == "1234"
    c.destroy()
    assert not os.path.exists(d)


def test_v2_missing_file_error_names_file_and_value(v2tree):
    root, layout = v2tree
    c = cg.open_cgroup("/x", "x", layout=layout, fs=TreeFS())
    c.create()
    strict = cg.open_cgroup("/x", "x", layout=layout, fs=CgroupFS())
    with pytest.raises(CgroupError) as e:
        strict.apply({"pids": {"limit": 7}})
    assert f"{root}/x/pids.max" in str(e.value) and "'7'" in str(e.value)
    assert "does not exist" in str(e.value)


def test_v2_stats_from_files(v2tree):
    root, layout = v2tree
    fs = TreeFS()
    c = cg.open_cgroup("/s", "s", layout=layout, fs=fs)
    c.create()
    d = f"{root}/s"
    put(f"{d}/cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\nnr_periods 7\n"
        "nr_throttled 3\nthrottled_usec 42\n")
    put(f"{d}/memory.current", "4096\n")
    put(f"{d}/memory.max", "max\n")
    put(f"{d}/memory.swap.current", "1024\n")
    put(f"{d}/memory.stat", "anon 100\nfile 2048\nkernel 64\n")
    put(f"{d}/memory.events", "low 0\nhigh 0\nmax 5\noom 1\noom_kill 2\n")
    put(f"{d}/pids.current", "3\n")
    put(f"{d}/pids.max", "10\n")
    put(f"{d}/io.stat", "254:0 rbytes=4096 wbytes=8192 rios=1 wios=2 dbytes=0 dios=0\n")
    s = c.stats()
    cpu = s["cpu_stats"]
    assert cpu["cpu_usage"]["total_usage"] == 1_500_000
    assert cpu["cpu_usage"]["usage_in_usermode"] == 1_000_000
    assert cpu["throttling_data"] == {"periods": 7, "throttled_periods": 3,
                                      "throttled_time": 42_000}
    mem = s["memory_stats"]
    assert mem["cache"] == 2048 and mem["usage"]["usage"] == 4096
    assert mem["usage"]["limit"] == 2**64 - 1 and mem["usage"]["failcnt"] == 5
    assert mem["swap_usage"]["usage"] == 4096 + 1024
    assert s["pids_stats"] == {"current": 3, "limit": 10}
    assert {"major": 254, "minor": 0, "op": "Write", "value": 8192} in \
        s["blkio_stats"]["io_service_bytes_recursive"]
    assert {"major": 254, "minor": 0, "op": "Read", "value": 1} in \
        s["blkio_stats"]["io_serviced_recursive"]
    assert c.oom_kills() == 2
    from google.protobuf import json_format

    from agent.protos import agent_pb2
    msg = json_format.ParseDict(s, agent_pb2.CgroupStats())  # the agent API's shape
    assert msg.memory_stats.usage.limit == 2**64 - 1 and msg.memory_stats.stats["file"] == 2048


def test_v2_freeze_and_kill_fallback(v2tree):
    root, layout = v2tree
    fs = TreeFS()
    c = cg.open_cgroup("/f", "f", layout=layout, fs=fs)
    c.create()
    d = f"{root}/f"
    put(f"{d}/cgroup.freeze", "0\n")
    put(f"{d}/cgroup.events", "populated 1\nfrozen 1\n")  # the kernel would set this
    c.freeze()
    assert read(f"{d}/cgroup.freeze") == "1" and c.frozen()
    put(f"{d}/cgroup.events", "populated 1\nfrozen 0\n")
    c.thaw()
    assert read(f"{d}/cgroup.freeze") == "0" and not c.frozen()
    # without cgroup.kill (or a freezer) every process, children cgroups included, is signalled
    os.unlink(f"{d}/cgroup.freeze")
    put(f"{d}/cgroup.procs", "10\n11\n")
    put(f"{d}/sub/cgroup.procs", "12\n")
    assert c.pids() == [10, 11, 12]
    c.kill(signal.SIGKILL)
    assert sorted(fs.killed) == [(10, 9), (11, 9), (12, 9)]
    put(f"{d}/cgroup.kill", "")
    fs.killed.clear()
    c.kill(signal.SIGKILL)
    assert fs.killed == [] and read(f"{d}/cgroup.kill") == "1"


# -- a fake v1 tree ---------------------------------------------------------------------------


def test_v1_create_fills_cpuset_and_apply(v1tree):
    base, layout = v1tree
    fs = TreeFS()
    c = cg.open_cgroup("/a/b", "b", layout=layout, fs=fs)
    c.create()
    for ctl in layout.v1:
        assert os.path.isdir(f"{base}/{ctl}/a/b")
    assert os.path.isdir(f"{base}/unified/a/b")
    assert read(f"{base}/cpuset/a/cpuset.cpus") == "0-3"
    assert read(f"{base}/cpuset/a/b/cpuset.mems") == "0"
    c.apply({"cpu": {"shares": 512, "quota": 20000, "period": 50000}, "pids": {"limit": 9},
             "devices": [{"allow": False, "access": "rwm"}]})
    assert read(f"{base}/cpu/a/b/cpu.shares") == "512"
    assert read(f"{base}/cpu/a/b/cpu.cfs_period_us") == "50000"
    assert read(f"{base}/cpu/a/b/cpu.cfs_quota_us") == "20000"
    assert read(f"{base}/pids/a/b/pids.max") == "9"
    dev_writes = [v for p, v in fs.writes if p.startswith(f"{base}/devices/")]
    assert dev_writes[0] == "a" and "c 1:3 rwm" in dev_writes
    c.add_pid(77)
    for ctl in layout.v1:
        assert read(f"{base}/{ctl}/a/b/cgroup.procs") == "77"
    assert read(f"{base}/unified/a/b/cgroup.procs") == "77"
    c.destroy()
    for ctl in layout.v1:
        assert not os.path.exists(f"{base}/{ctl}/a/b")


@pytest.mark.parametrize("current, limit, swap, first", [
    (100 << 20, 200 << 20, 300 << 20, "memsw"),  # raising: memsw must grow first
    (400 << 20, 200 << 20, 300 << 20, "limit"),  # lowering: limit must shrink first
    (100 << 20, 200 << 20, -1, "memsw"),
    (100 << 20, -1, None, "memsw"),  # unlimited memory makes memsw unlimited too
])
def test_v1_memory_and_swap_order(v1tree, current, limit, swap, first):
    base, layout = v1tree
    fs = TreeFS()
    c = cg.open_cgroup("/m", "m", layout=layout, fs=fs)
    c.create()
    d = os.path.normpath(f"{base}/memory/m")
    put(f"{d}/memory.limit_in_bytes", f"{current}\n")
    put(f"{d}/memory.memsw.limit_in_bytes", f"{current}\n")
    fs.writes.clear()
    c.apply({"memory": {"limit": limit, "swap": swap}})
    names = [os.path.basename(p) for p, _ in fs.writes]
    expect = ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
    if first == "limit":
        expect.reverse()
    assert names == expect
    assert read(f"{d}/memory.memsw.limit_in_bytes") == str(swap if swap else -1)


def test_v1_memory_swap_without_memsw_file(v1tree):
    base, layout = v1tree
    c = cg.open_cgroup("/m", "m", layout=layout, fs=TreeFS())
    c.create()
    with pytest.raises(CgroupError, match="memsw.limit_in_bytes does not exist"):
        c.apply({"memory": {"limit": 1 << 20, "swap": 2 << 20}})


def test_v1_stats_from_files(v1tree):
    base, layout = v1tree
    c = cg.open_cgroup("/s", "s", layout=layout, fs=TreeFS())
    c.create()
    put(f"{base}/cpuacct/s/cpuacct.usage", "5000\n")
    put(f"{base}/cpuacct/s/cpuacct.usage_percpu", "3000 2000 \n")
    put(f"{base}/cpuacct/s/cpuacct.stat", "user 3\nsystem 1\n")
    put(f"{base}/cpu/s/cpu.stat", "nr_periods 4\nnr_throttled 2\nthrottled_time 999\n")
    m = os.path.normpath(f"{base}/memory/s")
    put(f"{m}/memory.usage_in_bytes", "8192\n")
    put(f"{m}/memory.limit_in_bytes", "9223372036854771712\n")
    put(f"{m}/memory.failcnt", "6\n")
    put(f"{m}/memory.stat", "cache 111\ntotal_cache 222\nrss 5\n")
    put(f"{m}/memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 4\n")
    put(f"{base}/blkio/s/blkio.throttle.io_service_bytes_recursive",
        "254:0 Read 100\n254:0 Write 200\nTotal 300\n")
    put(f"{base}/pids/s/pids.current", "2\n")
    put(f"{base}/pids/s/pids.max", "max\n")
    s = c.stats()
    tick = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    assert s["cpu_stats"]["cpu_usage"] == {"total_usage": 5000, "percpu_usage": [3000, 2000],
                                           "usage_in_kernelmode": tick,
                                           "usage_in_usermode": 3 * tick}
    assert s["cpu_stats"]["throttling_data"]["throttled_time"] == 999
    assert s["memory_stats"]["cache"] == 222
    assert s["memory_stats"]["usage"]["usage"] == 8192
    assert s["memory_stats"]["usage"]["failcnt"] == 6
    assert s["blkio_stats"]["io_service_bytes_recursive"] == [
        {"major": 254, "minor": 0, "op": "Read", "value": 100},
        {"major": 254, "minor": 0, "op": "Write", "value": 200}]
    assert s["pids_stats"] == {"current": 2, "limit": 0}
    assert c.oom_kills() == 4


def test_v1_freezer_state(v1tree):
    base, layout = v1tree
    c = cg.open_cgroup("/z", "z", layout=layout, fs=TreeFS())
    c.create()
    c.freeze()
    assert read(f"{base}/freezer/z/freezer.state") == "FROZEN" and c.frozen()
    c.thaw()
    assert read(f"{base}/freezer/z/freezer.state") == "THAWED"


def test_legacy_refuses_unified_and_missing_controller(tmp_path):
    layout = Layout(v1={"memory": Mount(str(tmp_path / "memory"))}, own={"memory": "/"})
    os.makedirs(tmp_path / "memory")
    c = cg.open_cgroup("/l", "l", layout=layout, fs=TreeFS())
    c.create()
    with pytest.raises(CgroupError, match="no cgroup2 hierarchy"):
        c.apply({"unified": {"memory.high": "1"}})
    with pytest.raises(CgroupError, match="pids controller is not mounted"):
        c.apply({"pids": {"limit": 3}})


# -- cgroup2 device filter program ------------------------------------------------------------


def run_bpf(prog: bytes, dev_type: int, access: int, major: int, minor: int) -> int:
    """Interpret the few eBPF instructions device_program emits, on one access request."""
    ctx = {0: (access << 16) | dev_type, 4: major, 8: minor}
    regs = [0] * 11
    pc = 0
    insns = [prog[i:i + 8] for i in range(0, len(prog), 8)]
    m64 = (1 << 64) - 1
    for _ in range(10000):
        code, regs_b = insns[pc][0], insns[pc][1]
        dst, src = regs_b & 0xF, regs_b >> 4
        off = int.from_bytes(insns[pc][2:4], "little", signed=True)
        imm = int.from_bytes(insns[pc][4:8], "little", signed=True)
        pc += 1
        if code == 0x61:
            assert src == 1
            regs[dst] = ctx[off]
        elif code == 0x57:
            regs[dst] &= imm & m64
        elif code == 0x77:
            regs[dst] >>= imm
        elif code == 0xB7:
            regs[dst] = imm & m64
        elif code == 0xBF:
            regs[dst] = regs[src]
        elif code == 0x55:
            if regs[dst] != imm & m64:
                pc += off
        elif code == 0x95:
            return regs[0]
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")
        assert 0 <= pc < len(insns), "jump out of the program"
    raise AssertionError("no exit")


CHR, BLK, M, R, W = 2, 1, 1, 2, 4


def test_device_program_default_rules():
    prog = cg.device_program([{"allow": False, "access": "rwm"}] + cg.DEFAULT_ALLOWED_DEVICES)
    assert run_bpf(prog, CHR, R, 1, 3) == 1  # /dev/null
    assert run_bpf(prog, CHR, W, 136, 7) == 1  # /dev/pts/7
    assert run_bpf(prog, CHR, R, 1, 11) == 0  # /dev/kmsg
    assert run_bpf(prog, BLK, R, 254, 0) == 0  # a disk
    assert run_bpf(prog, BLK, M, 254, 0) == 1  # mknod of anything is allowed
    assert run_bpf(prog, CHR, M, 99, 99) == 1


def test_device_program_last_rule_wins_and_access_subsets():
    prog = cg.device_program([
        {"allow": True, "type": "c", "major": 10, "minor": None, "access": "rwm"},
        {"allow": False, "type": "c", "major": 10, "minor": 229, "access": "w"},
        {"allow": True, "type": "b", "major": 8, "minor": 0, "access": "r"},
    ])
    assert run_bpf(prog, CHR, R, 10, 200) == 1
    assert run_bpf(prog, CHR, R, 10, 229) == 1  # only writing was denied again
    assert run_bpf(prog, CHR, W, 10, 229) == 0
    assert run_bpf(prog, BLK, R, 8, 0) == 1
    assert run_bpf(prog, BLK, W, 8, 0) == 0  # asks for more than the rule grants
    assert run_bpf(prog, CHR, R, 11, 0) == 0  # nothing matches: deny


def test_device_program_catch_all_allow_has_no_unreachable_tail():
    prog = cg.device_program([{"allow": False, "type": "c", "major": 1, "minor": 3},
                              {"allow": True, "access": "rwm"}])
    assert run_bpf(prog, CHR, R, 1, 3) == 1  # the later allow-all overrides
    assert len(prog) == 8 * (6 + 2)  # header, one unconditional verdict, no default
    with pytest.raises(CgroupError, match="type 'x'"):
        cg.device_program([{"allow": True, "type": "x"}])


def test_hybrid_routes_only_offered_controllers_to_cgroup2(v1tree):
    base, layout = v1tree
    put(f"{base}/unified/cgroup.controllers", "hugetlb\n")
    put(f"{base}/unified/cgroup.subtree_control", "")
    fs = TreeFS()
    c = cg.open_cgroup("/h", "h", layout=layout, fs=fs)
    c.create()
    c.apply({"hugepageLimits": [{"pageSize": "2MB", "limit": 2 << 20}]})
    assert read(f"{base}/unified/h/hugetlb.2MB.max") == str(2 << 20)
    assert read(f"{base}/unified/cgroup.subtree_control") == "+hugetlb"
    with pytest.raises(CgroupError, match="net_cls controller is not mounted"):
        c.apply({"network": {"classID": 255}})
