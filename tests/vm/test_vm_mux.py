"""agentctl vm up --mux: many ttRPC clients at once over the guest's single virtio-serial
channel, through agentctl.vmrelay."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from agent.protos import agent_pb2, health_pb2
from agent.ttrpc import open_client
from agentctl import vm
from agentctl.containers import DEFAULT_ENV, Empty, default_spec

SVC = "grpc.AgentService"
REPO = Path(__file__).resolve().parents[2]


def agentctl(*args, timeout=300):
    """The real command line, as a person would run it."""
    return subprocess.run([sys.executable, "-m", "agentctl", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


@pytest.fixture(scope="module")
def mux_vm(guest_dir, tmp_path_factory):
    state = tmp_path_factory.mktemp("vm-mux")
    p = agentctl("vm", "up", "--mux", "--state-dir", str(state), "--kernel",
                 str(guest_dir / "vmlinux"), "--initrd", str(guest_dir / "initrd.img"),
                 "--boot-timeout", "120")
    assert p.returncode == 0, p.stdout + p.stderr
    lines = dict(ln.split(": ", 1) for ln in p.stdout.splitlines() if ": " in ln)
    st = vm.load_state(state)
    try:
        assert lines["server-addr"] == st.server_addr
        yield st, state
    finally:
        vm.down(state, timeout=20)


def test_cli_status_and_check(mux_vm):
    st, state = mux_vm
    p = agentctl("vm", "status", "--state-dir", str(state))
    assert p.returncode == 0 and p.stdout.startswith("running\n")
    assert f"server-addr: {st.server_addr}" in p.stdout
    p = agentctl("--server-addr", st.server_addr, "check")
    assert (p.returncode, p.stdout) == (0, "SERVING\n"), p.stderr


async def _check(addr):
    async with open_client(addr) as c:
        r = await c.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                         health_pb2.HealthCheckResponse, timeout=30)
        return r.status


def test_clients_at_once_and_one_leaving_mid_call(mux_vm):
    st, state = mux_vm
    assert st.server_addr == f"unix://{state}/mux.sock" and st.relay_pid
    spec = default_spec("/opt/busybox-rootfs", ["sh", "-c", "for i in 1 2 3; do echo tick $i; "
                                                "sleep 1; done"], terminal=False, env=DEFAULT_ENV)

    async def go():
        results = {}
        async with open_client(st.server_addr) as a:
            await a.call(SVC, "CreateContainer", agent_pb2.CreateContainerRequest(
                container_id="ticker", OCI=spec), Empty, timeout=120)
            await a.call(SVC, "StartContainer", agent_pb2.StartContainerRequest(
                container_id="ticker"), Empty, timeout=120)

            # A client that leaves while its long-poll read is pending: its answer must not
            # reach anybody else.
            async def leaver():
                async with open_client(st.server_addr) as b:
                    with trio.move_on_after(0.3):
                        await b.call(SVC, "ReadStderr", agent_pb2.ReadStreamRequest(
                            container_id="ticker", len=100), agent_pb2.ReadStreamResponse,
                            timeout=60)

            async def reader():
                out = b""
                while True:
                    r = await a.call(SVC, "ReadStdout", agent_pb2.ReadStreamRequest(
                        container_id="ticker", len=65536), agent_pb2.ReadStreamResponse,
                        timeout=60)
                    if not r.data:
                        break
                    out += r.data
                results["out"] = out

            async def checker(i):
                results[f"check{i}"] = await _check(st.server_addr)

            async with trio.open_nursery() as n:
                n.start_soon(reader)
                n.start_soon(leaver)
                for i in range(4):
                    n.start_soon(checker, i)
            w = await a.call(SVC, "WaitProcess", agent_pb2.WaitProcessRequest(
                container_id="ticker"), agent_pb2.WaitProcessResponse, timeout=60)
            await a.call(SVC, "RemoveContainer", agent_pb2.RemoveContainerRequest(
                container_id="ticker", timeout=10), Empty, timeout=60)
            results["status"] = w.status
        results["after"] = await _check(st.server_addr)
        return results

    r = trio.run(go)
    assert r["out"] == b"tick 1\ntick 2\ntick 3\n"
    assert r["status"] == 0
    serving = health_pb2.HealthCheckResponse.SERVING
    assert [r[f"check{i}"] for i in range(4)] == [serving] * 4 and r["after"] == serving


def test_cli_down_stops_vm_and_relay(mux_vm):
    st, state = mux_vm
    p = agentctl("vm", "down", "--state-dir", str(state))
    assert (p.returncode, p.stdout) == (0, "powered off by the agent\n"), p.stderr
    assert not vm.pid_alive(st.pid) and not vm.pid_alive(st.relay_pid)
    assert not (state / "mux.sock").exists()
    assert agentctl("vm", "status", "--state-dir", str(state)).stdout == "absent\n"
