#!/usr/bin/env python3
"""The ReadStdout path alone: a writer on a pipe, the daemon's stdio.Stream and ttRPC server in
one process, our ttRPC client in another, over a unix socket. No container, no init: what the
daemon and the client cost per byte, with the CPU seconds of each side.

    .venv/bin/python bench/stdout_bench.py [--mib 256] [--runs 5] [--len 4194304]

Prints per run: MB/s (10^6 bytes/s), calls and bytes per call, CPU seconds of the server (the
daemon's part) and of the client; then medians. bench/agent_bench.py measures the same RPC
end to end against a real container.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SERVER = r"""
import os, socket, sys, trio
from agent.daemon.agent_service import AgentService
from agent.daemon.services import bind
from agent.daemon.stdio import Stream, make_pipe
from agent.protos import agent_pb2
from agent.ttrpc import Server

path, mib = sys.argv[1], int(sys.argv[2])


class Proc:
    tty = None
    stderr = None


class StdoutOnly(AgentService):
    # the real ReadStdout/_read code, over one pipe instead of a container's table
    def __init__(self, stream):
        self.p = Proc()
        self.p.stdout = stream

    def _process(self, cid, exec_id):
        return None, self.p


async def main():
    lsock = socket.socket(socket.AF_UNIX)
    lsock.bind(path)
    lsock.listen(1)
    server = Server()
    r, w = make_pipe()
    # the writer: dd, as the agent bench's container runs it
    writer = await trio.lowlevel.open_process(["dd", "if=/dev/zero", "bs=1M", f"count={mib}"], stdout=w,
                                              stderr=open(os.devnull, "wb"))
    os.close(w)
    bind(server, {AgentService.SERVICE: StdoutOnly(Stream(r))})
    async with trio.open_nursery() as n:
        n.start_soon(server.serve_socket, lsock)
        await writer.wait()
        # the client reads to EOF, then removes the .busy file; a client that died never
        # does: give up after a minute rather than linger
        with trio.move_on_after(60):
            while server.stats.calls == 0 or os.path.exists(path + ".busy"):
                await trio.sleep(0.01)
        n.cancel_scope.cancel()
    t = os.times()
    print(f"{t.user + t.system:.3f}", flush=True)


trio.run(main)
"""


def one(mib: int, length: int) -> dict:
    import trio

    from agent.protos import agent_pb2
    from agent.ttrpc import open_client

    tmp = tempfile.mkdtemp(prefix="sa-stdout-")
    path = os.path.join(tmp, "s.sock")
    Path(path + ".busy").touch()
    srv = subprocess.Popen([sys.executable, "-c", SERVER, path, str(mib)], cwd=REPO, stdout=subprocess.PIPE,
                           text=True)
    while not os.path.exists(path):
        if srv.poll() is not None:
            raise RuntimeError("server died")
        time.sleep(0.01)
    out = {}

    async def body():
        async with open_client(f"unix://{path}") as c:
            req = agent_pb2.ReadStreamRequest(container_id="x", len=length)
            got = calls = 0
            import resource
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            while True:
                r = await c.call("grpc.AgentService", "ReadStdout", req, agent_pb2.ReadStreamResponse)
                data = r.data  # each read of a bytes field makes a new copy: once
                if not data:
                    break
                got += len(data)
                calls += 1
            out.update(secs=time.perf_counter() - t0, client_cpu=time.process_time() - c0, bytes=got, calls=calls,
                       faults=resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)

    try:
        trio.run(body)
    finally:
        os.unlink(path + ".busy")
        try:
            server_out = srv.communicate(timeout=90)[0]
        finally:
            if srv.poll() is None:
                srv.kill()
                srv.wait()
            for f in os.listdir(tmp):
                os.unlink(os.path.join(tmp, f))
            os.rmdir(tmp)
    out["server_cpu"] = float(server_out.strip().splitlines()[-1])
    if out["bytes"] != mib << 20:
        raise RuntimeError(f"read {out['bytes']} bytes, expected {mib << 20}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--len", type=int, default=4 << 20, help="ReadStreamRequest.len")
    args = ap.parse_args()
    rows = []
    for _ in range(args.runs):
        r = one(args.mib, args.len)
        rows.append(r)
        print(f"{r['bytes'] / r['secs'] / 1e6:7.0f} MB/s  {r['calls']:4d} calls  "
              f"{r['bytes'] / r['calls'] / 1024:5.0f} KiB/call  server cpu {r['server_cpu']:.2f}s "
              f"(incl. start-up)  client cpu {r['client_cpu']:.2f}s, {r['faults']} page faults", flush=True)
    med = statistics.median(r["bytes"] / r["secs"] / 1e6 for r in rows)
    print(f"median {med:.0f} MB/s over {args.runs} runs of {args.mib} MiB; client cpu median "
          f"{statistics.median(r['client_cpu'] for r in rows):.2f}s, server cpu median "
          f"{statistics.median(r['server_cpu'] for r in rows):.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
