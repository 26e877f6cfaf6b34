"""How the container's init gets into its cgroups on the fast path: created in the cgroup2
directory by clone3(CLONE_INTO_CGROUP), joining each v1 hierarchy itself through ``tasks``; and
the fallback (the launcher writes cgroup.procs) when clone3 is refused."""
from __future__ import annotations

import os

import pytest

from agent.launcher import cgroups
from agent.launcher import syscalls as S
from agent.launcher.container import Launcher

from .conftest import needs_busybox, needs_root


def _expected_lines(cid: str) -> set[str]:
    """/proc/PID/cgroup lines (without the hierarchy number) of a process in the container's
    cgroup, for every hierarchy the launcher manages."""
    cg = cgroups.open_cgroup(None, cid)
    out = set()
    for ctl, path in cg.cgroup_paths.items():
        if ctl == "":
            out.add(f":{path}")
        else:
            mount = cg.layout.v1[ctl]
            out.add(f"{','.join(sorted(mount.controllers))}:{path}"
                    if hasattr(mount, "controllers") else f"{ctl}:{path}")
    return out


def _in_all(cgroup_text: str, cid: str) -> list[str]:
    """Hierarchies (other than named ones) where the process is NOT in the container's
    cgroup: an empty list means it is in all of them."""
    missing = []
    for line in cgroup_text.splitlines():
        _hid, ctls, path = line.split(":", 2)
        if ctls.startswith("name="):
            continue
        if not path.rstrip("/").endswith(f"/{cid}"):
            missing.append(line)
    return missing


@needs_root
@needs_busybox
def test_run_init_is_in_every_hierarchy(runtime, make_bundle):
    b = make_bundle(["cat", "/proc/self/cgroup"])
    b.write()
    cid = runtime.new_id()
    p = runtime.cmd("run", "--bundle", b.path, cid)
    assert p.stdout.strip(), p.stderr
    assert _in_all(p.stdout, cid) == [], p.stdout


@needs_root
@needs_busybox
def test_pids_limit_holds_from_the_first_instruction(runtime, make_bundle):
    """The limits apply to the container's program from its start: a pids.max of 1 leaves
    no room for a child."""
    b = make_bundle(["sh", "-c", "true & wait; echo forked"])
    b.config["linux"]["resources"] = {"pids": {"limit": 1}}
    p = runtime.run(b, check=False)
    assert "forked" not in p.stdout and "can't fork" in p.stderr, (p.stdout, p.stderr)


class _Clone3Refused(S.Linux):
    """clone3 made to fail for real, after the kernel has allocated the child's pid: a
    directory fd that is not a cgroup2 one. That also kills the new pid namespace for any
    later fork, which the fallback must survive."""

    def clone_into_cgroup(self, cgroup_fd: int, ns_flags: int = 0) -> int:
        fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
        try:
            return super().clone_into_cgroup(fd, ns_flags)
        finally:
            os.close(fd)


@needs_root
@needs_busybox
def test_refused_clone3_falls_back_to_launcher_attach(make_bundle, tmp_path):
    if cgroups.detect_layout().unified is None:
        pytest.skip("no cgroup2 hierarchy: clone3 into a cgroup is not used here")
    b = make_bundle(["sleep", "30"])
    b.write()
    L = Launcher(str(tmp_path / "state"), sc=_Clone3Refused())
    cid = f"t-fallback-{os.getpid()}"
    pid = L.create(cid, b.path, fast_exec=True)
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            text = f.read()
        assert _in_all(text, cid) == [], text
        assert L.state(cid)["status"] == "created"
        L.start(cid)
        assert L.state(cid)["status"] == "running"
    finally:
        L.delete(cid, force=True)
    assert not os.path.exists(tmp_path / "state" / cid)


@needs_root
@needs_busybox
def test_run_with_refused_clone3_still_runs_in_its_cgroups(make_bundle, tmp_path):
    """`run` creates the init as its own child with one clone3 (namespaces and cgroup at
    once); when the kernel refuses, it starts over through C and a cgroup.procs write."""
    if cgroups.detect_layout().unified is None:
        pytest.skip("no cgroup2 hierarchy: clone3 into a cgroup is not used here")
    b = make_bundle(["sh", "-c", "cat /proc/self/cgroup > /tmp/cg; exit 5"])
    b.write()
    cid = f"t-runfb-{os.getpid()}"
    pid = os.fork()
    if pid == 0:  # Launcher.run makes its caller a subreaper: not the test process
        code = 99
        try:
            code = Launcher(str(tmp_path / "state"), sc=_Clone3Refused()).run(cid, b.path)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 5
    with open(os.path.join(b.rootfs, "tmp", "cg")) as f:
        text = f.read()
    assert _in_all(text, cid) == [], text
    assert os.listdir(tmp_path / "state") == []


@needs_root
def test_cgwarm_thread_moves_us_in_place_and_stops():
    """The warm-up thread (exec and the sealed create path) writes our pid into the cgroup we
    are already in, keeps doing so until stopped, and leaves our membership unchanged."""
    import time

    from agent.launcher import cgwarm
    path = cgwarm._own_procs_file()
    if path is None:
        pytest.skip("no writable cgroup.procs of our own")
    before = open("/proc/self/cgroup").read()
    n = len(os.listdir("/proc/self/task"))
    cgwarm.start()
    cgwarm.start()  # once per process
    try:
        assert len(os.listdir("/proc/self/task")) == n + 1
        time.sleep(0.05)
        with open(path) as f:
            assert str(os.getpid()) in f.read().split()
    finally:
        cgwarm.stop()
    end = time.monotonic() + 2
    while len(os.listdir("/proc/self/task")) > n and time.monotonic() < end:
        time.sleep(0.01)
    assert len(os.listdir("/proc/self/task")) == n
    assert open("/proc/self/cgroup").read() == before
