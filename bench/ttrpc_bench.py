#!/usr/bin/env python3
"""Unary grpc.Health/Check over a unix socket: our agent's ttRPC server vs containerd's Go
ttRPC server, in the same run, driven by the same client.

The load client is the Go peer (tests/interop/ttrpcpeer, containerd/ttrpc from Debian), so
both servers face an identical, fast caller and the figures compare servers. A second table
drives both servers with our Python client.

    .venv/bin/python bench/ttrpc_bench.py [--calls N] [--rounds R]

Prints calls/s, p50 and p99 latency for 1 and 64 concurrent callers, and the ratios
ours/Go. Medians over R rounds; these machines are noisy, so read ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests" / "interop"))
sys.path.insert(0, str(REPO))
import gopeer  # noqa: E402


def wait_for(path: str, proc: subprocess.Popen, timeout: float = 15) -> None:
    t0 = time.monotonic()
    while not os.path.exists(path):
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            raise RuntimeError(f"server for {path} did not come up")
        time.sleep(0.02)


def go_client(peer: Path, sock: str, calls: int, conc: int) -> dict:
    r = subprocess.run([str(peer), "bench", "-addr", sock, "-n", str(calls), "-c", str(conc)],
                       capture_output=True, text=True, timeout=600, check=True)
    return json.loads(r.stdout)


def py_client(sock: str, calls: int, conc: int) -> dict:
    code = r"""
import sys, time, json, trio
from agent.ttrpc import open_client
from agent.protos import health_pb2
sock, n, conc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
req = health_pb2.CheckRequest(); R = health_pb2.HealthCheckResponse
lat = []
async def main():
    async with open_client("unix://" + sock) as c:
        for _ in range(200):
            await c.call("grpc.Health", "Check", req, R)
        it = iter(range(n))
        async def worker():
            for _ in it:
                t0 = time.perf_counter()
                await c.call("grpc.Health", "Check", req, R)
                lat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        async with trio.open_nursery() as nur:
            for _ in range(conc):
                nur.start_soon(worker)
        return time.perf_counter() - t0
wall = trio.run(main)
lat.sort()
print(json.dumps({"calls_per_s": n / wall, "p50_us": lat[n // 2] * 1e6, "p99_us": lat[n * 99 // 100] * 1e6}))
"""
    r = subprocess.run([sys.executable, "-c", code, sock, str(calls), str(conc)], capture_output=True, text=True,
                       timeout=600, check=True, cwd=REPO)
    return json.loads(r.stdout)


def median_of(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in ("calls_per_s", "p50_us", "p99_us")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--python-client", action="store_true", default=True)
    args = ap.parse_args()

    try:
        peer = gopeer.build()
    except gopeer.GoUnavailable as exc:
        print(f"ttrpc_bench: {exc}", file=sys.stderr)
        return 1
    tmp = tempfile.mkdtemp(prefix="ttrpc-bench-")
    ours_sock, go_sock = f"{tmp}/ours.sock", f"{tmp}/go.sock"
    ours = subprocess.Popen([sys.executable, "-m", "agent", "--server-addr", f"unix://{ours_sock}",
                             "--log-level", "warning"], cwd=REPO, stderr=subprocess.DEVNULL)
    go = gopeer.start_server(peer, go_sock)
    try:
        wait_for(ours_sock, ours)
        print(f"ttRPC unary grpc.Health/Check over a unix socket; {args.calls} calls x {args.rounds} rounds, "
              f"medians of rounds\n")
        clients = [("Go client", lambda s, n, c: go_client(peer, s, n, c))]
        if args.python_client:
            clients.append(("Python client", py_client))
        for cname, fn in clients:
            print(f"== load from the {cname} ==")
            print(f"{'callers':>7} {'server':>7} {'calls/s':>10} {'p50 us':>9} {'p99 us':>9}")
            for conc in (1, 64):
                res = {}
                for sname, sock in (("ours", ours_sock), ("go", go_sock)):
                    runs = []
                    for _ in range(args.rounds):
                        # interleave servers round by round so drift hits both alike
                        runs.append(fn(sock, args.calls, conc))
                    res[sname] = median_of(runs)
                    m = res[sname]
                    print(f"{conc:>7} {sname:>7} {m['calls_per_s']:>10.0f} {m['p50_us']:>9.0f} {m['p99_us']:>9.0f}")
                o, g = res["ours"], res["go"]
                print(f"{conc:>7} {'ratio':>7} {o['calls_per_s'] / g['calls_per_s']:>9.2f}x "
                      f"{o['p50_us'] / g['p50_us']:>8.2f}x {o['p99_us'] / g['p99_us']:>8.2f}x   (ours/Go)")
            print()
    finally:
        ours.terminate()
        go.terminate()
        ours.wait(10)
        go.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
