"""agentctl: the host-side client of the sandbox agent.

    agentctl --server-addr ADDR check
    agentctl --server-addr ADDR version
    agentctl --server-addr ADDR call SERVICE/METHOD '{json request}'
    agentctl list-rpcs

ADDR is an agent address (unix:///path, unix://@name, vsock://CID:PORT, hvsock:///path:PORT);
it defaults to $AGENT_SERVER_ADDR. Failures print the status code name and message and exit
non-zero (2 for usage errors).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from agent.ttrpc import AddressError, TTRPCError, parse_address

from . import rpc

EXIT_RPC_ERROR = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentctl", description="Host-side client of the sandbox agent (ttRPC).")
    p.add_argument("--server-addr", default=os.environ.get("AGENT_SERVER_ADDR"),
                   help="agent address (default: $AGENT_SERVER_ADDR)")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per call (sent as the ttRPC deadline)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="grpc.Health/Check")
    sub.add_parser("version", help="grpc.Health/Version")
    c = sub.add_parser("call", help="call any RPC with a JSON request; prints the JSON response")
    c.add_argument("rpc", metavar="SERVICE/METHOD")
    c.add_argument("request", nargs="?", default="{}", help="JSON request ('-' reads stdin)")
    c.add_argument("--metadata", "-m", action="append", default=[], metavar="KEY=VALUE")
    sub.add_parser("list-rpcs", help="list the RPCs of the agent API")
    return p


def _need_addr(p: argparse.ArgumentParser, args) -> str:
    if not args.server_addr:
        p.error("--server-addr (or AGENT_SERVER_ADDR) is required")
    try:
        parse_address(args.server_addr)
    except AddressError as exc:
        p.error(str(exc))
    return args.server_addr


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    try:
        if args.command == "list-rpcs":
            from agent.protos import registry

            for (service, method), info in sorted(registry.METHODS.items()):
                print(f"{service}/{method}\t{info.request_cls.DESCRIPTOR.full_name} -> "
                      f"{info.response_cls.DESCRIPTOR.full_name}")
            return 0
        addr = _need_addr(p, args)
        if args.command == "check":
            resp = rpc.call_named(addr, "grpc.Health/Check", timeout=args.timeout)
            from agent.protos import health_pb2

            name = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
            print(name)
            return 0 if name == "SERVING" else EXIT_RPC_ERROR
        if args.command == "version":
            resp = rpc.call_named(addr, "grpc.Health/Version", timeout=args.timeout)
            print(json.dumps({"agent_version": resp.agent_version, "api_version": resp.grpc_version}))
            return 0
        if args.command == "call":
            info = rpc.resolve(args.rpc)
            text = sys.stdin.read() if args.request == "-" else args.request
            req = rpc.request_from_json(info, text)
            md = {}
            for item in args.metadata:
                k, sep, v = item.partition("=")
                if not sep:
                    raise rpc.UsageError(f"--metadata {item!r}: expected KEY=VALUE")
                md[k] = v
            resp = rpc.call(addr, info, req, timeout=args.timeout, metadata=md or None)
            print(rpc.to_json(resp))
            return 0
    except rpc.UsageError as exc:
        print(f"agentctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except TTRPCError as exc:
        from agent.ttrpc import Code

        print(f"agentctl: {Code.name_of(int(exc.code))}: {exc.message}", file=sys.stderr)
        return EXIT_RPC_ERROR
    p.error(f"unknown command {args.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
