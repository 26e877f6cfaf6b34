"""The comms daemon, as started by init: ``python -m agent.daemon``.

Init hands over, by fd number in the environment: the privsep channel
(SANDBOX_AGENT_PRIVSEP_FD), the host endpoint it opened (SANDBOX_AGENT_LISTEN_FD: a
listening socket, or a serial port), and its settings (SANDBOX_AGENT_CONFIG, JSON). The
daemon imports what it will need, confines itself (agent.daemon.confine), and only then
serves the host.
"""

from __future__ import annotations

# First, before the imports below pull in anything heavy (logging brings tokenize through
# linecache): what the daemon's libraries import but it never runs stays unrun.
from agent.daemon import deferred

deferred.install()

from agent.daemon import heap  # noqa: E402

import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import socket  # noqa: E402
import stat  # noqa: E402
import time  # noqa: E402
import sys  # noqa: E402

ENV_PRIVSEP_FD = "SANDBOX_AGENT_PRIVSEP_FD"
ENV_LISTEN_FD = "SANDBOX_AGENT_LISTEN_FD"
ENV_CONFIG = "SANDBOX_AGENT_CONFIG"


class _JsonFormatter(logging.Formatter):
    """One JSON object per line, the shape init's own log lines have."""

    def format(self, record: logging.LogRecord) -> str:

        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs * 1000):06d}Z",
               "level": record.levelname.lower(), "source": "daemon", "msg": record.getMessage(),
               "fields": {"logger": record.name}}
        if record.exc_info:
            out["fields"]["exception"] = self.formatException(record.exc_info)
        return json.dumps(out)


def _config() -> dict:
    raw = os.environ.get(ENV_CONFIG, "{}")
    try:
        cfg = json.loads(raw)
    except ValueError:
        cfg = {}
    return cfg if isinstance(cfg, dict) else {}


def main() -> int:
    cfg = _config()
    level = str(cfg.get("log_level", "info")).upper()
    level = {"TRACE": "DEBUG", "WARN": "WARNING", "FATAL": "CRITICAL"}.get(level, level)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter())
    logging.basicConfig(level=level, handlers=[handler])
    log = logging.getLogger("agent.daemon")
    try:
        privsep_fd = int(os.environ[ENV_PRIVSEP_FD])
        listen_fd = int(os.environ[ENV_LISTEN_FD])
    except (KeyError, ValueError):
        print("agent.daemon: must be started by init (SANDBOX_AGENT_PRIVSEP_FD and "
              "SANDBOX_AGENT_LISTEN_FD unset)", file=sys.stderr)
        return 2
    run_dir = cfg.get("run_dir", "/run/sandbox-agent")
    daemon_dir = os.path.join(run_dir, "daemon")

    # Everything the daemon will run is imported before confinement: afterwards the
    # filesystem outside the run dir is read-only at best and exec is forbidden.
    import trio  # noqa: F401

    from agent.daemon.agent_service import AgentService
    from agent.daemon.health import HealthService
    from agent.daemon.services import bind
    from agent.launcher import cgroups  # noqa: F401 - used lazily by stats
    from agent.privsep.client import InitClient
    from agent.ttrpc import Server
    from agent.ttrpc.serve import serve_serial_fd
    from puller import reference  # noqa: F401 - PullImage checks references (hashlib stays deferred)

    if os.geteuid() == 0:
        from agent.daemon.confine import confine

        confine(int(cfg.get("daemon_uid", 65534)), int(cfg.get("daemon_gid", 65534)), run_dir,
                seccomp=bool(cfg.get("seccomp", True)))
        log.info("confined to uid %s", os.geteuid())
    else:
        log.warning("not started as root: running unconfined as uid %d", os.geteuid())

    st = os.fstat(listen_fd)
    heap.limit_arenas()

    async def run() -> None:
        init = InitClient(socket.socket(fileno=privsep_fd))
        service = AgentService(init, daemon_dir, pipe_size=int(cfg.get("container_pipe_size", 0) or 0))
        server = Server()
        bind(server, {HealthService.SERVICE: HealthService(), AgentService.SERVICE: service})
        async with trio.open_nursery() as n:
            n.start_soon(init.reader)
            await n.start(service.run)
            # Start-up is over: what it left in the heap goes back before the first request.
            settled = heap.settle()
            log.debug("heap settled: %s; deferred modules: %s", settled, deferred.status())
            if stat.S_ISSOCK(st.st_mode):
                n.start_soon(server.serve_socket, socket.socket(fileno=listen_fd))
            else:
                n.start_soon(serve_serial_fd, server, listen_fd)
            # init closing the channel means it wants us gone (or died): stop serving
            idle_trim = heap.IdleTrim()
            while not init.closed:
                await trio.sleep(0.5)
                idle_trim.tick(server.stats.calls, trio.current_time())
            n.cancel_scope.cancel()

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
