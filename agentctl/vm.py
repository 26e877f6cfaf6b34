"""``agentctl vm up|down|status``: boot the guest built by rootfs-build.sh in QEMU.

    agentctl vm up [--state-dir DIR] [--memory MiB] [--cpus N] [--kernel K --initrd I]
                   [--append WORDS] [--accel auto|kvm|tcg] [--boot-timeout S]
    agentctl vm status [--state-dir DIR]
    agentctl vm down [--state-dir DIR] [--timeout S]

``up`` starts QEMU in its own session (it outlives the command), waits until the agent answers
grpc.Health/Check, and prints ``server-addr: unix:///STATE/agent.sock``: the QEMU chardev
socket behind the guest's virtio-serial port, which any ttRPC client can dial. Choices:

* acceleration: KVM when ``-accel kvm`` actually starts (a 1.5 s probe: on hosts whose
  /dev/kvm cannot run an ordinary guest QEMU aborts at once), else TCG with ``-cpu max``;
* the kernel boots through QEMU's PVH entry (the ELF vmlinux), machine q35;
* the agent channel: vhost-vsock-pci when /dev/vhost-vsock exists (the address printed is then
  ``vsock://CID:1024``), else a virtio-serial port named agent.channel.0 on a unix socket
  chardev (server=on, wait=off);
* user-mode networking with virtio-net: the guest reaches the host's 127.0.0.1 at 10.0.2.2;
* a watchdog: a boot whose agent has not answered Check in ``--boot-timeout`` seconds is
  killed and retried once (on TCG if the first try used KVM).

The state dir holds ``state.json`` (pid, addresses, accel), ``agent.sock``, ``qmp.sock`` and
``console.log`` (the guest's serial console: kernel messages and the agent's JSON logs).

QEMU's chardev socket serves one client at a time (a second one waits until the first
disconnects). ``--mux`` (the default, for the CLI and :func:`up` alike) starts agentctl.vmrelay,
which holds that one connection for the VM's lifetime and multiplexes any number of ttRPC
clients on ``mux.sock`` (stream ids remapped); the printed ``server-addr`` is then the relay's.
``--direct`` hands out the chardev socket itself, for one long-lived client: the guest cannot
tell reliably where one host connection ends and the next begins (virtio-serial delivers a new
connection's first bytes before the guest learns that the previous one hung up), so a call
sent right after another client left may be taken for the old connection's and cancelled with
it. Seen in CI as a CreateContainer never answered; the relay never reconnects, so it cannot
happen there.
``down`` asks the agent to DestroySandbox (init stops the containers and powers off), waits for
QEMU to exit, and falls back to QMP ``quit`` and then signals.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_GUEST_DIR = REPO / "out" / "guest"
DEFAULT_STATE_DIR = Path(os.environ.get("XDG_RUNTIME_DIR", "/run")) / "sandbox-agent-vm"
QEMU = "qemu-system-x86_64"
CHANNEL_NAME = "agent.channel.0"
VSOCK_PORT = 1024
VSOCK_CID_BASE = 3  # 0-2 are reserved (hypervisor, local, host)


def vsock_cid(state_dir: Path) -> int:
    """The guest's vsock CID: one per state dir, so two VMs on a host do not collide (QEMU
    refuses a CID in use). Stable across `up`s of the same state dir."""
    import hashlib

    h = int.from_bytes(hashlib.sha256(str(Path(state_dir).resolve()).encode()).digest()[:4], "big")
    return VSOCK_CID_BASE + h % (1 << 30)
STATE_FILE = "state.json"


class VMError(Exception):
    """The VM could not be started, reached or stopped; the message says which and why."""


@dataclass
class VMSpec:
    """What to boot and with how much."""
    kernel: Path
    initrd: Path
    cmdline: str
    memory_mib: int = 512
    cpus: int = 1
    accel: str = "auto"           # auto | kvm | tcg
    boot_timeout: float = 90.0    # seconds from QEMU start to Check answering
    qemu: str = QEMU


@dataclass
class VMState:
    """What `up` leaves in state.json for `status` and `down`."""
    pid: int
    accel: str
    channel: str                  # "virtio-serial" | "vsock"
    server_addr: str
    qmp: str
    console: str
    started_at: float
    boot_seconds: float | None = None     # QEMU start -> Check answered
    channel_seconds: float | None = None  # QEMU start -> the guest opened the agent port
    attempts: int = 1
    argv: list[str] = field(default_factory=list)
    relay_pid: int | None = None          # agentctl.vmrelay, with --mux


# ---- pure parts: paths, command line, QEMU argv ------------------------------------------------

def guest_files(kernel: str | None, initrd: str | None) -> tuple[Path, Path]:
    """The kernel and initrd to boot: given, or rootfs-build.sh's default output."""
    base = Path(os.environ.get("SANDBOX_AGENT_GUEST_DIR", DEFAULT_GUEST_DIR))
    k = Path(kernel) if kernel else base / "vmlinux"
    i = Path(initrd) if initrd else base / "initrd.img"
    for what, p in (("kernel", k), ("initrd", i)):
        if not p.is_file():
            raise VMError(f"{what} {p} does not exist: build the guest with ./rootfs-build.sh "
                          "or pass --kernel/--initrd")
    return k, i


def default_cmdline(initrd: Path) -> str:
    """The command line rootfs-build.sh wrote next to the initrd (it names the modules)."""
    f = initrd.parent / "cmdline"
    if f.is_file():
        return f.read_text().strip()
    src = REPO / "guest-image" / "cmdline.txt"
    words = [ln.split("#", 1)[0].strip() for ln in src.read_text().splitlines()]
    return " ".join(w for w in words if w)


def channel_cmdline(cmdline: str, channel: str) -> str:
    """Point the agent at the channel QEMU provides (drop any other channel setting)."""
    words = [w for w in cmdline.split()
             if not w.startswith(("agent.channel=", "agent.server_addr="))]
    if channel == "vsock":
        words.append(f"agent.server_addr=vsock://-1:{VSOCK_PORT}")
    else:
        words.append(f"agent.channel={CHANNEL_NAME}")
    return " ".join(words)


def qemu_argv(spec: VMSpec, state_dir: Path, accel: str, channel: str) -> list[str]:
    """The QEMU command line for one boot."""
    cpu = "host" if accel == "kvm" else "max"
    argv = [
        spec.qemu, "-name", "sandbox-agent", "-M", "q35", "-accel", accel, "-cpu", cpu,
        "-m", str(spec.memory_mib), "-smp", str(spec.cpus),
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-kernel", str(spec.kernel), "-initrd", str(spec.initrd),
        "-append", channel_cmdline(spec.cmdline, channel),
        "-chardev", f"file,id=console,path={state_dir / 'console.log'}",
        "-serial", "chardev:console",
        "-qmp", f"unix:{state_dir / 'qmp.sock'},server=on,wait=off",
        # romfile= : no iPXE option ROM to load and run under TCG (it costs a second of boot)
        "-netdev", "user,id=net0",
        "-device", "virtio-net-pci,netdev=net0,romfile=",
    ]
    if channel == "vsock":
        argv += ["-device", f"vhost-vsock-pci,guest-cid={vsock_cid(state_dir)}"]
    else:
        argv += ["-device", "virtio-serial-pci,id=vser0",
                 "-chardev", f"socket,id=agent,path={state_dir / 'agent.sock'},server=on,wait=off",
                 "-device", f"virtserialport,bus=vser0.0,chardev=agent,name={CHANNEL_NAME}"]
    return argv


def pick_channel() -> str:
    return "vsock" if os.path.exists("/dev/vhost-vsock") else "virtio-serial"


def kvm_works(qemu: str = QEMU, probe_seconds: float = 1.5) -> bool:
    """True if QEMU starts with KVM: a paused q35 VM still running after probe_seconds.

    Hosts with a /dev/kvm that cannot run a normal guest (PVM) make QEMU abort at once.
    """
    if not os.access("/dev/kvm", os.R_OK | os.W_OK) or shutil.which(qemu) is None:
        return False
    p = subprocess.Popen([qemu, "-M", "q35", "-accel", "kvm", "-cpu", "host", "-m", "64",
                          "-nodefaults", "-display", "none", "-S"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        p.wait(probe_seconds)
        return False
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()
        return True


# ---- processes ------------------------------------------------------------------------------

def pid_alive(pid: int, state_dir: Path | None = None) -> bool:
    """Whether pid is a live (not zombie) process, and our QEMU if state_dir is given."""
    try:
        os.waitpid(pid, os.WNOHANG)  # reap it if it is our child and has exited
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            st = f.read()
        if st[st.rindex(b")") + 2:][:1] == b"Z":
            return False
        if state_dir is not None:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if str(state_dir).encode() not in f.read():
                    return False  # the pid was reused by something else
    except (OSError, ValueError):
        return False
    return True


def wait_exit(pid: int, timeout: float, state_dir: Path | None = None) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not pid_alive(pid, state_dir):
            return True
        time.sleep(0.05)
    return not pid_alive(pid, state_dir)


class QMP:
    """A minimal synchronous QMP client (JSON lines over the unix socket)."""

    def __init__(self, path: Path, timeout: float = 5.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(str(path))
        self.buf = b""
        self._read()  # greeting
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("QMP socket closed")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def execute(self, cmd: str, **args) -> object:
        msg = {"execute": cmd, **({"arguments": args} if args else {})}
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            r = self._read()
            if "return" in r:
                return r["return"]
            if "error" in r:
                raise VMError(f"QMP {cmd}: {r['error'].get('desc', r['error'])}")
            # an asynchronous event: skip

    def close(self) -> None:
        self.sock.close()


def port_open(qmp_path: Path) -> bool:
    """Whether the guest has opened the agent's virtio-serial port (QEMU's frontend-open)."""
    try:
        q = QMP(qmp_path, timeout=2.0)
    except OSError:
        return False
    try:
        for c in q.execute("query-chardev"):
            if c.get("label") == "agent":
                return bool(c.get("frontend-open"))
    except (OSError, ValueError, VMError):
        return False
    finally:
        q.close()
    return False


def check(addr: str, timeout: float) -> bool:
    """One grpc.Health/Check; True if the agent answered SERVING."""
    from agent.protos import health_pb2

    from . import rpc
    try:
        resp = rpc.call_named(addr, "grpc.Health/Check", timeout=timeout)
    except Exception:  # noqa: BLE001 - any failure is "not yet"
        return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


# ---- up / status / down -------------------------------------------------------------------

def load_state(state_dir: Path) -> VMState | None:
    try:
        data = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return VMState(**data)


def _save_state(state_dir: Path, st: VMState) -> None:
    tmp = state_dir / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(asdict(st), indent=1) + "\n")
    tmp.replace(state_dir / STATE_FILE)


def _boot_once(spec: VMSpec, state_dir: Path, accel: str, channel: str,
               attempt: int) -> VMState:
    for name in ("agent.sock", "qmp.sock"):
        try:
            (state_dir / name).unlink()
        except FileNotFoundError:
            pass
    argv = qemu_argv(spec, state_dir, accel, channel)
    qemu_log = open(state_dir / "qemu.log", "ab")
    t0 = time.monotonic()
    started = time.time()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qemu_log, stderr=qemu_log,
                            start_new_session=True, close_fds=True)
    qemu_log.close()
    addr = (f"vsock://{vsock_cid(state_dir)}:{VSOCK_PORT}" if channel == "vsock"
            else f"unix://{state_dir / 'agent.sock'}")
    st = VMState(pid=proc.pid, accel=accel, channel=channel, server_addr=addr,
                 qmp=str(state_dir / "qmp.sock"), console=str(state_dir / "console.log"),
                 started_at=started, attempts=attempt, argv=argv)
    _save_state(state_dir, st)
    deadline = t0 + spec.boot_timeout
    # Wait until init has opened the port (QMP says so) before sending a byte: a request
    # written before that is lost, and its answer could surface on a later connection.
    while channel == "virtio-serial" and time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if port_open(state_dir / "qmp.sock"):
            st.channel_seconds = round(time.monotonic() - t0, 3)
            break
        time.sleep(0.05)
    while time.monotonic() < deadline and proc.poll() is None:
        if check(addr, timeout=max(0.5, min(10.0, deadline - time.monotonic()))):
            st.boot_seconds = round(time.monotonic() - t0, 3)
            _save_state(state_dir, st)
            return st
        time.sleep(0.1)
    why = (f"QEMU exited with status {proc.returncode}" if proc.poll() is not None
           else f"the agent did not answer Check within {spec.boot_timeout:.0f}s")
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    raise VMError(f"boot attempt {attempt} ({accel}, {channel}) failed: {why}; see "
                  f"{state_dir / 'console.log'} and {state_dir / 'qemu.log'}")


def start_relay(st: VMState, state_dir: Path, timeout: float = 30.0) -> None:
    """Put agentctl.vmrelay in front of the chardev socket; st.server_addr becomes its socket."""
    listen = state_dir / "mux.sock"
    listen.unlink(missing_ok=True)
    log = open(state_dir / "relay.log", "ab")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(REPO)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    upstream = st.server_addr[len("unix://"):] if st.server_addr.startswith("unix://") else st.server_addr
    p = subprocess.Popen([sys.executable, "-m", "agentctl.vmrelay", "--upstream",
                          upstream, "--listen", str(listen)],
                         stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=env,
                         start_new_session=True, close_fds=True)
    log.close()
    st.relay_pid = p.pid
    addr = f"unix://{listen}"
    end = time.monotonic() + timeout
    while time.monotonic() < end and p.poll() is None:
        # The relay's first call may be lost to the reconnect race the module text describes
        # (the boot wait's own connection has just closed): each Check has its own timeout
        # and is asked again.
        if listen.exists() and check(addr, timeout=5.0):
            st.server_addr = addr
            _save_state(state_dir, st)
            return
        time.sleep(0.05)
    if p.poll() is None:
        p.kill()
    p.wait()
    raise VMError(f"the ttRPC relay did not come up; see {state_dir / 'relay.log'}")


def up(spec: VMSpec, state_dir: Path, retries: int = 1, mux: bool = True) -> VMState:
    """Boot the guest and return once its agent answers Check (one retry by default).

    mux: serve clients through agentctl.vmrelay (any number at once, one connection to the
    guest for its lifetime); False hands out QEMU's chardev socket (one long-lived client at a
    time: see the module text for why quickly successive clients are not safe there)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    old = load_state(state_dir)
    if old is not None and pid_alive(old.pid, state_dir):
        raise VMError(f"a VM already runs from {state_dir} (pid {old.pid}); "
                      "`agentctl vm down` first")
    if shutil.which(spec.qemu) is None:
        raise VMError(f"{spec.qemu} not found (apt-get install qemu-system-x86)")
    for name in ("console.log", "qemu.log"):
        try:
            (state_dir / name).unlink()
        except FileNotFoundError:
            pass
    accel = spec.accel
    if accel == "auto":
        accel = "kvm" if kvm_works(spec.qemu) else "tcg"
    channel = pick_channel()
    errors = []
    for attempt in range(1, retries + 2):
        try:
            st = _boot_once(spec, state_dir, accel, channel, attempt)
            # vsock: clients reach the guest through the relay's unix socket, so the printed
            # server-addr is always one any ttRPC client can dial
            if mux or channel == "vsock":
                try:
                    start_relay(st, state_dir)
                except VMError:
                    os.kill(st.pid, signal.SIGKILL)
                    wait_exit(st.pid, 5.0)
                    raise
            return st
        except VMError as e:
            errors.append(str(e))
            if accel == "kvm" and spec.accel == "auto":
                accel = "tcg"
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    raise VMError("; ".join(errors))


def status(state_dir: Path) -> tuple[str, VMState | None]:
    st = load_state(state_dir)
    if st is None:
        return "absent", None
    return ("running" if pid_alive(st.pid, state_dir) else "stopped"), st


def down(state_dir: Path, timeout: float = 30.0) -> str:
    """Stop the VM: DestroySandbox, then QMP quit, then SIGKILL. Returns how it ended."""
    st = load_state(state_dir)
    if st is None or not pid_alive(st.pid, state_dir):
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        return "not running"
    how = None
    try:
        from . import rpc
        rpc.call_named(st.server_addr, "grpc.AgentService/DestroySandbox", timeout=10.0)
    except Exception as e:  # noqa: BLE001 - fall back to QMP below
        print(f"agentctl vm: DestroySandbox failed ({e}); using QMP", file=sys.stderr)
    else:
        if wait_exit(st.pid, timeout, state_dir):
            how = "powered off by the agent"
    if how is None:
        try:
            q = QMP(Path(st.qmp))
            try:
                q.execute("quit")
            finally:
                q.close()
        except (OSError, ValueError, VMError):
            pass
        if wait_exit(st.pid, 5.0, state_dir):
            how = "QMP quit"
    if how is None:
        try:
            os.kill(st.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_exit(st.pid, 5.0, state_dir)
        how = "killed"
    if st.relay_pid is not None:
        # it exits by itself when QEMU closes the channel; make sure
        if not wait_exit(st.relay_pid, 2.0):
            try:
                os.kill(st.relay_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            wait_exit(st.relay_pid, 5.0)
    for name in (STATE_FILE, "agent.sock", "qmp.sock", "mux.sock"):
        (state_dir / name).unlink(missing_ok=True)
    return how


# ---- command line ---------------------------------------------------------------------------

def add_parser(sub) -> None:
    """Register ``vm up|down|status`` on agentctl's subparsers."""
    vm = sub.add_parser("vm", help="boot / stop the guest VM in QEMU")
    vsub = vm.add_subparsers(dest="vm_command", required=True)
    for name in ("up", "down", "status"):
        p = vsub.add_parser(name)
        p.add_argument("--state-dir", default=str(DEFAULT_STATE_DIR))
        if name == "up":
            p.add_argument("--memory", type=int, default=512, help="MiB")
            p.add_argument("--cpus", type=int, default=1)
            p.add_argument("--kernel")
            p.add_argument("--initrd")
            p.add_argument("--append", default="", help="extra kernel command line words")
            p.add_argument("--accel", choices=("auto", "kvm", "tcg"), default="auto")
            p.add_argument("--boot-timeout", type=float, default=90.0)
            p.add_argument("--no-network", action="store_true",
                           help="leave the guest NIC unconfigured (default: 10.0.2.15/24 via 10.0.2.2)")
            p.add_argument("--mux", action="store_true",
                           help="serve many clients at once through a ttRPC relay "
                                "(server-addr is then the relay's socket); the default")
            p.add_argument("--direct", action="store_true",
                           help="hand out QEMU's chardev socket itself (one long-lived client "
                                "at a time; quickly successive clients can lose a call)")
        if name == "down":
            p.add_argument("--timeout", type=float, default=30.0, dest="down_timeout")


def configure_user_network(server_addr: str, timeout: float = 30.0) -> str:
    """Give the guest's NIC the address QEMU's user-mode network expects (10.0.2.15/24, default
    route via 10.0.2.2), through the agent's network RPCs as a runtime does. Returns the NIC."""
    from . import rpc

    ifaces = rpc.call_named(server_addr, "grpc.AgentService/ListInterfaces", {}, timeout=timeout)
    nics = [i for i in ifaces.Interfaces if i.name != "lo"]
    if not nics:
        raise VMError("the guest has no network interface to configure")
    nic = nics[0]
    rpc.call_named(server_addr, "grpc.AgentService/UpdateInterface", {"interface": {
        "name": nic.name, "hwAddr": nic.hwAddr, "mtu": 1500,
        "IPAddresses": [{"family": "v4", "address": "10.0.2.15", "mask": "24"}]}}, timeout=timeout)
    rpc.call_named(server_addr, "grpc.AgentService/UpdateRoutes", {"routes": {"Routes": [
        {"dest": "", "gateway": "10.0.2.2", "device": nic.name}]}}, timeout=timeout)
    return nic.name


def main(args: argparse.Namespace) -> int:
    state_dir = Path(args.state_dir).resolve()
    try:
        if args.vm_command == "up":
            k, i = guest_files(args.kernel, args.initrd)
            cmdline = default_cmdline(i)
            if args.append:
                cmdline += " " + args.append
            spec = VMSpec(kernel=k, initrd=i, cmdline=cmdline, memory_mib=args.memory,
                          cpus=args.cpus, accel=args.accel, boot_timeout=args.boot_timeout)
            st = up(spec, state_dir, mux=args.mux or not args.direct)
            if not args.no_network:
                try:
                    configure_user_network(st.server_addr)
                except Exception as e:  # noqa: BLE001 - the VM is up; say what failed and stop it
                    down(state_dir)
                    raise VMError(f"configuring the guest network failed: {e}") from None
            print(f"server-addr: {st.server_addr}")
            print(f"pid: {st.pid}\naccel: {st.accel}\nchannel: {st.channel}\n"
                  f"console: {st.console}\nboot-seconds: {st.boot_seconds}")
            return 0
        if args.vm_command == "status":
            what, st = status(state_dir)
            print(what)
            if st is not None and what == "running":
                print(f"server-addr: {st.server_addr}\npid: {st.pid}\naccel: {st.accel}")
            return 0 if what == "running" else 3
        if args.vm_command == "down":
            print(down(state_dir, args.down_timeout))
            return 0
    except VMError as e:
        print(f"agentctl vm: {e}", file=sys.stderr)
        return 1
    return 2
