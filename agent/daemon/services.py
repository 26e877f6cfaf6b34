"""Binding service implementations to the ttRPC server through the agent API's method table.

An implementation is a plain object whose coroutine methods are named like the RPCs
(``async def Check(self, ctx, req)``). Every RPC the API declares is registered: those
without an implementation answer UNIMPLEMENTED naming the RPC, so a Kata runtime probing
an optional call gets a clean error, never a hang.
"""

from __future__ import annotations

from typing import Mapping

from agent.protos import registry
from agent.ttrpc import CallContext, Code, Method, Server, TTRPCError


def _unimplemented(info: registry.MethodInfo):
    async def handler(ctx: CallContext, req) -> None:
        raise TTRPCError(Code.UNIMPLEMENTED, f"{info.service}/{info.name} is not implemented by this agent")

    return handler


def bind(server: Server, implementations: Mapping[str, object]) -> list[str]:
    """Register every declared RPC; return the full names of the implemented ones."""
    implemented = []
    by_service: dict[str, dict[str, Method]] = {}
    for (service, name), info in registry.METHODS.items():
        impl = implementations.get(service)
        fn = getattr(impl, name, None) if impl is not None else None
        if fn is None:
            fn = _unimplemented(info)
        else:
            implemented.append(f"{service}/{name}")
        inline = name in getattr(impl, "INLINE", ())
        by_service.setdefault(service, {})[name] = Method(info.request_cls, fn, inline)
    for service, methods in by_service.items():
        server.register_service(service, methods)
    return implemented
