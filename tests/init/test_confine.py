"""The daemon's confinement, applied in a forked child as root: ids, capabilities,
no_new_privs, Landlock, seccomp; forbidden actions fail; a trio daemon still works."""
import ctypes
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from agent.daemon import confine as cf

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="confine() drops root: needs root")
UID = 65534
HERE = os.path.dirname(__file__)


@pytest.fixture
def run_dir():
    # Not under pytest's tmp_path: its parents are mode 0700, which the daemon uid cannot
    # traverse whatever Landlock allows.
    base = tempfile.mkdtemp(prefix="confine-test-", dir="/tmp")
    os.chmod(base, 0o755)
    d = os.path.join(base, "run")
    os.mkdir(d)
    os.chown(d, UID, UID)
    yield d
    shutil.rmtree(base)


def in_confined_child(run_dir, action, **kw):
    """Fork, confine, run ``action()``; returns (wait status, JSON result or None)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            cf.confine(UID, UID, run_dir, **kw)
            try:
                out = {"ok": True, "value": action()}
            except OSError as e:
                out = {"ok": False, "errno": e.errno, "msg": str(e)}
            os.write(w, json.dumps(out).encode())
        except BaseException as e:  # noqa: BLE001
            os.write(w, json.dumps({"ok": False, "crash": repr(e)}).encode())
            code = 3
        os._exit(code)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return status, (json.loads(data) if data else None)


def _syscall(nr, *args):
    libc = ctypes.CDLL(None, use_errno=True)
    ret = libc.syscall(nr, *args)
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def status_fields():
    with open("/proc/self/status") as f:
        return {k: v.strip() for k, _, v in (ln.partition(":") for ln in f)}


def test_ids_caps_nnp_seccomp(run_dir):
    status, out = in_confined_child(run_dir, status_fields)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, out
    st = out["value"]
    for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(st[k], 16) == 0, (k, st[k])
    assert st["NoNewPrivs"] == "1"
    assert st["Seccomp"] == "2"
    assert st["Uid"].split() == [str(UID)] * 4
    assert st["Gid"].split() == [str(UID)] * 4
    assert st["Groups"] == ""


def test_regaining_root_is_impossible(run_dir):
    status, out = in_confined_child(run_dir, lambda: os.setresuid(0, 0, 0))
    assert out["ok"] is False and out["errno"] == errno.EPERM


def _killed_by_sigsys(status):
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSYS


def test_mount_kills(run_dir, tmp_path):
    libc = ctypes.CDLL(None, use_errno=True)
    status, out = in_confined_child(
        run_dir, lambda: libc.mount(b"none", run_dir.encode(), b"tmpfs", 0, None))
    assert _killed_by_sigsys(status), (status, out)


def test_ptrace_kills(run_dir):
    ppid = os.getpid()
    status, out = in_confined_child(run_dir, lambda: _syscall(101, 16, ppid, 0, 0))  # ATTACH
    assert _killed_by_sigsys(status), (status, out)


def test_module_load_kills(run_dir):
    def load():
        fd = os.open("/dev/null", os.O_RDONLY)
        return _syscall(313, fd, b"", 0)  # finit_module
    status, out = in_confined_child(run_dir, load)
    assert _killed_by_sigsys(status), (status, out)


def test_unshare_and_execve_kill(run_dir):
    status, _ = in_confined_child(run_dir, lambda: _syscall(272, 0x10000000))  # CLONE_NEWUSER
    assert _killed_by_sigsys(status)
    status, _ = in_confined_child(run_dir, lambda: os.execv("/bin/true", ["true"]))
    assert _killed_by_sigsys(status)


def test_other_denials_are_eperm(run_dir):
    def attempts():
        res = {}
        for name, fn in [
            ("inet_socket", lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)),
            ("netlink_socket", lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0)),
            ("kill_init", lambda: os.kill(1, 0)),
            ("set_dumpable", lambda: ctypes.CDLL(None).prctl(4, 1, 0, 0, 0) == 0 or
             (_ for _ in ()).throw(OSError(ctypes.get_errno(), "prctl"))),
            ("clone3", lambda: _syscall(435, 0, 0)),
            ("fork", lambda: os.fork() == 0 and os._exit(0)),
        ]:
            try:
                fn()
                res[name] = "allowed"
            except OSError as e:
                res[name] = e.errno
        return res
    status, out = in_confined_child(run_dir, attempts)
    assert os.WIFEXITED(status), out
    v = out["value"]
    assert v["inet_socket"] == errno.EPERM
    assert v["netlink_socket"] == errno.EPERM
    assert v["kill_init"] == errno.EPERM
    assert v["clone3"] == errno.ENOSYS
    assert v["fork"] == errno.EPERM
    assert v["set_dumpable"] != "allowed"


def test_files_outside_run_dir_refused(run_dir):
    outside = os.path.join(os.path.dirname(run_dir), "outside.txt")
    with open(outside, "w") as f:
        f.write("secret")
    os.chmod(outside, 0o644)  # readable by mode bits, parents traversable: only Landlock
    with open(outside) as f:   # stops the confined child
        assert f.read() == "secret"

    def attempts():
        res = {}
        for name, fn in [
            ("etc_passwd", lambda: open("/etc/passwd").read()),
            ("outside_world_readable", lambda: open(outside).read()),
            ("write_tmp", lambda: open("/tmp/confine-test-should-not-exist", "w")),
            ("inside_write", lambda: open(os.path.join(run_dir, "f"), "w").write("x")),
            ("inside_read", lambda: open(os.path.join(run_dir, "f")).read()),
            ("proc_meminfo", lambda: open("/proc/meminfo").readline()),
        ]:
            try:
                res[name] = ["ok", fn()]
            except OSError as e:
                res[name] = ["err", e.errno]
        return res
    if cf.landlock_abi() == 0:
        pytest.skip("this kernel has no Landlock: path confinement unavailable")
    status, out = in_confined_child(run_dir, attempts)
    v = out["value"]
    assert v["etc_passwd"] == ["err", errno.EACCES]
    assert v["outside_world_readable"] == ["err", errno.EACCES]
    assert v["write_tmp"][0] == "err"
    assert not os.path.exists("/tmp/confine-test-should-not-exist")
    assert v["inside_write"] == ["ok", 1]
    assert v["inside_read"] == ["ok", "x"]
    assert v["proc_meminfo"][0] == "ok" and v["proc_meminfo"][1].startswith("MemTotal")


def test_confine_refuses_root_target(run_dir):
    with pytest.raises(cf.ConfineError):
        cf.confine(0, 0, run_dir)


def test_trio_daemon_works_inside_the_filter(run_dir):
    """A trio echo server and client, a worker thread, protobuf, fd passing: all confined."""
    p = subprocess.run([sys.executable, os.path.join(HERE, "confined_workload.py"), run_dir,
                        str(UID)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    rep = json.loads(p.stdout)
    assert rep["echoed_bytes"] > 20000
    assert rep["thread"] == 499500
    assert rep["passed_fd"] == "via passed fd"
    assert rep["status"]["Seccomp"] == "2" and rep["status"]["NoNewPrivs"] == "1"
    assert int(rep["status"]["CapEff"], 16) == 0
    assert rep["landlock_abi"] == cf.landlock_abi()
