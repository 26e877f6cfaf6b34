"""Field numbers, names and types of the important messages, checked against Kata's values.

The expected tables are written down by hand from Kata's agent API; each test compares a whole
message, so a renumbered, retyped, renamed, added or dropped field fails.
"""

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from agent.protos import agent_pb2, csi_pb2, health_pb2, oci_pb2, types_pb2

_SCALARS = {
    v: k.removeprefix("TYPE_").lower()
    for k, v in vars(FieldDescriptor).items()
    if k.startswith("TYPE_") and isinstance(v, int)
}


def _type(f: FieldDescriptor) -> str:
    if f.message_type is not None:
        if f.message_type.GetOptions().map_entry:
            k, v = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
            return f"map<{_type(k)},{_type(v)}>"
        return f.message_type.full_name
    if f.enum_type is not None:
        return f.enum_type.full_name
    return _SCALARS[f.type]


def layout(d: Descriptor) -> dict[str, tuple[int, str]]:
    out = {}
    for f in d.fields:
        t = _type(f)
        if f.label == FieldDescriptor.LABEL_REPEATED and not t.startswith("map<"):
            t = "repeated " + t
        if f.has_presence and f.containing_oneof is not None and not f.containing_oneof.name.startswith("_"):
            t = f"oneof {f.containing_oneof.name} " + t
        out[f.name] = (f.number, t)
    return out


def test_create_container_request() -> None:
    assert layout(agent_pb2.CreateContainerRequest.DESCRIPTOR) == {
        "container_id": (1, "string"),
        "exec_id": (2, "string"),
        "string_user": (3, "grpc.StringUser"),
        "devices": (4, "repeated grpc.Device"),
        "storages": (5, "repeated grpc.Storage"),
        "OCI": (6, "grpc.Spec"),
        "sandbox_pidns": (7, "bool"),
        "shared_mounts": (8, "repeated grpc.SharedMount"),
        "stdin_port": (9, "uint32"),
        "stdout_port": (10, "uint32"),
        "stderr_port": (11, "uint32"),
    }


def test_exec_process_request() -> None:
    assert layout(agent_pb2.ExecProcessRequest.DESCRIPTOR) == {
        "container_id": (1, "string"),
        "exec_id": (2, "string"),
        "string_user": (3, "grpc.StringUser"),
        "process": (4, "grpc.Process"),
        "stdin_port": (5, "uint32"),
        "stdout_port": (6, "uint32"),
        "stderr_port": (7, "uint32"),
    }


def test_spec() -> None:
    assert layout(oci_pb2.Spec.DESCRIPTOR) == {
        "Version": (1, "string"),
        "Process": (2, "grpc.Process"),
        "Root": (3, "grpc.Root"),
        "Hostname": (4, "string"),
        "Mounts": (5, "repeated grpc.Mount"),
        "Hooks": (6, "grpc.Hooks"),
        "Annotations": (7, "map<string,string>"),
        "Linux": (8, "grpc.Linux"),
        "Solaris": (9, "grpc.Solaris"),
        "Windows": (10, "grpc.Windows"),
    }


def test_process() -> None:
    assert layout(oci_pb2.Process.DESCRIPTOR) == {
        "Terminal": (1, "bool"),
        "ConsoleSize": (2, "grpc.Box"),
        "User": (3, "grpc.User"),
        "Args": (4, "repeated string"),
        "Env": (5, "repeated string"),
        "Cwd": (6, "string"),
        "Capabilities": (7, "grpc.LinuxCapabilities"),
        "Rlimits": (8, "repeated grpc.POSIXRlimit"),
        "NoNewPrivileges": (9, "bool"),
        "ApparmorProfile": (10, "string"),
        "OOMScoreAdj": (11, "int64"),
        "SelinuxLabel": (12, "string"),
    }


def test_linux_and_resources() -> None:
    assert layout(oci_pb2.Linux.DESCRIPTOR) == {
        "UIDMappings": (1, "repeated grpc.LinuxIDMapping"),
        "GIDMappings": (2, "repeated grpc.LinuxIDMapping"),
        "Sysctl": (3, "map<string,string>"),
        "Resources": (4, "grpc.LinuxResources"),
        "CgroupsPath": (5, "string"),
        "Namespaces": (6, "repeated grpc.LinuxNamespace"),
        "Devices": (7, "repeated grpc.LinuxDevice"),
        "Seccomp": (8, "grpc.LinuxSeccomp"),
        "RootfsPropagation": (9, "string"),
        "MaskedPaths": (10, "repeated string"),
        "ReadonlyPaths": (11, "repeated string"),
        "MountLabel": (12, "string"),
        "IntelRdt": (13, "grpc.LinuxIntelRdt"),
    }
    assert layout(oci_pb2.LinuxMemory.DESCRIPTOR) == {
        "Limit": (1, "int64"),
        "Reservation": (2, "int64"),
        "Swap": (3, "int64"),
        "Kernel": (4, "int64"),
        "KernelTCP": (5, "int64"),
        "Swappiness": (6, "uint64"),
        "DisableOOMKiller": (7, "bool"),
    }
    assert layout(oci_pb2.LinuxSyscall.DESCRIPTOR) == {
        "Names": (1, "repeated string"),
        "Action": (2, "string"),
        "errnoret": (3, "oneof ErrnoRet uint32"),
        "Args": (4, "repeated grpc.LinuxSeccompArg"),
    }


def test_storage_and_friends() -> None:
    assert layout(agent_pb2.Storage.DESCRIPTOR) == {
        "driver": (1, "string"),
        "driver_options": (2, "repeated string"),
        "source": (3, "string"),
        "fstype": (4, "string"),
        "options": (5, "repeated string"),
        "mount_point": (6, "string"),
        "fs_group": (7, "grpc.FSGroup"),
        "shared": (8, "bool"),
    }
    assert layout(agent_pb2.FSGroup.DESCRIPTOR) == {
        "group_id": (2, "uint32"),
        "group_change_policy": (3, "types.FSGroupChangePolicy"),
    }
    assert layout(oci_pb2.Mount.DESCRIPTOR) == {
        "destination": (1, "string"),
        "source": (2, "string"),
        "type": (3, "string"),
        "options": (4, "repeated string"),
    }


def test_stdio_and_wait() -> None:
    assert layout(agent_pb2.ReadStreamRequest.DESCRIPTOR) == {
        "container_id": (1, "string"),
        "exec_id": (2, "string"),
        "len": (3, "uint32"),
    }
    assert layout(agent_pb2.ReadStreamResponse.DESCRIPTOR) == {"data": (1, "bytes")}
    assert layout(agent_pb2.WriteStreamResponse.DESCRIPTOR) == {"len": (1, "uint32")}
    assert layout(agent_pb2.WaitProcessResponse.DESCRIPTOR) == {"status": (1, "int32")}
    assert layout(agent_pb2.SignalProcessRequest.DESCRIPTOR) == {
        "container_id": (1, "string"),
        "exec_id": (2, "string"),
        "signal": (3, "uint32"),
    }


def test_network_types() -> None:
    assert layout(types_pb2.Interface.DESCRIPTOR) == {
        "device": (1, "string"),
        "name": (2, "string"),
        "IPAddresses": (3, "repeated types.IPAddress"),
        "mtu": (4, "uint64"),
        "hwAddr": (5, "string"),
        "devicePath": (6, "string"),
        "type": (7, "string"),
        "raw_flags": (8, "uint32"),
    }
    assert layout(types_pb2.Route.DESCRIPTOR) == {
        "dest": (1, "string"),
        "gateway": (2, "string"),
        "device": (3, "string"),
        "source": (4, "string"),
        "scope": (5, "uint32"),
        "family": (6, "types.IPFamily"),
        "flags": (7, "uint32"),
        "mtu": (8, "uint32"),
    }
    assert layout(types_pb2.IPAddress.DESCRIPTOR) == {
        "family": (1, "types.IPFamily"),
        "address": (2, "string"),
        "mask": (3, "string"),
    }
    assert layout(types_pb2.ARPNeighbor.DESCRIPTOR) == {
        "toIPAddress": (1, "types.IPAddress"),
        "device": (2, "string"),
        "lladdr": (3, "string"),
        "state": (4, "int32"),
        "flags": (5, "int32"),
    }
    assert layout(agent_pb2.Interfaces.DESCRIPTOR) == {"Interfaces": (1, "repeated types.Interface")}
    assert layout(agent_pb2.Routes.DESCRIPTOR) == {"Routes": (1, "repeated types.Route")}


def test_stats() -> None:
    assert layout(agent_pb2.StatsContainerResponse.DESCRIPTOR) == {
        "cgroup_stats": (1, "grpc.CgroupStats"),
        "network_stats": (2, "repeated grpc.NetworkStats"),
    }
    assert layout(agent_pb2.CgroupStats.DESCRIPTOR) == {
        "cpu_stats": (1, "grpc.CpuStats"),
        "memory_stats": (2, "grpc.MemoryStats"),
        "pids_stats": (3, "grpc.PidsStats"),
        "blkio_stats": (4, "grpc.BlkioStats"),
        "hugetlb_stats": (5, "map<string,grpc.HugetlbStats>"),
    }
    assert layout(agent_pb2.MemoryStats.DESCRIPTOR) == {
        "cache": (1, "uint64"),
        "usage": (2, "grpc.MemoryData"),
        "swap_usage": (3, "grpc.MemoryData"),
        "kernel_usage": (4, "grpc.MemoryData"),
        "use_hierarchy": (5, "bool"),
        "stats": (6, "map<string,uint64>"),
    }
    assert layout(agent_pb2.CpuUsage.DESCRIPTOR) == {
        "total_usage": (1, "uint64"),
        "percpu_usage": (2, "repeated uint64"),
        "usage_in_kernelmode": (3, "uint64"),
        "usage_in_usermode": (4, "uint64"),
    }


def test_misc_responses() -> None:
    assert layout(agent_pb2.Metrics.DESCRIPTOR) == {"metrics": (1, "string")}
    assert layout(agent_pb2.OOMEvent.DESCRIPTOR) == {"container_id": (1, "string")}
    assert layout(agent_pb2.GuestDetailsResponse.DESCRIPTOR) == {
        "mem_block_size_bytes": (1, "uint64"),
        "agent_details": (2, "grpc.AgentDetails"),
        "support_mem_hotplug_probe": (3, "bool"),
    }
    assert layout(agent_pb2.AgentDetails.DESCRIPTOR) == {
        "version": (1, "string"),
        "init_daemon": (2, "bool"),
        "device_handlers": (3, "repeated string"),
        "storage_handlers": (4, "repeated string"),
        "supports_seccomp": (5, "bool"),
        "extra_features": (6, "repeated string"),
    }
    assert layout(agent_pb2.ReseedRandomDevRequest.DESCRIPTOR) == {"data": (2, "bytes")}
    assert layout(csi_pb2.VolumeUsage.DESCRIPTOR) == {
        "available": (1, "uint64"),
        "total": (2, "uint64"),
        "used": (3, "uint64"),
        "unit": (4, "grpc.VolumeUsage.Unit"),
    }


def test_mem_agent_fields_have_presence() -> None:
    # Kata declares these "optional": unset must be distinguishable from 0/false.
    d = agent_pb2.MemAgentMemcgConfig.DESCRIPTOR
    assert [(f.name, f.number) for f in d.fields][:3] == [("disabled", 1), ("swap", 2), ("swappiness_max", 3)]
    assert all(f.has_presence for f in d.fields)
    m = agent_pb2.MemAgentMemcgConfig(swap=False)
    assert m.HasField("swap") and not m.HasField("disabled")
    assert agent_pb2.MemAgentMemcgConfig.FromString(m.SerializeToString()).HasField("swap")
    assert all(f.has_presence for f in agent_pb2.MemAgentCompactConfig.DESCRIPTOR.fields)
    assert len(agent_pb2.MemAgentCompactConfig.DESCRIPTOR.fields) == 8


def test_health() -> None:
    assert layout(health_pb2.CheckRequest.DESCRIPTOR) == {"service": (1, "string")}
    assert layout(health_pb2.HealthCheckResponse.DESCRIPTOR) == {
        "status": (1, "grpc.HealthCheckResponse.ServingStatus")
    }
    assert layout(health_pb2.VersionCheckResponse.DESCRIPTOR) == {
        "grpc_version": (1, "string"),
        "agent_version": (2, "string"),
    }


def test_enums() -> None:
    def values(e):
        return {v.name: v.number for v in e.values}

    assert values(types_pb2.IPFamily.DESCRIPTOR) == {"v4": 0, "v6": 1}
    assert values(types_pb2.FSGroupChangePolicy.DESCRIPTOR) == {"Always": 0, "OnRootMismatch": 1}
    assert values(health_pb2.HealthCheckResponse.ServingStatus.DESCRIPTOR) == {
        "UNKNOWN": 0,
        "SERVING": 1,
        "NOT_SERVING": 2,
    }
    assert values(csi_pb2.VolumeUsage.Unit.DESCRIPTOR) == {"UNKNOWN": 0, "BYTES": 1, "INODES": 2}


def test_pull_image_extension() -> None:
    assert layout(agent_pb2.PullImageRequest.DESCRIPTOR) == {
        "image": (1, "string"),
        "container_id": (2, "string"),
        "source_creds": (3, "string"),
        "lazy": (16, "bool"),
        "platform": (17, "string"),
        "insecure_registries": (18, "repeated string"),
        "auth_config_json": (19, "string"),
    }
    assert layout(agent_pb2.PullImageResponse.DESCRIPTOR) == {
        "image_ref": (1, "string"),
        "manifest_digest": (16, "string"),
        "rootfs": (17, "string"),
        "lazy": (18, "bool"),
        "runtime_config_json": (19, "string"),
    }


def test_packages_and_files() -> None:
    # Service and message names on the wire include the package.
    assert agent_pb2.DESCRIPTOR.package == "grpc"
    assert oci_pb2.DESCRIPTOR.package == "grpc"
    assert health_pb2.DESCRIPTOR.package == "grpc"
    assert csi_pb2.DESCRIPTOR.package == "grpc"
    assert types_pb2.DESCRIPTOR.package == "types"
    assert agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name == "grpc.AgentService"
    assert health_pb2.DESCRIPTOR.services_by_name["Health"].full_name == "grpc.Health"
    assert [d.name for d in agent_pb2.DESCRIPTOR.dependencies] == [
        "agent/protos/oci.proto",
        "agent/protos/csi.proto",
        "agent/protos/types.proto",
        "google/protobuf/empty.proto",
    ]


def test_known_wire_bytes() -> None:
    # Encodings computed by hand from the field numbers: tag = number << 3 | wire type.
    assert agent_pb2.WaitProcessResponse(status=137).SerializeToString() == b"\x08\x89\x01"
    assert agent_pb2.WaitProcessResponse(status=-1).SerializeToString() == b"\x08" + b"\xff" * 9 + b"\x01"
    assert agent_pb2.ReadStreamResponse(data=b"abc").SerializeToString() == b"\x0a\x03abc"
    assert agent_pb2.OOMEvent(container_id="c1").SerializeToString() == b"\x0a\x02c1"
    # OCI is field 6, length-delimited: 6 << 3 | 2 = 0x32; Spec.Hostname is field 4.
    req = agent_pb2.CreateContainerRequest(OCI=oci_pb2.Spec(Hostname="h"))
    assert req.SerializeToString() == b"\x32\x03\x22\x01h"
    assert agent_pb2.CreateContainerRequest(stderr_port=1025).SerializeToString() == b"\x58\x81\x08"
    assert agent_pb2.ReseedRandomDevRequest(data=b"\x00").SerializeToString() == b"\x12\x01\x00"
    assert agent_pb2.PullImageRequest(lazy=True).SerializeToString() == b"\x80\x01\x01"
    assert types_pb2.Route(family=types_pb2.v6, mtu=1500).SerializeToString() == b"\x30\x01\x40\xdc\x0b"
