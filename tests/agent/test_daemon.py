"""The comms daemon: confined, and restartable without losing containers."""

from __future__ import annotations

import os
import signal
import sys
import time

import trio

sys.path.insert(0, os.path.dirname(__file__))
import client as C  # noqa: E402
from conftest import spec  # noqa: E402
from test_lifecycle import run  # noqa: E402

from agent.protos import health_pb2  # noqa: E402
from agent.ttrpc import open_client  # noqa: E402


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.rstrip("\n").split(":\t", 1) for line in f if ":\t" in line)


def test_daemon_is_confined(agent):
    st = _status(agent.pids()["daemon"])
    for key in ("CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"):
        assert int(st[key], 16) == 0, (key, st[key])
    assert st["NoNewPrivs"].strip() == "1"
    assert st["Seccomp"].strip() == "2"
    uid = st["Uid"].split()
    assert uid[0] != "0" and len(set(uid)) == 1, uid


def test_kill_9_daemon_with_10_containers(agent, rootfs):
    n = 10

    async def setup(c):
        for i in range(n):
            # each exits with its own code when told to (a file appears in its /tmp), and writes
            # to its stdout meanwhile: with no daemon, that output must wait, not kill it
            await C.create(c, f"k{i}", spec(rootfs, ["sh", "-c", f"n=0; while [ ! -e /tmp/go ]; do echo tick$n; n=$((n+1)); sleep 0.05; done; echo done{i}; exit {i + 3}"]))
            await C.start(c, f"k{i}")

    run(agent, setup)
    old = agent.pids()["daemon"]
    os.kill(old, signal.SIGKILL)
    t0 = time.monotonic()
    while True:
        try:
            new = agent.pids()["daemon"]
            if new != old:
                break
        except StopIteration:
            pass
        assert time.monotonic() - t0 < 20, "daemon was not restarted"
        time.sleep(0.05)

    async def after(c):
        with trio.fail_after(30):
            while True:
                try:
                    await c.call("grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse)
                    break
                except Exception:  # noqa: BLE001 - until the new daemon serves
                    await trio.sleep(0.1)
        # half of them finish while nobody waits; then the rest
        for i in range(n):
            await C.exec_(c, f"k{i}", "go", ["touch", "/tmp/go"])
        for i in range(n):
            assert await C.wait(c, f"k{i}") == i + 3
            # the new daemon got the stdout pipe back from init: output from before, during and
            # after the restart, in order, ending with the last line
            out = (await C.read_all(c, f"k{i}")).decode().split()
            assert out[-1] == f"done{i}" and out[0].startswith("tick")
            await C.remove(c, f"k{i}")

    # a fresh connection: the old one died with the old daemon
    async def main():
        for _ in range(100):
            try:
                async with open_client(agent.addr) as c:
                    await after(c)
                return
            except OSError:
                await trio.sleep(0.1)
    try:
        trio.run(main)
    except BaseException:
        print(agent.logs()[-6000:])
        raise
