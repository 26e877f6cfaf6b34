"""The agent API's `grpc.Spec` (Kata's protobuf rendering of the OCI runtime spec) to the
OCI runtime spec's JSON, as config.json of a bundle.

Proto3 has no presence for scalars, so a zero means "not set" here, as in Kata's agent,
except where zero is a meaningful value that Kata's runtime sends (uid/gid 0, an
oomScoreAdj of 0 is the default anyway). Names follow config-linux.md / config.md.
"""

from __future__ import annotations

from typing import Any

from agent.protos import oci_pb2


def _nz(d: dict, key: str, value: Any) -> None:
    if value:
        d[key] = value


def _user(u: oci_pb2.User) -> dict:
    out: dict[str, Any] = {"uid": u.UID, "gid": u.GID}
    if u.AdditionalGids:
        out["additionalGids"] = list(u.AdditionalGids)
    _nz(out, "username", u.Username)
    return out


def _caps(c: oci_pb2.LinuxCapabilities) -> dict:
    return {k.lower(): list(getattr(c, k)) for k in ("Bounding", "Effective", "Inheritable", "Permitted", "Ambient")
            if getattr(c, k)}


def process(p: oci_pb2.Process) -> dict:
    out: dict[str, Any] = {
        "terminal": p.Terminal,
        "user": _user(p.User),
        "args": list(p.Args),
        "env": list(p.Env),
        "cwd": p.Cwd or "/",
    }
    if p.HasField("ConsoleSize") and (p.ConsoleSize.Height or p.ConsoleSize.Width):
        out["consoleSize"] = {"height": p.ConsoleSize.Height, "width": p.ConsoleSize.Width}
    if p.HasField("Capabilities"):
        out["capabilities"] = _caps(p.Capabilities)
    if p.Rlimits:
        out["rlimits"] = [{"type": r.Type, "hard": r.Hard, "soft": r.Soft} for r in p.Rlimits]
    _nz(out, "noNewPrivileges", p.NoNewPrivileges)
    _nz(out, "apparmorProfile", p.ApparmorProfile)
    _nz(out, "oomScoreAdj", p.OOMScoreAdj)
    _nz(out, "selinuxLabel", p.SelinuxLabel)
    return out


def _hooks(h: oci_pb2.Hooks) -> dict:
    out = {}
    for proto_name, json_name in (("Prestart", "prestart"), ("CreateRuntime", "createRuntime"),
                                  ("CreateContainer", "createContainer"), ("StartContainer", "startContainer"),
                                  ("Poststart", "poststart"), ("Poststop", "poststop")):
        hooks = []
        for hk in getattr(h, proto_name):
            d: dict[str, Any] = {"path": hk.Path}
            if hk.Args:
                d["args"] = list(hk.Args)
            if hk.Env:
                d["env"] = list(hk.Env)
            _nz(d, "timeout", hk.Timeout)
            hooks.append(d)
        if hooks:
            out[json_name] = hooks
    return out


def resources(r: oci_pb2.LinuxResources) -> dict:
    """The OCI linux.resources object for a `grpc.LinuxResources`."""
    return _resources(r)


def _resources(r: oci_pb2.LinuxResources) -> dict:
    out: dict[str, Any] = {}
    if r.Devices:
        devs = []
        for d in r.Devices:
            e: dict[str, Any] = {"allow": d.Allow}
            _nz(e, "type", d.Type)
            # -1 is the wildcard in Kata's rendering; absent is the wildcard in OCI's
            if d.Major not in (-1,) and (d.Major or d.Type in ("c", "b")):
                e["major"] = d.Major
            if d.Minor not in (-1,) and (d.Minor or d.Type in ("c", "b")):
                e["minor"] = d.Minor
            _nz(e, "access", d.Access)
            devs.append(e)
        out["devices"] = devs
    if r.HasField("Memory"):
        m = r.Memory
        mem: dict[str, Any] = {}
        for k, jk in (("Limit", "limit"), ("Reservation", "reservation"), ("Swap", "swap"),
                      ("Kernel", "kernel"), ("KernelTCP", "kernelTCP")):
            _nz(mem, jk, getattr(m, k))
        _nz(mem, "swappiness", m.Swappiness)
        _nz(mem, "disableOOMKiller", m.DisableOOMKiller)
        if mem:
            out["memory"] = mem
    if r.HasField("CPU"):
        c = r.CPU
        cpu: dict[str, Any] = {}
        for k, jk in (("Shares", "shares"), ("Quota", "quota"), ("Period", "period"),
                      ("RealtimeRuntime", "realtimeRuntime"), ("RealtimePeriod", "realtimePeriod"),
                      ("Cpus", "cpus"), ("Mems", "mems")):
            _nz(cpu, jk, getattr(c, k))
        if cpu:
            out["cpu"] = cpu
    if r.HasField("Pids") and r.Pids.Limit:
        out["pids"] = {"limit": r.Pids.Limit}
    if r.HasField("BlockIO"):
        b = r.BlockIO
        bio: dict[str, Any] = {}
        _nz(bio, "weight", b.Weight)
        _nz(bio, "leafWeight", b.LeafWeight)
        if b.WeightDevice:
            bio["weightDevice"] = [
                {k: v for k, v in (("major", w.Major), ("minor", w.Minor), ("weight", w.Weight),
                                   ("leafWeight", w.LeafWeight)) if v or k in ("major", "minor")}
                for w in b.WeightDevice]
        for proto_name, json_name in (("ThrottleReadBpsDevice", "throttleReadBpsDevice"),
                                      ("ThrottleWriteBpsDevice", "throttleWriteBpsDevice"),
                                      ("ThrottleReadIOPSDevice", "throttleReadIOPSDevice"),
                                      ("ThrottleWriteIOPSDevice", "throttleWriteIOPSDevice")):
            devs = getattr(b, proto_name)
            if devs:
                bio[json_name] = [{"major": t.Major, "minor": t.Minor, "rate": t.Rate} for t in devs]
        if bio:
            out["blockIO"] = bio
    if r.HugepageLimits:
        out["hugepageLimits"] = [{"pageSize": h.Pagesize, "limit": h.Limit} for h in r.HugepageLimits]
    if r.HasField("Network") and (r.Network.ClassID or r.Network.Priorities):
        net: dict[str, Any] = {}
        _nz(net, "classID", r.Network.ClassID)
        if r.Network.Priorities:
            net["priorities"] = [{"name": p.Name, "priority": p.Priority} for p in r.Network.Priorities]
        out["network"] = net
    return out


def _seccomp(s: oci_pb2.LinuxSeccomp) -> dict:
    out: dict[str, Any] = {"defaultAction": s.DefaultAction}
    if s.Architectures:
        out["architectures"] = list(s.Architectures)
    if s.Flags:
        out["flags"] = list(s.Flags)
    calls = []
    for sc in s.Syscalls:
        e: dict[str, Any] = {"names": list(sc.Names), "action": sc.Action}
        if sc.HasField("errnoret"):
            e["errnoRet"] = sc.errnoret
        if sc.Args:
            e["args"] = [{k: v for k, v in (("index", a.Index), ("value", a.Value), ("valueTwo", a.ValueTwo),
                                            ("op", a.Op)) if v or k in ("index", "value")} for a in sc.Args]
        calls.append(e)
    if calls:
        out["syscalls"] = calls
    return out


def linux(lx: oci_pb2.Linux) -> dict:
    out: dict[str, Any] = {}
    for proto_name, json_name in (("UIDMappings", "uidMappings"), ("GIDMappings", "gidMappings")):
        maps = getattr(lx, proto_name)
        if maps:
            out[json_name] = [{"containerID": m.ContainerID, "hostID": m.HostID, "size": m.Size} for m in maps]
    if lx.Sysctl:
        out["sysctl"] = dict(lx.Sysctl)
    if lx.HasField("Resources"):
        out["resources"] = _resources(lx.Resources)
    _nz(out, "cgroupsPath", lx.CgroupsPath)
    if lx.Namespaces:
        out["namespaces"] = [{"type": n.Type, **({"path": n.Path} if n.Path else {})} for n in lx.Namespaces]
    if lx.Devices:
        out["devices"] = [
            {"path": d.Path, "type": d.Type, "major": d.Major, "minor": d.Minor,
             **({"fileMode": d.FileMode} if d.FileMode else {}), "uid": d.UID, "gid": d.GID}
            for d in lx.Devices]
    if lx.HasField("Seccomp") and lx.Seccomp.DefaultAction:
        out["seccomp"] = _seccomp(lx.Seccomp)
    _nz(out, "rootfsPropagation", lx.RootfsPropagation)
    if lx.MaskedPaths:
        out["maskedPaths"] = list(lx.MaskedPaths)
    if lx.ReadonlyPaths:
        out["readonlyPaths"] = list(lx.ReadonlyPaths)
    _nz(out, "mountLabel", lx.MountLabel)
    if lx.HasField("IntelRdt") and lx.IntelRdt.L3CacheSchema:
        out["intelRdt"] = {"l3CacheSchema": lx.IntelRdt.L3CacheSchema}
    return out


def spec_to_oci(spec: oci_pb2.Spec) -> dict:
    """The OCI config.json object for a `grpc.Spec`."""
    out: dict[str, Any] = {"ociVersion": spec.Version or "1.0.2"}
    if spec.HasField("Process"):
        out["process"] = process(spec.Process)
    out["root"] = {"path": spec.Root.Path or "rootfs", "readonly": spec.Root.Readonly}
    _nz(out, "hostname", spec.Hostname)
    out["mounts"] = [
        {"destination": m.destination, **({"type": m.type} if m.type else {}),
         **({"source": m.source} if m.source else {}), **({"options": list(m.options)} if m.options else {})}
        for m in spec.Mounts]
    if spec.HasField("Hooks"):
        hooks = _hooks(spec.Hooks)
        if hooks:
            out["hooks"] = hooks
    if spec.Annotations:
        out["annotations"] = dict(spec.Annotations)
    if spec.HasField("Linux"):
        out["linux"] = linux(spec.Linux)
    return out


# ---- the other way: OCI config.json -> grpc.Spec (agentctl sends bundles this way) ----------

def _set_user(u: oci_pb2.User, d: dict) -> None:
    u.UID = int(d.get("uid", 0))
    u.GID = int(d.get("gid", 0))
    u.AdditionalGids.extend(int(g) for g in d.get("additionalGids", []) or [])
    u.Username = d.get("username", "") or ""


def process_from_oci(d: dict, p: oci_pb2.Process | None = None) -> oci_pb2.Process:
    p = p if p is not None else oci_pb2.Process()
    p.Terminal = bool(d.get("terminal", False))
    if "consoleSize" in d:
        p.ConsoleSize.Height = int(d["consoleSize"].get("height", 0))
        p.ConsoleSize.Width = int(d["consoleSize"].get("width", 0))
    _set_user(p.User, d.get("user", {}) or {})
    p.Args.extend(d.get("args", []) or [])
    p.Env.extend(d.get("env", []) or [])
    p.Cwd = d.get("cwd", "/") or "/"
    caps = d.get("capabilities")
    if caps:
        for k in ("Bounding", "Effective", "Inheritable", "Permitted", "Ambient"):
            getattr(p.Capabilities, k).extend(caps.get(k.lower(), []) or [])
    for r in d.get("rlimits", []) or []:
        p.Rlimits.add(Type=r["type"], Hard=int(r.get("hard", 0)), Soft=int(r.get("soft", 0)))
    p.NoNewPrivileges = bool(d.get("noNewPrivileges", False))
    p.ApparmorProfile = d.get("apparmorProfile", "") or ""
    p.OOMScoreAdj = int(d.get("oomScoreAdj", 0) or 0)
    p.SelinuxLabel = d.get("selinuxLabel", "") or ""
    return p


def _resources_from_oci(r: dict, out: oci_pb2.LinuxResources) -> None:
    for d in r.get("devices", []) or []:
        out.Devices.add(Allow=bool(d.get("allow")), Type=d.get("type", "") or "",
                        Major=int(d.get("major", -1)), Minor=int(d.get("minor", -1)),
                        Access=d.get("access", "") or "")
    m = r.get("memory")
    if m:
        for jk, k in (("limit", "Limit"), ("reservation", "Reservation"), ("swap", "Swap"),
                      ("kernel", "Kernel"), ("kernelTCP", "KernelTCP"), ("swappiness", "Swappiness")):
            if m.get(jk) is not None:
                setattr(out.Memory, k, int(m[jk]))
        out.Memory.DisableOOMKiller = bool(m.get("disableOOMKiller", False))
    c = r.get("cpu")
    if c:
        for jk, k in (("shares", "Shares"), ("quota", "Quota"), ("period", "Period"),
                      ("realtimeRuntime", "RealtimeRuntime"), ("realtimePeriod", "RealtimePeriod")):
            if c.get(jk) is not None:
                setattr(out.CPU, k, int(c[jk]))
        out.CPU.Cpus = c.get("cpus", "") or ""
        out.CPU.Mems = c.get("mems", "") or ""
    if r.get("pids"):
        out.Pids.Limit = int(r["pids"].get("limit", 0))
    b = r.get("blockIO")
    if b:
        out.BlockIO.Weight = int(b.get("weight", 0) or 0)
        out.BlockIO.LeafWeight = int(b.get("leafWeight", 0) or 0)
        for w in b.get("weightDevice", []) or []:
            out.BlockIO.WeightDevice.add(Major=int(w["major"]), Minor=int(w["minor"]),
                                         Weight=int(w.get("weight", 0) or 0), LeafWeight=int(w.get("leafWeight", 0) or 0))
        for jk, k in (("throttleReadBpsDevice", "ThrottleReadBpsDevice"), ("throttleWriteBpsDevice", "ThrottleWriteBpsDevice"),
                      ("throttleReadIOPSDevice", "ThrottleReadIOPSDevice"), ("throttleWriteIOPSDevice", "ThrottleWriteIOPSDevice")):
            for t in b.get(jk, []) or []:
                getattr(out.BlockIO, k).add(Major=int(t["major"]), Minor=int(t["minor"]), Rate=int(t["rate"]))
    for h in r.get("hugepageLimits", []) or []:
        out.HugepageLimits.add(Pagesize=h["pageSize"], Limit=int(h["limit"]))
    n = r.get("network")
    if n:
        out.Network.ClassID = int(n.get("classID", 0) or 0)
        for p in n.get("priorities", []) or []:
            out.Network.Priorities.add(Name=p["name"], Priority=int(p["priority"]))


def spec_from_oci(cfg: dict) -> oci_pb2.Spec:
    """A `grpc.Spec` for an OCI config.json object (the inverse of :func:`spec_to_oci`)."""
    s = oci_pb2.Spec(Version=cfg.get("ociVersion", ""), Hostname=cfg.get("hostname", "") or "")
    if "process" in cfg:
        process_from_oci(cfg["process"], s.Process)
    root = cfg.get("root") or {}
    s.Root.Path = root.get("path", "") or ""
    s.Root.Readonly = bool(root.get("readonly", False))
    for m in cfg.get("mounts", []) or []:
        s.Mounts.add(destination=m["destination"], source=m.get("source", "") or "",
                     type=m.get("type", "") or "", options=m.get("options", []) or [])
    hooks = cfg.get("hooks") or {}
    for jk, k in (("prestart", "Prestart"), ("createRuntime", "CreateRuntime"), ("createContainer", "CreateContainer"),
                  ("startContainer", "StartContainer"), ("poststart", "Poststart"), ("poststop", "Poststop")):
        for h in hooks.get(jk, []) or []:
            getattr(s.Hooks, k).add(Path=h["path"], Args=h.get("args", []) or [], Env=h.get("env", []) or [],
                                    Timeout=int(h.get("timeout", 0) or 0))
    s.Annotations.update(cfg.get("annotations", {}) or {})
    lx = cfg.get("linux")
    if lx is not None:
        L = s.Linux
        for jk, k in (("uidMappings", "UIDMappings"), ("gidMappings", "GIDMappings")):
            for m in lx.get(jk, []) or []:
                getattr(L, k).add(HostID=int(m["hostID"]), ContainerID=int(m["containerID"]), Size=int(m["size"]))
        L.Sysctl.update(lx.get("sysctl", {}) or {})
        if lx.get("resources"):
            _resources_from_oci(lx["resources"], L.Resources)
        L.CgroupsPath = lx.get("cgroupsPath", "") or ""
        for ns in lx.get("namespaces", []) or []:
            L.Namespaces.add(Type=ns["type"], Path=ns.get("path", "") or "")
        for d in lx.get("devices", []) or []:
            L.Devices.add(Path=d["path"], Type=d["type"], Major=int(d.get("major", 0)), Minor=int(d.get("minor", 0)),
                          FileMode=int(d.get("fileMode", 0) or 0), UID=int(d.get("uid", 0) or 0), GID=int(d.get("gid", 0) or 0))
        sc = lx.get("seccomp")
        if sc:
            L.Seccomp.DefaultAction = sc.get("defaultAction", "")
            L.Seccomp.Architectures.extend(sc.get("architectures", []) or [])
            L.Seccomp.Flags.extend(sc.get("flags", []) or [])
            for call in sc.get("syscalls", []) or []:
                e = L.Seccomp.Syscalls.add(Names=call.get("names", []) or [], Action=call.get("action", ""))
                if "errnoRet" in call:
                    e.errnoret = int(call["errnoRet"])
                for a in call.get("args", []) or []:
                    e.Args.add(Index=int(a["index"]), Value=int(a.get("value", 0)), ValueTwo=int(a.get("valueTwo", 0) or 0),
                               Op=a.get("op", ""))
        L.RootfsPropagation = lx.get("rootfsPropagation", "") or ""
        L.MaskedPaths.extend(lx.get("maskedPaths", []) or [])
        L.ReadonlyPaths.extend(lx.get("readonlyPaths", []) or [])
        L.MountLabel = lx.get("mountLabel", "") or ""
        if lx.get("intelRdt"):
            L.IntelRdt.L3CacheSchema = lx["intelRdt"].get("l3CacheSchema", "") or ""
    return s
