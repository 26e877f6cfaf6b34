"""One test (or a few) per area of the Linux runtime spec, each running a real container."""
from __future__ import annotations

import array
import json
import os
import socket
import stat
import subprocess
import time

import pytest

from .conftest import needs_busybox, needs_root

pytestmark = [needs_root, needs_busybox]


def run_sh(runtime, make_bundle, script: str, mutate=None, check=True):
    b = make_bundle(["sh", "-c", script])
    if mutate:
        mutate(b.config)
    return runtime.run(b, check=check)


def status_field(out: str, name: str) -> str:
    for line in out.splitlines():
        if line.startswith(name + ":"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"{name} not in {out!r}")


# --- namespaces -----------------------------------------------------------------------------

def test_new_namespaces(runtime, make_bundle):
    out = run_sh(runtime, make_bundle, "echo $$; hostname; ls /sys/class/net; "
                 "for n in net ipc uts; do readlink /proc/self/ns/$n; done").stdout.split()
    assert out[0] == "1"                      # pid namespace
    assert out[1] == "bbtest"                 # uts namespace + hostname
    assert out[2:3] == ["lo"] and len(out) == 6  # network namespace: only loopback
    for got, kind in zip(out[3:], ("net", "ipc", "uts")):
        assert got != os.readlink(f"/proc/self/ns/{kind}")


def test_domainname(runtime, make_bundle):
    out = run_sh(runtime, make_bundle, "cat /proc/sys/kernel/domainname",
                 lambda c: c.update(domainname="example.test")).stdout
    assert out.strip() == "example.test"


def test_join_namespaces_by_path(runtime, make_bundle):
    a = make_bundle(["sleep", "100"])
    a.config["hostname"] = "first"
    cid, _ = runtime.create(a)
    pid = runtime.state(cid)["pid"]
    want = {k: os.readlink(f"/proc/{pid}/ns/{k}") for k in ("net", "uts", "ipc")}

    def join(c):
        c.pop("hostname")
        c["linux"]["namespaces"] = [{"type": "mount"}, {"type": "pid"},
                                    {"type": "network", "path": f"/proc/{pid}/ns/net"},
                                    {"type": "uts", "path": f"/proc/{pid}/ns/uts"},
                                    {"type": "ipc", "path": f"/proc/{pid}/ns/ipc"}]
    out = run_sh(runtime, make_bundle, "for n in net uts ipc; do readlink /proc/self/ns/$n; "
                 "done; hostname", join).stdout.split()
    assert out == [want["net"], want["uts"], want["ipc"], "first"]


@pytest.fixture
def open_tmp(tmp_path):
    """The namespace's root (host uid 100000) must be able to reach the bundle: pytest's
    tmp dirs are 0700, so open the chain up to the test's directory."""
    p = tmp_path
    while str(p) != "/tmp" and p != p.parent:
        os.chmod(p, os.stat(p).st_mode | 0o011)
        p = p.parent
    return tmp_path


def test_user_namespace_mappings(runtime, make_bundle, open_tmp):
    def userns(c):
        c["linux"]["namespaces"].append({"type": "user"})
        c["linux"]["uidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        c["linux"]["gidMappings"] = [{"containerID": 0, "hostID": 100000, "size": 65536}]
        c["mounts"] = [m for m in c["mounts"] if m["type"] not in ("sysfs", "mqueue")]
    b = make_bundle(["sh", "-c", "cat /proc/self/uid_map /proc/self/gid_map; id -u; "
                                 "stat -c %u /proc/1/status; ls /dev/null"])
    userns(b.config)
    os.chown(b.rootfs, 100000, 100000)
    out = runtime.run(b).stdout.split()
    assert out[:6] == ["0", "100000", "65536", "0", "100000", "65536"]
    assert out[6] == "0"
    # seen from the host the process runs as uid 100000
    cid, _ = runtime.create(make_bundle_with(make_bundle, ["sleep", "30"], userns))
    pid = runtime.state(cid)["pid"]
    assert os.stat(f"/proc/{pid}").st_uid == 100000
    # exec joins the user namespace too: root inside, 100000 outside
    runtime.cmd("start", cid)
    p = runtime.cmd("exec", cid, "sh", "-c", "id -u; readlink /proc/self/ns/user")
    uid, ns = p.stdout.split()
    assert uid == "0" and ns == os.readlink(f"/proc/{pid}/ns/user")


def make_bundle_with(make_bundle, args, mutate):
    b = make_bundle(args)
    mutate(b.config)
    os.chown(b.rootfs, 100000, 100000)
    return b


# --- mounts and the root ----------------------------------------------------------------------

def test_mount_types_and_options(runtime, make_bundle, tmp_path):
    src = tmp_path / "shared"
    src.mkdir()
    (src / "hello").write_text("from host")

    def mounts(c):
        c["mounts"] += [
            {"destination": "/data", "type": "bind", "source": str(src),
             "options": ["rbind", "ro"]},
            {"destination": "/scratch", "type": "tmpfs", "source": "tmpfs",
             "options": ["size=1m", "mode=700", "noexec"]},
            {"destination": "/deep/er/dir", "type": "tmpfs", "source": "tmpfs"},
        ]
    out = run_sh(runtime, make_bundle,
                 "cat /data/hello; echo; touch /data/x 2>/dev/null && echo wrote || echo rofs; "
                 "grep -E ' /(scratch|data|deep/er/dir) ' /proc/self/mounts; "
                 "stat -c %a /scratch", mounts).stdout
    assert out.startswith("from host\nrofs\n")
    assert " /data " in out and "ro," in out.split(" /data ")[1].split("\n")[0]
    scratch = [l for l in out.splitlines() if " /scratch " in l][0]
    assert "tmpfs" in scratch and "noexec" in scratch and "size=1024k" in scratch
    assert " /deep/er/dir tmpfs" in out
    assert out.split()[-1] == "700"
    assert not (src / "x").exists()


def test_root_readonly(runtime, make_bundle):
    out = run_sh(runtime, make_bundle, "touch /newfile 2>/dev/null && echo rw || echo ro; "
                 "touch /dev/shm/ok && echo shm-rw",
                 lambda c: c["root"].update(readonly=True)).stdout.split()
    assert out == ["ro", "shm-rw"]


def test_propagation_private_root(runtime, make_bundle):
    out = run_sh(runtime, make_bundle, "awk '$5 == \"/\"' /proc/self/mountinfo",
                 lambda c: c["linux"].update(rootfsPropagation="private")).stdout
    assert "shared:" not in out and "master:" not in out


def test_no_pivot(runtime, make_bundle):
    b = make_bundle(["sh", "-c", "ls /; cat /proc/self/mountinfo | wc -l"])
    b.write()
    p = runtime.cmd("run", "--no-pivot", "--bundle", b.path, runtime.new_id())
    assert "bin" in p.stdout.split() and "proc" in p.stdout.split()


def test_masked_and_readonly_paths(runtime, make_bundle):
    out = run_sh(runtime, make_bundle,
                 "wc -c < /proc/timer_list; ls /proc/acpi | wc -l; "
                 "echo 1 > /proc/sys/kernel/domainname 2>/dev/null && echo writable || echo ro"
                 ).stdout.split()
    assert out == ["0", "0", "ro"]


def test_devices_and_dev_layout(runtime, make_bundle):
    def devs(c):
        c["linux"]["devices"] = [{"type": "c", "path": "/dev/fuse", "major": 10, "minor": 229,
                                  "fileMode": 0o640, "uid": 7, "gid": 8},
                                 {"type": "p", "path": "/dev/mypipe"}]
    out = run_sh(runtime, make_bundle,
                 "stat -c '%n %t %T %a %u %g %F' /dev/null /dev/zero /dev/full /dev/random "
                 "/dev/urandom /dev/tty /dev/fuse; stat -c %F /dev/mypipe; "
                 "for l in fd stdin stdout stderr ptmx; do readlink /dev/$l; done; "
                 "grep -E ' /dev/(pts|shm) ' /proc/self/mounts | cut -d' ' -f2,3", devs).stdout
    lines = out.splitlines()
    assert lines[0] == "/dev/null 1 3 666 0 0 character special file"
    assert lines[5] == "/dev/tty 5 0 666 0 0 character special file"
    assert lines[6] == "/dev/fuse a e5 640 7 8 character special file"
    assert lines[7] == "fifo"
    assert lines[8:13] == ["/proc/self/fd", "/proc/self/fd/0", "/proc/self/fd/1",
                           "/proc/self/fd/2", "pts/ptmx"]
    assert lines[13:] == ["/dev/pts devpts", "/dev/shm tmpfs"]


def test_sysctl(runtime, make_bundle):
    out = run_sh(runtime, make_bundle, "cat /proc/sys/net/ipv4/ip_forward "
                 "/proc/sys/kernel/msgmax",
                 lambda c: c["linux"].update(sysctl={"net.ipv4.ip_forward": "1",
                                                     "kernel.msgmax": "4242"})).stdout.split()
    assert out == ["1", "4242"]
    with open("/proc/sys/kernel/msgmax") as f:
        assert f.read().strip() != "4242"  # the ipc namespace kept it in the container


# --- process ----------------------------------------------------------------------------------

def test_user_groups_umask_env_cwd(runtime, make_bundle):
    def proc(c):
        c["process"]["user"] = {"uid": 1000, "gid": 1001, "additionalGids": [5, 2000],
                                "umask": 0o077}
        c["process"]["env"].append("GREETING=hello world")
        c["process"]["cwd"] = "/tmp"
    out = run_sh(runtime, make_bundle, "id -u; id -g; id -G; umask; echo $GREETING; pwd",
                 proc).stdout.splitlines()
    assert out[0] == "1000" and out[1] == "1001"
    assert sorted(out[2].split()) == sorted(["1001", "5", "2000"])
    assert out[3] == "0077" and out[4] == "hello world" and out[5] == "/tmp"


def test_rlimits_and_oom_score(runtime, make_bundle):
    def proc(c):
        c["process"]["rlimits"] = [{"type": "RLIMIT_NOFILE", "soft": 321, "hard": 654},
                                   {"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]
        c["process"]["oomScoreAdj"] = 417
    out = run_sh(runtime, make_bundle, "ulimit -n; ulimit -Hn; ulimit -c; "
                 "cat /proc/self/oom_score_adj", proc).stdout.split()
    assert out == ["321", "654", "0", "417"]


def test_capability_sets_and_nnp(runtime, make_bundle):
    def caps(c):
        c["process"]["capabilities"] = {
            "bounding": ["CAP_KILL", "CAP_NET_RAW", "CAP_CHOWN"],
            "effective": ["CAP_KILL", "CAP_NET_RAW"], "permitted": ["CAP_KILL", "CAP_NET_RAW"],
            "inheritable": ["CAP_NET_RAW"], "ambient": ["CAP_NET_RAW"]}
        c["process"]["user"] = {"uid": 1000, "gid": 1000}
    out = run_sh(runtime, make_bundle, "grep -E '^(Cap|NoNewPrivs)' /proc/self/status",
                 caps).stdout
    kill, raw, chown = 1 << 5, 1 << 13, 1 << 0
    assert int(status_field(out, "CapBnd"), 16) == kill | raw | chown
    # uid 1000 keeps only what ambient gives across exec: effective = permitted = ambient
    assert int(status_field(out, "CapAmb"), 16) == raw
    assert int(status_field(out, "CapInh"), 16) == raw
    assert int(status_field(out, "CapPrm"), 16) == raw
    assert int(status_field(out, "CapEff"), 16) == raw
    assert status_field(out, "NoNewPrivs") == "1"


def test_root_capabilities_and_no_nnp(runtime, make_bundle):
    def caps(c):
        c["process"]["capabilities"] = {"bounding": ["CAP_KILL", "CAP_SYS_ADMIN"],
                                        "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"]}
        c["process"]["noNewPrivileges"] = False
    out = run_sh(runtime, make_bundle, "grep -E '^(Cap|NoNewPrivs)' /proc/self/status",
                 caps).stdout
    assert int(status_field(out, "CapBnd"), 16) == (1 << 5) | (1 << 21)
    # uid 0 gains its whole bounding set at exec (no SECBIT_NOROOT), as with runc
    assert int(status_field(out, "CapEff"), 16) == (1 << 5) | (1 << 21)
    assert status_field(out, "NoNewPrivs") == "0"
    out = run_sh(runtime, make_bundle, "grep -E '^Cap' /proc/self/status",
                 lambda c: (caps(c), c["process"].update(user={"uid": 1000, "gid": 1000}))
                 ).stdout
    assert int(status_field(out, "CapEff"), 16) == 0  # non-root without ambient: nothing
    assert int(status_field(out, "CapBnd"), 16) == (1 << 5) | (1 << 21)


def test_terminal_over_console_socket(runtime, make_bundle, tmp_path):
    sock_path = str(tmp_path / "console.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(1)
    b = make_bundle(["sh", "-c", "tty; stty size; echo done"])
    b.config["process"]["terminal"] = True
    b.config["process"]["consoleSize"] = {"height": 33, "width": 101}
    cid, _ = runtime.create(b, None, "--console-socket", sock_path)
    conn, _ = srv.accept()
    fds = array.array("i")
    msg, anc, _, _ = conn.recvmsg(16, socket.CMSG_SPACE(4))
    fds.frombytes(anc[0][2][:4])
    master = fds[0]
    conn.close()
    srv.close()
    runtime.cmd("start", cid)
    data = b""
    end = time.monotonic() + 5
    while b"done" not in data and time.monotonic() < end:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    text = data.decode().replace("\r", "").split()
    assert text[0].startswith("/dev/pts/") and text[1:3] == ["33", "101"]


# --- cgroups --------------------------------------------------------------------------------

def test_cgroup_limits_applied(runtime, make_bundle):
    b = make_bundle(["sleep", "100"])
    b.config["linux"]["cgroupsPath"] = f"/launcher-test/{os.getpid()}-{time.time_ns()}"
    b.config["linux"]["resources"] = {"memory": {"limit": 64 << 20},
                                      "pids": {"limit": 42}}
    cid, _ = runtime.create(b)
    pid = runtime.state(cid)["pid"]
    from agent.launcher import cgroups
    cg = cgroups.open_cgroup(b.config["linux"]["cgroupsPath"], cid)
    assert pid in cg.pids()
    paths = cg.paths()
    if "memory" in paths:
        with open(os.path.join(paths["memory"], "memory.limit_in_bytes")) as f:
            assert int(f.read()) == 64 << 20
    else:
        with open(os.path.join(paths[""], "memory.max")) as f:
            assert int(f.read()) == 64 << 20
    pids_dir = paths.get("pids", paths.get(""))
    with open(os.path.join(pids_dir, "pids.max")) as f:
        assert f.read().strip() == "42"
    runtime.cmd("delete", "--force", cid)
    assert not os.path.exists(pids_dir)
    try:
        for d in {os.path.dirname(p) for p in paths.values()}:
            os.rmdir(d)
    except OSError:
        pass


def test_pids_limit_enforced(runtime, make_bundle):
    def lim(c):
        c["linux"]["resources"] = {"pids": {"limit": 5}}
    out = run_sh(runtime, make_bundle, "for i in 1 2 3 4 5 6 7 8; do sleep 5 & done 2>&1; "
                 "jobs | wc -l", lim, check=False)
    assert "fork" in out.stdout + out.stderr or int(out.stdout.split()[-1]) < 8


# --- hooks ----------------------------------------------------------------------------------

def test_hooks_order_stdin_and_env(runtime, make_bundle, tmp_path):
    log = tmp_path / "hooks.log"
    script = tmp_path / "hook.sh"
    script.write_text(f"#!/bin/sh\nread state\necho \"$1 $HOOKVAR $state\" >> {log}\n")
    script.chmod(0o755)
    b = make_bundle(["sh", "-c", "echo ran > /tmp/ran"])

    def h(kind):
        return [{"path": str(script), "args": ["hook.sh", kind], "env": ["HOOKVAR=v-" + kind]}]
    b.config["hooks"] = {k: h(k) for k in ("prestart", "createRuntime", "poststart",
                                            "poststop")}
    # createContainer runs in the container's namespaces before pivot_root: host paths work;
    # startContainer runs inside the container: its path must exist there.
    b.config["hooks"]["createContainer"] = h("createContainer")
    b.config["hooks"]["startContainer"] = [{"path": "/bin/sh", "args": [
        "sh", "-c", "read s; echo \"$s\" > /tmp/start-hook"]}]
    runtime.run(b)
    lines = log.read_text().splitlines()
    kinds = [l.split()[0] for l in lines]
    assert kinds == ["prestart", "createRuntime", "createContainer", "poststart", "poststop"]
    for line in lines:
        kind, var, state = line.split(" ", 2)
        assert var == "v-" + kind
        st = json.loads(state)
        assert st["bundle"] == b.path and st["ociVersion"]
        expect = {"prestart": "created", "createRuntime": "created",
                  "createContainer": "created", "poststart": "running",
                  "poststop": "stopped"}[kind]
        assert st["status"] == expect, line
        if kind != "poststop":
            assert st["pid"] > 0
    st = json.loads(open(os.path.join(b.rootfs, "tmp", "start-hook")).read())
    assert st["status"] == "created" and st["pid"] > 0


def test_failing_and_slow_hooks_fail_create(runtime, make_bundle, tmp_path):
    b = make_bundle(["true"])
    b.config["hooks"] = {"createRuntime": [{"path": "/bin/false"}]}
    p = runtime.run(b, check=False)
    assert p.returncode != 0 and "createRuntime hook /bin/false" in p.stderr
    b = make_bundle(["true"])
    b.config["hooks"] = {"prestart": [{"path": "/bin/sleep", "args": ["sleep", "10"],
                                       "timeout": 1}]}
    t = time.monotonic()
    p = runtime.run(b, check=False)
    assert p.returncode != 0 and "timed out after 1s" in p.stderr
    assert time.monotonic() - t < 8
    assert os.listdir(runtime.root) == []


def test_poststop_failure_is_only_a_warning(runtime, make_bundle):
    b = make_bundle(["true"])
    b.config["hooks"] = {"poststop": [{"path": "/bin/false"}]}
    p = runtime.run(b)
    assert p.returncode == 0 and "warning" in p.stderr


def test_shared_mount_namespace_uses_chroot(runtime, make_bundle):
    """No mount namespace in the spec: the container shares the caller's, gets its mounts
    there (as runc does) and enters the root with chroot. The caller here is a private mount
    namespace made for the test, so nothing reaches the host."""
    from .conftest import LAUNCHER
    b = make_bundle(["sh", "-c", "ls /bin/busybox; cat /proc/self/mountinfo | wc -l"])
    b.config["linux"]["namespaces"] = [{"type": "pid"}, {"type": "uts"}]
    b.config["linux"]["maskedPaths"] = []
    b.config["linux"]["readonlyPaths"] = []
    b.write()
    p = subprocess.run(["unshare", "-m", "--propagation", "private", *LAUNCHER, "--root",
                        runtime.root, "run", "--bundle", b.path, runtime.new_id()],
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split()[0] == "/bin/busybox"
    with open("/proc/self/mountinfo") as f:
        assert b.rootfs not in f.read()  # the mounts stayed in the test's namespace


def test_exec_with_terminal(runtime, make_bundle, tmp_path):
    sock_path = str(tmp_path / "exec-console.sock")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(1)
    cid, _ = runtime.create(make_bundle(["sleep", "30"]))
    runtime.cmd("start", cid)
    p = runtime.cmd("exec", "--tty", "--detach", "--console-socket", sock_path, cid,
                    "sh", "-c", "tty; echo exec-done; sleep 1")
    conn, _ = srv.accept()
    fds = array.array("i")
    _msg, anc, _, _ = conn.recvmsg(16, socket.CMSG_SPACE(4))
    fds.frombytes(anc[0][2][:4])
    master = fds[0]
    conn.close()
    srv.close()
    data = b""
    end = time.monotonic() + 5
    while b"exec-done" not in data and time.monotonic() < end:
        try:
            chunk = os.read(master, 4096)
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    os.close(master)
    assert data.decode().split()[0].startswith("/dev/pts/"), data
    assert p.returncode == 0


def test_cgroup_mount_shows_own_cgroup(runtime, make_bundle):
    def cg(c):
        c["mounts"].append({"destination": "/sys/fs/cgroup", "type": "cgroup",
                            "source": "cgroup", "options": ["ro", "nosuid", "noexec"]})
        c["linux"]["namespaces"].append({"type": "cgroup"})
        c["linux"]["resources"] = {"pids": {"limit": 77}}
    out = run_sh(runtime, make_bundle,
                 "cat /sys/fs/cgroup/pids/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids.max; "
                 "cat /proc/self/cgroup | grep -c ':/$'; "
                 "touch /sys/fs/cgroup/x 2>/dev/null && echo rw || echo ro", cg).stdout.split()
    assert out[0] == "77"           # the container's own cgroup, with its limit
    assert int(out[1]) >= 1         # cgroup namespace: the container's cgroup is its "/"
    assert out[2] == "ro"


def test_unobtainable_capability_fails_create(runtime, make_bundle):
    """A capability the launcher itself lacks fails create with its name (not start)."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)

    def drop_sys_nice():  # runs in the child before exec: the launcher starts without it
        libc.prctl(24, 23, 0, 0, 0)  # PR_CAPBSET_DROP, CAP_SYS_NICE

    b = make_bundle(["true"])
    caps = b.config["process"]["capabilities"]
    for k in ("bounding", "effective", "permitted"):
        caps[k] = caps[k] + ["CAP_SYS_NICE"]
    cid, p = runtime.create(b, None, check=False, preexec_fn=drop_sys_nice)
    assert p.returncode != 0 and "CAP_SYS_NICE" in p.stderr, p.stderr
    assert not os.path.exists(os.path.join(runtime.root, cid))
