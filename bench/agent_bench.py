#!/usr/bin/env python3
"""The agent on this host, driven over ttRPC like a Kata runtime would, beside runc.

    .venv/bin/python bench/agent_bench.py [--runtime oci-launcher|runc] [--n 50]

Prints: resident memory (RSS, PSS) of init and of the idle daemon; CreateContainer +
StartContainer + WaitProcess latency for /bin/true (median of N) beside `runc run` of the same
bundle; ExecProcess + WaitProcess latency; ReadStdout throughput for 256 MiB of output (median
of --stdout-runs, with the CPU seconds the daemon and the client spent on each).
Medians and ratios; the machine is noisy.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "agent"))

import trio  # noqa: E402

import client as C  # noqa: E402  (tests/agent/client.py)
from conftest import Agent, spec  # noqa: E402
from agent.ttrpc import open_client  # noqa: E402


def mem_of(pid: int) -> tuple[int, int]:
    rss = pss = 0
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                rss = int(line.split()[1]) * 1024
            elif line.startswith("Pss:"):
                pss = int(line.split()[1]) * 1024
    return rss, pss


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def make_rootfs(base: Path) -> str:
    root = base / "rootfs"
    (root / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", root / "bin" / "busybox")
    for name in subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True).stdout.split():
        if name != "busybox":
            os.symlink("busybox", root / "bin" / name)
    for d in ("proc", "dev", "tmp", "sys"):
        (root / d).mkdir()
    return str(root)


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", default="oci-launcher")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--stdout-mib", type=int, default=256)
    ap.add_argument("--stdout-runs", type=int, default=5, help="ReadStdout runs (median reported)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("agent_bench: needs root", file=sys.stderr)
        return 1

    tmp = Path(tempfile.mkdtemp(prefix="sa-bench-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    rootfs = make_rootfs(tmp)
    os.environ["SANDBOX_AGENT_TEST_RUNTIME"] = args.runtime
    import conftest
    conftest.RUNTIME = args.runtime
    agent = Agent(tmp / "agent")
    (tmp / "agent").mkdir()
    os.chmod(tmp / "agent", 0o755)
    agent.start()
    try:
        time.sleep(1.0)
        pids = agent.pids()
        print(f"agent_bench: runtime={args.runtime}, N={args.n}\n")
        print("== memory, idle ==")
        for role in ("init", "daemon"):
            rss, pss = mem_of(pids[role])
            print(f"{role:>7}: RSS {mib(rss):>10}  PSS {mib(pss):>10}")
        print("   goals: daemon PSS <= 20 MiB, init RSS <= 10 MiB\n")

        lat_agent, lat_exec = [], []
        out_runs: list[tuple[int, float, int, float, float]] = []

        async def body():
            async with open_client(agent.addr) as c:
                cfg = spec(rootfs, ["/bin/true"], netns=False)
                for i in range(args.n + 3):
                    t0 = time.perf_counter()
                    await C.create(c, f"t{i}", cfg)
                    await C.start(c, f"t{i}")
                    code = await C.wait(c, f"t{i}")
                    dt = time.perf_counter() - t0
                    assert code == 0
                    await C.remove(c, f"t{i}")
                    if i >= 3:
                        lat_agent.append(dt)
                await C.create(c, "ex", spec(rootfs, ["sleep", "10000"], netns=False))
                await C.start(c, "ex")
                for i in range(args.n + 3):
                    t0 = time.perf_counter()
                    await C.exec_(c, "ex", f"e{i}", ["/bin/true"])
                    await C.wait(c, "ex", f"e{i}")
                    if i >= 3:
                        lat_exec.append(time.perf_counter() - t0)
                rss, pss = mem_of(agent.pids()["daemon"])
                print(f"daemon with one container and {args.n} execs done: RSS {mib(rss)} PSS {mib(pss)}\n")
                await C.remove(c, "ex")
                # ReadStdout: a container writes stdout_mib MiB as fast as dd can; the client
                # reads it to EOF with 4 MiB requests, as a runtime's copy loop does
                from agent.protos import agent_pb2
                daemon_pid = agent.pids()["daemon"]
                for run in range(args.stdout_runs):
                    cid = f"out{run}"
                    await C.create(c, cid, spec(rootfs, ["dd", "if=/dev/zero", "bs=1M", f"count={args.stdout_mib}"],
                                                netns=False))
                    await C.start(c, cid)
                    req = agent_pb2.ReadStreamRequest(container_id=cid, len=4 << 20)
                    got = calls = 0
                    d0, c0, t0 = cpu_of(daemon_pid), time.process_time(), time.perf_counter()
                    while True:
                        r = await c.call(C.SVC, "ReadStdout", req, agent_pb2.ReadStreamResponse)
                        data = r.data  # every read of a bytes field is a new copy: read it once
                        if not data:
                            break
                        got += len(data)
                        calls += 1
                    secs = time.perf_counter() - t0
                    out_runs.append((got, secs, calls, cpu_of(daemon_pid) - d0, time.process_time() - c0))
                    await C.wait(c, cid)
                    await C.remove(c, cid)
                await trio.sleep(3)  # the daemon trims its heap once quiet for 2 s
                rss, pss = mem_of(daemon_pid)
                print(f"daemon idle after the ReadStdout runs: RSS {mib(rss)} PSS {mib(pss)}\n")

        trio.run(body)
    finally:
        agent.stop()

    # runc run of the same bundle, in the same run
    bundle = tmp / "runc-bundle"
    bundle.mkdir()
    import json
    cfg = spec(rootfs, ["/bin/true"], netns=False)
    cfg["root"]["path"] = rootfs
    (bundle / "config.json").write_text(json.dumps(cfg))
    lat_runc = []
    for i in range(args.n + 3):
        t0 = time.perf_counter()
        r = subprocess.run(["runc", "run", "--bundle", str(bundle), f"bench-runc-{os.getpid()}-{i}"],
                           stdin=subprocess.DEVNULL, capture_output=True)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            print("runc run failed:", r.stderr.decode()[-500:])
            break
        if i >= 3:
            lat_runc.append(dt)
    shutil.rmtree(tmp, ignore_errors=True)

    def ms(xs):
        return statistics.median(xs) * 1000 if xs else float("nan")

    print("== latency, median ms ==")
    print(f"agent Create+Start+Wait /bin/true : {ms(lat_agent):8.1f}")
    print(f"runc run /bin/true                : {ms(lat_runc):8.1f}")
    if lat_runc:
        print(f"ratio agent/runc                  : {ms(lat_agent) / ms(lat_runc):8.2f}x   (goal <= 1.5x)")
    print(f"agent ExecProcess+Wait /bin/true  : {ms(lat_exec):8.1f}\n")
    print("== ReadStdout throughput ==")
    for got, secs, calls, dcpu, ccpu in out_runs:
        print(f"{mib(got)} in {secs:.2f}s = {got / secs / 1e6:5.0f} MB/s, {calls} calls "
              f"({got / max(calls, 1) / 1024:.0f} KiB each); CPU s: daemon {dcpu:.2f}, client {ccpu:.2f}")
    if out_runs:
        rates = [got / secs / 1e6 for got, secs, *_ in out_runs]
        print(f"median {statistics.median(rates):.0f} MB/s over {len(rates)} runs (min {min(rates):.0f}, "
              f"max {max(rates):.0f})   (goal >= 500 MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
