#!/usr/bin/env bash
# The main job, as far as the project has come: installs what it needs (idempotent), starts
# the agent on a unix socket, drives it with agentctl over ttRPC, and stops it.
# (Later: boot the guest in QEMU, pull an image inside it, run a container, show its output.)
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh >/dev/null
PY=.venv/bin/python
CTL=.venv/bin/agentctl

dir=$(mktemp -d /tmp/sandbox-agent-demo.XXXXXX)
addr="unix://$dir/agent.sock"
"$PY" -m agent --server-addr "$addr" --log-level warning 2>"$dir/agent.log" &
agent_pid=$!
cleanup() { kill "$agent_pid" 2>/dev/null || true; wait "$agent_pid" 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$dir/agent.sock" ] && break; sleep 0.05; done

echo "+ agentctl --server-addr $addr check"
"$CTL" --server-addr "$addr" check
echo "+ agentctl --server-addr $addr version"
"$CTL" --server-addr "$addr" version
echo "+ agentctl --server-addr $addr call grpc.Health/Check '{\"service\": \"demo\"}'"
"$CTL" --server-addr "$addr" call grpc.Health/Check '{"service": "demo"}'
echo "+ agentctl --server-addr $addr call grpc.AgentService/CreateContainer '{\"container_id\": \"demo\"}'   (not built yet)"
"$CTL" --server-addr "$addr" call grpc.AgentService/CreateContainer '{"container_id": "demo"}' || echo "(exit $?, as expected for an RPC not implemented yet)"
