"""The method table: all 42 Kata RPCs + Health's 2 + our PullImage, with Kata's message types."""

import dataclasses
import subprocess
import sys

import pytest
from google.protobuf import empty_pb2

from agent.protos import agent_pb2, csi_pb2, health_pb2, registry, types_pb2

E = "google.protobuf.Empty"

# Kata's AgentService as (method, request, response) full names, written down from its API
# (not derived from our descriptors), so a renamed or retyped RPC fails here.
KATA_AGENT_SERVICE = [
    ("CreateContainer", "grpc.CreateContainerRequest", E),
    ("StartContainer", "grpc.StartContainerRequest", E),
    ("RemoveContainer", "grpc.RemoveContainerRequest", E),
    ("ExecProcess", "grpc.ExecProcessRequest", E),
    ("SignalProcess", "grpc.SignalProcessRequest", E),
    ("WaitProcess", "grpc.WaitProcessRequest", "grpc.WaitProcessResponse"),
    ("UpdateContainer", "grpc.UpdateContainerRequest", E),
    ("UpdateEphemeralMounts", "grpc.UpdateEphemeralMountsRequest", E),
    ("StatsContainer", "grpc.StatsContainerRequest", "grpc.StatsContainerResponse"),
    ("PauseContainer", "grpc.PauseContainerRequest", E),
    ("ResumeContainer", "grpc.ResumeContainerRequest", E),
    ("RemoveStaleVirtiofsShareMounts", "grpc.RemoveStaleVirtiofsShareMountsRequest", E),
    ("GetDiagnosticData", "grpc.GetDiagnosticDataRequest", "grpc.GetDiagnosticDataResponse"),
    ("WriteStdin", "grpc.WriteStreamRequest", "grpc.WriteStreamResponse"),
    ("ReadStdout", "grpc.ReadStreamRequest", "grpc.ReadStreamResponse"),
    ("ReadStderr", "grpc.ReadStreamRequest", "grpc.ReadStreamResponse"),
    ("CloseStdin", "grpc.CloseStdinRequest", E),
    ("TtyWinResize", "grpc.TtyWinResizeRequest", E),
    ("UpdateInterface", "grpc.UpdateInterfaceRequest", "types.Interface"),
    ("UpdateRoutes", "grpc.UpdateRoutesRequest", "grpc.Routes"),
    ("ListInterfaces", "grpc.ListInterfacesRequest", "grpc.Interfaces"),
    ("ListRoutes", "grpc.ListRoutesRequest", "grpc.Routes"),
    ("AddARPNeighbors", "grpc.AddARPNeighborsRequest", E),
    ("GetIPTables", "grpc.GetIPTablesRequest", "grpc.GetIPTablesResponse"),
    ("SetIPTables", "grpc.SetIPTablesRequest", "grpc.SetIPTablesResponse"),
    ("GetMetrics", "grpc.GetMetricsRequest", "grpc.Metrics"),
    ("MemAgentMemcgSet", "grpc.MemAgentMemcgConfig", E),
    ("MemAgentCompactSet", "grpc.MemAgentCompactConfig", E),
    ("CreateSandbox", "grpc.CreateSandboxRequest", E),
    ("DestroySandbox", "grpc.DestroySandboxRequest", E),
    ("OnlineCPUMem", "grpc.OnlineCPUMemRequest", E),
    ("ReseedRandomDev", "grpc.ReseedRandomDevRequest", E),
    ("GetGuestDetails", "grpc.GuestDetailsRequest", "grpc.GuestDetailsResponse"),
    ("MemHotplugByProbe", "grpc.MemHotplugByProbeRequest", E),
    ("SetGuestDateTime", "grpc.SetGuestDateTimeRequest", E),
    ("CopyFile", "grpc.CopyFileRequest", E),
    ("GetOOMEvent", "grpc.GetOOMEventRequest", "grpc.OOMEvent"),
    ("AddSwap", "grpc.AddSwapRequest", E),
    ("AddSwapPath", "grpc.AddSwapPathRequest", E),
    ("GetVolumeStats", "grpc.VolumeStatsRequest", "grpc.VolumeStatsResponse"),
    ("ResizeVolume", "grpc.ResizeVolumeRequest", E),
    ("SetPolicy", "grpc.SetPolicyRequest", E),
]
EXTENSIONS = [("PullImage", "grpc.PullImageRequest", "grpc.PullImageResponse")]
HEALTH = [
    ("Check", "grpc.CheckRequest", "grpc.HealthCheckResponse"),
    ("Version", "grpc.CheckRequest", "grpc.VersionCheckResponse"),
]


def expected() -> dict[tuple[str, str], tuple[str, str]]:
    table = {("grpc.AgentService", m): (req, resp) for m, req, resp in KATA_AGENT_SERVICE + EXTENSIONS}
    table |= {("grpc.Health", m): (req, resp) for m, req, resp in HEALTH}
    return table


def test_kata_list_is_complete() -> None:
    assert len(KATA_AGENT_SERVICE) == 42
    assert len({m for m, _, _ in KATA_AGENT_SERVICE}) == 42


def test_methods_table_has_exactly_the_45_rpcs_with_their_types() -> None:
    got = {
        key: (info.request_cls.DESCRIPTOR.full_name, info.response_cls.DESCRIPTOR.full_name)
        for key, info in registry.METHODS.items()
    }
    assert len(got) == 45
    assert got == expected()


def test_services() -> None:
    assert registry.SERVICES == ("grpc.AgentService", "grpc.Health")
    assert [i.name for i in registry.methods_of("grpc.Health")] == ["Check", "Version"]
    assert len(registry.methods_of("grpc.AgentService")) == 43
    assert registry.methods_of("grpc.Nope") == []


def test_descriptors_agree_with_table() -> None:
    # The registry must reflect the generated service descriptors, not a table of its own.
    for file, svc in ((agent_pb2.DESCRIPTOR, "AgentService"), (health_pb2.DESCRIPTOR, "Health")):
        service = file.services_by_name[svc]
        for method in service.methods:
            info = registry.lookup(service.full_name, method.name)
            assert info is not None, method.full_name
            assert info.request_cls.DESCRIPTOR is method.input_type
            assert info.response_cls.DESCRIPTOR is method.output_type


def test_lookup_returns_the_generated_classes() -> None:
    info = registry.lookup("grpc.AgentService", "CreateContainer")
    assert info is not None
    assert info.request_cls is agent_pb2.CreateContainerRequest
    assert info.response_cls is empty_pb2.Empty
    assert info.path == "/grpc.AgentService/CreateContainer"
    # Instances made from the registry's class are the generated type.
    assert isinstance(info.request_cls(container_id="c"), agent_pb2.CreateContainerRequest)

    assert registry.lookup("grpc.AgentService", "UpdateInterface").response_cls is types_pb2.Interface
    assert registry.lookup("grpc.AgentService", "GetVolumeStats").response_cls is csi_pb2.VolumeStatsResponse
    assert registry.lookup("grpc.Health", "Check").response_cls is health_pb2.HealthCheckResponse


@pytest.mark.parametrize(
    "service,method",
    [
        ("grpc.AgentService", "NoSuchMethod"),
        ("grpc.Nope", "CreateContainer"),
        ("AgentService", "CreateContainer"),  # short service name is not the ttRPC name
        ("grpc.AgentService", "createContainer"),  # names are case-sensitive
        ("grpc.Health", "CreateContainer"),  # method of the other service
        ("", ""),
    ],
)
def test_lookup_unknown(service: str, method: str) -> None:
    assert registry.lookup(service, method) is None


def test_method_info_is_frozen() -> None:
    info = registry.lookup("grpc.Health", "Check")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.name = "Other"  # type: ignore[misc]


def test_table_is_read_only() -> None:
    with pytest.raises(TypeError):
        registry.METHODS[("grpc.Health", "X")] = registry.lookup("grpc.Health", "Check")  # type: ignore[index]


def test_unknown_attribute() -> None:
    with pytest.raises(AttributeError, match="NOPE"):
        registry.NOPE  # noqa: B018


def test_registry_import_is_lazy() -> None:
    # The daemon imports the registry at start; protobuf should load only on first use.
    code = (
        "import sys\n"
        "from agent.protos import registry\n"
        "assert 'google.protobuf' not in sys.modules, 'protobuf imported eagerly'\n"
        "assert 'agent.protos.agent_pb2' not in sys.modules\n"
        "assert registry.lookup('grpc.Health', 'Check') is not None\n"
        "assert 'agent.protos.agent_pb2' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
