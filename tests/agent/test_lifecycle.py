"""Container lifecycle over the Kata agent API, against the real agent (init + confined
daemon + OCI launcher), driven only over ttRPC."""

from __future__ import annotations

import os
import signal as sig
import subprocess
import sys

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
import client as C  # noqa: E402
from conftest import spec  # noqa: E402

from agent.protos import agent_pb2  # noqa: E402
from agent.ttrpc import Code, TTRPCError, open_client  # noqa: E402


def run(agent, body, timeout=120):
    async def main():
        with trio.fail_after(timeout):
            async with open_client(agent.addr) as c:
                await body(c)
    try:
        trio.run(main)
    except BaseException:
        print(agent.logs()[-6000:])
        raise


def test_create_start_read_wait_remove(agent, rootfs):
    async def body(c):
        await C.create(c, "c1", spec(rootfs, ["sh", "-c", "echo hello; echo oops >&2; exit 42"]))
        await C.start(c, "c1")
        out = await C.read_all(c, "c1")
        err = await C.read_all(c, "c1", method="ReadStderr")
        assert out == b"hello\n" and err == b"oops\n"
        assert await C.wait(c, "c1") == 42
        # output written before exit is still there after it (drained first), then EOF
        await C.remove(c, "c1")
        with pytest.raises(TTRPCError) as ei:
            await C.wait(c, "c1")
        assert ei.value.code == Code.NOT_FOUND
    run(agent, body)


def test_output_after_exit_is_drained_before_eof(agent, rootfs):
    async def body(c):
        await C.create(c, "c2", spec(rootfs, ["sh", "-c", "i=0; while [ $i -lt 2000 ]; do echo line$i; i=$((i+1)); done"]))
        await C.start(c, "c2")
        assert await C.wait(c, "c2") == 0  # exits with its output still in the pipe
        out = await C.read_all(c, "c2")
        assert out.splitlines()[0] == b"line0" and out.splitlines()[-1] == b"line1999"
        assert len(out.splitlines()) == 2000
        await C.remove(c, "c2")
    run(agent, body)


def test_exec_with_stdin(agent, rootfs):
    async def body(c):
        await C.create(c, "c3", spec(rootfs, ["sleep", "1000"]))
        await C.start(c, "c3")
        await C.exec_(c, "c3", "e1", ["sh", "-c", "read a; read b; echo \"$b-$a\"; cat; exit 3"])
        await C.write_stdin(c, "c3", "e1", b"first\nsecond\nrest of it")
        await C.close_stdin(c, "c3", "e1")
        assert await C.read_all(c, "c3", "e1") == b"second-first\nrest of it"
        assert await C.wait(c, "c3", "e1") == 3
        with pytest.raises(TTRPCError) as ei:
            await C.exec_(c, "c3", "e1", ["true"])
        assert ei.value.code == Code.ALREADY_EXISTS
        await C.remove(c, "c3")
    run(agent, body)


def test_tty_session(agent, rootfs):
    async def body(c):
        await C.create(c, "c4", spec(rootfs, ["sh"], terminal=True))
        await C.start(c, "c4")
        await c.call(C.SVC, "TtyWinResize", agent_pb2.TtyWinResizeRequest(container_id="c4", row=33, column=101), C.Empty)
        await C.write_stdin(c, "c4", "", b"stty size; tty; exit 5\n")
        out = await C.read_all(c, "c4")
        assert b"33 101" in out and b"/dev/pts/" in out
        assert await C.wait(c, "c4") == 5
        await C.remove(c, "c4")
    run(agent, body)


def test_signals(agent, rootfs):
    async def body(c):
        await C.create(c, "c5", spec(rootfs, ["sh", "-c", "trap 'echo got-term; exit 9' TERM; echo ready; while :; do sleep 0.1; done"]))
        await C.start(c, "c5")
        r = await c.call(C.SVC, "ReadStdout", agent_pb2.ReadStreamRequest(container_id="c5", len=100), agent_pb2.ReadStreamResponse)
        assert r.data == b"ready\n"
        await C.signal(c, "c5", sig.SIGTERM)
        assert await C.wait(c, "c5") == 9
        assert b"got-term" in await C.read_all(c, "c5")
        # SIGKILL with no exec id: every process of the container
        await C.create(c, "c6", spec(rootfs, ["sh", "-c", "sleep 1000 & sleep 1000"]))
        await C.start(c, "c6")
        await C.exec_(c, "c6", "e", ["sleep", "1000"])
        await C.signal(c, "c6", sig.SIGKILL)
        assert await C.wait(c, "c6") == 128 + sig.SIGKILL
        assert await C.wait(c, "c6", "e") == 128 + sig.SIGKILL
        for cid in ("c5", "c6"):
            await C.remove(c, cid)
    run(agent, body)


def test_errors_have_the_right_codes(agent, rootfs):
    async def body(c):
        for cid, code in (("", Code.INVALID_ARGUMENT), ("../x", Code.INVALID_ARGUMENT), ("nope", Code.NOT_FOUND)):
            with pytest.raises(TTRPCError) as ei:
                await C.start(c, cid)
            assert ei.value.code == code, ei.value
        await C.create(c, "dup", spec(rootfs, ["sleep", "100"]))
        with pytest.raises(TTRPCError) as ei:
            await C.create(c, "dup", spec(rootfs, ["sleep", "100"]))
        assert ei.value.code == Code.ALREADY_EXISTS
        with pytest.raises(TTRPCError) as ei:
            await C.exec_(c, "dup", "x", ["true"])  # created, not started
        assert ei.value.code == Code.FAILED_PRECONDITION
        with pytest.raises(TTRPCError) as ei:
            await C.wait(c, "dup", "no-such-exec")
        assert ei.value.code == Code.NOT_FOUND
        with pytest.raises(TTRPCError) as ei:
            await C.create(c, "badroot", spec("relative/root", ["true"]))
        assert ei.value.code == Code.INVALID_ARGUMENT
        await C.start(c, "dup")
        with pytest.raises(TTRPCError) as ei:
            await C.start(c, "dup")
        assert ei.value.code == Code.FAILED_PRECONDITION
        await C.remove(c, "dup")
    run(agent, body)


def test_stats_and_oom_event(agent, rootfs):
    async def body(c):
        await C.create(c, "mem", spec(rootfs, ["sh", "-c", "echo started; sleep 1000"], memory_limit=64 << 20))
        await C.start(c, "mem")
        st = await C.stats(c, "mem")
        assert st.cgroup_stats.memory_stats.usage.limit == 64 << 20
        assert st.cgroup_stats.memory_stats.usage.usage > 0
        assert st.cgroup_stats.pids_stats.current >= 1
        # a process that grows past the limit is OOM-killed, and GetOOMEvent says so
        await C.exec_(c, "mem", "hog", ["sh", "-c", "x=a; while :; do x=$x$x$x$x; done"])
        with trio.fail_after(60):
            ev = await c.call(C.SVC, "GetOOMEvent", agent_pb2.GetOOMEventRequest(), agent_pb2.OOMEvent)
        assert ev.container_id == "mem"
        assert await C.wait(c, "mem", "hog") == 128 + sig.SIGKILL
        await C.remove(c, "mem")
    run(agent, body)


def _mounts() -> str:
    with open("/proc/self/mountinfo") as f:
        return f.read()


def test_remove_leaves_nothing_behind(agent, rootfs):
    cid = "tidy"

    async def body(c):
        await C.create(c, cid, spec(rootfs, ["sh", "-c", "sleep 1000 & sleep 1000"]))
        await C.start(c, cid)
        await C.exec_(c, cid, "e", ["sleep", "1000"])
        await C.remove(c, cid)

    run(agent, body)
    pids = agent.pids()
    # no process of the container left under init
    out = subprocess.run(["ps", "-ww", "-e", "-o", "ppid=,args="], capture_output=True, text=True).stdout
    assert not [line for line in out.splitlines() if "sleep 1000" in line]
    # no cgroup
    for root in ("/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"):
        assert not os.path.exists(os.path.join(root, "sandbox-agent", cid))
    # no mount of its rootfs or bundle (seen from init's mount namespace)
    with open(f"/proc/{pids['init']}/mountinfo") as f:
        mi = f.read()
    assert cid not in mi
    assert not os.path.exists(os.path.join(agent.run_dir, "daemon", "containers", cid))


def test_create_sandbox_sets_hostname_and_dns(agent):
    async def body(c):
        await c.call(C.SVC, "CreateSandbox", agent_pb2.CreateSandboxRequest(
            hostname="pod-1", dns=["nameserver 10.0.2.3", "search example.test"], sandbox_id="sb1"), C.Empty)
        with pytest.raises(TTRPCError) as ei:
            await c.call(C.SVC, "CreateSandbox", agent_pb2.CreateSandboxRequest(hostname="again"), C.Empty)
        assert ei.value.code == Code.ALREADY_EXISTS
    run(agent, body)
    init = agent.pids()["init"]
    out = subprocess.run(["nsenter", "-t", str(init), "-u", "hostname"], capture_output=True, text=True).stdout
    assert out.strip() == "pod-1"
    assert os.uname().nodename != "pod-1"  # the host's own name is untouched
    resolv = (agent.run_dir / "resolv.conf").read_text()
    assert "nameserver 10.0.2.3" in resolv and "search example.test" in resolv


def test_create_sandbox_refuses_bad_input(agent):
    async def body(c):
        for req in (agent_pb2.CreateSandboxRequest(hostname="bad host name!"),
                    agent_pb2.CreateSandboxRequest(dns=["nameserver 1.2.3.4\nnameserver 6.6.6.6"]),
                    agent_pb2.CreateSandboxRequest(sandbox_id="../escape")):
            with pytest.raises(TTRPCError) as ei:
                await c.call(C.SVC, "CreateSandbox", req, C.Empty)
            assert ei.value.code == Code.INVALID_ARGUMENT, req
    run(agent, body)


def test_tty_write_while_a_read_is_pending(agent, rootfs):
    """Kata's shim keeps a ReadStdout long poll open while it writes what the user types."""
    async def body(c):
        await C.create(c, "tt", spec(rootfs, ["sh"], terminal=True))
        await C.start(c, "tt")
        out = bytearray()

        async def reader():
            out.extend(await C.read_all(c, "tt"))

        async with trio.open_nursery() as n:
            n.start_soon(reader)
            await trio.sleep(0.5)  # the reader is now parked in ReadStdout
            with trio.fail_after(10):
                await C.write_stdin(c, "tt", "", b"echo typed-$((40+2)); exit 0\n")
        assert b"typed-42" in out
        assert await C.wait(c, "tt") == 0
        await C.remove(c, "tt")
    run(agent, body)
