#!/usr/bin/env python3
"""The agent on this host, driven over ttRPC like a Kata runtime would, beside runc.

    .venv/bin/python bench/agent_bench.py [--runtime oci-launcher|runc] [--n 50]

Prints: resident memory (RSS, PSS) of init, the idle daemon and the warm launcher (zygote);
CreateContainer + StartContainer + WaitProcess latency for /bin/true (median of N) beside
`runc run` of the same bundle and beside the same agent with --no-zygote (our launcher's CLI
per runtime command), all interleaved in one run; ExecProcess + WaitProcess latency for both
agents; ReadStdout throughput for 256 MiB of output (median of --stdout-runs, with the CPU
seconds the daemon and the client spent on each). Medians and ratios; the machine is noisy.
"""

from __future__ import annotations

import argparse
import contextlib
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


def runc_run(bundle: Path, name: str) -> float | None:
    t0 = time.perf_counter()
    r = subprocess.run(["runc", "run", "--bundle", str(bundle), name],
                       stdin=subprocess.DEVNULL, capture_output=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        print("runc run failed:", r.stderr.decode()[-500:])
        return None
    return dt


def zygote_of(init_pid: int) -> int | None:
    out = subprocess.run(["ps", "-ww", "-e", "-o", "pid=,ppid=,args="], capture_output=True,
                         text=True).stdout
    for line in out.splitlines():
        p, pp, a = line.split(None, 2)
        if int(pp) == init_pid and "agent.privsep.zygote" in a:
            return int(p)
    return None


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    return (int(rest[11]) + int(rest[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runtime", default="oci-launcher")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--stdout-mib", type=int, default=256)
    ap.add_argument("--stdout-runs", type=int, default=5, help="ReadStdout runs (median reported)")
    ap.add_argument("--no-cli", action="store_true",
                    help="skip the second agent that runs our launcher through its CLI")
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
    # The agent as configured (our launcher: through the warm launcher), and, in the same run
    # and interleaved with it, the same agent with --no-zygote (a launcher CLI process per
    # runtime command, the previous design), and runc run.
    agents = {"agent": Agent(tmp / "agent")}
    if args.runtime == "oci-launcher" and not args.no_cli:
        agents["agent --no-zygote"] = Agent(tmp / "agent-cli", extra=("--no-zygote",))
    for a in agents.values():
        a.tmp = a.run_dir.parent
        a.tmp.mkdir()
        os.chmod(a.tmp, 0o755)
    bundle = tmp / "runc-bundle"
    bundle.mkdir()
    import json
    cfg = spec(rootfs, ["/bin/true"], netns=False)
    cfg["root"]["path"] = rootfs
    (bundle / "config.json").write_text(json.dumps(cfg))
    lat = {name: [] for name in list(agents) + ["runc run"]}
    lat_exec = {name: [] for name in agents}
    out_runs: list[tuple[int, float, int, float, float]] = []
    try:
        for a in agents.values():
            a.start()
        time.sleep(1.0)
        print(f"agent_bench: runtime={args.runtime}, N={args.n}\n")
        print("== memory, idle ==")
        for name, a in agents.items():
            pids = a.pids()
            z = zygote_of(pids["init"])
            if z:
                pids["zygote"] = z
            for role, pid in pids.items():
                rss, pss = mem_of(pid)
                print(f"{name:>18} {role:>7}: RSS {mib(rss):>10}  PSS {mib(pss):>10}")
        print("   goals: daemon PSS <= 20 MiB, init RSS <= 10 MiB; the zygote (warm launcher) is"
              "\n   the price of fast runtime commands, reported on its own\n")

        async def body():
            async with contextlib.AsyncExitStack() as stack:
                cs = {name: await stack.enter_async_context(open_client(a.addr))
                      for name, a in agents.items()}
                cfg = spec(rootfs, ["/bin/true"], netns=False)
                for i in range(args.n + 3):
                    for name, c in cs.items():
                        t0 = time.perf_counter()
                        await C.create(c, f"t{i}", cfg)
                        await C.start(c, f"t{i}")
                        code = await C.wait(c, f"t{i}")
                        dt = time.perf_counter() - t0
                        assert code == 0
                        await C.remove(c, f"t{i}")
                        if i >= 3:
                            lat[name].append(dt)
                    dt = runc_run(bundle, f"bench-runc-{os.getpid()}-{i}")
                    if dt is not None and i >= 3:
                        lat["runc run"].append(dt)
                for name, c in cs.items():
                    await C.create(c, "ex", spec(rootfs, ["sleep", "10000"], netns=False))
                    await C.start(c, "ex")
                for i in range(args.n + 3):
                    for name, c in cs.items():
                        t0 = time.perf_counter()
                        await C.exec_(c, "ex", f"e{i}", ["/bin/true"])
                        await C.wait(c, "ex", f"e{i}")
                        if i >= 3:
                            lat_exec[name].append(time.perf_counter() - t0)
                for name, c in cs.items():
                    rss, pss = mem_of(agents[name].pids()["daemon"])
                    print(f"{name}: daemon with one container and {args.n} execs done: "
                          f"RSS {mib(rss)} PSS {mib(pss)}")
                    z = zygote_of(agents[name].pids()["init"])
                    if z:
                        rss, pss = mem_of(z)
                        print(f"{name}: zygote after {args.n} containers and {args.n} execs: "
                              f"RSS {mib(rss)} PSS {mib(pss)}")
                    await C.remove(c, "ex")
                print()
                c = cs["agent"]
                from agent.protos import agent_pb2
                # ReadStdout: a container writes stdout_mib MiB as fast as dd can; the client
                # reads it to EOF with 4 MiB requests, as a runtime's copy loop does
                daemon_pid = agents["agent"].pids()["daemon"]
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
        for a in agents.values():
            a.stop()
        shutil.rmtree(tmp, ignore_errors=True)

    def ms(xs):
        return statistics.median(xs) * 1000 if xs else float("nan")

    ref = ms(lat["runc run"])
    print("== latency, median ms (runs interleaved) ==")
    for name, xs in lat.items():
        label = "runc run /bin/true" if name == "runc run" else f"{name} Create+Start+Wait /bin/true"
        ratio = f"   {ms(xs) / ref:5.2f}x runc" if name != "runc run" and lat["runc run"] else ""
        print(f"{label:<48}: {ms(xs):8.1f}{ratio}")
    print("   goal: agent <= 1.5x runc run")
    for name, xs in lat_exec.items():
        print(f"{name + ' ExecProcess+Wait /bin/true':<48}: {ms(xs):8.1f}")
    print("\n== ReadStdout throughput ==")
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
