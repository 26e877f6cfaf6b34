"""A full CreateContainerRequest (with OCI spec) through binary and JSON encodings."""

import json

from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protos import agent_pb2, oci_pb2, types_pb2


def full_request() -> agent_pb2.CreateContainerRequest:
    spec = oci_pb2.Spec(
        Version="1.1.0",
        Process=oci_pb2.Process(
            Terminal=True,
            ConsoleSize=oci_pb2.Box(Height=24, Width=80),
            User=oci_pb2.User(UID=1000, GID=1000, AdditionalGids=[10, 20], Username="app"),
            Args=["/bin/sh", "-c", "echo hi; sleep 1"],
            Env=["PATH=/usr/bin:/bin", "TERM=xterm"],
            Cwd="/work",
            Capabilities=oci_pb2.LinuxCapabilities(
                Bounding=["CAP_CHOWN", "CAP_KILL"],
                Effective=["CAP_KILL"],
                Inheritable=[],
                Permitted=["CAP_CHOWN", "CAP_KILL"],
                Ambient=["CAP_KILL"],
            ),
            Rlimits=[oci_pb2.POSIXRlimit(Type="RLIMIT_NOFILE", Hard=4096, Soft=1024)],
            NoNewPrivileges=True,
            ApparmorProfile="unconfined",
            OOMScoreAdj=-500,
            SelinuxLabel="system_u:system_r:container_t:s0",
        ),
        Root=oci_pb2.Root(Path="/run/kata-containers/c1/rootfs", Readonly=True),
        Hostname="pod-1",
        Mounts=[
            oci_pb2.Mount(destination="/proc", source="proc", type="proc", options=["nosuid", "noexec"]),
            oci_pb2.Mount(destination="/data", source="vm:/dev/hostfs/data", type="bind", options=["rbind"]),
        ],
        Hooks=oci_pb2.Hooks(
            Prestart=[oci_pb2.Hook(Path="/usr/bin/hook", Args=["hook", "pre"], Env=["A=1"], Timeout=5)],
            StartContainer=[oci_pb2.Hook(Path="/usr/bin/hook2")],
        ),
        Annotations={"io.kubernetes.cri.container-type": "container", "é": "ü ✓"},
        Linux=oci_pb2.Linux(
            UIDMappings=[oci_pb2.LinuxIDMapping(HostID=100000, ContainerID=0, Size=65536)],
            Sysctl={"net.ipv4.ip_forward": "1"},
            Resources=oci_pb2.LinuxResources(
                Devices=[oci_pb2.LinuxDeviceCgroup(Allow=False, Access="rwm")],
                Memory=oci_pb2.LinuxMemory(Limit=256 << 20, Swap=512 << 20, DisableOOMKiller=True),
                CPU=oci_pb2.LinuxCPU(Shares=1024, Quota=50000, Period=100000, Cpus="0-1", Mems="0"),
                Pids=oci_pb2.LinuxPids(Limit=128),
                BlockIO=oci_pb2.LinuxBlockIO(
                    Weight=500,
                    ThrottleReadBpsDevice=[oci_pb2.LinuxThrottleDevice(Major=8, Minor=0, Rate=1 << 20)],
                ),
                HugepageLimits=[oci_pb2.LinuxHugepageLimit(Pagesize="2MB", Limit=0)],
                Network=oci_pb2.LinuxNetwork(
                    ClassID=7, Priorities=[oci_pb2.LinuxInterfacePriority(Name="eth0", Priority=3)]
                ),
            ),
            CgroupsPath="/kata/c1",
            Namespaces=[
                oci_pb2.LinuxNamespace(Type="pid"),
                oci_pb2.LinuxNamespace(Type="network", Path="/var/run/netns/cni-1"),
            ],
            Devices=[oci_pb2.LinuxDevice(Path="/dev/fuse", Type="c", Major=10, Minor=229, FileMode=0o666)],
            Seccomp=oci_pb2.LinuxSeccomp(
                DefaultAction="SCMP_ACT_ERRNO",
                Architectures=["SCMP_ARCH_X86_64"],
                Flags=["SECCOMP_FILTER_FLAG_LOG"],
                Syscalls=[
                    oci_pb2.LinuxSyscall(Names=["read", "write"], Action="SCMP_ACT_ALLOW"),
                    oci_pb2.LinuxSyscall(
                        Names=["personality"],
                        Action="SCMP_ACT_ERRNO",
                        errnoret=0,  # set to zero: must survive as "present"
                        Args=[oci_pb2.LinuxSeccompArg(Index=0, Value=0xFFFFFFFF, ValueTwo=0, Op="SCMP_CMP_EQ")],
                    ),
                ],
            ),
            RootfsPropagation="rslave",
            MaskedPaths=["/proc/kcore"],
            ReadonlyPaths=["/proc/sys"],
            MountLabel="",
            IntelRdt=oci_pb2.LinuxIntelRdt(L3CacheSchema="L3:0=ff"),
        ),
    )
    return agent_pb2.CreateContainerRequest(
        container_id="c1",
        exec_id="c1",
        string_user=agent_pb2.StringUser(uid="1000", gid="1000", additionalGids=["10"]),
        devices=[agent_pb2.Device(id="vda", type="blk", vm_path="/dev/vda", container_path="/dev/xvda")],
        storages=[
            agent_pb2.Storage(
                driver="virtio-fs",
                driver_options=["a=b"],
                source="kataShared",
                fstype="virtiofs",
                options=["ro"],
                mount_point="/run/kata-containers/shared",
                fs_group=agent_pb2.FSGroup(group_id=2000, group_change_policy=types_pb2.OnRootMismatch),
                shared=True,
            )
        ],
        OCI=spec,
        sandbox_pidns=True,
        shared_mounts=[agent_pb2.SharedMount(name="m", src_ctr="a", src_path="/x", dst_ctr="b", dst_path="/y")],
        stdin_port=1025,
        stdout_port=1026,
        stderr_port=1027,
    )


def test_binary_round_trip() -> None:
    req = full_request()
    data = req.SerializeToString()
    back = agent_pb2.CreateContainerRequest.FromString(data)
    assert back == req
    assert back.SerializeToString(deterministic=True) == req.SerializeToString(deterministic=True)
    assert back.OCI.Process.Args == ["/bin/sh", "-c", "echo hi; sleep 1"]
    assert back.OCI.Annotations["é"] == "ü ✓"
    assert back.OCI.Linux.Resources.Memory.Limit == 256 << 20
    assert back.OCI.Process.OOMScoreAdj == -500
    assert back.storages[0].fs_group.group_change_policy == types_pb2.OnRootMismatch
    # errnoret sits in a oneof: an explicit 0 stays distinguishable from "not set".
    assert back.OCI.Linux.Seccomp.Syscalls[1].WhichOneof("ErrnoRet") == "errnoret"
    assert back.OCI.Linux.Seccomp.Syscalls[0].WhichOneof("ErrnoRet") is None


def test_json_round_trip() -> None:
    req = full_request()
    text = json_format.MessageToJson(req)
    doc = json.loads(text)
    # JSON names come from the field names (lowerCamelCase for snake_case; the OCI message's
    # capitalised names stay as they are). agentctl's JSON input depends on these.
    assert doc["containerId"] == "c1"
    assert doc["OCI"]["Process"]["Args"][0] == "/bin/sh"
    assert doc["OCI"]["Linux"]["Resources"]["Memory"]["Limit"] == str(256 << 20)  # int64 as string
    assert doc["storages"][0]["fsGroup"]["groupChangePolicy"] == "OnRootMismatch"
    assert doc["stdinPort"] == 1025
    assert json_format.Parse(text, agent_pb2.CreateContainerRequest()) == req

    # Field names as written in the .proto are accepted as input too.
    by_name = json_format.MessageToJson(req, preserving_proto_field_name=True)
    assert json.loads(by_name)["container_id"] == "c1"
    assert json_format.Parse(by_name, agent_pb2.CreateContainerRequest()) == req


def test_dict_round_trip() -> None:
    req = full_request()
    d = json_format.MessageToDict(req)
    assert json_format.ParseDict(d, agent_pb2.CreateContainerRequest()) == req


def test_unknown_fields_are_kept_not_rejected() -> None:
    # A newer peer may send fields we do not know: they must parse and survive re-encoding.
    extra = b"\xf8\x06\x2a"  # field 111, varint 42
    data = agent_pb2.StartContainerRequest(container_id="c1").SerializeToString() + extra
    msg = agent_pb2.StartContainerRequest.FromString(data)
    assert msg.container_id == "c1"
    assert msg.SerializeToString().endswith(extra)


def test_pull_image_round_trip() -> None:
    req = agent_pb2.PullImageRequest(
        image="127.0.0.1:5000/library/busybox:latest",
        container_id="c1",
        source_creds="user:pass",
        lazy=True,
        platform="linux/amd64",
        insecure_registries=["127.0.0.1:5000"],
        auth_config_json='{"auths": {}}',
    )
    assert agent_pb2.PullImageRequest.FromString(req.SerializeToString()) == req
    assert json_format.Parse(json_format.MessageToJson(req), agent_pb2.PullImageRequest()) == req
    # A peer without our extension (fields 1-3 only) must still decode the request and simply
    # skip fields 16+; build that older message type in a private pool and decode with it.
    proto = descriptor_pb2.FileDescriptorProto(name="old/pull.proto", package="old", syntax="proto3")
    m = proto.message_type.add(name="PullImageRequest")
    for number, name in enumerate(["image", "container_id", "source_creds"], start=1):
        m.field.add(name=name, number=number, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                    label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(proto)
    old_cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("old.PullImageRequest"))
    old = old_cls.FromString(req.SerializeToString())
    assert (old.image, old.container_id, old.source_creds) == (req.image, "c1", "user:pass")
    # ... and what it sends back decodes on our side with the extension fields at their defaults.
    ours = agent_pb2.PullImageRequest.FromString(old_cls(image="x").SerializeToString())
    assert ours.image == "x" and ours.lazy is False and ours.platform == "" and not ours.insecure_registries

_text = st.text(max_size=20)
_processes = st.builds(
    oci_pb2.Process,
    Terminal=st.booleans(),
    User=st.builds(oci_pb2.User, UID=st.integers(0, 2**32 - 1), GID=st.integers(0, 2**32 - 1)),
    Args=st.lists(_text, max_size=5),
    Env=st.lists(_text, max_size=5),
    Cwd=_text,
    OOMScoreAdj=st.integers(-(2**63), 2**63 - 1),
    Rlimits=st.lists(
        st.builds(oci_pb2.POSIXRlimit, Type=_text, Hard=st.integers(0, 2**64 - 1), Soft=st.integers(0, 2**64 - 1)),
        max_size=3,
    ),
)


@settings(max_examples=150, deadline=None)
@given(
    proc=_processes,
    cid=_text,
    eid=_text,
    ports=st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)),
)
def test_exec_request_round_trip_property(proc, cid, eid, ports) -> None:
    req = agent_pb2.ExecProcessRequest(
        container_id=cid, exec_id=eid, process=proc, stdin_port=ports[0], stdout_port=ports[1], stderr_port=ports[2]
    )
    assert agent_pb2.ExecProcessRequest.FromString(req.SerializeToString()) == req
    assert json_format.Parse(json_format.MessageToJson(req), agent_pb2.ExecProcessRequest()) == req
