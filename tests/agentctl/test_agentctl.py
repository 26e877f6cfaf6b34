"""agentctl and `python -m agent` as a person uses them: separate processes, real socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def agentctl(*args, env=None, input=None):
    return subprocess.run([str(BIN / "agentctl"), *args], capture_output=True, text=True, timeout=60,
                          env=env, input=input)


@pytest.fixture
def agent(tmp_path):
    sock = tmp_path / "agent.sock"
    env = dict(os.environ, AGENT_SERVER_ADDR=f"unix://{sock}")
    p = subprocess.Popen([sys.executable, "-m", "agent"], cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    t0 = time.monotonic()
    while not sock.exists():
        assert p.poll() is None, p.stderr.read()
        assert time.monotonic() - t0 < 20, "agent did not start"
        time.sleep(0.02)
    yield f"unix://{sock}"
    p.terminate()
    p.wait(10)


def test_check_and_version(agent):
    r = agentctl("--server-addr", agent, "check")
    assert r.returncode == 0 and r.stdout.strip() == "SERVING", r.stderr
    r = agentctl("--server-addr", agent, "version")
    v = json.loads(r.stdout)
    import agent as agent_pkg
    assert v == {"agent_version": agent_pkg.__version__, "api_version": "0.0.1"}


def test_address_from_environment(agent):
    r = agentctl("check", env=dict(os.environ, AGENT_SERVER_ADDR=agent))
    assert r.returncode == 0 and "SERVING" in r.stdout


def test_generic_call_maps_json_both_ways(agent):
    r = agentctl("--server-addr", agent, "call", "grpc.Health/Version", '{"service": "x"}')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["grpc_version"] == "0.0.1"
    r = agentctl("--server-addr", agent, "call", "/grpc.Health/Check", "-", input='{"service": "stdin"}')
    assert json.loads(r.stdout) == {"status": "SERVING"}


def test_unimplemented_rpc_says_code_and_name(agent):
    r = agentctl("--server-addr", agent, "call", "grpc.AgentService/ReseedRandomDev", '{"data": "AAAA"}')
    assert r.returncode == 1
    assert "UNIMPLEMENTED" in r.stderr and "ReseedRandomDev" in r.stderr


def test_usage_errors(agent):
    r = agentctl("--server-addr", agent, "call", "grpc.Health/Check", '{"nope": 1}')
    assert r.returncode == 2 and "nope" in r.stderr
    r = agentctl("--server-addr", agent, "call", "grpc.Health/Check", "{not json")
    assert r.returncode == 2
    r = agentctl("--server-addr", agent, "call", "grpc.Nope/Check")
    assert r.returncode == 2 and "no such RPC" in r.stderr
    r = agentctl("--server-addr", "tcp://1.2.3.4:5", "check")
    assert r.returncode == 2 and "unknown scheme" in r.stderr


def test_unreachable_agent_is_a_clear_error(tmp_path):
    r = agentctl("--server-addr", f"unix://{tmp_path}/none.sock", "--timeout", "2", "check")
    assert r.returncode == 1 and "UNAVAILABLE" in r.stderr and "none.sock" in r.stderr


def test_list_rpcs_has_all_45():
    r = agentctl("list-rpcs")
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 45
    assert any(line.startswith("grpc.AgentService/CreateContainer\t") for line in lines)


def test_agent_refuses_bad_address():
    r = subprocess.run([sys.executable, "-m", "agent", "--server-addr", "unix://relative"], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "absolute" in r.stderr
