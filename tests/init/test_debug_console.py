"""The debug console (agent/debug_console.py): real shells on a real pty and a real socket."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SHELL = "/bin/sh"


def _start(*args: str) -> subprocess.Popen:
    env = {**os.environ, "SANDBOX_AGENT_DEBUG_SHELL": SHELL}
    return subprocess.Popen([sys.executable, "-m", "agent.debug_console", *args], cwd=REPO,
                            env=env, stderr=subprocess.PIPE, start_new_session=True)


def _stop(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, 9)
    except ProcessLookupError:
        pass
    p.wait(10)


def _read_until(read, pattern: str, timeout: float = 10.0) -> str:
    buf = b""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            chunk = read()
        except (BlockingIOError, socket.timeout, TimeoutError):
            continue
        except OSError:
            break
        if not chunk:
            break
        buf += chunk
        m = re.search(pattern, buf.decode(errors="replace"))
        if m:
            return m.group(1) if m.groups() else m.group(0)
    raise AssertionError(f"no {pattern!r} in {buf!r}")


def _connect(path: str, timeout: float = 10.0) -> socket.socket:
    end = time.monotonic() + timeout
    while True:
        s = socket.socket(socket.AF_UNIX)
        try:
            s.connect(path)
            s.settimeout(0.5)
            return s
        except (FileNotFoundError, ConnectionRefusedError):
            s.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def test_listen_gives_each_connection_its_own_shell(tmp_path):
    path = str(tmp_path / "dbg.sock")
    p = _start("listen", f"unix://{path}")
    try:
        a, b = _connect(path), _connect(path)
        a.sendall(b"echo A=$((6*7)):$$\n")
        b.sendall(b"echo B=$((7*7)):$$\n")
        pid_a = _read_until(lambda: a.recv(4096), r"A=42:(\d+)")
        pid_b = _read_until(lambda: b.recv(4096), r"B=49:(\d+)")
        assert pid_a != pid_b
        # a shell with a terminal: the pty is its controlling tty
        a.sendall(b"tty; echo done\n")
        assert _read_until(lambda: a.recv(4096), r"/dev/pts/\d+")
        # exit closes the connection
        a.sendall(b"exit\n")
        end = time.monotonic() + 10
        while time.monotonic() < end:
            try:
                if a.recv(4096) == b"":
                    break
            except socket.timeout:
                continue
            except OSError:
                break
        else:
            raise AssertionError("connection stayed open after the shell exited")
        # the other session is unaffected
        b.sendall(b"echo still-$((1+1))\n")
        _read_until(lambda: b.recv(4096), r"still-2")
        # a peer that goes away hangs up its shell
        b.close()
        end = time.monotonic() + 10
        while os.path.exists(f"/proc/{pid_b}") and time.monotonic() < end:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{pid_b}"), "shell survived its peer"
    finally:
        _stop(p)


def test_console_runs_a_shell_and_restarts_it(tmp_path):
    master, slave = os.openpty()
    os.set_blocking(master, False)
    device = os.ttyname(slave)
    p = _start("console", device)
    try:
        def read() -> bytes:
            time.sleep(0.02)
            return os.read(master, 4096)
        os.write(master, b"echo first:$$\n")
        first = _read_until(read, r"first:(\d+)")
        os.write(master, b"exit\n")
        time.sleep(0.3)
        deadline = time.monotonic() + 10
        second = None
        while second is None and time.monotonic() < deadline:
            os.write(master, b"echo second:$$\n")
            try:
                second = _read_until(read, r"second:(\d+)", timeout=1.5)
            except AssertionError:
                pass
        assert second is not None and second != first
    finally:
        _stop(p)
        os.close(master)
        os.close(slave)


def test_bad_usage_and_missing_shell_are_refused():
    p = subprocess.run([sys.executable, "-m", "agent.debug_console", "serve", "x"], cwd=REPO,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "usage" in p.stderr
    env = {**os.environ, "SANDBOX_AGENT_DEBUG_SHELL": "/nonexistent/sh"}
    p = subprocess.run([sys.executable, "-m", "agent.debug_console", "console", "/dev/null"],
                       cwd=REPO, capture_output=True, text=True, timeout=30, env=env)
    assert p.returncode == 1 and "/nonexistent/sh" in p.stderr



def test_console_device_follows_the_active_console(tmp_path):
    from agent.debug_console import console_device
    f = tmp_path / "active"
    f.write_text("tty0 ttyS0\n")
    assert console_device(str(f)) == "/dev/ttyS0"
    assert console_device(str(tmp_path / "missing")) == "/dev/console"


def test_init_starts_the_vport_console_from_its_config(monkeypatch):
    """init's wiring: agent.debug_console_vport=N starts one self-supervising listener on
    vsock port N (the host has AF_VSOCK sockets but no loopback transport to connect with)."""
    from agent.cmdline import AgentConfig
    from agent.init import start_debug_consoles
    from agent.observe import JsonLogger
    from agent.privsep.record import replace

    monkeypatch.chdir(REPO)
    assert start_debug_consoles(AgentConfig(), JsonLogger("t", "info")) == []
    port = 20000 + os.getpid() % 20000
    cfg = replace(AgentConfig(), debug_console_vport=port)
    env = os.environ.get("SANDBOX_AGENT_DEBUG_SHELL")
    os.environ["SANDBOX_AGENT_DEBUG_SHELL"] = SHELL
    try:
        (pid,) = start_debug_consoles(cfg, JsonLogger("t", "info"))
    finally:
        if env is None:
            os.environ.pop("SANDBOX_AGENT_DEBUG_SHELL")
        else:
            os.environ["SANDBOX_AGENT_DEBUG_SHELL"] = env
    try:
        time.sleep(0.5)  # cmdline reads empty until the exec has set up the new image
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the listener exited"
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        assert b"agent.debug_console" in argv and f"vsock://-1:{port}".encode() in argv
        assert os.getsid(pid) == pid  # its own session, away from init's terminal
    finally:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
