"""The privsep pieces on their own: packet encoding and fd passing, operation validation,
the process table, records, the trio client; and a fuzz of init's request handling."""
import json
import os
import socket
import string

import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cmdline import AgentConfig
from agent.privsep import ops, wire
from agent.privsep.client import InitError, InitGone, open_client
from agent.privsep.record import FrozenInstanceError, asdict, field, record, replace
from agent.privsep.state import ProcessTable, exit_code


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ---- wire --------------------------------------------------------------------------------

def test_packet_roundtrip_with_fds():
    a, b = wire.socketpair()
    r, w = os.pipe()
    try:
        wire.send_packet(a, {"t": "req", "id": 1, "op": "x", "args": {}}, [w])
        os.close(w)
        pkt = wire.recv_packet(b)
        assert pkt.msg["op"] == "x" and len(pkt.fds) == 1
        assert not os.get_inheritable(pkt.fds[0])  # close-on-exec: never leaks into a spawn
        os.write(pkt.fds[0], b"ok")
        assert os.read(r, 2) == b"ok"
        pkt.close_fds()
        assert pkt.fds == []
    finally:
        os.close(r)
        a.close()
        b.close()


@pytest.mark.parametrize("data,why", [
    (b"\xff\xfe", "not JSON"), (b"[]", "not an object"), (b'{"t":"zz"}', "'t'"),
    (b'{"t":"req","id":0}', "'id'"), (b'{"t":"rep","id":true}', "'id'"),
    (b'{"t":"req","id":"1"}', "'id'"),
])
def test_malformed_packets_rejected(data, why):
    with pytest.raises(wire.ProtocolError, match=why):
        wire.decode(data)


def test_oversize_and_too_many_fds_close_what_arrived():
    a, b = wire.socketpair()
    try:
        with pytest.raises(wire.ProtocolError):
            wire.send_packet(a, {"t": "ev", "x": "y" * wire.MAX_PACKET})
        before = open_fds()
        pipes = [os.pipe() for _ in range(wire.MAX_FDS + 2)]
        fds = [fd for p in pipes for fd in p][: wire.MAX_FDS + 4]
        socket.send_fds(a, [b'{"t":"ev"}'], fds)
        a.send(b"x" * (wire.MAX_PACKET + 10))
        for fd in fds:
            os.close(fd)
        for p in pipes:
            for fd in p:
                try:
                    os.close(fd)
                except OSError:
                    pass
        with pytest.raises(wire.ProtocolError, match="too many fds"):
            wire.recv_packet(b)
        with pytest.raises(wire.ProtocolError, match="cap"):
            wire.recv_packet(b)
        assert open_fds() == before  # what arrived with rejected packets was closed
    finally:
        a.close()
        b.close()


def test_eof_is_none():
    a, b = wire.socketpair()
    a.close()
    assert wire.recv_packet(b) is None
    b.close()


# ---- ops ---------------------------------------------------------------------------------

def test_parse_launch_resolves_paths(tmp_path):
    run = tmp_path / "run"
    (run / "b1").mkdir(parents=True)
    (run / "link").symlink_to(run / "b1")
    op = ops.parse("launch", {"container_id": "c1", "bundle": str(run / "link"),
                              "stdio": {"stdout": True, "stderr": True}}, 2, str(run))
    assert op == ops.Launch("c1", str(run / "b1"), False, ops.Stdio(False, True, True))
    assert op.stdio.count == 2
    with pytest.raises(ops.ValidationError) as ei:
        ops.parse("launch", {"container_id": "c1", "bundle": str(run / "b1"),
                             "terminal": True, "stdio": {"stdout": True}}, 1, str(run))
    assert ei.value.field == "stdio"
    with pytest.raises(ops.ValidationError) as ei:
        ops.parse("launch", {"container_id": "c1", "bundle": str(run / "b1"),
                             "stdio": {"stdout": 1}}, 1, str(run))
    assert ei.value.field == "stdio.stdout"


@pytest.mark.parametrize("cid", ["", ".hidden", "a/b", "x" * 129, "a b", "é"])
def test_bad_ids(cid, tmp_path):
    with pytest.raises(ops.ValidationError) as ei:
        ops.parse("start", {"container_id": cid}, 0, str(tmp_path))
    assert ei.value.field == "container_id"


def test_prefix_sibling_is_outside(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run2").mkdir()
    with pytest.raises(ops.ValidationError) as ei:
        ops.under("bundle", str(tmp_path / "run2"), str(tmp_path / "run"))
    assert "outside" in ei.value.msg


# ---- state -------------------------------------------------------------------------------

def test_table_claims_early_exit_and_releases():
    t = ProcessTable()
    t.add_container("c", "/b")
    assert t.reaped(100, 3 << 8) is None      # reaped before the launcher reported it
    p = t.register(100, "c", "e1")
    assert p.status == 3 << 8 and exit_code(p.status) == 3
    assert t.live(100) is None
    t.register(101, "c")
    assert t.live(101) is not None
    assert t.reaped(101, 9) is not None and exit_code(9) == 137
    assert {d["pid"]: d["exit_code"] for d in t.dump()["processes"]} == {100: 3, 101: 137}
    assert t.release(100) and not t.release(100)
    assert "e1" not in t.containers["c"].execs
    with pytest.raises(KeyError):
        t.add_container("c", "/b")
    t.remove_container("c")
    assert t.dump() == {"containers": [], "processes": []}


def test_unclaimed_is_bounded():
    t = ProcessTable()
    for pid in range(5000):
        t.reaped(pid + 2, 0)
    assert len(t.unclaimed) == 4096 and 2 not in t.unclaimed


# ---- record ------------------------------------------------------------------------------

@record(frozen=True)
class Pt:
    x: int
    y: int = 2
    tags: list = field(default_factory=list, compare=False)


def test_record_semantics():
    a = Pt(1)
    assert a == Pt(1, 2, ["other"]) and a != Pt(1, 3)
    assert repr(a) == "Pt(x=1, y=2, tags=[])"
    assert Pt(1).tags is not Pt(1).tags
    with pytest.raises(FrozenInstanceError):
        a.x = 5
    assert replace(a, y=7) == Pt(1, 7)
    assert asdict(Pt(1, tags=[Pt(3)])) == {"x": 1, "y": 2, "tags": [{"x": 3, "y": 2,
                                                                      "tags": []}]}
    with pytest.raises(TypeError, match="missing field 'x'"):
        Pt()
    with pytest.raises(TypeError, match="unknown fields"):
        Pt(1, z=3)
    assert hash(a) == hash(Pt(1))
    assert AgentConfig() == replace(AgentConfig(), ignored=("agent.x",))


# ---- trio client ---------------------------------------------------------------------------

def test_client_concurrent_calls_events_and_eof():
    init_end, daemon_end = wire.socketpair()

    async def fake_init():
        """Answers the second request first, pushes an event, then hangs up."""
        init_end.setblocking(False)
        got = []
        while len(got) < 2:
            await trio.lowlevel.wait_readable(init_end)
            got.append(wire.recv_packet(init_end))
        wire.send_packet(init_end, {"t": "ev", "ev": "exit", "pid": 5, "exit_code": 1})
        r, w = os.pipe()
        wire.send_packet(init_end, {"t": "rep", "id": got[1].msg["id"], "ok": True,
                                    "result": {"n": 2}}, [r])
        os.close(r)
        wire.send_packet(init_end, {"t": "rep", "id": got[0].msg["id"], "ok": False,
                                    "error": {"field": "bundle", "msg": "outside"}})
        await trio.sleep(0.05)
        init_end.close()
        return w

    async def main():
        results = {}
        async with open_client(daemon_end) as client:
            async with trio.open_nursery() as n:
                async def first():
                    with pytest.raises(InitError) as ei:
                        await client.call("launch", {"a": 1})
                    results["first"] = (ei.value.field, ei.value.msg)

                async def second():
                    await trio.sleep(0.01)
                    rep = await client.call("table")
                    results["second"] = rep.result
                    for fd in rep.fds:
                        os.close(fd)
                    results["fds"] = len(rep.fds)
                n.start_soon(first)
                n.start_soon(second)
                w = await fake_init()
            ev = await client.events.receive()
            results["event"] = ev
            with pytest.raises(InitGone):
                await client.call("table")
        os.close(w)
        return results

    res = trio.run(main)
    assert res["first"] == ("bundle", "outside")
    assert res["second"] == {"n": 2} and res["fds"] == 1
    assert res["event"]["pid"] == 5


# ---- fuzz of init's request handling --------------------------------------------------------

FIELD_NAMES = sorted({f for cls in ops.OPS.values() for f in cls.__record_fields__} |
                     {"stdio", "x", ""})
values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False) |
    st.text(string.printable, max_size=40) | st.sampled_from(["/", "/etc", "..", "c1"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
requests = st.fixed_dictionaries({
    "t": st.just("req"), "id": st.integers(1, 2**40),
    "op": st.sampled_from(sorted(ops.OPS)) | st.text(max_size=10) | st.integers(),
    "args": st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=5) | values,
})


@pytest.fixture(scope="module")
def bare_init(tmp_path_factory):
    from agent.init import Init
    run = tmp_path_factory.mktemp("fuzz") / "run"
    init = Init(AgentConfig(run_dir=str(run), oci_runtime="/bin/false"), ["/bin/false"],
                vm=False, log=None)
    mine, theirs = wire.socketpair()
    mine.setblocking(False)
    theirs.setblocking(False)
    init.daemon.sock = mine
    yield init, theirs
    mine.close()
    theirs.close()


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow])
@given(req=requests)
def test_init_answers_every_request_and_never_raises(bare_init, req):
    init, peer = bare_init
    init.stopping = None
    init._on_packet(wire.Packet(json.loads(json.dumps(req)), []))
    for pid in list(init.jobs):  # a job would need a real child: none may start here
        raise AssertionError(f"fuzzed request started a job: {req}")
    pkt = wire.recv_packet(peer)
    assert pkt.msg["t"] == "rep" and pkt.msg["id"] == req["id"]
    if not pkt.msg["ok"]:
        assert isinstance(pkt.msg["error"]["field"], str) and pkt.msg["error"]["msg"]
        assert not init.stopping
    else:  # only these can succeed without a child, a mount or a live process
        assert req["op"] in ("table", "init_stats", "shutdown"), (req, pkt.msg)
        assert bool(init.stopping) == (req["op"] == "shutdown")
    with pytest.raises(BlockingIOError):
        wire.recv_packet(peer)


def _all_op_names():
    from agent.privsep import imageops
    return sorted(set(ops.OPS) | set(imageops.OPS))


@settings(max_examples=400, deadline=None)
@given(op=st.sampled_from(_all_op_names()) | st.text(max_size=8),
       args=st.dictionaries(st.sampled_from(FIELD_NAMES + ["image", "resources", "sec", "usec",
                                                           "hostname", "lines", "creds",
                                                           "platform", "insecure"]),
                            values, max_size=5) | values,
       nfds=st.integers(0, 3))
def test_parse_only_ever_raises_validation_errors(tmp_path_factory, op, args, nfds):
    run = str(tmp_path_factory.getbasetemp())
    try:
        ops.parse(op, args, nfds, run)
    except ops.ValidationError as e:
        assert isinstance(e.field, str) and e.msg
