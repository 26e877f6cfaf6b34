"""``python -m agent --server-addr ADDR``: the agent outside a VM (development, tests).

The same code as in the guest: agent/init.py runs as a child subreaper and starts the
confined comms daemon, which serves ADDR (also read from AGENT_SERVER_ADDR). In a guest,
init is PID 1 and reads its settings from the kernel command line instead.

Other options are init's (``--run-dir``, ``--runtime``, ``--log-level``, ...; see
``python -m agent.init --help``). Without ``--run-dir``, each server address gets its own
run directory under /run/sandbox-agent, so several agents can run side by side.
"""

from __future__ import annotations

import hashlib
import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__)
    addr = os.environ.get("AGENT_SERVER_ADDR", "")
    for i, a in enumerate(argv):
        if a == "--server-addr" and i + 1 < len(argv):
            addr = argv[i + 1]
        elif a.startswith("--server-addr="):
            addr = a.split("=", 1)[1]
    if not addr:
        print("python -m agent: --server-addr ADDR (or AGENT_SERVER_ADDR) is required, e.g. "
              "unix:///run/agent.sock", file=sys.stderr)
        return 2
    from agent.address import AddressError, parse_address

    try:
        parse_address(addr)
    except AddressError as exc:
        print(f"python -m agent: {exc}", file=sys.stderr)
        return 2
    if not any(a == "--run-dir" or a.startswith("--run-dir=") for a in argv):
        tag = hashlib.sha256(addr.encode()).hexdigest()[:12]
        base = "/run/sandbox-agent" if os.geteuid() == 0 else os.path.join(
            os.environ.get("XDG_RUNTIME_DIR", "/tmp"), "sandbox-agent")
        argv += ["--run-dir", os.path.join(base, tag)]
    if os.getpid() == 1:
        argv.append("--subreaper")  # `python -m agent` is never the guest's PID 1
    from agent import init

    return init.main(argv)


if __name__ == "__main__":
    sys.exit(main())
