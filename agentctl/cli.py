"""agentctl: the host-side client of the sandbox agent.

    agentctl --server-addr ADDR check
    agentctl --server-addr ADDR version
    agentctl --server-addr ADDR call SERVICE/METHOD '{json request}'
    agentctl list-rpcs
    agentctl --server-addr ADDR create-sandbox [--hostname H] [--dns LINE ...]
    agentctl --server-addr ADDR run [-t] [-i] [-d] [--id ID] IMAGE|BUNDLE|ROOTFS [-- CMD ...]
    agentctl --server-addr ADDR exec [-t] [-i] CONTAINER -- CMD ...
    agentctl --server-addr ADDR logs|wait|stats|rm CONTAINER
    agentctl --server-addr ADDR kill CONTAINER [SIGNAL]
    agentctl --server-addr ADDR metrics | destroy-sandbox

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

    cs = sub.add_parser("create-sandbox", help="grpc.AgentService/CreateSandbox")
    cs.add_argument("--hostname", default="")
    cs.add_argument("--dns", action="append", default=[], help="a resolv.conf line (repeatable)")
    cs.add_argument("--id", default="", dest="sandbox_id")
    sub.add_parser("destroy-sandbox", help="stop every container and shut the sandbox down")

    r = sub.add_parser("run", help="create and start a container, stream its output, exit with its code")
    r.add_argument("target", metavar="IMAGE|BUNDLE|ROOTFS",
                   help="an image reference (pulled inside the sandbox), an OCI bundle dir, or a rootfs dir")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD ARGS...")
    r.add_argument("-t", "--tty", action="store_true")
    r.add_argument("-i", "--interactive", action="store_true", help="forward stdin")
    r.add_argument("-d", "--detach", action="store_true", help="print the id and leave it running")
    r.add_argument("--id", default="", dest="container_id")
    r.add_argument("-e", "--env", action="append", default=[])
    r.add_argument("-w", "--workdir", default="")
    r.add_argument("--keep", action="store_true", help="do not remove the container after it exits")
    r.add_argument("--lazy", action="store_true", help="lazy pull (start from image metadata)")
    r.add_argument("--insecure-registry", action="append", default=[], dest="insecure")
    r.add_argument("--creds", default="", help="USER:PASSWORD for the registry")

    e = sub.add_parser("exec", help="run a process in a running container")
    e.add_argument("container_id")
    e.add_argument("cmd", nargs=argparse.REMAINDER)
    e.add_argument("-t", "--tty", action="store_true")
    e.add_argument("-i", "--interactive", action="store_true")
    e.add_argument("-e", "--env", action="append", default=[])
    e.add_argument("-w", "--workdir", default="")
    e.add_argument("--exec-id", default="")

    for name, helptext in (("logs", "stream a process's stdout/stderr until EOF"),
                           ("wait", "wait for a process; print and exit with its code"),
                           ("stats", "cgroup statistics as JSON"), ("rm", "remove a container")):
        q = sub.add_parser(name, help=helptext)
        q.add_argument("container_id")
        if name in ("logs", "wait"):
            q.add_argument("--exec-id", default="")
    k = sub.add_parser("kill", help="signal a container's process (SIGKILL of the container: all of them)")
    k.add_argument("container_id")
    k.add_argument("signal", nargs="?", default="SIGTERM")
    k.add_argument("--exec-id", default="")
    sub.add_parser("metrics", help="Prometheus text from GetMetrics")
    from . import vm
    vm.add_parser(sub)  # agentctl vm up|down|status (agentctl/vm.py)
    return p


def _cmd(args) -> list[str]:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    return cmd


def _containers(args, addr: str) -> int:
    import trio

    from agent.protos import agent_pb2

    from . import containers as C

    if args.command == "run":
        o = C.RunOptions(target=args.target, args=_cmd(args), container_id=args.container_id, tty=args.tty,
                         interactive=args.interactive, env=args.env, cwd=args.workdir, keep=args.keep,
                         detach=args.detach, lazy=args.lazy, insecure_registries=args.insecure, creds=args.creds,
                         timeout=args.timeout)
        return trio.run(C.run, addr, o)
    if args.command == "exec":
        cmd = _cmd(args)
        if not cmd:
            raise rpc.UsageError("exec: a command is needed after --")
        return trio.run(lambda: C.exec_(addr, args.container_id, cmd, tty=args.tty, interactive=args.interactive,
                                        env=args.env, cwd=args.workdir, exec_id=args.exec_id))
    if args.command == "logs":
        return trio.run(C.logs, addr, args.container_id, args.exec_id)
    if args.command == "wait":
        return trio.run(C.wait, addr, args.container_id, args.exec_id)
    if args.command == "kill":
        try:
            sig = C.parse_signal(args.signal)
        except ValueError as exc:
            raise rpc.UsageError(str(exc))
        trio.run(C.simple, addr, "SignalProcess", agent_pb2.SignalProcessRequest(
            container_id=args.container_id, exec_id=args.exec_id, signal=sig))
        return 0
    if args.command == "rm":
        trio.run(C.simple, addr, "RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=args.container_id))
        return 0
    if args.command == "stats":
        resp = trio.run(C.simple, addr, "StatsContainer", agent_pb2.StatsContainerRequest(container_id=args.container_id),
                        agent_pb2.StatsContainerResponse)
        print(rpc.to_json(resp))
        return 0
    if args.command == "metrics":
        resp = trio.run(C.simple, addr, "GetMetrics", agent_pb2.GetMetricsRequest(), agent_pb2.Metrics)
        sys.stdout.write(resp.metrics)
        return 0
    if args.command == "create-sandbox":
        trio.run(C.simple, addr, "CreateSandbox", agent_pb2.CreateSandboxRequest(
            hostname=args.hostname, dns=args.dns, sandbox_id=args.sandbox_id))
        return 0
    if args.command == "destroy-sandbox":
        trio.run(C.simple, addr, "DestroySandbox", agent_pb2.DestroySandboxRequest())
        return 0
    raise rpc.UsageError(f"unknown command {args.command}")


def _need_addr(p: argparse.ArgumentParser, args) -> str:
    if not args.server_addr:
        p.error("--server-addr (or AGENT_SERVER_ADDR) is required")
    try:
        parse_address(args.server_addr)
    except AddressError as exc:
        p.error(str(exc))
    return args.server_addr


def _leaves(group: BaseExceptionGroup):
    for e in group.exceptions:
        if isinstance(e, BaseExceptionGroup):
            yield from _leaves(e)
        else:
            yield e


def _report(exc: BaseException) -> int:
    from agent.ttrpc import Code

    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, rpc.UsageError):
        print(f"agentctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if isinstance(exc, TTRPCError):
        print(f"agentctl: {Code.name_of(int(exc.code))}: {exc.message}", file=sys.stderr)
        return EXIT_RPC_ERROR
    if isinstance(exc, (ValueError, OSError)):
        print(f"agentctl: {exc}", file=sys.stderr)
        return EXIT_RPC_ERROR
    raise exc


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
        if args.command == "vm":
            from . import vm
            return vm.main(args)
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
        return _containers(args, addr)
    except BaseExceptionGroup as group:  # from trio nurseries: report the first real cause
        leaves = [e for e in _leaves(group) if not isinstance(e, (KeyboardInterrupt,))] or list(_leaves(group))
        return _report(leaves[0])
    except (Exception, KeyboardInterrupt) as exc:  # noqa: BLE001 - turned into a message + exit code
        return _report(exc)
    p.error(f"unknown command {args.command}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
