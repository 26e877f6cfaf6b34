"""The same init flows with our own OCI runtime (agent.oci_launcher, the default in a guest)
instead of runc: create/start, output, exit status, exec with stdin, a terminal, signals."""
import os
import signal

import pytest


@pytest.fixture
def lagent(agent_factory):
    return agent_factory(runtime="oci-launcher")


def test_launch_output_exit(lagent):
    a = lagent
    pid, ends = a.launch("l1", ["sh", "-c", "echo out; echo err >&2; exit 7"],
                         stdio=("stdout", "stderr"))
    assert a.read_all(ends["stdout"]) == b"out\n"
    assert a.read_all(ends["stderr"]) == b"err\n"
    ev = a.wait_event(lambda e: e.get("ev") == "exit" and e["pid"] == pid)
    assert ev["exit_code"] == 7
    a.call_ok("delete", {"container_id": "l1"})
    assert a.call_ok("table")["containers"] == []


def test_kill_all(lagent):
    a = lagent
    pid, _ = a.launch("lk", ["sleep", "1000"], stdio=())
    a.call_ok("kill", {"container_id": "lk", "signal": signal.SIGKILL, "all": True})
    ev = a.wait_event(lambda e: e.get("ev") == "exit" and e["pid"] == pid)
    assert ev["exit_code"] == 137


def test_exec_stdin(lagent):
    a = lagent
    pid, _ = a.launch("l2", ["sleep", "1000"], stdio=())
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    proc = a.process_file("x1", ["sh", "-c", "cat; exit 6"])
    res = a.call_ok("exec", {"container_id": "l2", "exec_id": "x1", "process": proc,
                             "stdio": {"stdin": True, "stdout": True}}, [r_in, w_out])
    os.close(r_in)
    os.close(w_out)
    os.write(w_in, b"data\n")
    os.close(w_in)
    assert a.read_all(r_out) == b"data\n"
    os.close(r_out)
    ev = a.wait_event(lambda e: e.get("ev") == "exit" and e["pid"] == res["pid"])
    assert ev["exit_code"] == 6


def test_terminal(lagent):
    a = lagent
    b = a.bundle("lt", ["sh", "-c", "tty; exit 2"], terminal=True)
    rep, fds = a.request({"cmd": "call", "op": "launch",
                          "args": {"container_id": "lt", "bundle": b, "terminal": True}})
    assert rep["ok"], rep
    master = fds[0]
    a.call_ok("start", {"container_id": "lt"})
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert b"/dev/pts/" in out, out
    ev = a.wait_event(lambda e: e.get("ev") == "exit" and e["container_id"] == "lt")
    assert ev["exit_code"] == 2
