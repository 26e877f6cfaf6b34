"""agent.daemon.deferred and agent.daemon.heap, each in a fresh interpreter (deferral changes
the import system of the process it runs in; gc.freeze and malloc_trim act on it)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, body: str) -> dict:
    """Run `body` in a new interpreter with tmp_path on sys.path; it prints one JSON line."""
    script = tmp_path / "main_script.py"
    script.write_text(textwrap.dedent(body))
    out = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": f"{tmp_path}:{REPO}", "PATH": "/usr/bin:/bin"}, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def _modules(tmp_path: Path) -> None:
    # Each module counts its runs in a file, so a run is seen even across sys.modules changes.
    for name, extra in (("dm_leaf", "VALUE = 42\ndef twice(x):\n    return 2 * x\n"),
                        ("dm_user", "import dm_leaf\nimport dm_leaf as again\n"
                                    "def use():\n    return dm_leaf.twice(again.VALUE)\n"),
                        ("dm_bad", "raise RuntimeError('dm_bad cannot run here')\n")):
        (tmp_path / f"{name}.py").write_text(
            f"with open({str(tmp_path / (name + '.runs'))!r}, 'a') as _f:\n    _f.write('x')\n" + extra)
    pkg = tmp_path / "dm_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(f"with open({str(tmp_path / 'dm_pkg.runs')!r}, 'a') as _f:\n"
                                     "    _f.write('x')\nNAME = 'pkg'\n")
    (pkg / "sub.py").write_text("SUB = 1\n")


def test_deferred_module_runs_only_on_first_real_use(tmp_path):
    _modules(tmp_path)
    r = _run(tmp_path, f"""
        import json, os, sys
        from agent.daemon import deferred
        deferred.install(["dm_leaf", "dm_pkg"])
        runs = lambda n: len(open(os.path.join({str(tmp_path)!r}, n + ".runs")).read()) if os.path.exists(os.path.join({str(tmp_path)!r}, n + ".runs")) else 0
        import dm_user                       # imports dm_leaf twice (import, import as)
        out = {{"after_import": runs("dm_leaf"), "state_before": deferred.status()["dm_leaf"],
               "spec": sys.modules["dm_leaf"].__spec__.name, "has_path": hasattr(sys.modules["dm_leaf"], "__path__")}}
        out["use"] = dm_user.use()            # first attribute read runs it
        out["after_use"] = runs("dm_leaf")
        out["use_again"] = dm_user.use()
        out["after_again"] = runs("dm_leaf")
        out["state_after"] = deferred.status()["dm_leaf"]
        import dm_pkg.sub                     # a submodule of a deferred package: the package stays unrun
        out["pkg_runs_after_sub"] = runs("dm_pkg")
        out["sub"] = dm_pkg.sub.SUB
        from dm_pkg import NAME               # from-import reads an attribute: it runs
        out["pkg_name"], out["pkg_runs"] = NAME, runs("dm_pkg")
        print(json.dumps(out))
    """)
    assert r["after_import"] == 0 and r["state_before"] == "deferred"
    assert r["spec"] == "dm_leaf" and r["has_path"] is False
    assert r["use"] == 84 and r["after_use"] == 1
    assert r["use_again"] == 84 and r["after_again"] == 1  # once, not per use
    assert r["state_after"] == "loaded"
    assert r["pkg_runs_after_sub"] == 0 and r["sub"] == 1
    assert r["pkg_name"] == "pkg" and r["pkg_runs"] == 1


def test_failing_deferred_module_raises_at_every_use(tmp_path):
    """A deferred module that cannot run raises its error at each use, not an AttributeError
    of a half-made module (other modules hold a reference to the object)."""
    _modules(tmp_path)
    r = _run(tmp_path, """
        import json, sys
        from agent.daemon import deferred
        deferred.install(["dm_bad"])
        import dm_bad
        held = dm_bad
        out = {"imported": "dm_bad" in sys.modules, "errors": []}
        for _ in range(2):
            try:
                held.anything
            except RuntimeError as e:
                out["errors"].append(str(e))
        out["state"] = deferred.status()["dm_bad"]
        print(json.dumps(out))
    """)
    assert r == {"imported": True, "errors": ["dm_bad cannot run here"] * 2, "state": "deferred"}
    assert (tmp_path / "dm_bad.runs").read_text() == "xx"  # tried (and failed) at each use


def test_extension_and_early_modules_are_not_deferred(tmp_path):
    r = _run(tmp_path, """
        import json, sys, math
        from agent.daemon import deferred
        # math: imported before install (eager); _json: an extension module (never deferred);
        # dm_missing: never imported (absent)
        deferred.install(["math", "_json", "dm_missing"])
        import _json
        print(json.dumps({"status": deferred.status(), "json_type": type(_json).__name__,
                          "scanner": callable(_json.make_scanner)}))
    """)
    assert r["status"] == {"_json": "eager", "dm_missing": "absent", "math": "eager"}
    assert r["json_type"] == "module" and r["scanner"] is True


def test_daemon_imports_leave_the_deferred_modules_unrun(tmp_path):
    """The daemon's own import set, as __main__ does it: trio, protobuf, the agent service,
    confinement's preloads. None of DAEMON_DEFERRED runs, and trio still runs a loop with a
    worker thread, sockets and a ttRPC round trip."""
    r = _run(tmp_path, """
        import json, socket, sys
        early = sorted(sys.modules)  # what site imported already (a venv's editable finder does)
        from agent.daemon import deferred
        deferred.install()
        import trio
        from agent.daemon.agent_service import AgentService  # noqa: F401
        from agent.daemon.health import HealthService
        from agent.daemon.services import bind
        from agent.daemon.confine import PRELOAD
        from agent.ttrpc import Server, open_client
        from agent.protos import health_pb2
        import importlib
        for m in PRELOAD:
            importlib.import_module(m)

        async def main():
            server = Server()
            bind(server, {HealthService.SERVICE: HealthService()})
            a, b = socket.socketpair()
            async with trio.open_nursery() as n:
                n.start_soon(server.serve_stream, trio.SocketStream(trio.socket.from_stdlib_socket(a)))
                async with open_client(trio.SocketStream(trio.socket.from_stdlib_socket(b))) as c:
                    r = await c.call("grpc.Health", "Check", health_pb2.CheckRequest(), health_pb2.HealthCheckResponse)
                t = await trio.to_thread.run_sync(lambda: 7)
                await trio.sleep(0.01)
                n.cancel_scope.cancel()
            return r.status, t

        status, t = trio.run(main)
        st = deferred.status()
        maps = open("/proc/self/maps").read()
        print(json.dumps({"status": st, "health": status, "thread": t, "early": early,
                          "libssl": "libssl" in maps or "_ssl." in maps}))
    """)
    assert r["health"] == 1 and r["thread"] == 7
    assert r["libssl"] is False
    bad = {k: v for k, v in r["status"].items()
           if v == "loaded" or (v == "eager" and k not in r["early"])}
    assert not bad, f"deferred modules that ran: {bad}"
    assert r["status"]["ssl"] == "deferred"


def test_heap_settle_collects_freezes_and_trims(tmp_path):
    r = _run(tmp_path, """
        import ctypes, gc, json
        from agent.daemon import heap
        class Cycle:
            pass
        gc.disable()  # the cycles below must still be there for settle() to find
        for _ in range(1000):
            a, b = Cycle(), Cycle()
            a.other, b.other = b, a
        del a, b
        s = heap.settle()
        print(json.dumps({"collected": s.collected, "frozen": s.frozen, "freeze_count": gc.get_freeze_count(),
                          "trimmed": s.trimmed, "arenas": heap.limit_arenas()}))
    """)
    assert r["collected"] >= 2000  # the 1000 two-object cycles (their dicts too)
    assert r["frozen"] == r["freeze_count"] > 1000
    assert isinstance(r["trimmed"], bool)
    assert r["arenas"] is True


def test_idle_trim_once_per_burst_after_quiet():
    from agent.daemon.heap import IdleTrim

    trims = []
    t = IdleTrim(quiet=2.0, trim_fn=lambda: trims.append(1))
    assert not t.tick(0, 0.0)           # no calls yet: nothing to give back
    assert not t.tick(0, 10.0)
    assert not t.tick(5, 11.0)          # a burst
    assert not t.tick(9, 12.0)          # still busy
    assert not t.tick(9, 13.5)          # quiet for 1.5 s only
    assert t.tick(9, 14.0) and trims == [1]
    assert not t.tick(9, 30.0) and trims == [1]   # once per burst
    assert not t.tick(10, 31.0)
    assert t.tick(10, 33.5) and trims == [1, 1]


def test_tokenize_deferred_only_without_sources(tmp_path):
    """The guest runs from bytecode alone: there linecache never opens a source, so tokenize
    waits too; from source (a development host) it does not."""
    import py_compile

    src = REPO / "agent" / "daemon" / "deferred.py"
    (tmp_path / "src_only").mkdir()
    (tmp_path / "src_only" / "dm_deferred.py").write_text(src.read_text())
    (tmp_path / "pyc_only").mkdir()
    py_compile.compile(str(src), cfile=str(tmp_path / "pyc_only" / "dm_deferred.pyc"), doraise=True)
    got = {}
    for d in ("src_only", "pyc_only"):
        out = subprocess.run([sys.executable, "-c", "import json, dm_deferred; print(json.dumps(dm_deferred.daemon_deferred()))"],
                             cwd=tmp_path / d, capture_output=True, text=True, env={"PYTHONPATH": str(tmp_path / d)})
        assert out.returncode == 0, out.stderr
        got[d] = json.loads(out.stdout)
    assert "tokenize" not in got["src_only"] and "ssl" in got["src_only"]
    assert got["pyc_only"] == got["src_only"] + ["tokenize"]
