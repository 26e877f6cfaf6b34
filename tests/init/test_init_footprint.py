"""init must stay small: none of the daemon's heavy modules may reach it."""
import json
import subprocess
import sys

HEAVY = ("trio", "google.protobuf", "pyroute2", "agent.ttrpc", "agent.protos", "asyncio",
         "dataclasses", "inspect", "typing", "argparse", "subprocess", "threading")


def test_init_imports_none_of_the_heavy_modules(tmp_path):
    code = f"""
import json, sys
import agent.init
from agent.cmdline import AgentConfig
from agent.privsep import wire
init = agent.init.Init(AgentConfig(run_dir={str(tmp_path / 'run')!r}), ["/bin/false"],
                       vm=False)
a, b = wire.socketpair()
a.setblocking(False)
init.daemon.sock = a
for op, args in (("table", {{}}), ("init_stats", {{}}), ("signal", {{"pid": 5, "signal": 9}})):
    init._on_packet(wire.Packet({{"t": "req", "id": 1, "op": op, "args": args}}, []))
print(json.dumps(sorted(sys.modules)))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = set(json.loads(out))
    bad = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert bad == [], bad
