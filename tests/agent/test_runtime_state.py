"""UpdateContainer, PauseContainer, ResumeContainer: init asks the OCI runtime (`update`,
`pause`, `resume`). Run with our launcher (the default, through the warm launcher) and with
runc, so the agent's side of the RPCs and both runtimes' verbs are exercised."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import client as C  # noqa: E402
from conftest import Agent, _need_root, spec  # noqa: E402
from test_lifecycle import run  # noqa: E402

from agent.protos import agent_pb2, oci_pb2  # noqa: E402
from agent.ttrpc import Code, TTRPCError  # noqa: E402


@pytest.fixture(params=["oci-launcher", "runc"])
def runc_agent(request):
    _need_root()
    if request.param == "runc" and shutil.which("runc") is None:
        pytest.skip("runc is not installed")
    tmp = Path(tempfile.mkdtemp(prefix="sa-rt-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    a = Agent(tmp, runtime=request.param)
    a.start()
    yield a
    a.stop()
    subprocess.run(["umount", "-R", "-l", str(tmp / "run")], capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


def _frozen(cid: str) -> bool | None:
    """The container cgroup's freezer state, v1 or v2, as the kernel reports it."""
    v1 = f"/sys/fs/cgroup/freezer/sandbox-agent/{cid}/freezer.state"
    if os.path.exists(v1):
        return open(v1).read().strip() == "FROZEN"
    for root in ("/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        v2 = f"{root}/sandbox-agent/{cid}/cgroup.events"
        if os.path.exists(v2):
            return "frozen 1" in open(v2).read()
    return None


def test_pause_resume_update(runc_agent, rootfs):
    async def body(c):
        await C.create(c, "p1", spec(rootfs, ["sh", "-c", "while :; do date +%s%N > /tmp/t; sleep 0.05; done"],
                                     memory_limit=64 << 20))
        await C.start(c, "p1")
        await c.call(C.SVC, "PauseContainer", agent_pb2.PauseContainerRequest(container_id="p1"), C.Empty)
        with pytest.raises(TTRPCError) as ei:
            await c.call(C.SVC, "PauseContainer", agent_pb2.PauseContainerRequest(container_id="p1"), C.Empty)
        assert ei.value.code == Code.FAILED_PRECONDITION
        assert _frozen("p1") is True
        with pytest.raises(TTRPCError) as ei:  # nothing runs in a paused container
            await C.exec_(c, "p1", "r1", ["cat", "/tmp/t"])
        assert ei.value.code == Code.FAILED_PRECONDITION
        await c.call(C.SVC, "ResumeContainer", agent_pb2.ResumeContainerRequest(container_id="p1"), C.Empty)
        assert _frozen("p1") is False
        await C.exec_(c, "p1", "r1", ["cat", "/tmp/t"])
        assert await C.wait(c, "p1", "r1") == 0
        res = oci_pb2.LinuxResources(Memory=oci_pb2.LinuxMemory(Limit=96 << 20, Swap=96 << 20))
        await c.call(C.SVC, "UpdateContainer", agent_pb2.UpdateContainerRequest(container_id="p1", resources=res), C.Empty)
        st = await C.stats(c, "p1")
        assert st.cgroup_stats.memory_stats.usage.limit == 96 << 20
        with pytest.raises(TTRPCError) as ei:
            await c.call(C.SVC, "UpdateContainer", agent_pb2.UpdateContainerRequest(container_id="p1"), C.Empty)
        assert ei.value.code == Code.INVALID_ARGUMENT
        with pytest.raises(TTRPCError) as ei:
            await c.call(C.SVC, "SetGuestDateTime", agent_pb2.SetGuestDateTimeRequest(Sec=-5), C.Empty)
        assert ei.value.code == Code.INVALID_ARGUMENT
        await C.remove(c, "p1")

    run(runc_agent, body)
