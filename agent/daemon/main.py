"""The comms daemon's serving loop: the agent API on one transport address."""

from __future__ import annotations

import logging

import trio

from agent.ttrpc import Server, serve_address

from .health import HealthService
from .services import bind

log = logging.getLogger("agent.daemon")


def build_server() -> Server:
    server = Server()
    bind(server, {HealthService.SERVICE: HealthService()})
    return server


async def serve(server_addr: str, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    server = build_server()
    log.info("serving the agent API on %s", server_addr)
    await serve_address(server, server_addr, task_status=task_status)
