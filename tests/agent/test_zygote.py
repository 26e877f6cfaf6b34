"""The warm launcher (agent.privsep.zygote) inside the real agent: runtime commands run in its
forks, from a sealed interpreter, the containers end up as init's children, its death costs
speed and never function, and errors read as they do through the CLI."""

from __future__ import annotations

import fcntl
import os
import shutil
import signal as sig
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import trio

sys.path.insert(0, os.path.dirname(__file__))
import client as C  # noqa: E402
from conftest import Agent, _need_root, spec  # noqa: E402
from test_lifecycle import run  # noqa: E402

from agent.ttrpc import TTRPCError  # noqa: E402

if os.environ.get("SANDBOX_AGENT_TEST_RUNTIME", "oci-launcher") != "oci-launcher":
    pytest.skip("the warm launcher serves only our launcher as the runtime",
                allow_module_level=True)



def _children(ppid: int) -> dict[int, bytes]:
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == ppid:
            out[int(d)] = cmd
    return out


def zygote_pid(agent, timeout: float = 30, not_pid: int = 0) -> int:
    """The warm launcher's host pid once it has said it is ready (a new one if not_pid)."""
    init = agent.pids()["init"]
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        z = [p for p, cmd in _children(init).items()
             if b"agent.privsep.zygote" in cmd and cmd.endswith(b"\0launcher\0")]  # not the puller's
        ready = agent.logs().count('"warm launcher ready"')
        if z and z[0] != not_pid and ready >= (2 if not_pid else 1):
            return z[0]
        time.sleep(0.05)
    raise AssertionError(f"no ready warm launcher under init {init}:\n{agent.logs()[-3000:]}")


def worker_commands(agent) -> list[str]:
    import json
    out = []
    for line in agent.logs().splitlines():
        if '"command in a warm worker"' in line:
            out.append(json.loads(line)["fields"]["command"])
    return out


def test_commands_run_in_sealed_workers_and_containers_are_inits(agent, rootfs):
    z = zygote_pid(agent)
    # CVE-2019-5736: what the workers fork into a container maps no writable host binary.
    assert os.readlink(f"/proc/{z}/exe").startswith("/memfd:")
    fd = os.open(f"/proc/{z}/exe", os.O_RDONLY)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_WRITE
    finally:
        os.close(fd)
    init = agent.pids()["init"]

    async def body(c):
        await C.create(c, "z1", spec(rootfs, ["sleep", "4242"], netns=False))
        await C.start(c, "z1")
        end = time.monotonic() + 10
        while time.monotonic() < end:  # StartContainer returns before the program is exec'd
            kids = _children(init)
            ctr = [p for p, cmd in kids.items() if cmd == b"sleep\x004242\x00"]
            if ctr:
                break
            await trio.sleep(0.02)
        assert len(ctr) == 1, kids  # reparented to init, as with the CLI
        # the zygote warms up at nice 19, then serves (and forks) at init's priority
        assert os.getpriority(os.PRIO_PROCESS, z) == os.getpriority(os.PRIO_PROCESS, init)
        assert os.getpriority(os.PRIO_PROCESS, ctr[0]) == os.getpriority(os.PRIO_PROCESS, init)
        assert ctr[0] not in _children(z)
        await C.exec_(c, "z1", "e1", ["sh", "-c", "echo from-exec"])
        assert await C.read_all(c, "z1", "e1") == b"from-exec\n"
        assert await C.wait(c, "z1", "e1") == 0
        await C.signal(c, "z1", sig.SIGKILL)
        assert await C.wait(c, "z1") == 128 + sig.SIGKILL
        await C.remove(c, "z1")
    run(agent, body)
    cmds = worker_commands(agent)
    for want in ("create", "start", "exec", "kill", "delete"):
        assert want in cmds, cmds
    assert _children(z) == {}  # workers are reaped by the zygote


def test_zygote_killed_falls_back_then_restarts(agent, rootfs):
    z = zygote_pid(agent)

    async def phase1(c):
        await C.create(c, "keep", spec(rootfs, ["sleep", "4343"], netns=False))
        await C.start(c, "keep")
        os.kill(z, sig.SIGKILL)
        # Right away (the zygote may not be back yet): the CLI or a new zygote, never a failure.
        for i in range(3):
            await C.create(c, f"a{i}", spec(rootfs, ["sh", "-c", f"exit {i + 3}"], netns=False))
            await C.start(c, f"a{i}")
            assert await C.wait(c, f"a{i}") == i + 3
            await C.remove(c, f"a{i}")
    run(agent, phase1)
    assert '"warm launcher exited' in agent.logs()
    z2 = zygote_pid(agent, not_pid=z)
    before = len(worker_commands(agent))

    async def phase2(c):
        await C.create(c, "b", spec(rootfs, ["sh", "-c", "echo back"], netns=False))
        await C.start(c, "b")
        assert await C.read_all(c, "b") == b"back\n"
        assert await C.wait(c, "b") == 0
        await C.remove(c, "b")
        # the container started before the kill still runs, and is still controllable
        await C.exec_(c, "keep", "k", ["true"])
        assert await C.wait(c, "keep", "k") == 0
        await C.signal(c, "keep", sig.SIGKILL)  # PID 1 of its namespace ignores SIGTERM
        assert await C.wait(c, "keep") == 128 + sig.SIGKILL
        await C.remove(c, "keep")
    run(agent, phase2)
    assert len(worker_commands(agent)) > before  # the new zygote took commands
    assert z2 != z


@pytest.fixture
def cli_agent():
    """The same agent with --no-zygote: every runtime command through the launcher CLI."""
    _need_root()
    tmp = Path(tempfile.mkdtemp(prefix="sa-agent-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    a = Agent(tmp, extra=("--no-zygote",))
    a.start()
    yield a
    a.stop()
    subprocess.run(["umount", "-R", "-l", str(tmp / "run")], capture_output=True)
    shutil.rmtree(tmp, ignore_errors=True)


def test_errors_read_as_through_the_cli(agent, cli_agent, rootfs):
    zygote_pid(agent)
    bad = spec(rootfs, ["true"], netns=False)
    bad["mounts"].append({"destination": "/x", "type": "bind", "source": "/no/such/dir",
                          "options": ["bind"]})
    errors = []
    for a in (agent, cli_agent):
        async def body(c):
            with pytest.raises(TTRPCError) as ei:
                await C.create(c, "bad", bad)
            errors.append(ei.value.message)
            # and the id is free again afterwards
            await C.create(c, "bad", spec(rootfs, ["true"], netns=False))
            await C.remove(c, "bad")
        run(a, body)
    assert "/no/such/dir" in errors[0]
    assert errors[0] == errors[1]
    assert '"command in a warm worker"' not in cli_agent.logs()
    assert not [p for p, cmd in _children(cli_agent.pids()["init"]).items()
                if b"agent.privsep.zygote" in cmd]
