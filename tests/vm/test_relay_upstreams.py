"""The relay in front of the guest channel takes any agent address as its upstream (a chardev
path, unix://, or vsock:// on hosts with vhost-vsock). Checked here against a real agent
server on a unix socket: this host has no vsock to a guest."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import trio

from agent.daemon.main import build_server
from agent.protos import health_pb2
from agent.ttrpc import open_client, serve_address

REPO = Path(__file__).resolve().parents[2]


def test_relay_upstream_given_as_an_address(tmp_path):
    up = tmp_path / "agent.sock"
    listen = tmp_path / "relay.sock"

    async def main():
        with trio.fail_after(30):
            async with trio.open_nursery() as n:
                await n.start(serve_address, build_server(), f"unix://{up}")
                relay = await trio.lowlevel.open_process(
                    [sys.executable, "-m", "agentctl.vmrelay", "--upstream", f"unix://{up}", "--listen", str(listen)],
                    cwd=REPO)
                try:
                    while not listen.exists():
                        await trio.sleep(0.05)
                    for _ in range(3):  # one client after another, and each gets its answers
                        async with open_client(f"unix://{listen}") as c:
                            r = await c.call("grpc.Health", "Check", health_pb2.CheckRequest(),
                                             health_pb2.HealthCheckResponse)
                            assert r.status == health_pb2.HealthCheckResponse.SERVING
                finally:
                    relay.terminate()
                    await relay.wait()
                n.cancel_scope.cancel()

    trio.run(main)
