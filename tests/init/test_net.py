"""Network jobs through init (forked pyroute2 worker), in a network namespace of the test's
own: a veth pair configured with Kata-shaped Interface/Route/ARPNeighbor arguments."""
import json
import os
import subprocess

import pytest


@pytest.fixture
def netagent(agent_factory):
    a = agent_factory(unshare=["--net"])
    a.ns_init = None
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/status") as f:
                    st = f.read()
            except OSError:
                continue
            nspid = [ln for ln in st.splitlines() if ln.startswith("NSpid:")]
            ppid = [ln for ln in st.splitlines() if ln.startswith("PPid:")]
            if nspid and nspid[0].split()[-1] == "1" and len(nspid[0].split()) > 2 \
                    and int(ppid[0].split()[1]) == a.proc.pid:
                a.ns_init = int(d)
    assert a.ns_init
    a.ip = lambda *args: subprocess.run(["nsenter", "-t", str(a.ns_init), "-n", "ip", "-j",
                                         *args], capture_output=True, text=True, check=True)
    a.ip("link", "add", "veth0", "address", "02:00:00:00:00:aa", "type", "veth", "peer",
         "name", "veth1")
    return a


def test_update_interface_routes_and_neighbors(netagent):
    a = netagent
    names = {i["name"] for i in a.call_ok("net", {"action": "list_interfaces"})["interfaces"]}
    assert names == {"lo", "veth0", "veth1"}
    res = a.call_ok("net", {"action": "update_interface", "args": {"interface": {
        "hwAddr": "02:00:00:00:00:AA", "name": "eth0", "mtu": 1400,
        "IPAddresses": [{"family": 0, "address": "10.200.0.1", "mask": "24"}]}}})
    iface = res["interface"]
    assert iface["name"] == "eth0" and iface["mtu"] == 1400
    assert {"family": 0, "address": "10.200.0.1", "mask": "24"} in iface["IPAddresses"]
    links = {l["ifname"]: l for l in json.loads(a.ip("link", "show").stdout)}
    assert links["eth0"]["mtu"] == 1400 and "UP" in links["eth0"]["flags"]
    a.ip("link", "set", "veth1", "up")
    res = a.call_ok("net", {"action": "update_routes", "args": {"routes": [
        {"dest": "10.201.0.0/24", "gateway": "10.200.0.2", "device": "eth0"},
        {"dest": "", "gateway": "10.200.0.254", "device": "eth0"},
    ]}})
    got = {(r["dest"], r["gateway"]) for r in res["routes"]}
    assert ("10.201.0.0/24", "10.200.0.2") in got and ("", "10.200.0.254") in got
    kroutes = json.loads(a.ip("route", "show").stdout)
    assert {"dst": "default", "gateway": "10.200.0.254"}.items() <= \
        [r for r in kroutes if r["dst"] == "default"][0].items()
    assert any(r["dst"] == "10.201.0.0/24" and r["gateway"] == "10.200.0.2" for r in kroutes)
    listed = a.call_ok("net", {"action": "list_routes"})["routes"]
    assert any(r["dest"] == "10.201.0.0/24" for r in listed)
    a.call_ok("net", {"action": "add_arp_neighbors", "args": {"neighbors": [
        {"toIPAddress": {"family": 0, "address": "10.200.0.2"}, "device": "eth0",
         "lladdr": "02:00:00:00:00:bb"}]}})
    neigh = json.loads(a.ip("neigh", "show", "dev", "eth0").stdout)
    assert [(n["dst"], n["lladdr"]) for n in neigh] == [("10.200.0.2", "02:00:00:00:00:bb")]
    assert "PERMANENT" in neigh[0]["state"]


@pytest.mark.parametrize("args,field", [
    ({"action": "update_interface", "args": {"interface": {"name": "x" * 20}}},
     "interface.name"),
    ({"action": "update_interface", "args": {"interface": {"name": "eth9", "IPAddresses": [
        {"address": "10.0.0.300", "mask": "24"}]}}}, "interface.IPAddresses[0].address"),
    ({"action": "update_interface", "args": {"interface": {"hwAddr": "zz"}}},
     "interface.hwAddr"),
    ({"action": "update_interface", "args": {"interface": {"name": "nosuch0"}}}, "interface"),
    ({"action": "update_routes", "args": {"routes": [{"dest": "10.1.0.0/33",
                                                      "device": "lo"}]}}, "routes[0].dest"),
    ({"action": "update_routes", "args": {"routes": [{"dest": "10.1.0.0/24",
                                                      "device": "nosuch0"}]}},
     "routes[0].device"),
    ({"action": "add_arp_neighbors", "args": {"neighbors": [{"device": "lo"}]}},
     "neighbors[0].toIPAddress"),
])
def test_bad_network_arguments_name_the_field(netagent, args, field):
    rep = netagent.call("net", args)
    assert not rep["ok"] and rep["field"] == field, rep
