"""``python -m agent --server-addr ADDR``: run the agent outside a VM (development, tests).

The address may also come from AGENT_SERVER_ADDR. In a guest, PID 1 is agent/init.py and
reads the same setting from the kernel command line (agent.server_addr).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m agent", description=__doc__.splitlines()[0])
    p.add_argument("--server-addr", default=os.environ.get("AGENT_SERVER_ADDR"),
                   help="vsock://CID:PORT, unix:///path, unix://@name or serial:///dev/virtio-ports/NAME "
                        "(default: $AGENT_SERVER_ADDR)")
    p.add_argument("--log-level", default=os.environ.get("AGENT_LOG_LEVEL", "info"))
    args = p.parse_args(argv)
    if not args.server_addr:
        p.error("--server-addr (or AGENT_SERVER_ADDR) is required")

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import trio

    from agent.daemon.main import serve
    from agent.ttrpc import AddressError, parse_address

    try:
        parse_address(args.server_addr)
    except AddressError as exc:
        p.error(str(exc))
    try:
        trio.run(serve, args.server_addr)
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(f"agent: cannot serve on {args.server_addr}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
