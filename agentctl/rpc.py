"""Synchronous calls into the agent for command-line use: one connection per command."""

from __future__ import annotations

from typing import Any

import trio
from google.protobuf import json_format
from google.protobuf.message import Message

from agent.protos import registry
from agent.ttrpc import Code, TTRPCError, open_client


class UsageError(Exception):
    """The user asked for something that cannot be sent (unknown RPC, bad JSON)."""


def resolve(full: str) -> registry.MethodInfo:
    """'grpc.Health/Check' (or '/grpc.Health/Check') -> the RPC's MethodInfo."""
    service, sep, method = full.strip("/").rpartition("/")
    if not sep or not service or not method:
        raise UsageError(f"{full!r}: expected SERVICE/METHOD, e.g. grpc.Health/Check")
    info = registry.lookup(service, method)
    if info is None:
        known = ", ".join(sorted(registry.SERVICES))
        raise UsageError(f"{full!r}: no such RPC in the agent API (services: {known})")
    return info


def request_from_json(info: registry.MethodInfo, text: str) -> Message:
    msg = info.request_cls()
    try:
        json_format.Parse(text or "{}", msg)
    except json_format.ParseError as exc:
        raise UsageError(f"{info.path}: request JSON does not fit {info.request_cls.DESCRIPTOR.full_name}: {exc}")
    return msg


def to_json(msg: Message) -> str:
    return json_format.MessageToJson(msg, preserving_proto_field_name=True, indent=2, sort_keys=True)


def call(addr: str, info: registry.MethodInfo, request: Message, *, timeout: float | None,
         metadata: dict[str, str] | None = None) -> Message:
    async def run() -> Message:
        async with open_client(addr, connect_timeout=timeout or 10.0) as c:
            return await c.call(info.service, info.name, request, info.response_cls,
                                timeout=timeout, metadata=metadata)

    try:
        return trio.run(run)
    except trio.TooSlowError:
        raise TTRPCError(Code.UNAVAILABLE, f"cannot connect to {addr} within {timeout or 10.0}s") from None
    except (ConnectionError, FileNotFoundError, OSError) as exc:
        raise TTRPCError(Code.UNAVAILABLE, f"cannot connect to {addr}: {exc}") from None


def call_named(addr: str, full: str, fields: dict[str, Any] | None = None, *, timeout: float | None = None) -> Message:
    info = resolve(full)
    msg = info.request_cls()
    if fields:
        json_format.ParseDict(fields, msg)
    return call(addr, info, msg, timeout=timeout)
