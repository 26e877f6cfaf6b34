"""Calls into the agent for tests: thin async helpers over the ttRPC client."""

from __future__ import annotations

from google.protobuf import empty_pb2

from agent import specconv
from agent.protos import agent_pb2, oci_pb2

SVC = "grpc.AgentService"
Empty = empty_pb2.Empty


async def create(c, cid: str, cfg: dict, **kw):
    req = agent_pb2.CreateContainerRequest(container_id=cid, OCI=specconv.spec_from_oci(cfg), **kw)
    return await c.call(SVC, "CreateContainer", req, Empty, timeout=60)


async def start(c, cid: str):
    return await c.call(SVC, "StartContainer", agent_pb2.StartContainerRequest(container_id=cid), Empty, timeout=60)


async def wait(c, cid: str, exec_id: str = "", timeout: float | None = 60) -> int:
    r = await c.call(SVC, "WaitProcess", agent_pb2.WaitProcessRequest(container_id=cid, exec_id=exec_id),
                     agent_pb2.WaitProcessResponse, timeout=timeout)
    return r.status


async def read_all(c, cid: str, exec_id: str = "", method: str = "ReadStdout") -> bytes:
    out = b""
    while True:
        r = await c.call(SVC, method, agent_pb2.ReadStreamRequest(container_id=cid, exec_id=exec_id, len=65536),
                         agent_pb2.ReadStreamResponse, timeout=60)
        if not r.data:
            return out
        out += r.data


async def exec_(c, cid: str, exec_id: str, args: list[str], *, terminal: bool = False):
    proc = oci_pb2.Process(Args=args, Env=["PATH=/bin"], Cwd="/", Terminal=terminal)
    return await c.call(SVC, "ExecProcess", agent_pb2.ExecProcessRequest(container_id=cid, exec_id=exec_id, process=proc),
                        Empty, timeout=60)


async def write_stdin(c, cid: str, exec_id: str, data: bytes) -> int:
    r = await c.call(SVC, "WriteStdin", agent_pb2.WriteStreamRequest(container_id=cid, exec_id=exec_id, data=data),
                     agent_pb2.WriteStreamResponse, timeout=30)
    return r.len


async def close_stdin(c, cid: str, exec_id: str = ""):
    return await c.call(SVC, "CloseStdin", agent_pb2.CloseStdinRequest(container_id=cid, exec_id=exec_id), Empty)


async def signal(c, cid: str, sig: int, exec_id: str = ""):
    return await c.call(SVC, "SignalProcess", agent_pb2.SignalProcessRequest(container_id=cid, exec_id=exec_id, signal=sig),
                        Empty, timeout=30)


async def remove(c, cid: str, timeout: int = 10):
    return await c.call(SVC, "RemoveContainer", agent_pb2.RemoveContainerRequest(container_id=cid, timeout=timeout),
                        Empty, timeout=60)


async def stats(c, cid: str) -> agent_pb2.StatsContainerResponse:
    return await c.call(SVC, "StatsContainer", agent_pb2.StatsContainerRequest(container_id=cid),
                        agent_pb2.StatsContainerResponse, timeout=30)
