#!/usr/bin/env python3
"""The guest VM: initrd size, boot time to a serving agent, the agent's memory in the guest.

    .venv/bin/python bench/vm_bench.py [--boots 5] [--guest-dir out/guest] [--accel auto]

Builds the guest if needed (rootfs-build.sh, cached), then prints

* the initrd's size (compressed, and the staged tree it unpacks to);
* boot times, median of N boots (KVM where `-accel kvm` works, else TCG), each from QEMU's
  start to: the guest opening the agent's virtio-serial port (init running, modules loaded),
  and grpc.Health/Check answering (the daemon imported, confined and serving); beside it, in
  the same run, the floor: the same kernel booting a minimal initrd whose /init is busybox sh
  writing a line to the console (kernel + QEMU, no Python);
* the agent's guest memory from GetMetrics (PSS and RSS of init and the daemon, and guest
  MemTotal - MemAvailable) right after boot and with one container running.
Figures only: no pass/fail. TCG on a shared 2-core host is noisy; read medians.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agentctl import vm  # noqa: E402

ROOTFS = "/opt/busybox-rootfs"


def build(guest_dir: Path) -> None:
    subprocess.run([str(REPO / "rootfs-build.sh"), str(guest_dir)], check=True,
                   stdout=subprocess.DEVNULL)


def build_info(guest_dir: Path) -> dict[str, str]:
    info = {}
    for line in (guest_dir / "build-info").read_text().splitlines():
        k, _, v = line.partition(" ")
        info[k] = v
    return info


def floor_initrd(tmp: Path) -> Path:
    """A minimal initrd: static busybox, /init printing a marker and powering off."""
    sys.path.insert(0, str(REPO / "guest-image"))
    import cpio  # guest-image/cpio.py
    import stat
    root = tmp / "floor"
    (root / "bin").mkdir(parents=True)
    (root / "dev").mkdir()
    (root / "proc").mkdir()
    shutil.copy2(shutil.which("busybox"), root / "bin/busybox")
    (root / "init").write_text("#!/bin/busybox sh\n/bin/busybox echo FLOOR-READY\n"
                               "/bin/busybox poweroff -f\n")
    (root / "init").chmod(0o755)
    out = tmp / "floor.cpio"
    with open(out, "wb") as f:
        cpio.write(str(root), f, 0, [cpio.Node("dev/console", stat.S_IFCHR | 0o600, (5, 1))])
    return out


def floor_boot(kernel: Path, initrd: Path, accel: str, tmp: Path) -> float:
    log = tmp / "floor-console.log"
    log.unlink(missing_ok=True)
    argv = ["qemu-system-x86_64", "-M", "q35", "-accel", accel, "-cpu",
            "host" if accel == "kvm" else "max", "-m", "512", "-smp", "1", "-nodefaults",
            "-no-user-config", "-display", "none", "-no-reboot", "-kernel", str(kernel),
            "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1 loglevel=4",
            "-serial", f"file:{log}"]
    t0 = time.monotonic()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.monotonic() - t0 < 60:
            if log.exists() and b"FLOOR-READY" in log.read_bytes():
                return time.monotonic() - t0
            if p.poll() is not None:
                break
            time.sleep(0.01)
        raise RuntimeError(f"the floor guest did not print its marker: {log.read_text()[-500:]}")
    finally:
        if p.poll() is None:
            p.kill()
        p.wait()


def metrics(addr: str) -> dict[str, float]:
    from agent.protos import agent_pb2
    from agentctl import rpc
    info = rpc.resolve("grpc.AgentService/GetMetrics")
    text = rpc.call(addr, info, agent_pb2.GetMetricsRequest(), timeout=60).metrics
    out: dict[str, float] = {}
    for kind, name in (("proportional", "pss"), ("resident", "rss")):
        for proc, v in re.findall(rf'^sandbox_agent_process_{kind}_memory_bytes'
                                  rf'\{{process="(\w+)"\}} (\S+)', text, re.M):
            out[f"{proc}_{name}"] = float(v)
    mem = dict(re.findall(r'^sandbox_guest_meminfo_bytes\{item="(\w+)"\} (\S+)', text, re.M))
    if "MemTotal" in mem and "MemAvailable" in mem:
        out["guest_used"] = float(mem["MemTotal"]) - float(mem["MemAvailable"])
    return out


def start_sleeper(addr: str) -> None:
    import trio
    from agent.protos import agent_pb2
    from agent.ttrpc import open_client
    from agentctl.containers import DEFAULT_ENV, Empty, default_spec
    spec = default_spec(ROOTFS, ["sleep", "600"], terminal=False, env=DEFAULT_ENV)

    async def go():
        async with open_client(addr) as c:
            await c.call("grpc.AgentService", "CreateContainer", agent_pb2.CreateContainerRequest(
                container_id="bench", OCI=spec), Empty, timeout=120)
            await c.call("grpc.AgentService", "StartContainer", agent_pb2.StartContainerRequest(
                container_id="bench"), Empty, timeout=120)
    trio.run(go)


def mib(v: float) -> str:
    return f"{v / 1048576:6.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--boots", type=int, default=5)
    ap.add_argument("--guest-dir", default=str(REPO / "out" / "guest"))
    ap.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
    ap.add_argument("--memory", type=int, default=512)
    a = ap.parse_args()
    gdir = Path(a.guest_dir).resolve()
    build(gdir)
    info = build_info(gdir)
    print(f"guest: {info.get('kernel_package')}, python {info.get('python')}")
    print(f"initrd: {int(info['initrd_bytes']):,} bytes compressed (zstd), "
          f"{int(info['staged_bytes']):,} bytes unpacked; vmlinux {int(info['vmlinux_bytes']):,}")

    accel = a.accel if a.accel != "auto" else ("kvm" if vm.kvm_works() else "tcg")
    spec = vm.VMSpec(kernel=gdir / "vmlinux", initrd=gdir / "initrd.img",
                     cmdline=vm.default_cmdline(gdir / "initrd.img"), memory_mib=a.memory,
                     cpus=1, accel=accel, boot_timeout=120)
    boots, channels, floors, downs = [], [], [], []
    mem_idle: dict[str, float] = {}
    mem_busy: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="vm-bench-") as td:
        tmp = Path(td)
        floor = floor_initrd(tmp)
        for i in range(a.boots):
            floors.append(floor_boot(spec.kernel, floor, accel, tmp))
            state = tmp / f"vm{i}"
            st = vm.up(spec, state, retries=1)
            boots.append(st.boot_seconds)
            if st.channel_seconds is not None:
                channels.append(st.channel_seconds)
            if i == 0:
                mem_idle = metrics(st.server_addr)
                start_sleeper(st.server_addr)
                time.sleep(1)
                mem_busy = metrics(st.server_addr)
                # init starts its warm puller once the launcher's is ready (or at 30 s)
                end = time.monotonic() + 60
                last = -1.0
                while time.monotonic() < end:  # until it exists and has stopped growing
                    pss = mem_busy.get("puller_zygote_pss", -1.0)
                    if pss > 0 and abs(pss - last) < 0.01 * pss:
                        break
                    last = pss
                    time.sleep(2)
                    mem_busy = metrics(st.server_addr)
            t0 = time.monotonic()
            how = vm.down(state, timeout=60)
            downs.append(time.monotonic() - t0)
            if how != "powered off by the agent":
                print(f"  boot {i + 1}: shutdown fell back to {how}")
            print(f"  boot {i + 1}: channel open {st.channel_seconds:.2f} s, Check "
                  f"{st.boot_seconds:.2f} s, floor {floors[-1]:.2f} s, down {downs[-1]:.2f} s"
                  f"{' (retried)' if st.attempts > 1 else ''}", flush=True)
    med = statistics.median
    print(f"\nboot to Check answering ({accel}, median of {len(boots)}): {med(boots):.2f} s"
          f"   [min {min(boots):.2f}, max {max(boots):.2f}]")
    if channels:
        print(f"  of which to the agent port opened by init: {med(channels):.2f} s; "
              f"daemon start to serving: {med(boots) - med(channels):.2f} s")
    print(f"reference, same kernel + busybox-sh /init printing a line: {med(floors):.2f} s"
          f"  -> agent boot / floor = {med(boots) / med(floors):.2f}x")
    print(f"DestroySandbox to QEMU exit: {med(downs):.2f} s")
    print("\nagent memory in the guest (GetMetrics)   after boot    one container running "
          "(warm processes warmed up)")
    for key, label in (("init_pss", "init PSS"), ("daemon_pss", "daemon PSS"),
                       ("init_rss", "init RSS"), ("daemon_rss", "daemon RSS"),
                       ("zygote_pss", "warm launcher (zygote) PSS"),
                       ("zygote_rss", "warm launcher (zygote) RSS"),
                       ("puller_zygote_pss", "warm puller PSS"),
                       ("puller_zygote_rss", "warm puller RSS"),
                       ("guest_used", "guest MemTotal-MemAvailable")):
        if key in mem_idle or key in mem_busy:
            print(f"  {label:36s} {mib(mem_idle.get(key, float('nan')))}    "
                  f"{mib(mem_busy.get(key, float('nan')))}")
    if "init_pss" in mem_idle and "daemon_pss" in mem_idle:
        tot = mem_idle["init_pss"] + mem_idle["daemon_pss"]
        tot_b = mem_busy.get("init_pss", 0) + mem_busy.get("daemon_pss", 0)
        print(f"  {'init + daemon PSS':36s} {mib(tot)}    {mib(tot_b)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
