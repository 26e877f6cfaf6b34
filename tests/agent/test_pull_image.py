"""PullImage inside the sandbox, then a container from that image, over ttRPC only:
a real registry on 127.0.0.1, the puller as init's confined helper job."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
import client as C  # noqa: E402
from conftest import spec  # noqa: E402
from test_lifecycle import run  # noqa: E402

from agent.protos import agent_pb2  # noqa: E402
from agent.ttrpc import Code, TTRPCError  # noqa: E402

_kit_path = Path(__file__).resolve().parents[1] / "puller" / "conftest.py"
_spec = importlib.util.spec_from_file_location("puller_test_kit", _kit_path)
kit = importlib.util.module_from_spec(_spec)
sys.modules["puller_test_kit"] = kit  # dataclasses look their module up there
_spec.loader.exec_module(kit)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    reg = kit.start_registry(tmp_path_factory.mktemp("reg"))
    try:
        root = kit.busybox_tree(tmp_path_factory.mktemp("img") / "rootfs")
        (root / "hello.txt").write_text("hello from the image\n")
        layer = kit.Layer(kit.tar_dir(root), "gzip")
        pushed = kit.Pusher(reg).image("demo/hello", "v1", [layer],
                                       config={"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["cat /hello.txt"],
                                               "Env": ["PATH=/bin", "GREETING=hi"], "WorkingDir": "/tmp"})
        yield reg, f"{reg.host}/demo/hello:v1", pushed
    finally:
        reg.stop()


def test_pull_image_then_run_it(agent, image):
    reg, ref, pushed = image

    async def body(c):
        req = agent_pb2.PullImageRequest(image=ref, container_id="img1", insecure_registries=[reg.host])
        r = await c.call(C.SVC, "PullImage", req, agent_pb2.PullImageResponse, timeout=120)
        assert r.manifest_digest == pushed.digest
        assert r.rootfs.startswith(str(agent.run_dir))
        cfg = json.loads(r.runtime_config_json)
        assert cfg["process"]["args"] == ["/bin/sh", "-c", "cat /hello.txt"]
        assert "GREETING=hi" in cfg["process"]["env"]
        ctr = spec(r.rootfs, cfg["process"]["args"])
        ctr["root"]["readonly"] = False
        await C.create(c, "img1", ctr)
        await C.start(c, "img1")
        assert await C.read_all(c, "img1") == b"hello from the image\n"
        assert await C.wait(c, "img1") == 0
        await C.remove(c, "img1")
        assert not os.path.ismount(r.rootfs)
        # pulling again shares the stored layers; a second container gets its own rootfs
        r2 = await c.call(C.SVC, "PullImage", agent_pb2.PullImageRequest(
            image=ref, container_id="img2", insecure_registries=[reg.host]), agent_pb2.PullImageResponse, timeout=120)
        assert r2.rootfs != r.rootfs and r2.manifest_digest == r.manifest_digest
        with pytest.raises(TTRPCError) as ei:
            await c.call(C.SVC, "PullImage", agent_pb2.PullImageRequest(
                image=ref, container_id="img2", insecure_registries=[reg.host]), agent_pb2.PullImageResponse)
        assert ei.value.code == Code.ALREADY_EXISTS

    run(agent, body, timeout=240)


def test_pull_errors_are_clear(agent, image):
    reg, ref, _ = image

    async def body(c):
        for bad in ("", "-rf", "has space:1", "a" * 600, "reg/x@sha256:zz", "x//y", "host:5000/Repo"):
            with pytest.raises(TTRPCError) as ei:
                await c.call(C.SVC, "PullImage", agent_pb2.PullImageRequest(image=bad), agent_pb2.PullImageResponse)
            assert ei.value.code == Code.INVALID_ARGUMENT, (bad, ei.value)
        with pytest.raises(TTRPCError) as ei:
            await c.call(C.SVC, "PullImage", agent_pb2.PullImageRequest(
                image=f"{reg.host}/demo/nope:v1", insecure_registries=[reg.host]), agent_pb2.PullImageResponse, timeout=60)
        assert "nope" in ei.value.message
        # nothing listens there: refused at once, not after minutes of retries
        import socket
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{s.getsockname()[1]}"
        s.close()
        t0 = trio.current_time()
        with pytest.raises(TTRPCError):
            await c.call(C.SVC, "PullImage", agent_pb2.PullImageRequest(
                image=f"{dead}/x/y:1", insecure_registries=[dead]), agent_pb2.PullImageResponse, timeout=120)
        assert trio.current_time() - t0 < 60

    run(agent, body)


def test_lazy_pull_image_then_run_it(agent, image):
    """With lazy metadata in the registry (python -m puller index), PullImage(lazy) fetches only
    the metadata and the container runs from the FUSE-served rootfs."""
    import subprocess

    reg, ref, pushed = image
    out = subprocess.run([sys.executable, "-m", "puller", "index", ref, "--plain-http", reg.host],
                         capture_output=True, text=True, timeout=120, cwd=Path(__file__).parents[2])
    assert out.returncode == 0, out.stderr

    async def body(c):
        req = agent_pb2.PullImageRequest(image=ref, container_id="lz", insecure_registries=[reg.host], lazy=True)
        r = await c.call(C.SVC, "PullImage", req, agent_pb2.PullImageResponse, timeout=120)
        assert r.lazy and r.manifest_digest == pushed.digest
        ctr = spec(r.rootfs, json.loads(r.runtime_config_json)["process"]["args"])
        ctr["root"]["readonly"] = False
        await C.create(c, "lz", ctr)
        await C.start(c, "lz")
        assert await C.read_all(c, "lz") == b"hello from the image\n"
        assert await C.wait(c, "lz") == 0
        await C.remove(c, "lz")
        assert not os.path.ismount(r.rootfs)

    run(agent, body, timeout=240)


def test_image_guest_pull_storage(agent, image):
    """Kata's image_guest_pull storage driver: CreateContainer names the image, the agent pulls
    it inside the sandbox and runs the container from it."""
    reg, ref, _ = image

    async def body(c):
        ctr = spec("/run/kata-containers/igp/rootfs", ["/bin/sh", "-c", "cat /hello.txt"])
        ctr["root"]["readonly"] = False
        st = agent_pb2.Storage(driver="image_guest_pull", source=ref, mount_point="/run/kata-containers/igp/rootfs",
                               options=[f"insecure={reg.host}"])
        await C.create(c, "igp", ctr, storages=[st])
        await C.start(c, "igp")
        assert await C.read_all(c, "igp") == b"hello from the image\n"
        assert await C.wait(c, "igp") == 0
        await C.remove(c, "igp")

    run(agent, body, timeout=240)


def test_image_jobs_run_in_the_warm_puller(agent, image):
    """Init's warm puller starts at the first image request (a sandbox that pulls nothing
    does not pay its memory); from then on PullImage's jobs (pull, snapshot) and
    RemoveContainer's unsnapshot are forks of it instead of new interpreters, with the same
    answers and errors."""
    import time
    reg, ref, pushed = image
    assert "warm puller started" not in agent.logs()

    def warm(command):
        return [r for r in map(json.loads, filter(None, agent.logs().splitlines()))
                if r.get("msg") == "command in a warm worker"
                and r.get("fields", {}).get("command") == command]

    async def pull_and_run(c, cid):
        req = agent_pb2.PullImageRequest(image=ref, container_id=cid, insecure_registries=[reg.host])
        r = await c.call(C.SVC, "PullImage", req, agent_pb2.PullImageResponse, timeout=120)
        assert r.manifest_digest == pushed.digest
        ctr = spec(r.rootfs, json.loads(r.runtime_config_json)["process"]["args"])
        ctr["root"]["readonly"] = False
        await C.create(c, cid, ctr)
        await C.start(c, cid)
        assert await C.read_all(c, cid) == b"hello from the image\n"
        assert await C.wait(c, cid) == 0
        await C.remove(c, cid)
        assert not os.path.ismount(r.rootfs)

    run(agent, lambda c: pull_and_run(c, "cold"), timeout=240)
    end = time.monotonic() + 60
    while "warm puller ready" not in agent.logs():
        assert time.monotonic() < end, agent.logs()[-3000:]
        time.sleep(0.1)
    pulls = len(warm("pull"))

    async def body(c):
        await pull_and_run(c, "wp")
        with pytest.raises(TTRPCError) as e:  # the job's own message, through the worker
            await c.call(C.SVC, "PullImage", agent_pb2.PullImageRequest(
                image=f"{reg.host}/demo/nosuch:v1", insecure_registries=[reg.host]),
                agent_pb2.PullImageResponse, timeout=120)
        assert "pull of" in e.value.message and "nosuch" in e.value.message, e.value.message

    run(agent, body, timeout=240)
    assert len(warm("pull")) == pulls + 2 and warm("snapshot") and warm("unsnapshot"), \
        agent.logs()[-3000:]
