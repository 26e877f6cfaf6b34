"""Our ttRPC against containerd's Go implementation, both ways."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "ttrpc"))
import gopeer  # noqa: E402
from echo_service import SERVICE, EchoState, make_server  # noqa: E402

from agent.daemon.main import build_server  # noqa: E402
from agent.protos import health_pb2  # noqa: E402
from agent.ttrpc import Code, TTRPCError, open_client, serve_address  # noqa: E402
from agent.ttrpc.ttrpc_pb2 import KeyValue  # noqa: E402

pytestmark = pytest.mark.go


@pytest.fixture(scope="module")
def peer():
    try:
        return gopeer.build()
    except gopeer.GoUnavailable as exc:
        pytest.skip(str(exc))


def test_go_client_calls_our_server(peer, sock_path):
    """Check, Version, unknown RPCs, metadata, deadline, concurrency - Go client, our agent."""
    state = EchoState()
    server = build_server()
    # the echo service rides along so metadata and deadlines can be observed server-side
    echo = make_server(state)
    server.register_service(SERVICE, echo._services[SERVICE])

    async def main():
        with trio.fail_after(60):
            async with trio.open_nursery() as n:
                await n.start(serve_address, server, f"unix://{sock_path}")
                r = await trio.to_thread.run_sync(
                    lambda: subprocess.run([str(peer), "client", "-addr", sock_path],
                                           capture_output=True, text=True, timeout=50))
                n.cancel_scope.cancel()
        return r

    r = trio.run(main)
    assert r.returncode == 0, r.stderr
    results = {x["name"]: x for x in json.loads(r.stdout)}
    for name in ("check", "version", "unknown-method", "unknown-service", "metadata", "deadline", "concurrent"):
        assert results[name]["ok"], results[name]
    assert "0.1.0" in results["version"]["detail"]
    md = results["metadata"]["detail"].split("value=", 1)[1]
    assert json.loads(md) == {"x-go-key": ["v1", "v2"]}
    # the deadline reached our server and cancelled the handler there
    assert state.cancelled >= 1


def test_our_client_calls_go_server(peer, sock_path):
    proc = gopeer.start_server(peer, sock_path)
    try:
        async def main():
            with trio.fail_after(30):
                async with open_client(f"unix://{sock_path}") as c:
                    h = await c.call("grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse)
                    assert h.status == health_pb2.HealthCheckResponse.SERVING
                    v = await c.call("grpc.Health", "Version", health_pb2.CheckRequest(), health_pb2.VersionCheckResponse)
                    assert v.agent_version == "go-ttrpc-peer" and v.grpc_version == "0.0.1"
                    with pytest.raises(TTRPCError) as ei:
                        await c.call("grpc.Health", "Nope", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse)
                    assert ei.value.code == Code.UNIMPLEMENTED
                    with pytest.raises(TTRPCError) as ei:
                        await c.call(SERVICE, "Fail", KeyValue(), KeyValue)
                    assert ei.value.code == Code.NOT_FOUND and "go peer" in ei.value.message
                    r = await c.call(SERVICE, "Metadata", KeyValue(), KeyValue, metadata={"k1": ["a", "b"], "k2": "c"})
                    assert json.loads(r.value) == {"k1": ["a", "b"], "k2": ["c"]}
                    t0 = trio.current_time()
                    with pytest.raises(TTRPCError) as ei:
                        await c.call(SERVICE, "Sleep", KeyValue(), KeyValue, timeout=0.3)
                    assert ei.value.code == Code.DEADLINE_EXCEEDED
                    assert trio.current_time() - t0 < 3
                    out = []

                    async def one(i):
                        out.append((await c.call(SERVICE, "Echo", KeyValue(key=str(i)), KeyValue)).key)

                    async with trio.open_nursery() as n:
                        for i in range(64):
                            n.start_soon(one, i)
                    assert sorted(map(int, out)) == list(range(64))

        trio.run(main)
    finally:
        proc.terminate()
        proc.wait(10)
