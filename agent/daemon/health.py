"""grpc.Health: liveness and version, answered without touching anything privileged."""

from __future__ import annotations

from agent.protos import health_pb2
from agent.ttrpc import CallContext
from agent.version import AGENT_VERSION, API_VERSION


class HealthService:
    SERVICE = "grpc.Health"

    # Plain functions: answered inline by the connection's reader (see ttrpc.Method.inline);
    # a runtime polls Check often and it needs nothing but memory.
    INLINE = ("Check", "Version")

    def Check(self, ctx: CallContext, req: health_pb2.CheckRequest) -> health_pb2.HealthCheckResponse:
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    def Version(self, ctx: CallContext, req: health_pb2.CheckRequest) -> health_pb2.VersionCheckResponse:
        return health_pb2.VersionCheckResponse(grpc_version=API_VERSION, agent_version=AGENT_VERSION)
