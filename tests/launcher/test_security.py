"""One test per known runc escape, each showing the escape is blocked."""
from __future__ import annotations

import importlib.util
import os
import time

import pytest

from .conftest import assert_sealed_against_writes, file_sha256, needs_busybox, needs_root

pytestmark = [needs_root, needs_busybox]


# --- CVE-2019-5736: overwriting the runtime's executable from the container -------------------

def test_container_init_runs_from_sealed_copy(runtime, make_bundle):
    """The pre-exec process inside the container is what /proc/PID/exe of the container's
    PID 1 leads to. It must be a sealed memfd, not the host's interpreter."""
    interp = os.path.realpath("/proc/self/exe")
    before = file_sha256(interp)
    cid, _ = runtime.create(make_bundle(["true"]))
    pid = runtime.state(cid)["pid"]
    exe = os.readlink(f"/proc/{pid}/exe")
    assert exe.startswith("/memfd:"), exe
    # What an attacker would do: keep a handle, wait for the process to go, reopen for writing.
    fd = os.open(f"/proc/{pid}/exe", os.O_PATH)
    try:
        runtime.cmd("delete", "--force", cid)
        assert_sealed_against_writes(fd)
    finally:
        os.close(fd)
    assert file_sha256(interp) == before


def test_container_cannot_open_init_exe(runtime, make_bundle):
    """From inside: a container process cannot even open the waiting init's executable
    (it is non-dumpable until it executes the container's program)."""
    cid, _ = runtime.create(make_bundle(["sleep", "30"]))
    p = runtime.cmd("exec", cid, "sh", "-c",
                    "cat /proc/1/exe > /dev/null && echo opened || echo refused; "
                    "ls -l /proc/1/exe 2>&1", check=False)
    assert p.stdout.startswith("refused"), p.stdout + p.stderr


def test_readonly_interpreter_is_used_as_is(runtime, make_bundle, tmp_path):
    """Launcher started from an interpreter on a read-only mount (how the guest image runs
    it): no copy is made, and the container's init still cannot be written through."""
    import shutil
    import subprocess
    from .conftest import LAUNCHER
    # A private copy, so that no other process (this pytest) runs the file being attacked.
    interp = str(tmp_path / "python3")
    shutil.copy(os.path.realpath("/proc/self/exe"), interp)
    b = make_bundle(["sleep", "30"])
    b.write()
    cid = runtime.new_id()
    pidfile = tmp_path / "pid"
    script = (f"mount --bind {interp} {interp} && mount -o remount,bind,ro {interp} {interp} "
              f"&& exec \"$@\"")
    p = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
                        interp, *LAUNCHER[1:], "--root", runtime.root, "create", "--bundle",
                        b.path,
                        "--pid-file", str(pidfile), cid],
                       stdout=subprocess.DEVNULL, stderr=open(tmp_path / "err", "w"),
                       timeout=30)
    assert p.returncode == 0, (tmp_path / "err").read_text()
    pid = int(pidfile.read_text())
    # a plain fork: not a memfd (the path reads oddly from here, the mount is in another
    # namespace)
    assert not os.readlink(f"/proc/{pid}/exe").startswith("/memfd:")
    fd = os.open(f"/proc/{pid}/exe", os.O_PATH)
    try:
        runtime.cmd("delete", "--force", cid)
        with pytest.raises(OSError) as e:
            os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
        assert e.value.errno == 30  # EROFS: the read-only mount holds even from the host
    finally:
        os.close(fd)


def test_launcher_reexecs_from_sealed_memfd(tmp_path):
    """The CLI itself: started from a writable interpreter it re-executes from a sealed copy."""
    import subprocess
    import sys
    from .conftest import REPO
    code = (f"import sys;sys.path.insert(0,{REPO!r});"
            "from agent.launcher import selfexe;selfexe.ensure_protected('tests_probe')")
    probe = tmp_path / "tests_probe.py"
    probe.write_text("import os\ndef main():\n    print(os.readlink('/proc/self/exe'))\n")
    env = dict(os.environ)
    env.pop("_OCI_LAUNCHER_SEALED", None)
    p = subprocess.run([sys.executable, "-I", "-S", "-c",
                        f"import sys;sys.path.insert(0,{str(tmp_path)!r});" + code],
                       capture_output=True, text=True, env=env, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("/memfd:oci-launcher-python"), p.stdout


# --- CVE-2024-21626: leaked fds and cwd -------------------------------------------------------

def test_no_host_fd_leaks_into_container(runtime, make_bundle, tmp_path):
    hostdir = tmp_path / "hostdir"
    hostdir.mkdir()
    leak = os.open(hostdir, os.O_RDONLY | os.O_DIRECTORY)
    os.set_inheritable(leak, True)
    try:
        b = make_bundle(["sh", "-c", "for f in /proc/self/fd/*; do echo $f $(readlink $f); "
                                     "done"])
        b.write()
        p = runtime.cmd("run", "--bundle", b.path, runtime.new_id(), pass_fds=(leak,))
    finally:
        os.close(leak)
    fds = {line.split()[0].rsplit("/", 1)[1] for line in p.stdout.splitlines()}
    # 0-2 and the fd the shell's glob itself has open, nothing inherited
    assert str(leak) not in fds or leak <= 3, p.stdout
    assert str(hostdir) not in p.stdout


def test_cwd_through_leaked_fd_is_refused(runtime, make_bundle, tmp_path):
    hostdir = tmp_path / "hostdir"
    hostdir.mkdir()
    leak = os.open(hostdir, os.O_RDONLY | os.O_DIRECTORY)
    os.set_inheritable(leak, True)
    try:
        b = make_bundle(["sh", "-c", "pwd; ls ..; touch ../../escaped"])
        b.config["process"]["cwd"] = f"/proc/self/fd/{leak}"
        b.write()
        p = runtime.cmd("run", "--bundle", b.path, runtime.new_id(), pass_fds=(leak,),
                        check=False)
    finally:
        os.close(leak)
    assert p.returncode != 0 and "cwd" in p.stderr, p.stdout + p.stderr
    assert not (tmp_path / "escaped").exists()


def test_container_cwd_is_inside_root(runtime, make_bundle, tmp_path):
    """The launcher's own cwd (the caller's) must not survive into the container."""
    b = make_bundle(["sh", "-c", "cd -P . && pwd; ls /proc/self/cwd/ | head -3"])
    b.write()
    p = runtime.cmd("run", "--bundle", b.path, runtime.new_id(), cwd=str(tmp_path))
    assert p.stdout.splitlines()[0] == "/"


# --- CVE-2021-30465 class: mount destinations through symlinks --------------------------------

def test_mount_destination_symlink_cannot_escape(runtime, make_bundle, tmp_path):
    host_target = tmp_path / "host-target"
    host_target.mkdir()
    src = tmp_path / "src"
    src.mkdir()
    (src / "payload").write_text("x")
    b = make_bundle(["sh", "-c", "ls /evil /climb; touch /evil/sub/new && echo wrote"])
    os.symlink(str(host_target), os.path.join(b.rootfs, "evil"))
    os.symlink("../../../../../../../../" + str(host_target).lstrip("/"),
               os.path.join(b.rootfs, "climb"))
    b.config["mounts"] += [
        {"destination": "/evil/sub", "type": "bind", "source": str(src), "options": ["rbind"]},
        {"destination": "/climb/tmpfs", "type": "tmpfs", "source": "tmpfs"},
    ]
    p = runtime.run(b)
    assert "wrote" in p.stdout
    # nothing was created or mounted on the host side of the symlinks
    assert os.listdir(host_target) == []
    with open("/proc/self/mountinfo") as f:
        assert str(host_target) not in f.read()
    # the mounts landed inside the rootfs, where the symlinks point once re-rooted
    inside = os.path.join(b.rootfs, str(host_target).lstrip("/"))
    assert os.path.isdir(os.path.join(inside, "sub"))
    assert os.path.isdir(os.path.join(inside, "tmpfs"))
    assert (src / "new").exists()  # the bind mount itself worked


# --- /proc masking cannot be undone -----------------------------------------------------------

def test_proc_masks_cannot_be_undone(runtime, make_bundle):
    script = ("umount /proc/timer_list 2>/dev/null && echo unmounted || echo umount-refused; "
              "umount -l /proc/sys 2>/dev/null && echo unmounted || echo umount-refused; "
              "mount -o remount,rw /proc/sys 2>/dev/null && echo remounted || echo "
              "remount-refused; "
              "mount -t proc proc /tmp 2>/dev/null && echo newproc || echo proc-refused; "
              "mount --bind /proc /tmp 2>/dev/null && echo bound || echo bind-refused; "
              "wc -c < /proc/timer_list; "
              "echo 1 > /proc/sys/kernel/ns_last_pid 2>/dev/null && echo wrote || echo ro")
    p = runtime.run(make_bundle(["sh", "-c", script]))
    assert p.stdout.split() == ["umount-refused", "umount-refused", "remount-refused",
                                "proc-refused", "bind-refused", "0", "ro"]


# --- seccomp is applied last ------------------------------------------------------------------

_has_seccomp = importlib.util.find_spec("agent.launcher.seccomp") is not None


@pytest.mark.skipif(not _has_seccomp, reason="agent/launcher/seccomp.py (other helper) absent")
def test_seccomp_filter_is_the_last_step(runtime, make_bundle):
    """The filter denies calls the launcher itself makes while setting up (mount, capset,
    prctl, setresuid, setgroups, chdir, umask, poll, close_range...). Had it been installed
    before any of them, create would fail; instead the container starts and the calls are
    denied to the container's program."""
    denied = ["mkdir", "mkdirat", "capset", "prctl", "setresuid", "setgroups", "chdir",
              "umask", "poll", "ppoll", "close_range", "mount", "sethostname", "fchdir"]
    b = make_bundle(["sh", "-c", "mkdir /tmp/d 2>&1; hostname foo 2>&1; echo still-running"])
    b.config["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": denied, "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
    }
    b.config["process"]["user"] = {"uid": 1000, "gid": 1000}
    p = runtime.run(b)
    lines = p.stdout.splitlines()
    assert "Operation not permitted" in lines[0]
    assert lines[-1] == "still-running"
    # Without noNewPrivileges the kernel wants CAP_SYS_ADMIN to load a filter, so it is loaded
    # just before the final capset/ambient prctl (the profile must allow those two, as
    # Docker's default does); everything else still comes before it.
    b2 = make_bundle(["sh", "-c", "grep Seccomp: /proc/self/status; mkdir /tmp/x 2>&1; true"])
    b2.config["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW",
        "syscalls": [{"names": [n for n in denied if n not in ("capset", "prctl")],
                      "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}
    b2.config["process"]["noNewPrivileges"] = False
    b2.config["process"]["user"] = {"uid": 1000, "gid": 1000}
    out = runtime.run(b2).stdout.splitlines()
    assert out[0].split() == ["Seccomp:", "2"] and "Operation not permitted" in out[1]


@pytest.mark.skipif(not _has_seccomp, reason="agent/launcher/seccomp.py (other helper) absent")
def test_seccomp_notify_fd_goes_to_listener(runtime, make_bundle, tmp_path):
    """SCMP_ACT_NOTIFY: the listener fd reaches linux.seccomp.listenerPath with the
    container state, per the runtime spec's seccomp-notify protocol."""
    import array
    import json
    import socket
    import threading
    path = str(tmp_path / "agent.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    got: dict = {}

    def serve():
        conn, _ = srv.accept()
        msg, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4))
        fds = array.array("i")
        fds.frombytes(anc[0][2][:4])
        got["state"] = json.loads(msg)
        got["fd_target"] = os.readlink(f"/proc/self/fd/{fds[0]}")
        os.close(fds[0])  # no agent: pending notifications then fail with ENOSYS
        conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    b = make_bundle(["sh", "-c", "mkdir /tmp/x 2>&1; echo after"])
    b.config["linux"]["seccomp"] = {
        "defaultAction": "SCMP_ACT_ALLOW", "listenerPath": path,
        "listenerMetadata": "meta-1",
        "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_NOTIFY"}]}
    p = runtime.run(b)
    t.join(5)
    srv.close()
    assert got["state"]["fds"] == ["seccompFd"] and got["state"]["metadata"] == "meta-1"
    assert got["state"]["pid"] > 0 and got["state"]["state"]["bundle"] == b.path
    assert "seccomp notify" in got["fd_target"] or got["fd_target"].startswith("anon_inode:")
    assert p.stdout.splitlines()[-1] == "after"
    assert not os.path.exists(os.path.join(b.rootfs, "tmp", "x"))
