#!/usr/bin/env python3
"""The idle comms daemon's memory on this host: several fresh agents, medians.

    .venv/bin/python bench/daemon_mem_bench.py [--runs 5] [--idle 1.0] [--variant NAME=CMD ...]

Each run starts `python -m agent.init` (subreaper, own pid and mount namespace, as the agent
tests do), waits until the confined daemon answers Health/Check, lets it idle, and reads
/proc/PID/smaps_rollup of the daemon and of init: RSS, PSS, anonymous and private bytes
(anonymous is what the daemon itself allocated; PSS also holds its share of the
interpreter's and libraries' file pages, which depends on what else runs). Variants start
the daemon with another command line (init's --daemon-cmd), e.g.

    --variant 'no-site=/path/to/python -S -m agent.daemon'

Runs of the variants are interleaved, so a busy machine disturbs them alike. The goal of
issue 4 is a daemon PSS <= 20 MiB; in the guest, read it from `agentctl metrics`.
"""

from __future__ import annotations

import argparse
import os
import shlex
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

from conftest import Agent  # noqa: E402  (tests/agent/conftest.py)

FIELDS = ("Rss", "Pss", "Anonymous", "Private")


def smaps(pid: int) -> dict[str, int]:
    out = dict.fromkeys(FIELDS, 0)
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in out:
                out[key] += int(val.split()[0]) * 1024
            elif key in ("Private_Clean", "Private_Dirty"):
                out["Private"] += int(val.split()[0]) * 1024
    return out


def one_run(daemon_cmd: str | None, idle: float) -> dict[str, dict[str, int]]:
    tmp = Path(tempfile.mkdtemp(prefix="sa-dmem-", dir="/tmp"))
    os.chmod(tmp, 0o755)
    # the tests' agent, with init's --daemon-cmd when a variant asks for one
    agent = Agent(tmp, extra=("--daemon-cmd", daemon_cmd) if daemon_cmd else ())
    try:
        agent.start()
        time.sleep(idle)
        pids = agent.pids()
        return {role: smaps(pids[role]) for role in ("daemon", "init")}
    finally:
        agent.stop()
        subprocess.run(["umount", "-R", "-l", str(tmp / "run")], capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--idle", type=float, default=1.0, help="seconds of idling before reading")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=CMD",
                    help="another daemon command line, measured alongside the default")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("daemon_mem_bench: needs root", file=sys.stderr)
        return 1
    variants: list[tuple[str, str | None]] = [("default", None)]
    for v in args.variant:
        name, _, cmd = v.partition("=")
        variants.append((name, cmd))
    results: dict[str, list[dict]] = {name: [] for name, _ in variants}
    for _ in range(args.runs):
        for name, cmd in variants:
            results[name].append(one_run(cmd, args.idle))

    def med(rows, role, key):
        return statistics.median(r[role][key] for r in rows) / 2**20

    print(f"daemon_mem_bench: {args.runs} runs per variant, {args.idle:.1f} s idle, MiB (median)")
    print(f"{'variant':<14}{'role':<8}" + "".join(f"{k:>11}" for k in FIELDS))
    for name, cmd in variants:
        for role in ("daemon", "init"):
            print(f"{name:<14}{role:<8}" + "".join(f"{med(results[name], role, k):11.1f}" for k in FIELDS))
        if cmd:
            print(f"{'':<14}daemon command: {shlex.join(shlex.split(cmd))}")
    print("goal: daemon PSS <= 20 MiB (issue 4)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
