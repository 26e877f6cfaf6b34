#!/usr/bin/env python3
"""`run` of /bin/true in a busybox bundle: oci-launcher vs runc vs crun, same machine, same run.

Prints the median wall time of each (>= 20 runs, interleaved so drift hits all alike) and the
ratios. Needs root, Debian's busybox-static, runc and crun.

crun refuses this host's hybrid cgroup layout, so it runs as
`unshare -m --propagation private sh -c 'umount /sys/fs/cgroup/unified; crun run ...'`; the cost
of that wrapper alone is measured too and subtracted in the "crun (net)" line.

Our launcher is measured twice:
  * "oci-launcher"  - `python -I -S -c ENTRY`, the way init starts it, interpreter on the
    ordinary (writable) root file system: the container's init is a plain fork that reaches the
    program through the sealed exec trampoline (CVE-2019-5736 guard, launcher/trampoline.py);
  * "oci-launcher, ro exe" - the interpreter on a read-only bind mount, as in the guest image:
    the guard accepts it as is. Run in the same kind of private mount namespace wrapper as crun
    (wrapper cost subtracted in its "net" line).
In both, `run` creates the container's init as its own child with one clone3 (new namespaces,
created in the cgroup2 directory) and the init joins each v1 hierarchy by writing "0" to its
tasks file, instead of the launcher writing cgroup.procs, which waits an RCU grace period the
first time (6-20 ms on this kernel; runc pays it).

And once more the way the guest's init uses it: a warm Python process (modules imported,
interpreter on a read-only mount) that forks and calls ``Launcher.run`` in the child, timed
inside that process ("library, forked from a warm process").

usage: bench/launcher_bench.py [--runs N] [--console-script]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = os.path.join(REPO, ".venv", "bin", "python")
if not os.path.exists(PY):
    PY = sys.executable
ENTRY = f"import sys;sys.path.insert(0,{REPO!r});from agent.oci_launcher import main;main()"


def make_bundle(d: str) -> str:
    bundle = os.path.join(d, "bundle")
    rootfs = os.path.join(bundle, "rootfs")
    os.makedirs(os.path.join(rootfs, "bin"))
    for sub in ("proc", "sys", "dev", "tmp"):
        os.makedirs(os.path.join(rootfs, sub))
    shutil.copy("/bin/busybox", os.path.join(rootfs, "bin", "busybox"))
    names = subprocess.run(["/bin/busybox", "--list"], capture_output=True, text=True,
                           check=True).stdout.split()
    for n in names:
        if n != "busybox":
            os.symlink("busybox", os.path.join(rootfs, "bin", n))
    # the config `runc spec` writes, with /bin/true and no terminal
    subprocess.run(["runc", "spec"], cwd=bundle, check=True)
    with open(os.path.join(bundle, "config.json")) as f:
        cfg = json.load(f)
    cfg["process"]["args"] = ["/bin/true"]
    cfg["process"]["terminal"] = False
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(cfg, f)
    return bundle


WARM = r"""
import os, sys, time
sys.path.insert(0, REPO)
from agent.launcher.container import Launcher, wait_exit
import agent.launcher.cgroups, agent.launcher.init  # what a long-lived parent has loaded
for line in sys.stdin:
    name = line.strip()
    t = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = Launcher(ROOT).run(name, BUNDLE)
        finally:
            os._exit(code)
    rc = wait_exit(pid)
    print(f"{rc} {time.perf_counter() - t}", flush=True)
"""


class Warm:
    """A long-lived Python process (interpreter on a read-only mount, modules loaded) that
    forks and calls Launcher.run once per request: how the guest's init would use it."""

    def __init__(self, bundle: str, root: str, interp: str) -> None:
        code = (WARM.replace("REPO", repr(REPO)).replace("ROOT", repr(root))
                .replace("BUNDLE", repr(bundle)))
        ro = (f"mount --bind {interp} {interp} && mount -o remount,bind,ro {interp} {interp}"
              " && ")
        self.p = subprocess.Popen(["unshare", "-m", "--propagation", "private", "sh", "-c",
                                   ro + 'exec "$0" -I -S -c "$1"', PY, code], cwd=bundle,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def run(self, name: str) -> float:
        self.p.stdin.write(name + "\n")
        self.p.stdin.flush()
        rc, dt = self.p.stdout.readline().split()
        if rc != "0":
            raise SystemExit(f"warm run {name} exited {rc}")
        return float(dt)

    def close(self) -> None:
        self.p.stdin.close()
        self.p.wait(30)


def timed(cmd: list[str], cwd: str) -> float:
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    dt = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{cmd[:4]}... failed ({p.returncode}): {p.stderr.decode()[-500:]}")
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=25)
    ap.add_argument("--console-script", action="store_true",
                    help="also time the `oci-launcher` console script (imports site)")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("needs root")
    for tool in ("runc", "crun", "unshare", "/bin/busybox"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} not found")
    with tempfile.TemporaryDirectory(prefix="launcher-bench-") as d:
        bundle = make_bundle(d)
        interp = os.path.realpath(PY)
        roots = {k: os.path.join(d, k) for k in ("ours", "ours-ro", "runc", "crun", "cs")}
        wrap = "umount /sys/fs/cgroup/unified 2>/dev/null; "
        ro = (f"mount --bind {interp} {interp} && mount -o remount,bind,ro {interp} {interp}"
              " && ")
        cases = {
            "oci-launcher": lambda i: [PY, "-I", "-S", "-c", ENTRY, "--root", roots["ours"],
                                       "run", f"o{i}"],
            "oci-launcher, ro exe": lambda i: [
                "unshare", "-m", "--propagation", "private", "sh", "-c",
                ro + f'exec {PY} -I -S -c "{ENTRY}" --root {roots["ours-ro"]} run r{i}'],
            "runc": lambda i: ["runc", "--root", roots["runc"], "run", f"u{i}"],
            "crun": lambda i: ["unshare", "-m", "--propagation", "private", "sh", "-c",
                               wrap + f"exec crun --root {roots['crun']} run c{i}"],
            "wrapper only (unshare+sh+umount)": lambda i: [
                "unshare", "-m", "--propagation", "private", "sh", "-c", wrap + "exec true"],
            "wrapper only (unshare+sh+ro bind)": lambda i: [
                "unshare", "-m", "--propagation", "private", "sh", "-c", ro + "exec true"],
        }
        if args.console_script:
            cs = os.path.join(REPO, ".venv", "bin", "oci-launcher")
            cases["oci-launcher console script"] = lambda i: [cs, "--root", roots["cs"], "run",
                                                              f"s{i}"]
        warm_name = "library, forked from a warm process"
        warm = Warm(bundle, os.path.join(d, "warm"), interp)
        times: dict[str, list[float]] = {k: [] for k in cases}
        times[warm_name] = []
        try:
            for k, f in cases.items():  # warm-up: page cache, pyc files
                timed(f(-1), bundle)
            warm.run("w-1")
            for i in range(args.runs):
                for k, f in cases.items():
                    times[k].append(timed(f(i), bundle))
                times[warm_name].append(warm.run(f"w{i}"))
        finally:
            warm.close()
        med = {k: statistics.median(v) * 1000 for k, v in times.items()}
        crun_net = med["crun"] - med["wrapper only (unshare+sh+umount)"]
        ours_ro_net = med["oci-launcher, ro exe"] - med["wrapper only (unshare+sh+ro bind)"]
        print(f"run of /bin/true in a busybox bundle, median of {args.runs} runs "
              f"(interleaved), ms")
        for k in times:
            lo, hi = min(times[k]) * 1000, max(times[k]) * 1000
            print(f"  {k:40s} {med[k]:7.1f}   (min {lo:.1f}, max {hi:.1f})")
        print(f"  {'crun (net of wrapper)':40s} {crun_net:7.1f}")
        print(f"  {'oci-launcher, ro exe (net of wrapper)':40s} {ours_ro_net:7.1f}")
        print("ratios")
        print(f"  oci-launcher / runc                  {med['oci-launcher'] / med['runc']:.2f}")
        print(f"  oci-launcher / crun (net)            {med['oci-launcher'] / crun_net:.2f}")
        print(f"  oci-launcher ro exe (net) / runc     {ours_ro_net / med['runc']:.2f}")
        print(f"  oci-launcher ro exe (net) / crun(net) {ours_ro_net / crun_net:.2f}")
        lib = med["library, forked from a warm process"]
        print(f"  library (warm fork) / runc           {lib / med['runc']:.2f}")
        print(f"  library (warm fork) / crun (net)     {lib / crun_net:.2f}")


if __name__ == "__main__":
    main()
