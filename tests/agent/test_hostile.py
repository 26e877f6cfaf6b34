"""Hostile or malformed requests to the agent: clear errors, nothing written where it does
not belong, and the agent keeps serving."""

from __future__ import annotations

import os
import stat
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
import client as C  # noqa: E402
from conftest import spec  # noqa: E402
from test_lifecycle import run  # noqa: E402

from agent.protos import agent_pb2, health_pb2  # noqa: E402
from agent.ttrpc import Code, TTRPCError  # noqa: E402


def test_copy_file_stays_in_the_run_dir(agent, tmp_path):
    target = tmp_path / "outside"
    daemon_dir = agent.run_dir / "daemon"

    async def body(c):
        # a good copy, in two chunks, lands with its mode
        path = str(daemon_dir / "shared" / "f.txt")
        data = b"0123456789"
        for off in (0, 5):
            await c.call(C.SVC, "CopyFile", agent_pb2.CopyFileRequest(
                path=path, file_size=len(data), file_mode=stat.S_IFREG | 0o640, dir_mode=0o750,
                offset=off, data=data[off:off + 5]), C.Empty)
        assert open(path, "rb").read() == data
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
        # outside the run dir, by absolute path, by .., and through a symlink planted inside
        os.symlink(str(tmp_path), daemon_dir / "link")
        for bad in (str(target), str(daemon_dir / ".." / ".." / "x"), str(daemon_dir / "link" / "outside"),
                    "relative/path"):
            with pytest.raises(TTRPCError) as ei:
                await c.call(C.SVC, "CopyFile", agent_pb2.CopyFileRequest(
                    path=bad, file_size=1, file_mode=stat.S_IFREG | 0o644, data=b"x"), C.Empty)
            assert ei.value.code in (Code.PERMISSION_DENIED, Code.INVALID_ARGUMENT), bad
        # a chunk past the announced size
        with pytest.raises(TTRPCError) as ei:
            await c.call(C.SVC, "CopyFile", agent_pb2.CopyFileRequest(
                path=path, file_size=2, file_mode=stat.S_IFREG | 0o644, data=b"toolong"), C.Empty)
        assert ei.value.code == Code.INVALID_ARGUMENT
        r = await c.call("grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse)
        assert r.status == health_pb2.HealthCheckResponse.SERVING

    run(agent, body)
    assert not target.exists()
    assert not (agent.run_dir.parent / "x").exists()


def test_bad_container_requests(agent, rootfs):
    async def body(c):
        cases = [
            agent_pb2.CreateContainerRequest(container_id="noSpec"),
            agent_pb2.CreateContainerRequest(container_id="a/b"),
            agent_pb2.CreateContainerRequest(container_id="x" * 300),
        ]
        for req in cases:
            with pytest.raises(TTRPCError) as ei:
                await c.call(C.SVC, "CreateContainer", req, C.Empty)
            assert ei.value.code == Code.INVALID_ARGUMENT, req.container_id
        cfg = spec(rootfs, ["true"])
        bad_storage = agent_pb2.Storage(driver="nfs", source="1.2.3.4:/x", mount_point="/mnt")
        with pytest.raises(TTRPCError) as ei:
            await C.create(c, "st", cfg, storages=[bad_storage])
        assert ei.value.code == Code.INVALID_ARGUMENT and "nfs" in ei.value.message
        # a bind storage from outside the sandbox is refused by init
        escape = agent_pb2.Storage(driver="bind", source="/etc", mount_point=str(agent.run_dir / "daemon" / "m"))
        with pytest.raises(TTRPCError):
            await C.create(c, "st2", cfg, storages=[escape])
        for sig in (0, 65, 1000):
            with pytest.raises(TTRPCError) as ei:
                await C.signal(c, "nope", sig)
            assert ei.value.code in (Code.INVALID_ARGUMENT, Code.NOT_FOUND)
        # nothing half-created is left
        with pytest.raises(TTRPCError) as ei:
            await C.start(c, "st")
        assert ei.value.code == Code.NOT_FOUND

    run(agent, body)
