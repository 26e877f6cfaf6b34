"""A small test service over the ttRPC envelope's own KeyValue message, so the transport
and dispatcher are tested without depending on the agent API."""

from __future__ import annotations

import json

import trio

from agent.ttrpc import CallContext, Code, Server, TTRPCError
from agent.ttrpc.ttrpc_pb2 import KeyValue

SERVICE = "test.Echo"


class EchoState:
    def __init__(self) -> None:
        self.cancelled = 0
        self.active = 0


def make_server(state: EchoState | None = None) -> Server:
    state = state or EchoState()
    server = Server()

    async def echo(ctx: CallContext, req: KeyValue) -> KeyValue:
        return KeyValue(key=req.key, value=req.value)

    async def sleep(ctx: CallContext, req: KeyValue) -> KeyValue:
        state.active += 1
        try:
            await trio.sleep(float(req.value or "3600"))
        except trio.Cancelled:
            state.cancelled += 1
            raise
        finally:
            state.active -= 1
        return KeyValue(key="slept", value=req.value)

    async def metadata(ctx: CallContext, req: KeyValue) -> KeyValue:
        return KeyValue(key="metadata", value=json.dumps(ctx.metadata, sort_keys=True))

    async def deadline(ctx: CallContext, req: KeyValue) -> KeyValue:
        remaining = ctx.deadline - trio.current_time()
        return KeyValue(key="remaining", value=repr(remaining))

    async def fail(ctx: CallContext, req: KeyValue) -> KeyValue:
        if req.key == "status":
            raise TTRPCError(Code[req.value], f"asked to fail with {req.value}")
        if req.key == "oserror":
            raise FileNotFoundError(2, "no such thing", req.value)
        raise RuntimeError("handler bug: " + req.value)

    async def big(ctx: CallContext, req: KeyValue) -> KeyValue:
        return KeyValue(key="big", value="x" * int(req.value))

    def quick(ctx: CallContext, req: KeyValue) -> KeyValue:
        if req.key == "boom":
            raise RuntimeError("inline handler bug")
        return KeyValue(key=req.key, value=str(ctx.stream_id))

    server.register(SERVICE, "Quick", KeyValue, quick, inline=True)
    for name, fn in {"Echo": echo, "Sleep": sleep, "Metadata": metadata, "Deadline": deadline,
                     "Fail": fail, "Big": big}.items():
        server.register(SERVICE, name, KeyValue, fn)
    return server
