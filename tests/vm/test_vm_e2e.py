"""The guest booted in QEMU (KVM where it works, TCG here) and driven only over its channel.

One VM for the module (boot costs ~8 s under TCG); the last test powers it off with
DestroySandbox. Clients reach it through agentctl.vmrelay, as `agentctl vm up` serves them:
every test opens new connections, and over QEMU's own chardev socket a call sent right after
the previous client left can be lost in the guest (see agentctl.vm). The container rootfs is
the busybox tree rootfs-build.sh bakes into the initrd at /opt/busybox-rootfs.
"""
from __future__ import annotations

import http.server
import importlib.util
import json
import re
import sys
import threading
import time
from pathlib import Path

import pytest
import trio

from agent.protos import agent_pb2, health_pb2, types_pb2
from agent.ttrpc import open_client
from agentctl import vm
from agentctl.containers import DEFAULT_ENV, Empty, default_spec

SVC = "grpc.AgentService"
ROOTFS = "/opt/busybox-rootfs"


@pytest.fixture(scope="module")
def guest_vm(guest_dir, tmp_path_factory):
    state = tmp_path_factory.mktemp("vm")
    spec = vm.VMSpec(kernel=guest_dir / "vmlinux", initrd=guest_dir / "initrd.img",
                     cmdline=vm.default_cmdline(guest_dir / "initrd.img"), memory_mib=512,
                     cpus=1, boot_timeout=120)
    st = vm.up(spec, state)
    try:
        yield st, state
    finally:
        vm.down(state, timeout=20)
        if vm.pid_alive(st.pid):
            raise AssertionError("QEMU still runs after vm.down")


def call(addr, method, req, resp_cls=Empty, timeout=60, service=SVC):
    async def go():
        async with open_client(addr) as c:
            return await c.call(service, method, req, resp_cls, timeout=timeout)
    return trio.run(go)


async def _read_all(c, cid, exec_id="", method="ReadStdout"):
    out = b""
    while True:
        r = await c.call(SVC, method, agent_pb2.ReadStreamRequest(
            container_id=cid, exec_id=exec_id, len=65536), agent_pb2.ReadStreamResponse,
            timeout=120)
        if not r.data:
            return out
        out += r.data


def run_container(addr, cid, args, *, namespaces=("pid", "network", "ipc", "uts", "mount"),
                  root=ROOTFS):
    """Create, start, read stdout to EOF, wait, remove: (stdout, exit status)."""
    spec = default_spec(root, args, terminal=False, env=DEFAULT_ENV)
    keep = [ns for ns in spec.Linux.Namespaces if ns.Type in namespaces]
    del spec.Linux.Namespaces[:]
    spec.Linux.Namespaces.extend(keep)
    if "uts" not in namespaces:
        spec.Hostname = ""  # the guest's own: setting one needs a uts namespace

    async def go():
        async with open_client(addr) as c:
            await c.call(SVC, "CreateContainer", agent_pb2.CreateContainerRequest(
                container_id=cid, OCI=spec), Empty, timeout=120)
            try:
                await c.call(SVC, "StartContainer", agent_pb2.StartContainerRequest(
                    container_id=cid), Empty, timeout=120)
                out = await _read_all(c, cid)
                w = await c.call(SVC, "WaitProcess", agent_pb2.WaitProcessRequest(
                    container_id=cid), agent_pb2.WaitProcessResponse, timeout=120)
                return out.decode(), w.status
            finally:
                await c.call(SVC, "RemoveContainer", agent_pb2.RemoveContainerRequest(
                    container_id=cid, timeout=10), Empty, timeout=120)
    return trio.run(go)


def test_check_and_version(guest_vm):
    st, _ = guest_vm
    assert st.server_addr.startswith("unix://") and st.channel == "virtio-serial"
    assert st.relay_pid and st.server_addr.endswith("/mux.sock")
    r = call(st.server_addr, "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse,
             service="grpc.Health")
    assert r.status == health_pb2.HealthCheckResponse.SERVING
    v = call(st.server_addr, "Version", health_pb2.CheckRequest(), health_pb2.VersionCheckResponse,
             service="grpc.Health")
    assert v.agent_version


def test_agentctl_check_over_the_printed_address(guest_vm):
    from agentctl.cli import main
    st, _ = guest_vm
    assert main(["--server-addr", st.server_addr, "check"]) == 0


def test_quickly_successive_clients_are_all_answered(guest_vm):
    """Each test here is a new client. Over QEMU's own socket a call sent right after the
    previous client left could be cancelled in the guest together with the old connection (a
    CreateContainer in CI never got its answer); through the relay the guest sees one
    connection. Calls that wait on init (GetMetrics), as those did, not inline ones."""
    st, _ = guest_vm

    async def go():
        for i in range(30):
            async with open_client(st.server_addr) as c:
                m = await c.call(SVC, "GetMetrics", agent_pb2.GetMetricsRequest(),
                                 agent_pb2.Metrics, timeout=30)
                assert m.metrics, i
    trio.run(go)


def test_guest_details(guest_vm):
    st, _ = guest_vm
    r = call(st.server_addr, "GetGuestDetails", agent_pb2.GuestDetailsRequest(
        mem_block_size=True), agent_pb2.GuestDetailsResponse)
    assert r.mem_block_size_bytes > 0
    assert r.agent_details.init_daemon


def test_create_sandbox_sets_guest_hostname(guest_vm):
    st, _ = guest_vm
    call(st.server_addr, "CreateSandbox", agent_pb2.CreateSandboxRequest(
        hostname="vmbox", dns=["nameserver 10.0.2.3"], sandbox_id="sb-vm"))
    # a container sharing the guest's uts namespace sees the sandbox's hostname
    out, status = run_container(st.server_addr, "uts", ["hostname"],
                                namespaces=("pid", "network", "ipc", "mount"))
    assert (out, status) == ("vmbox\n", 0)


def test_container_stdout_and_exit_code(guest_vm):
    st, _ = guest_vm
    out, status = run_container(st.server_addr, "hello", [
        "sh", "-c", "echo hello from $(hostname); echo pid $$; exit 7"])
    assert out == "hello from sandbox\npid 1\n"
    assert status == 7


def test_guest_cgroup2_favours_dynamic_moves(guest_vm):
    """init mounts the guest's cgroup2 with favordynmods (cgroup moves skip an RCU grace
    period). A container in the guest's pid and cgroup namespaces reads init's mount table."""
    st, _ = guest_vm
    out, status = run_container(st.server_addr, "cgopts", ["cat", "/proc/1/mountinfo"],
                                namespaces=("network", "ipc", "uts", "mount"))
    assert status == 0, out
    cg = [line for line in out.splitlines() if " - cgroup2 " in line]
    assert cg and all("favordynmods" in line for line in cg), out


def test_exec_with_stdin(guest_vm):
    st, _ = guest_vm
    spec = default_spec(ROOTFS, ["sleep", "60"], terminal=False, env=DEFAULT_ENV)

    async def go():
        async with open_client(st.server_addr) as c:
            await c.call(SVC, "CreateContainer", agent_pb2.CreateContainerRequest(
                container_id="sleeper", OCI=spec), Empty, timeout=120)
            await c.call(SVC, "StartContainer", agent_pb2.StartContainerRequest(
                container_id="sleeper"), Empty, timeout=120)
            proc = spec.Process.__class__(Args=["sh", "-c", "tr a-z A-Z; exit 4"],
                                          Env=DEFAULT_ENV, Cwd="/")
            await c.call(SVC, "ExecProcess", agent_pb2.ExecProcessRequest(
                container_id="sleeper", exec_id="up", process=proc), Empty, timeout=120)
            await c.call(SVC, "WriteStdin", agent_pb2.WriteStreamRequest(
                container_id="sleeper", exec_id="up", data=b"shout\n"),
                agent_pb2.WriteStreamResponse, timeout=60)
            await c.call(SVC, "CloseStdin", agent_pb2.CloseStdinRequest(
                container_id="sleeper", exec_id="up"), Empty, timeout=60)
            out = await _read_all(c, "sleeper", "up")
            w = await c.call(SVC, "WaitProcess", agent_pb2.WaitProcessRequest(
                container_id="sleeper", exec_id="up"), agent_pb2.WaitProcessResponse,
                timeout=120)
            stats = await c.call(SVC, "StatsContainer", agent_pb2.StatsContainerRequest(
                container_id="sleeper"), agent_pb2.StatsContainerResponse, timeout=60)
            await c.call(SVC, "SignalProcess", agent_pb2.SignalProcessRequest(
                container_id="sleeper", signal=9), Empty, timeout=60)
            main = await c.call(SVC, "WaitProcess", agent_pb2.WaitProcessRequest(
                container_id="sleeper"), agent_pb2.WaitProcessResponse, timeout=120)
            await c.call(SVC, "RemoveContainer", agent_pb2.RemoveContainerRequest(
                container_id="sleeper", timeout=10), Empty, timeout=120)
            return out, w.status, main.status, stats
    out, status, main_status, stats = trio.run(go)
    assert out == b"SHOUT\n" and status == 4
    assert main_status == 128 + 9
    # the guest has pure cgroup v2: the figures come from the container's own cgroup
    cg = stats.cgroup_stats
    assert cg.memory_stats.usage.usage > 0
    assert cg.pids_stats.current >= 1
    assert cg.cpu_stats.cpu_usage.total_usage > 0


def test_puller_helper_rootfs_runs_the_puller(guest_vm):
    # The puller's own container root (/opt/puller-rootfs, baked in): Python and the puller,
    # and none of the agent.
    st, _ = guest_vm
    spec_root = "/opt/puller-rootfs"
    script = ("import importlib.util as u, puller.pull, puller.store; "
              "print('puller', puller.pull.__name__, 'agent', u.find_spec('agent'))")
    out, status = run_container(st.server_addr, "puller", [
        "/usr/bin/python3.11", "-I", "-S", "-c", script], root=spec_root)
    assert status == 0, out
    assert out == "puller puller.pull agent None\n"


def test_daemon_is_confined_in_the_guest(guest_vm):
    # A container sharing the guest's pid namespace reads the daemon's /proc status: the
    # view from inside the VM, where the host cannot look directly.
    st, _ = guest_vm
    script = ("for d in /proc/[0-9]*; do "
              "if tr '\\0' ' ' < $d/cmdline 2>/dev/null | grep -q 'agent.daemon'; then "
              "echo pid ${d#/proc/}; grep -E '^(Uid|CapEff|CapPrm|CapBnd|NoNewPrivs|Seccomp):' "
              "$d/status; fi; done")
    out, status = run_container(st.server_addr, "peek", ["sh", "-c", script],
                                namespaces=("mount", "uts", "ipc", "network"))
    assert status == 0, out
    fields = dict(re.findall(r"^(\w+):\s*(.*)$", out, re.M))
    assert "pid" in out, f"no daemon process found in the guest:\n{out}"
    assert fields["Uid"].split()[:2] == ["65534", "65534"]
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapPrm"], 16) == 0
    assert fields["NoNewPrivs"] == "1"
    assert fields["Seccomp"] == "2"  # SECCOMP_MODE_FILTER


def test_metrics_report_agent_memory(guest_vm):
    st, _ = guest_vm
    m = call(st.server_addr, "GetMetrics", agent_pb2.GetMetricsRequest(), agent_pb2.Metrics)
    pss = dict(re.findall(
        r'^sandbox_agent_process_proportional_memory_bytes\{process="(\w+)"\} (\d+)',
        m.metrics, re.M))
    assert set(pss) >= {"init", "daemon"}
    assert all(0 < int(v) < 200 << 20 for v in pss.values())
    assert re.search(r'^sandbox_guest_meminfo_bytes\{item="MemTotal"\} \d+', m.metrics, re.M)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"host says hi to {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


@pytest.fixture(scope="module")
def guest_network(guest_vm):
    """The guest's NIC configured as QEMU's user-mode network expects (10.0.2.15/24, default
    route via 10.0.2.2), over the agent's network RPCs as a runtime would do it."""
    st, _ = guest_vm
    ifaces = call(st.server_addr, "ListInterfaces", agent_pb2.ListInterfacesRequest(),
                  agent_pb2.Interfaces)
    nic = [i for i in ifaces.Interfaces if i.name != "lo"]
    assert nic, f"no NIC in the guest: {ifaces}"
    name = nic[0].name
    call(st.server_addr, "UpdateInterface", agent_pb2.UpdateInterfaceRequest(
        interface=types_pb2.Interface(name=name, hwAddr=nic[0].hwAddr, mtu=1500,
                                      IPAddresses=[types_pb2.IPAddress(
                                          address="10.0.2.15", mask="24")])),
         types_pb2.Interface)
    call(st.server_addr, "UpdateRoutes", agent_pb2.UpdateRoutesRequest(
        routes=agent_pb2.Routes(Routes=[types_pb2.Route(dest="", gateway="10.0.2.2",
                                                        device=name)])),
         agent_pb2.Routes)
    return name


def test_guest_reaches_host_loopback_through_user_networking(guest_vm, guest_network):
    st, _ = guest_vm
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    port = srv.server_address[1]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        # shares the guest's network namespace (no "network" in the list); no wget -T:
        # busybox 1.35's wget segfaults with it
        out, status = run_container(st.server_addr, "wget", [
            "wget", "-q", "-O", "-", f"http://10.0.2.2:{port}/"],
            namespaces=("pid", "mount", "uts", "ipc"))
        assert status == 0, out
        assert out == "host says hi to 127.0.0.1\n"  # slirp connects from the host's loopback
    finally:
        srv.shutdown()
        srv.server_close()


def _puller_kit():
    path = Path(__file__).resolve().parents[1] / "puller" / "conftest.py"
    spec = importlib.util.spec_from_file_location("puller_test_kit", path)
    kit = importlib.util.module_from_spec(spec)
    sys.modules["puller_test_kit"] = kit  # its dataclasses look their module up there
    spec.loader.exec_module(kit)
    return kit


def test_pull_image_in_the_guest_from_the_host_registry(guest_vm, guest_network, tmp_path):
    # Debian's docker-registry on the host's 127.0.0.1; the guest reaches it as 10.0.2.2.
    st, _ = guest_vm
    kit = _puller_kit()
    reg = kit.start_registry(tmp_path / "reg")
    try:
        root = kit.busybox_tree(tmp_path / "rootfs")
        (root / "hello.txt").write_text("hello from the registry\n")
        pushed = kit.Pusher(reg).image("demo/hello", "v1", [kit.Layer(kit.tar_dir(root), "gzip")],
                                       config={"Cmd": ["/bin/cat", "/hello.txt"],
                                               "Env": ["PATH=/bin"]})
        guest_host = "10.0.2.2:" + reg.host.rsplit(":", 1)[1]
        ref = f"{guest_host}/demo/hello:v1"
        r = call(st.server_addr, "PullImage", agent_pb2.PullImageRequest(
            image=ref, container_id="pulled", insecure_registries=[guest_host]),
            agent_pb2.PullImageResponse, timeout=300)
        assert r.manifest_digest == pushed.digest
        assert r.rootfs
        args = json.loads(r.runtime_config_json)["process"]["args"]
        assert args == ["/bin/cat", "/hello.txt"]
        out, status = run_container(st.server_addr, "pulled", args, root=r.rootfs)
        assert (out, status) == ("hello from the registry\n", 0)
    finally:
        reg.stop()


def test_destroy_sandbox_powers_the_vm_off(guest_vm):
    st, state = guest_vm
    t0 = time.monotonic()
    how = vm.down(state, timeout=60)
    assert how == "powered off by the agent", how
    assert not vm.pid_alive(st.pid)
    assert vm.status(state)[0] == "absent"
    log = (state / "console.log").read_text(errors="replace")
    assert "powering off" in log
    assert time.monotonic() - t0 < 60
