"""The running daemon defers what it never uses: after a session of real RPCs, GetMetrics
reports every deferred module still unrun, and neither TLS library is mapped."""

from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(__file__))
import client as C  # noqa: E402
from conftest import spec  # noqa: E402
from test_lifecycle import run  # noqa: E402

from agent.daemon.deferred import daemon_deferred  # noqa: E402
from agent.protos import agent_pb2  # noqa: E402

SAMPLE = re.compile(r'^sandbox_agent_process_deferred_module\{process="daemon",module="([^"]+)",state="([^"]+)"\} 1$')


def _deferred_states(metrics: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for m in map(SAMPLE.match, metrics.splitlines()) if m}


def test_rpcs_leave_deferred_modules_unrun(agent, rootfs):
    out = {}

    async def body(c):
        await C.create(c, "m1", spec(rootfs, ["sh", "-c", "cat; echo out; echo err >&2; exit 3"], netns=False))
        await C.start(c, "m1")
        await C.write_stdin(c, "m1", "", b"in\n")
        await C.close_stdin(c, "m1")
        out["stdout"] = await C.read_all(c, "m1")
        out["stderr"] = await C.read_all(c, "m1", method="ReadStderr")
        out["code"] = await C.wait(c, "m1")
        await C.create(c, "m2", spec(rootfs, ["sleep", "100"], netns=False))
        await C.start(c, "m2")
        await C.exec_(c, "m2", "e1", ["sh", "-c", "echo exec"])
        out["exec"] = await C.read_all(c, "m2", "e1")
        out["exec_code"] = await C.wait(c, "m2", "e1")
        out["stats"] = await C.stats(c, "m2")
        await c.call(C.SVC, "GetGuestDetails", agent_pb2.GuestDetailsRequest(mem_block_size=True),
                     agent_pb2.GuestDetailsResponse)
        await c.call(C.SVC, "ListInterfaces", agent_pb2.ListInterfacesRequest(), agent_pb2.Interfaces)
        await c.call(C.SVC, "ListRoutes", agent_pb2.ListRoutesRequest(), agent_pb2.Routes)
        try:  # an error path: the answer is an error status, formatted by the server
            await C.start(c, "no-such-container")
        except Exception as exc:  # noqa: BLE001
            out["error"] = str(exc)
        await C.signal(c, "m2", 9)
        await C.wait(c, "m2")
        await C.remove(c, "m1")
        await C.remove(c, "m2")
        out["metrics"] = (await c.call(C.SVC, "GetMetrics", agent_pb2.GetMetricsRequest(), agent_pb2.Metrics)).metrics

    run(agent, body)
    assert out["stdout"] == b"in\nout\n" and out["stderr"] == b"err\n" and out["code"] == 3
    assert out["exec"] == b"exec\n" and out["exec_code"] == 0
    assert "no-such-container" in out["error"]

    states = _deferred_states(out["metrics"])
    assert set(states) == set(daemon_deferred()), states  # from source here: no tokenize
    # "eager" only for what the interpreter's site imported before the daemon's first line
    ran = {name: st for name, st in states.items() if st == "loaded"}
    assert not ran, f"deferred modules the daemon ran after all: {ran}"
    assert states["ssl"] == "deferred"
    assert re.search(r'^sandbox_agent_process_python_modules\{process="daemon"\} \d+$', out["metrics"], re.M)

    with open(f"/proc/{agent.pids()['daemon']}/maps") as f:
        libs = {line.split()[-1] for line in f if ".so" in line}
    assert not [lib for lib in libs if "libssl" in lib or "libcrypto" in lib or "/_ssl." in lib], libs
