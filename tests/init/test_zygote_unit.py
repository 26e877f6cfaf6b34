"""The pieces that keep init small and its runtime commands fast, on their own: the warm
launcher (a real zygote process driven through ZygoteLink), jsonlite against json, the
character-class validators against the regular expressions they replaced, sysc.in_child, and
what init has imported after serving requests."""
from __future__ import annotations

import io
import json
import os
import re
import select
import subprocess
import sys
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.observe import JsonLogger
from agent import jsonlite
from agent.privsep import imageops, ops, sysc, zygote
from agent.privsep.handlers import launcher_paths
from agent.privsep.zygote_link import (LOST_STATUS, ZygoteLink, ZygoteUnavailable,
                                        boot_argv)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- jsonlite ----------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=8), kids,
                                                               max_size=5),
    max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_jsonlite_matches_json(v):
    assert jsonlite.dumps(v) == json.dumps(v, separators=(",", ":"), allow_nan=False)
    assert jsonlite.dumps(v, ensure_ascii=False, separators=(", ", ": ")) == \
        json.dumps(v, ensure_ascii=False)
    text = json.dumps(v, indent=1)
    assert jsonlite.loads(text) == json.loads(text)
    assert jsonlite.loads(text.encode()) == json.loads(text)


@pytest.mark.parametrize("bad", ["", " ", "{", "[1,]", "NaN", "-Infinity", "1 2", '{"a":1}x',
                                 "{" * 100_000, "[" * 100_000, '"\\x"'])
def test_jsonlite_rejects_with_value_error(bad):
    with pytest.raises(ValueError):
        jsonlite.loads(bad)


def test_jsonlite_refuses_nan_unless_asked():
    with pytest.raises(ValueError):
        jsonlite.dumps({"x": float("nan")})
    assert jsonlite.dumps([float("inf")], allow_nan=True) == "[Infinity]"
    with pytest.raises(TypeError, match="set"):
        jsonlite.dumps({1, 2})


# ---- validators against the regular expressions they replace ------------------------------

def _agrees(pattern: str, check, s: str) -> None:
    assert bool(re.match("(?:" + pattern + r")\Z", s)) == check(s), s


ALPHABET = "aZ09_.+-:/@%[] =x\n\u00e9\u0661"
texts = st.text(alphabet=ALPHABET, max_size=12)
CASES = [
    (r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}", ops.valid_id, 128),
    (r"[A-Za-z0-9_.-]{1,64}", ops.valid_name, 64),
    (r"[A-Za-z0-9_.-]{1,64}(=[A-Za-z0-9_.:/@+-]{0,4096})?", ops.valid_data_option, 64),
    (r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62})?", ops.valid_hostname, 63),
    (r"[A-Za-z0-9][A-Za-z0-9._/:@+-]{0,511}", imageops.valid_ref, 512),
    (r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}(:[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](:[0-9]{1,5})?",
     imageops.valid_hostport, 253),
    (r"[a-z0-9]{1,32}/[a-z0-9_]{1,32}(/[a-z0-9]{1,16})?", imageops.valid_platform, 32),
]
RESOLV = (r"(nameserver [0-9A-Fa-f.:%a-z]{2,64}|(search|domain) [A-Za-z0-9. _-]{1,1000}|"
          r"options [A-Za-z0-9:. _-]{1,200}|sortlist [0-9./ ]{1,200})")


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_validators_agree_with_the_regexes(data):
    for pattern, check, longest in CASES:
        _agrees(pattern, check, data.draw(texts))
        # around the length limits, and the structured shapes
        _agrees(pattern, check, "a" * data.draw(st.integers(longest - 1, longest + 1)))
        _agrees(pattern, check, data.draw(st.sampled_from(
            ["a:1", "a:123456", "[::1]:80", "[]", "[g]", "linux/amd64", "linux/arm64/v8",
             "a/b/c/d", "a=", "=a", "a=b=c", "host.x:", "[::1]", "[::1]:"])))
    word = data.draw(st.sampled_from(["nameserver ", "search ", "domain ", "options ",
                                      "sortlist ", "nameserver", "bogus "]))
    _agrees(RESOLV, ops.valid_resolv_line, word + data.draw(texts))
    _agrees(RESOLV, ops.valid_resolv_line, "nameserver " + "1" * data.draw(st.integers(1, 65)))


# ---- sysc.in_child ------------------------------------------------------------------------

def test_in_child_returns_raises_and_keeps_ctypes_out():
    code = """
import sys
from agent.privsep import sysc
assert sysc.in_child(lambda a, b: [a, b], 1, "x") == [1, "x"]
try:
    sysc.in_child(sysc.umount, "/nonexistent/zygote-test", 0)
except OSError as e:
    assert e.errno == 2 and "umount2" in e.strerror, e
else:
    raise AssertionError("no error")
try:
    sysc.in_child(lambda: {}["k"])
except RuntimeError as e:
    assert "KeyError" in str(e), e
assert "ctypes" not in sys.modules
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True)
    assert out.stdout.strip() == "ok", out.stderr


# ---- what init imports ----------------------------------------------------------------------

def test_init_serving_requests_imports_no_enum_regex_json_socket_or_ctypes(tmp_path):
    # Run under -I -S like the guest's PID 1; the report goes out through jsonlite.
    code = f"""
import sys
sys.path[:0] = [{REPO!r}]
import agent.init
from agent.cmdline import AgentConfig
from agent import jsonlite
from agent.privsep import wire
a = agent.init._parse_args(["--server-addr", "unix:///x", "--no-zygote", "--job-timeout", "3"])
init = agent.init.Init(AgentConfig(run_dir={str(tmp_path / 'run')!r}), ["/bin/false"],
                       vm=False)
mine, theirs = wire.socketpair()
mine.setblocking(False)
init.daemon.sock = mine
reqs = [("table", {{}}), ("init_stats", {{}}), ("signal", {{"pid": 5, "signal": 9}}),
        ("write_resolv", {{"lines": ["nameserver 10.0.0.1", "search a.b"]}}),
        ("launch", {{"container_id": "bad id", "bundle": "/x"}}),
        ("pull", {{"image": "a b"}}), ("nonsense", {{}})]
for i, (op, args) in enumerate(reqs, 1):
    init._on_packet(wire.Packet({{"t": "req", "id": i, "op": op, "args": args}}, []))
replies = [wire.recv_packet(theirs).msg for _ in reqs]
print(jsonlite.dumps({{"modules": sorted(sys.modules), "replies": replies}}))
"""
    out = subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    heavy = ("re", "json", "socket", "enum", "collections", "ctypes", "signal", "argparse",
             "functools", "dataclasses", "typing", "trio", "shlex")
    bad = [m for m in res["modules"] if m.split(".")[0] in heavy]
    assert bad == []
    oks = [r["ok"] for r in res["replies"]]
    assert oks == [True, True, False, True, False, False, False]
    assert "not a valid id" in res["replies"][4]["error"]["msg"]
    assert "not an image reference" in res["replies"][5]["error"]["msg"]


# ---- the warm launcher ---------------------------------------------------------------------

def test_check_request():
    assert zygote.check_request({"op": "run", "args": {"argv": ["state", "x"]}}, 3) == \
        ["state", "x"]
    for msg, nfds, why in [({"op": "exec", "args": {"argv": ["x"]}}, 3, "op"),
                           ({"op": "run", "args": {"argv": []}}, 3, "argv"),
                           ({"op": "run", "args": {"argv": ["a\0b"]}}, 3, "argv"),
                           ({"op": "run", "args": {"argv": [1]}}, 3, "argv"),
                           ({"op": "run", "args": {"argv": ["x"] * 65}}, 3, "argv"),
                           ({"op": "run", "args": "x"}, 3, "argv"),
                           ({"op": "run", "args": {"argv": ["x"]}}, 2, "3 fds")]:
        with pytest.raises(ValueError, match=why):
            zygote.check_request(msg, nfds)


def _pump(link: ZygoteLink, until, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not until():
        left = end - time.monotonic()
        assert left > 0, "timed out waiting on the zygote"
        if link.sock is not None:
            select.select([link.sock], [], [], min(left, 0.1))
            link.read()
        else:
            time.sleep(0.01)


@pytest.fixture
def link():
    if os.geteuid() != 0:
        pytest.skip("the zygote arms PR_SET_PDEATHSIG and forks the launcher: run as root")
    log = io.StringIO()
    z = ZygoteLink(boot_argv(sys.executable, launcher_paths(), os.getpid()),
                   JsonLogger("init", "debug", stream=log))
    z.log_text = log
    yield z
    pid = z.pid
    z.stop()
    if pid is not None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:  # the test reaped it
            pass


def test_zygote_runs_cli_commands_in_forks(link, tmp_path):
    with pytest.raises(ZygoteUnavailable):
        link.spawn(["state", "x"], [None, None, None])  # not started
    link.start()
    with pytest.raises(ZygoteUnavailable):  # started, not ready yet: the caller uses the CLI
        link.spawn(["state", "x"], [None, None, None])
    _pump(link, lambda: link.ready)
    # ready means it gave up its warm-up priority: workers and containers inherit this one
    assert os.getpriority(os.PRIO_PROCESS, link.pid) == os.getpriority(os.PRIO_PROCESS, 0)
    exe = os.readlink(f"/proc/{link.pid}/exe")
    assert exe.startswith("/memfd:"), exe  # re-executed from a sealed copy
    root = str(tmp_path / "state")
    r, w = os.pipe()
    try:
        pid = link.spawn(["--root", root, "state", "nosuch"], [None, w, w])
        os.close(w)
        w = None
        _pump(link, lambda: link.exits)
        (got, status), = link.take_exits()
        assert got == pid and os.waitstatus_to_exitcode(status) == 1
        err = os.read(r, 65536).decode()
        assert "oci-launcher: state:" in err and "nosuch" in err  # the CLI's own message
        # a usage error: the CLI's status 2 and usage text, through the same path
        r2, w2 = os.pipe()
        pid = link.spawn(["frobnicate"], [None, None, w2])
        os.close(w2)
        _pump(link, lambda: link.exits)
        (got, status), = link.take_exits()
        assert os.waitstatus_to_exitcode(status) == 2
        assert "unknown command 'frobnicate'" in os.read(r2, 65536).decode()
        os.close(r2)
        assert link.workers == set()
    finally:
        os.close(r)
        if w is not None:
            os.close(w)


def test_zygote_death_reports_lost_workers_and_restarts(link):
    link.start()
    _pump(link, lambda: link.ready)
    first = link.pid
    # A worker the zygote forked whose exit report died with it: reported as lost.
    dead = subprocess.Popen(["true"])
    dead.wait()
    link.workers.add(dead.pid)
    os.kill(first, 9)
    _, status = os.waitpid(first, 0)
    link.exited(status)
    assert link.take_exits() == [(dead.pid, LOST_STATUS)]
    assert "warm launcher exited" in link.log_text.getvalue()
    with pytest.raises(ZygoteUnavailable):
        link.spawn(["state", "x"], [None, None, None])
    assert link.wake_at() is not None
    link.tick(link.wake_at())  # the backoff is over: start again
    _pump(link, lambda: link.ready)
    assert link.pid != first


def test_zygote_setting_from_the_kernel_command_line():
    from agent import cmdline
    assert cmdline.parse("").zygote is True
    assert cmdline.parse("agent.zygote=off").zygote is False
    assert cmdline.parse("agent.zygote").zygote is True
    with pytest.raises(cmdline.CmdlineError, match="zygote"):
        cmdline.parse("agent.zygote=maybe")


def test_zygote_dying_with_the_request_unread_means_nothing_ran(link):
    import signal
    import threading
    link.start()
    _pump(link, lambda: link.ready)
    z = link.pid
    os.kill(z, signal.SIGSTOP)  # it cannot read what comes next
    threading.Timer(0.3, os.kill, (z, signal.SIGKILL)).start()
    with pytest.raises(ZygoteUnavailable, match="before reading"):  # so the CLI may run it
        link.spawn(["state", "x"], [None, None, None])
    _, status = os.waitpid(z, 0)
    link.exited(status)
    assert link.take_exits() == []


def test_zygote_preload_names_only_modules_that_exist():
    # A stale name costs every worker an import (and was logged as a failure at each boot).
    assert zygote.preload() == []


def test_zygote_not_ready_in_time_is_killed_once_then_restarted(tmp_path):
    log = io.StringIO()
    # a "zygote" that never says it is ready
    z = ZygoteLink(["/bin/sleep", "60"], JsonLogger("init", "debug", stream=log),
                   ready_timeout=0.2)
    z.start()
    pid = z.pid
    try:
        assert z.wake_at() == pytest.approx(z.started_at + 0.2)  # before the priority raise
        time.sleep(0.25)
        z.tick(time.monotonic())
        # killed; until its death is reaped nothing is due: init's loop must sleep, not spin
        # killing it again (it did, logging a line per turn, while a nice-19 zygote died)
        assert z.wake_at() is None
        for _ in range(3):
            z.tick(time.monotonic())
        assert log.getvalue().count("not ready in time") == 1
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == 9
        z.exited(status)
        assert z.pid is None and z.wake_at() is not None  # the restart is scheduled
        z.tick(z.wake_at())
        assert z.pid not in (None, pid) and z.wake_at() is not None
    finally:
        z.stop()
        for p in {pid, z.pid} - {None}:
            try:
                os.waitpid(p, 0)
            except ChildProcessError:
                pass


def test_zygote_warms_up_at_low_priority_then_gets_inits_back():
    if os.geteuid() != 0:
        pytest.skip("raising a priority needs CAP_SYS_NICE: run as root")
    from agent.privsep.zygote_link import ENV_PRIORITY, LOW_PRIORITY
    log = io.StringIO()
    z = ZygoteLink(["/bin/sleep", "60"], JsonLogger("init", "debug", stream=log),
                   low_priority_for=0.2, ready_timeout=30)
    mine = os.getpriority(os.PRIO_PROCESS, 0)
    z.start()
    pid = z.pid
    try:
        assert os.getpriority(os.PRIO_PROCESS, pid) == LOW_PRIORITY
        env = b""
        for _ in range(200):  # empty until the new program has set up its stack
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            if env:
                break
            time.sleep(0.005)
        assert f"{ENV_PRIORITY}={mine}".encode() in env.split(b"\0")  # restored before forking
        assert z.wake_at() == pytest.approx(z.started_at + 0.2)
        time.sleep(0.25)
        z.tick(time.monotonic())
        # still not ready: it keeps running, now at init's priority, until the ready timeout
        assert os.getpriority(os.PRIO_PROCESS, pid) == mine
        assert z.pid == pid and z.wake_at() == pytest.approx(z.started_at + 30)
        assert "not ready in time" not in log.getvalue()
    finally:
        z.stop()
        os.waitpid(pid, 0)


def test_puller_zygote_runs_the_puller_jobs(tmp_path):
    """The second kind (init's warm puller): workers run puller.agentjob with init's argv,
    answer on stdout and fail as the job's own process would, message on stderr included."""
    if os.geteuid() != 0:
        pytest.skip("the zygote arms PR_SET_PDEATHSIG: run as root")
    assert zygote.preload(zygote.PRELOAD_PULLER) == []
    log = io.StringIO()
    z = ZygoteLink(boot_argv(sys.executable, launcher_paths(), os.getpid(), "puller"),
                   JsonLogger("init", "debug", stream=log), name="warm puller")
    z.start()
    try:
        _pump(z, lambda: z.ready)
        assert "warm puller ready" in log.getvalue()
        # not re-executed from a sealed copy: its workers never enter a container
        assert not os.readlink(f"/proc/{z.pid}/exe").startswith("/memfd:")
        store = str(tmp_path / "store")

        def job(*argv):
            r, w = os.pipe()
            er, ew = os.pipe()
            pid = z.spawn(list(argv), [None, w, ew])
            os.close(w)
            os.close(ew)
            _pump(z, lambda: z.exits)
            (got, status), = z.take_exits()
            assert got == pid
            out, err = os.read(r, 65536), os.read(er, 65536)
            os.close(r)
            os.close(er)
            return os.waitstatus_to_exitcode(status), out.decode(), err.decode()

        assert job("unsnapshot", "nosuch", "--store", store) == (0, '{"removed": false}', "")
        code, out, err = job("snapshot", "reg.example/a/b:1", "--store", store, "--dest",
                             str(tmp_path / "root"), "--id", "c1")
        assert (code, out) == (1, "") and "is not in the store" in err  # SystemExit's text
        code, _, err = job("frobnicate")
        assert code == 2 and "invalid choice: 'frobnicate'" in err  # argparse's usage error
    finally:
        pid = z.pid
        z.stop()
        if pid is not None:
            os.waitpid(pid, 0)


def test_zygote_on_demand_starts_only_when_wanted():
    z = ZygoteLink(["/bin/sleep", "60"], JsonLogger("init", "debug", stream=io.StringIO()),
                   first_start=None)
    assert z.wake_at() is None
    z.tick(time.monotonic() + 3600)
    assert z.pid is None  # no time makes it start
    z.wanted_now()
    assert z.wake_at() is not None
    z.tick(z.wake_at())
    pid = z.pid
    try:
        assert pid is not None
    finally:
        z.stop()
        if pid is not None:
            os.waitpid(pid, 0)
    z.wanted_now()  # stopped for good: wanting it again starts nothing
    assert z.wake_at() is None
