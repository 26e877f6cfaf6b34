"""Network RPCs against a real veth whose guest end is in the agent's network namespace."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
from conftest import Agent, _need_root  # noqa: E402

from agent.protos import agent_pb2, types_pb2  # noqa: E402
from agent.ttrpc import Code, TTRPCError, open_client  # noqa: E402
from google.protobuf.empty_pb2 import Empty  # noqa: E402

SVC = "grpc.AgentService"


def sh(*args, check=True):
    return subprocess.run(list(args), capture_output=True, text=True, check=check)


@pytest.fixture
def netns_agent():
    _need_root()
    ns = f"sa-test-{os.getpid()}"
    sh("ip", "netns", "add", ns)
    tmp = Path(tempfile.mkdtemp(prefix="sa-net-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    host_if, guest_if = f"sah{os.getpid() % 10000}", f"sag{os.getpid() % 10000}"
    a = Agent(tmp, netns=ns)
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", guest_if)
        sh("ip", "link", "set", guest_if, "netns", ns)
        sh("ip", "addr", "add", "10.231.0.1/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        mac = json.loads(sh("ip", "-n", ns, "-j", "link", "show", guest_if).stdout)[0]["address"]
        a.start()
        yield a, ns, mac, host_if
    finally:
        a.stop()
        sh("ip", "link", "del", host_if, check=False)
        sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(tmp, ignore_errors=True)


def test_interfaces_routes_neighbors(netns_agent):
    agent, ns, mac, host_if = netns_agent

    async def body():
        with trio.fail_after(60):
            async with open_client(agent.addr) as c:
                iface = types_pb2.Interface(device="", name="eth0", hwAddr=mac, mtu=1400,
                                            IPAddresses=[types_pb2.IPAddress(family=types_pb2.v4, address="10.231.0.2", mask="24")])
                got = await c.call(SVC, "UpdateInterface", agent_pb2.UpdateInterfaceRequest(interface=iface), types_pb2.Interface)
                assert got.name == "eth0" and got.mtu == 1400
                assert any(a.address == "10.231.0.2" for a in got.IPAddresses)
                routes = agent_pb2.Routes(Routes=[
                    types_pb2.Route(dest="default", gateway="10.231.0.1", device="eth0", family=types_pb2.v4)])
                got = await c.call(SVC, "UpdateRoutes", agent_pb2.UpdateRoutesRequest(routes=routes), agent_pb2.Routes)
                assert any(r.gateway == "10.231.0.1" for r in got.Routes)
                neigh = agent_pb2.ARPNeighbors(ARPNeighbors=[types_pb2.ARPNeighbor(
                    toIPAddress=types_pb2.IPAddress(family=types_pb2.v4, address="10.231.0.77"),
                    device="eth0", lladdr="02:00:00:00:00:77", state=0x80)])
                await c.call(SVC, "AddARPNeighbors", agent_pb2.AddARPNeighborsRequest(neighbors=neigh), Empty)
                ifs = await c.call(SVC, "ListInterfaces", agent_pb2.ListInterfacesRequest(), agent_pb2.Interfaces)
                assert {"lo", "eth0"} <= {i.name for i in ifs.Interfaces}
                rts = await c.call(SVC, "ListRoutes", agent_pb2.ListRoutesRequest(), agent_pb2.Routes)
                assert any(r.gateway == "10.231.0.1" for r in rts.Routes)
                # bad input: a clear error, nothing changed
                bad = types_pb2.Interface(name="x" * 40, hwAddr=mac)
                with pytest.raises(TTRPCError) as ei:
                    await c.call(SVC, "UpdateInterface", agent_pb2.UpdateInterfaceRequest(interface=bad), types_pb2.Interface)
                assert ei.value.code == Code.INVALID_ARGUMENT
    trio.run(body)
    # the kernel agrees, seen from outside the agent
    link = json.loads(sh("ip", "-n", ns, "-j", "addr", "show", "eth0").stdout)[0]
    assert link["mtu"] == 1400 and "UP" in link["flags"]
    assert any(a["local"] == "10.231.0.2" for a in link["addr_info"])
    assert "default via 10.231.0.1" in sh("ip", "-n", ns, "route").stdout
    assert "10.231.0.77" in sh("ip", "-n", ns, "neigh").stdout
    assert sh("/bin/busybox", "ping", "-c", "1", "-W", "3", "10.231.0.2", check=False).returncode == 0
