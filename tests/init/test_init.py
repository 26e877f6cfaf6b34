"""init as PID 1 of a pid+mount namespace (subreaper mode), driven through the dummy
daemon over the real privsep channel, launching real runc containers."""
import os
import signal
import time


def test_daemon_is_confined_and_gets_empty_table(agent):
    h = agent.hello
    st_run, st_d = os.stat(agent.run_dir), os.stat(os.path.join(agent.run_dir, "daemon"))
    assert (st_run.st_uid, st_run.st_mode & 0o777) == (0, 0o755)
    assert (st_d.st_uid, st_d.st_gid, st_d.st_mode & 0o777) == (65534, 65534, 0o700)
    st_s = os.stat(os.path.join(agent.run_dir, ".oci-state"))
    assert (st_s.st_uid, st_s.st_mode & 0o777) == (0, 0o700)
    assert h["generation"] == 1
    assert h["initial_table"] == {"containers": [], "processes": [], "kept": []}
    st = h["status"]
    assert st["Uid"].split()[0] == "65534"
    assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
    assert st["NoNewPrivs"] == "1" and st["Seccomp"] == "2"


def test_launch_start_output_and_exit_status(agent):
    pid, ends = agent.launch("c1", ["sh", "-c", "echo hello from c1; exit 3"])
    assert agent.read_all(ends["stdout"]) == b"hello from c1\n"
    os.close(ends["stdout"])
    ev = agent.wait_event(lambda e: e.get("ev") == "exit" and e["pid"] == pid)
    assert ev["container_id"] == "c1" and ev["exec_id"] == ""
    assert ev["exit_code"] == 3
    table = agent.call_ok("table")
    procs = {p["pid"]: p for p in table["processes"]}
    assert procs[pid]["exited"] and procs[pid]["exit_code"] == 3
    assert table["containers"][0]["started"] is True
    # the status is kept until released, then forgotten
    agent.call_ok("release", {"pid": pid})
    assert pid not in {p["pid"] for p in agent.call_ok("table")["processes"]}
    rep = agent.call("release", {"pid": pid})
    assert not rep["ok"] and rep["field"] == "pid"
    agent.call_ok("delete", {"container_id": "c1"})
    assert agent.call_ok("table")["containers"] == []



def _host_pid(agent, ns_pid: int) -> int:
    """The host pid of a process of the agent's pid namespace."""
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/status") as f:
                for line in f:
                    if line.startswith("NSpid:"):
                        ids = line.split()[1:]
                        break
                else:
                    continue
        except OSError:
            continue
        if len(ids) >= 2 and int(ids[-1]) == ns_pid and _in_tree(agent.proc.pid, int(d)):
            return int(d)
    raise LookupError(f"no process with ns pid {ns_pid}")


def _in_tree(root: int, pid: int) -> bool:
    while pid > 1:
        if pid == root:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                raw = f.read()
        except OSError:
            return False
        pid = int(raw[raw.rindex(")") + 2:].split()[1])
    return False


def _tree(root: int) -> dict[int, tuple[str, str]]:
    procs = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != root and _in_tree(root, int(d)):
            try:
                with open(f"/proc/{d}/stat") as f:
                    raw = f.read()
            except OSError:
                continue
            procs[int(d)] = (raw[raw.rindex(")") + 2:].split()[0],
                             raw[raw.index("(") + 1:raw.rindex(")")])
    return procs


def test_exec_with_stdin_and_signal(agent):
    pid, ends = agent.launch("c2", ["sleep", "1000"], stdio=())
    r_in, w_in = os.pipe()
    r_out, w_out = os.pipe()
    proc = agent.process_file("e1", ["sh", "-c", "cat; exit 5"])
    res = agent.call_ok("exec", {"container_id": "c2", "exec_id": "e1", "process": proc,
                                 "stdio": {"stdin": True, "stdout": True}}, [r_in, w_out])
    os.close(r_in)
    os.close(w_out)
    os.write(w_in, b"through stdin\n")
    os.close(w_in)
    assert agent.read_all(r_out) == b"through stdin\n"
    os.close(r_out)
    ev = agent.wait_event(lambda e: e.get("ev") == "exit" and e["pid"] == res["pid"])
    assert (ev["exec_id"], ev["exit_code"]) == ("e1", 5)
    # the same exec id twice is refused
    rep = agent.call("exec", {"container_id": "c2", "exec_id": "e1", "process": proc})
    assert not rep["ok"] and rep["field"] == "exec_id"
    # signal only processes init started
    for bad in (1, 2, 99999):
        rep = agent.call("signal", {"pid": bad, "signal": 9})
        assert not rep["ok"] and rep["field"] == "pid", rep
    agent.call_ok("signal", {"pid": pid, "signal": signal.SIGKILL})
    ev = agent.wait_event(lambda e: e.get("ev") == "exit" and e["pid"] == pid)
    assert ev["exit_code"] == 128 + signal.SIGKILL
    rep = agent.call("signal", {"pid": pid, "signal": 9})  # reaped: no longer signalable
    assert not rep["ok"] and rep["field"] == "pid"


def test_terminal_gets_pty_master(agent):
    b = agent.bundle("tty1", ["sh", "-c", "tty; echo hi; exit 2"], terminal=True)
    rep, fds = agent.request({"cmd": "call", "op": "launch",
                              "args": {"container_id": "tty1", "bundle": b,
                                       "terminal": True}})
    assert rep["ok"], rep
    assert len(fds) == 1
    master = fds[0]
    agent.call_ok("start", {"container_id": "tty1"})
    out = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # EIO once the last slave fd closes
            break
        if not chunk:
            break
        out += chunk
    os.close(master)
    assert b"/dev/pts/0" in out and b"hi" in out, out
    ev = agent.wait_event(lambda e: e.get("ev") == "exit" and e["container_id"] == "tty1")
    assert ev["exit_code"] == 2


def test_requests_are_validated_and_init_survives_garbage(agent):
    init_host = agent.proc.pid
    ns_init = _host_pid(agent, 1)
    fds_before = len(os.listdir(f"/proc/{ns_init}/fd"))
    os.symlink("/etc", os.path.join(agent.run_dir, "escape"))
    os.makedirs(os.path.join(agent.run_dir, "mnt"), exist_ok=True)
    cases = [
        ("frobnicate", {}, "op"),
        ("launch", {"bundle": agent.run_dir}, "container_id"),
        ("launch", {"container_id": "../x", "bundle": agent.run_dir}, "container_id"),
        ("launch", {"container_id": "x", "bundle": "/etc"}, "bundle"),
        ("launch", {"container_id": "x", "bundle": agent.run_dir + "/escape"}, "bundle"),
        ("launch", {"container_id": "x", "bundle": agent.run_dir + "/../.."}, "bundle"),
        ("launch", {"container_id": "x", "bundle": agent.run_dir, "stdio": {"stdout": True}},
         "stdio"),
        ("launch", {"container_id": 5, "bundle": agent.run_dir}, "container_id"),
        ("launch", {"container_id": "x", "bundle": agent.run_dir, "colour": "red"}, "colour"),
        ("start", {"container_id": "nope"}, "container_id"),
        ("exec", {"container_id": "nope", "exec_id": "e", "process": "/etc/passwd"},
         "process"),
        ("signal", {"pid": 2, "signal": 0}, "signal"),
        ("signal", {"pid": 2, "signal": True}, "signal"),
        ("signal", {"pid": "1", "signal": 9}, "pid"),
        ("mount", {"source": "proc", "target": agent.run_dir + "/mnt", "fstype": "proc"},
         "fstype"),
        ("mount", {"source": "/", "target": agent.run_dir + "/mnt", "fstype": "bind"},
         "source"),
        ("mount", {"source": "t", "target": "/mnt", "fstype": "tmpfs"}, "target"),
        ("mount", {"source": "t", "target": agent.run_dir + "/mnt", "fstype": "tmpfs",
                   "options": ["size=1m,suid"]}, "options[0]"),
        ("mount", {"source": "t", "target": agent.run_dir + "/mnt", "fstype": "overlay",
                   "options": ["lowerdir=/etc"]}, "options[0].lowerdir[0]"),
        ("umount", {"target": "/proc"}, "target"),
        ("launch", {"container_id": "x", "bundle": agent.run_dir + "/.oci-state"}, "bundle"),
        ("umount", {"target": agent.run_dir + "/.oci-state"}, "target"),
        ("net", {"action": "format_disk"}, "action"),
    ]
    for op, args, fld in cases:
        rep = agent.call(op, args)
        assert not rep["ok"], (op, args, rep)
        assert rep["field"] == fld, (op, args, rep)
        assert rep["msg"]
    # fds on an op that takes none are refused and closed
    r, w = os.pipe()
    rep = agent.call("table", {}, [r, w])
    os.close(r)
    os.close(w)
    assert not rep["ok"] and rep["field"] == "fds"
    # packets that are not messages at all
    garbage = [b"\x00\xff\xfe", b"[1,2,3]", b'{"t":"req","id":-1,"op":"table"}',
               b'{"t":"rep","id":5,"ok":true}', b'{"t":"req","id":1.5}', b"{" * 5000,
               b'{"t":"req","id":7,"op":"table","args":[]}', b"x" * (200 * 1024)]
    for g in garbage:
        r, w = os.pipe()
        rep, _ = agent.request({"cmd": "raw", "hex": g.hex()}, [r, w])
        os.close(r)
        os.close(w)
        assert rep["ok"]
    errors = agent.wait_event(lambda e: e.get("ev") == "error" and "cap" in e["msg"])
    assert "exceeds" in errors["msg"]
    n_err = sum(1 for e in agent.events() if e.get("ev") == "error")
    assert n_err >= 6
    # init is alive, answers, and leaked no fds from any of it
    assert agent.proc.poll() is None and _host_pid(agent, 1) == ns_init
    assert agent.call_ok("table") == {"containers": [], "processes": [], "kept": []}
    assert len(os.listdir(f"/proc/{ns_init}/fd")) == fds_before
    assert init_host == agent.proc.pid


def _settles(root: int, pred, timeout: float = 10) -> dict:
    """Poll the process tree until ``pred(tree)`` holds; returns the last tree seen."""
    end = time.monotonic() + timeout
    while True:
        tree = _tree(root)
        if pred(tree) or time.monotonic() > end:
            return tree
        time.sleep(0.05)


def _clean(tree) -> bool:
    return not any(state == "Z" or comm == "sleep" for state, comm in tree.values())


def test_orphans_are_reaped(agent_factory):
    # the daemon's wrapper leaves background sleeps behind: orphans for init to reap
    a = agent_factory(daemon_prefix="sh -c '(sleep 2 &); (sleep 2.5 &); (sleep 3 &); "
                                    "exec \"$@\"' sh")
    tree = _tree(a.proc.pid)
    assert any(comm == "sleep" for _, comm in tree.values()), tree  # orphans exist now
    tree = _settles(a.proc.pid, _clean)
    assert _clean(tree), tree  # ... and were reaped, not left as zombies
    # a container's own children orphaned inside it are its init's business; its exit is ours
    pid, ends = a.launch("orph", ["sh", "-c", "(sleep 0.2 &); exit 4"], stdio=())
    ev = a.wait_event(lambda e: e.get("ev") == "exit" and e["pid"] == pid)
    assert ev["exit_code"] == 4
    tree = _settles(a.proc.pid, _clean)
    assert _clean(tree), tree


def test_daemon_restart_keeps_containers_and_statuses(agent):
    n = 10
    stdins, pids = {}, {}
    for i in range(n):
        cid = f"r{i}"
        pids[cid], ends = agent.launch(cid, ["sh", "-c", f"read x; exit {10 + i}"],
                                       stdio=("stdin",))
        stdins[cid] = ends["stdin"]
    old = agent.hello
    os.kill(_host_pid(agent, old["pid"]), signal.SIGKILL)
    # half of the containers finish while there is no daemon (or while it starts)
    for i in range(0, n, 2):
        os.write(stdins[f"r{i}"], b"go\n")
        os.close(stdins.pop(f"r{i}"))
    new = agent.wait_hello(not_pid=old["pid"])
    assert new["generation"] == old["generation"] + 1
    table = new["initial_table"]
    assert sorted(c["container_id"] for c in table["containers"]) == sorted(pids)
    assert {p["pid"] for p in table["processes"]} == set(pids.values())
    # the other half kept running through the restart and finish now
    for cid, fd in stdins.items():
        os.write(fd, b"go\n")
        os.close(fd)
    for i in range(n):
        rep, _ = agent.request({"cmd": "wait", "pid": pids[f"r{i}"]})
        assert rep["exit_code"] == 10 + i, (i, rep)
    # restart again twice in quick succession: the backoff grows, statuses stay
    for _ in range(2):
        h = agent.wait_hello()
        os.kill(_host_pid(agent, h["pid"]), signal.SIGKILL)
        agent.wait_hello(not_pid=h["pid"])
    h = agent.wait_hello()
    assert h["generation"] == old["generation"] + 3
    codes = {p["pid"]: p["exit_code"] for p in h["initial_table"]["processes"]}
    assert codes == {pids[f"r{i}"]: 10 + i for i in range(n)}
    for i in range(n):  # WaitProcess in the newest daemon: served from init's table
        rep, _ = agent.request({"cmd": "wait", "pid": pids[f"r{i}"]})
        assert rep["exit_code"] == 10 + i
    import json
    delays = [json.loads(line)["fields"]["delay"] for line in agent.read_log().splitlines()
              if line.startswith("{") and '"daemon will restart"' in line]
    # doubling while the daemon keeps dying young (a life over 10 s, possible for the
    # second one on a loaded machine, starts again from 0.1)
    assert len(delays) == 3 and delays[0] == 0.1, delays
    assert delays[1] in (0.1, 0.2) and delays[2] == 2 * delays[1], delays


def test_mount_and_umount_in_run_dir(agent):
    tgt = os.path.join(agent.run_dir, "mnt", "t")
    src = os.path.join(agent.run_dir, "src")
    bnd = os.path.join(agent.run_dir, "mnt", "b")
    os.makedirs(tgt)
    os.makedirs(src)
    ns_init = _host_pid(agent, 1)
    agent.call_ok("mount", {"source": "scratch", "target": tgt, "fstype": "tmpfs",
                            "options": ["nosuid", "nodev", "size=1m"]})
    agent.call_ok("mount", {"source": src, "target": bnd, "fstype": "bind",
                            "options": ["ro"]})
    with open(f"/proc/{ns_init}/mountinfo") as f:
        info = f.read()
    lines = {ln.split()[4]: ln for ln in info.splitlines()}
    assert tgt in lines and "tmpfs" in lines[tgt] and "nosuid" in lines[tgt]
    assert bnd in lines and lines[bnd].split()[5].split(",")[0] == "ro", lines.get(bnd)
    # invisible on the host: init's mount namespace is private
    with open("/proc/self/mountinfo") as f:
        assert tgt not in f.read()
    agent.call_ok("umount", {"target": tgt})
    agent.call_ok("umount", {"target": bnd})
    with open(f"/proc/{ns_init}/mountinfo") as f:
        info = f.read()
    assert tgt not in info and bnd not in info


def test_shutdown_stops_containers_and_exits(agent):
    pid, _ = agent.launch("s1", ["sleep", "1000"], stdio=())
    assert any(v[1] == "sleep" for v in _tree(agent.proc.pid).values())
    rep = agent.call("shutdown")
    assert rep["ok"]
    assert agent.proc.wait(timeout=20) == 0
    state = os.path.join(agent.run_dir, ".oci-state", "root")
    assert not os.path.isdir(state) or os.listdir(state) == []
    assert _tree(agent.proc.pid) == {}


def test_json_logs_of_init_and_daemon_on_the_log_port(agent_factory):
    import json
    import socket as socket_mod
    a = agent_factory(log_socket=True)
    s = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    s.connect(a.log_socket)
    s.settimeout(10)
    os.kill(_host_pid(a, a.hello["pid"]), signal.SIGKILL)
    a.wait_hello(not_pid=a.hello["pid"])
    data = b""
    while data.count(b"dummy daemon serving") < 2:
        chunk = s.recv(65536)
        assert chunk, data
        data += chunk
    s.close()
    recs = [json.loads(line) for line in data.splitlines()]  # every line is one JSON object
    sources = {(r["source"], r["msg"]) for r in recs}
    assert ("init", "daemon started") in sources and ("init", "daemon exited") in sources
    gens = [r["fields"]["generation"] for r in recs if r["msg"] == "dummy daemon serving"]
    assert gens == [1, 2]
    assert not os.path.exists(a.log_path) or "dummy daemon serving" not in a.read_log()


def test_sigterm_outside_a_vm_stops_everything(agent):
    agent.launch("t1", ["sleep", "1000"], stdio=())
    os.kill(_host_pid(agent, 1), signal.SIGTERM)
    assert agent.proc.wait(timeout=20) == 0
    assert _tree(agent.proc.pid) == {}
    state = os.path.join(agent.run_dir, ".oci-state", "root")
    assert not os.path.isdir(state) or os.listdir(state) == []


def test_a_hung_runtime_is_killed_and_reported(agent_factory, tmp_path):
    # A runtime that never returns cannot be made from runc on purpose: a script stands in.
    hang = tmp_path / "hung-runtime"
    hang.write_text("#!/bin/sh\nexec sleep 1000\n")
    hang.chmod(0o755)
    a = agent_factory(runtime=str(hang), extra=["--job-timeout", "0.5"])
    rep = a.call("launch", {"container_id": "h1", "bundle": a.bundle("h1", ["true"])})
    assert not rep["ok"] and "failed" in rep["msg"] and "status 9" in rep["msg"], rep
    assert a.call_ok("table")["containers"] == []  # the failed launch left no entry
    assert "job overran its time" in a.read_log()


def test_launch_finishing_after_the_daemon_died_reaches_its_successor(agent_factory, tmp_path):
    # runc behind a delay, so the daemon can be killed while a launch is pending (and its
    # successor is up before the launch ends; otherwise only the table would tell it)
    slow = tmp_path / "slow-runc"
    slow.write_text('#!/bin/sh\ncase " $* " in *" create "*) sleep 2;; esac\nexec runc "$@"\n')
    slow.chmod(0o755)
    a = agent_factory(runtime=str(slow))
    req = {"t": "req", "id": 424242, "op": "launch",
           "args": {"container_id": "late", "bundle": a.bundle("late", ["sleep", "1000"])}}
    import json
    rep, _ = a.request({"cmd": "raw", "hex": json.dumps(req).encode().hex()})
    assert rep["ok"]
    os.kill(_host_pid(a, a.hello["pid"]), signal.SIGKILL)
    a.wait_hello(not_pid=a.hello["pid"])
    ev = a.wait_event(lambda e: e.get("ev") == "stale_reply")
    assert ev["generation"] == 1 and ev["result"]["pid"] > 1
    table = a.call_ok("table")
    assert [c["container_id"] for c in table["containers"]] == ["late"]
    assert [p["pid"] for p in table["processes"]] == [ev["result"]["pid"]]
    a.call_ok("start", {"container_id": "late"})
    a.call_ok("kill", {"container_id": "late", "signal": 9})
    ev = a.wait_event(lambda e: e.get("ev") == "exit" and e["container_id"] == "late")
    assert ev["exit_code"] == 137


def test_init_reports_its_own_figures(agent):
    st = agent.call_ok("init_stats")
    assert st["rss_bytes"] > 1 << 20 and 0 < st["pss_bytes"] <= st["rss_bytes"]
    assert st["threads"] == 1  # init stays single-threaded


def test_pause_resume_update_through_the_runtime(agent):
    import json
    import subprocess
    pid, _ = agent.launch("p1", ["sleep", "1000"], stdio=())
    state_root = os.path.join(agent.run_dir, ".oci-state", "root")

    def status():  # asked inside init's namespaces: the pid in runc's state is theirs
        out = subprocess.run(["nsenter", "-t", str(_host_pid(agent, 1)), "-p", "-m", "runc",
                              "--root", state_root, "state", "p1"],
                             capture_output=True, text=True, check=True).stdout
        return json.loads(out)["status"]
    assert status() == "running"
    agent.call_ok("pause", {"container_id": "p1"})
    assert status() == "paused"
    agent.call_ok("resume", {"container_id": "p1"})
    assert status() == "running"
    agent.call_ok("update", {"container_id": "p1", "resources": {"pids": {"limit": 50}}})
    cg = f"/sys/fs/cgroup/pids/sandbox-agent-init-test/{os.path.basename(agent.base)}-p1"
    if not os.path.isdir(cg):  # a pure cgroup2 host
        cg = f"/sys/fs/cgroup/sandbox-agent-init-test/{os.path.basename(agent.base)}-p1"
    with open(os.path.join(cg, "pids.max")) as f:
        assert f.read().strip() == "50"
    rep = agent.call("update", {"container_id": "p1", "resources": "/etc/passwd"})
    assert not rep["ok"] and rep["field"] == "resources"  # an object, not a path
    rep = agent.call("pause", {"container_id": "nope"})
    assert not rep["ok"] and rep["field"] == "container_id"


def test_hostname_dns_and_time_requests(agent):
    import socket as socket_mod
    import subprocess
    host_name = socket_mod.gethostname()
    agent.call_ok("set_hostname", {"hostname": "sandbox-1"})
    out = subprocess.run(["nsenter", "-t", str(_host_pid(agent, 1)), "-u", "hostname"],
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == "sandbox-1"
    assert socket_mod.gethostname() == host_name  # init has its own UTS namespace
    lines = ["nameserver 10.0.0.53", "search example.test svc.test", "options ndots:5"]
    rep = agent.call_ok("write_resolv", {"lines": lines})
    assert rep["path"] == os.path.join(agent.run_dir, "resolv.conf")  # not the host's file
    with open(rep["path"]) as f:
        assert f.read() == "".join(x + "\n" for x in lines)
    for op, args, fld in [
        ("set_hostname", {"hostname": "a b"}, "hostname"),
        ("set_hostname", {"hostname": "x" * 64}, "hostname"),
        ("write_resolv", {"lines": ["nameserver 1.1.1.1\nnameserver 6.6.6.6"]}, "lines[0]"),
        ("write_resolv", {"lines": ["rm -rf /"]}, "lines[0]"),
        ("write_resolv", {"lines": "nameserver 1.1.1.1"}, "lines"),
        # only refusals: a test must not move the shared machine's clock
        ("set_time", {"sec": -1, "usec": 0}, "sec"),
        ("set_time", {"sec": 1, "usec": 1_000_000}, "sec"),
        ("set_time", {"usec": 5}, "sec"),
    ]:
        rep = agent.call(op, args)
        assert not rep["ok"] and rep["field"] == fld, (op, args, rep)
