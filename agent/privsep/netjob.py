"""Network jobs, run by a worker init forks for one request (pyroute2 is never imported by
init itself). Arguments follow Kata's types.proto JSON shapes:

* Interface   ``{"device", "name", "IPAddresses": [{"family", "address", "mask"}], "mtu",
  "hwAddr"}``; family 0 = IPv4, 1 = IPv6 (Kata's IPFamily), mask = prefix length string
* Route       ``{"dest", "gateway", "device", "source", "scope", "family"}``; dest "" or
  "default" = the default route
* ARPNeighbor ``{"toIPAddress": {"family", "address"}, "device", "lladdr", "state",
  "flags"}``

Semantics as Kata's agent: update_interface finds the link by hwAddr (else by device/name),
renames it, sets the MTU, replaces its addresses and brings it up; update_routes replaces every
route of the main table on the links named with the given list (link-scope routes first so
gateways resolve); add_arp_neighbors adds or replaces entries.
"""
from __future__ import annotations

import ipaddress
import re
import socket
from dataclasses import dataclass

from .ops import ValidationError

_IFNAME_RE = re.compile(r"[A-Za-z0-9_.:@-]{1,15}\Z")
_MAC_RE = re.compile(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}\Z")
SCOPES = {0: "universe", 200: "site", 253: "link", 254: "host", 255: "nowhere"}
NUD_PERMANENT = 0x80


def _str(d: dict, key: str, path: str, default: str = "") -> str:
    v = d.get(key, default)
    if not isinstance(v, str):
        raise ValidationError(f"{path}.{key}", f"must be a string, got {type(v).__name__}")
    return v


def _int(d: dict, key: str, path: str, lo: int, hi: int, default: int = 0) -> int:
    v = d.get(key, default)
    if isinstance(v, str) and v.isdigit():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValidationError(f"{path}.{key}", f"must be an integer {lo}..{hi}, got {v!r}")
    return v


def _ifname(v: str, path: str) -> str:
    if v and not _IFNAME_RE.match(v):
        raise ValidationError(path, f"{v[:40]!r} is not an interface name")
    return v


@dataclass(frozen=True)
class IPAddr:
    address: str
    prefix: int
    family: int  # socket.AF_INET / AF_INET6

    @classmethod
    def parse(cls, d: object, path: str, need_mask: bool = True) -> "IPAddr":
        if not isinstance(d, dict):
            raise ValidationError(path, "must be an object")
        addr = _str(d, "address", path)
        try:
            ip = ipaddress.ip_address(addr)
        except ValueError:
            raise ValidationError(f"{path}.address", f"{addr[:60]!r} is not an IP address") \
                from None
        mask = d.get("mask", "")
        maxlen = 32 if ip.version == 4 else 128
        if mask in ("", None):
            if need_mask:
                raise ValidationError(f"{path}.mask", "missing prefix length")
            prefix = maxlen
        else:
            prefix = _int(d, "mask", path, 0, maxlen)
        fam = socket.AF_INET if ip.version == 4 else socket.AF_INET6
        if "family" in d and d["family"] not in (0, 1, "v4", "v6"):
            raise ValidationError(f"{path}.family", f"{d['family']!r} is not 0 (v4) or 1 (v6)")
        return cls(str(ip), prefix, fam)

    def as_dict(self) -> dict:
        return {"family": 0 if self.family == socket.AF_INET else 1,
                "address": self.address, "mask": str(self.prefix)}


@dataclass(frozen=True)
class Interface:
    device: str
    name: str
    addresses: tuple[IPAddr, ...]
    mtu: int
    hw_addr: str

    @classmethod
    def parse(cls, d: object, path: str = "interface") -> "Interface":
        if not isinstance(d, dict):
            raise ValidationError(path, "must be an object")
        hw = _str(d, "hwAddr", path)
        if hw and not _MAC_RE.match(hw):
            raise ValidationError(f"{path}.hwAddr", f"{hw[:40]!r} is not a MAC address")
        addrs = d.get("IPAddresses", [])
        if not isinstance(addrs, list):
            raise ValidationError(f"{path}.IPAddresses", "must be a list")
        dev = _ifname(_str(d, "device", path), f"{path}.device")
        name = _ifname(_str(d, "name", path), f"{path}.name")
        if not (hw or dev or name):
            raise ValidationError(path, "names no link (hwAddr, device or name)")
        return cls(dev, name,
                   tuple(IPAddr.parse(a, f"{path}.IPAddresses[{i}]") for i, a in
                         enumerate(addrs)),
                   _int(d, "mtu", path, 0, 65535), hw.lower())


@dataclass(frozen=True)
class Route:
    dest: str | None      # "a.b.c.d/len" or None = default
    gateway: str | None
    device: str
    source: str | None
    scope: int
    family: int

    @classmethod
    def parse(cls, d: object, path: str) -> "Route":
        if not isinstance(d, dict):
            raise ValidationError(path, "must be an object")
        fam = None
        dest = _str(d, "dest", path)
        if dest in ("", "default"):
            dest_n = None
        else:
            try:
                net = ipaddress.ip_network(dest, strict=False)
            except ValueError:
                raise ValidationError(f"{path}.dest", f"{dest[:60]!r} is not a network") \
                    from None
            dest_n, fam = str(net), net.version
        ips = {}
        for key in ("gateway", "source"):
            v = _str(d, key, path)
            if v:
                try:
                    ip = ipaddress.ip_address(v)
                except ValueError:
                    raise ValidationError(f"{path}.{key}", f"{v[:60]!r} is not an IP") \
                        from None
                if fam is not None and ip.version != fam:
                    raise ValidationError(f"{path}.{key}", "address family differs from dest")
                fam = ip.version
                ips[key] = str(ip)
        fam_field = d.get("family", None)
        if fam is None:
            fam = 6 if fam_field in (1, "v6") else 4
        device = _ifname(_str(d, "device", path), f"{path}.device")
        if not device:
            raise ValidationError(f"{path}.device", "missing")
        scope = _int(d, "scope", path, 0, 255)
        return cls(dest_n, ips.get("gateway"), device, ips.get("source"), scope,
                   socket.AF_INET if fam == 4 else socket.AF_INET6)

    def as_dict(self) -> dict:
        return {"dest": self.dest or "", "gateway": self.gateway or "", "device": self.device,
                "source": self.source or "", "scope": self.scope,
                "family": 0 if self.family == socket.AF_INET else 1}


@dataclass(frozen=True)
class Neighbor:
    ip: IPAddr
    device: str
    lladdr: str
    state: int
    flags: int

    @classmethod
    def parse(cls, d: object, path: str) -> "Neighbor":
        if not isinstance(d, dict):
            raise ValidationError(path, "must be an object")
        ip = IPAddr.parse(d.get("toIPAddress"), f"{path}.toIPAddress", need_mask=False)
        dev = _ifname(_str(d, "device", path), f"{path}.device")
        if not dev:
            raise ValidationError(f"{path}.device", "missing")
        ll = _str(d, "lladdr", path)
        if ll and not _MAC_RE.match(ll):
            raise ValidationError(f"{path}.lladdr", f"{ll[:40]!r} is not a MAC address")
        return cls(ip, dev, ll.lower(), _int(d, "state", path, 0, 0xFFFF, NUD_PERMANENT),
                   _int(d, "flags", path, 0, 0xFF))


# ---- netlink ----------------------------------------------------------------------------------

def _links(ipr) -> dict[int, dict]:
    out = {}
    for link in ipr.get_links():
        out[link["index"]] = {"name": link.get_attr("IFLA_IFNAME"),
                              "hwAddr": link.get_attr("IFLA_ADDRESS") or "",
                              "mtu": link.get_attr("IFLA_MTU") or 0,
                              "up": bool(link["flags"] & 1)}
    return out


def _addrs(ipr, index: int) -> list[IPAddr]:
    return [IPAddr(a.get_attr("IFA_ADDRESS"), a["prefixlen"], a["family"])
            for a in ipr.get_addr(index=index)]


def _iface_dict(ipr, index: int, info: dict) -> dict:
    return {"device": info["name"], "name": info["name"], "mtu": info["mtu"],
            "hwAddr": info["hwAddr"],
            "IPAddresses": [a.as_dict() for a in _addrs(ipr, index)]}


def list_interfaces(ipr, args: dict) -> dict:
    return {"interfaces": [_iface_dict(ipr, i, info) for i, info in _links(ipr).items()]}


def _route_dicts(ipr, index_names: dict[int, str]) -> list[dict]:
    out = []
    for fam in (socket.AF_INET, socket.AF_INET6):
        for r in ipr.get_routes(family=fam, table=254):
            oif = r.get_attr("RTA_OIF")
            if oif not in index_names:
                continue
            dst = r.get_attr("RTA_DST")
            out.append(Route(f"{dst}/{r['dst_len']}" if dst else None,
                             r.get_attr("RTA_GATEWAY"), index_names[oif],
                             r.get_attr("RTA_PREFSRC"), r["scope"], fam).as_dict())
    return out


def list_routes(ipr, args: dict) -> dict:
    names = {i: info["name"] for i, info in _links(ipr).items()}
    return {"routes": _route_dicts(ipr, names)}


def _find_link(ipr, iface: Interface) -> int:
    links = _links(ipr)
    if iface.hw_addr:
        for i, info in links.items():
            if info["hwAddr"].lower() == iface.hw_addr:
                return i
    for i, info in links.items():
        if info["name"] in (iface.device, iface.name) and info["name"]:
            return i
    raise ValidationError("interface", f"no link with hwAddr {iface.hw_addr!r} or name "
                                       f"{iface.device or iface.name!r}")


def update_interface(ipr, args: dict) -> dict:
    iface = Interface.parse(args.get("interface"))
    idx = _find_link(ipr, iface)
    info = _links(ipr)[idx]
    if iface.name and iface.name != info["name"]:
        ipr.link("set", index=idx, state="down")
        ipr.link("set", index=idx, ifname=iface.name)
    if iface.mtu:
        ipr.link("set", index=idx, mtu=iface.mtu)
    wanted = {(a.address, a.prefix) for a in iface.addresses}
    for a in _addrs(ipr, idx):
        if (a.address, a.prefix) not in wanted and not a.address.startswith("fe80:"):
            ipr.addr("del", index=idx, address=a.address, prefixlen=a.prefix)
    have = {(a.address, a.prefix) for a in _addrs(ipr, idx)}
    for a in iface.addresses:
        if (a.address, a.prefix) not in have:
            ipr.addr("add", index=idx, address=a.address, prefixlen=a.prefix, family=a.family)
    ipr.link("set", index=idx, state="up")
    return {"interface": _iface_dict(ipr, idx, _links(ipr)[idx])}


def update_routes(ipr, args: dict) -> dict:
    raw = args.get("routes")
    if not isinstance(raw, list):
        raise ValidationError("routes", "must be a list")
    routes = [Route.parse(r, f"routes[{i}]") for i, r in enumerate(raw)]
    by_name = {info["name"]: i for i, info in _links(ipr).items()}
    for i, r in enumerate(routes):
        if r.device not in by_name:
            raise ValidationError(f"routes[{i}].device", f"no link named {r.device!r}")
    devices = {by_name[r.device] for r in routes}
    for fam in (socket.AF_INET, socket.AF_INET6):
        for old in ipr.get_routes(family=fam, table=254):
            # The kernel's own prefix routes (proto kernel) follow the addresses; keep them.
            if old.get_attr("RTA_OIF") in devices and old["proto"] != 2:
                ipr.route("del", **{"dst": old.get_attr("RTA_DST") or None,
                                    "dst_len": old["dst_len"], "family": fam,
                                    "oif": old.get_attr("RTA_OIF"), "table": 254,
                                    "gateway": old.get_attr("RTA_GATEWAY")})
    for r in sorted(routes, key=lambda r: r.gateway is not None):
        spec = {"oif": by_name[r.device], "family": r.family, "table": 254,
                "scope": r.scope}
        if r.dest:
            spec["dst"] = r.dest
        if r.gateway:
            spec["gateway"] = r.gateway
        if r.source:
            spec["prefsrc"] = r.source
        ipr.route("replace", **spec)
    names = {i: n for n, i in by_name.items()}
    return {"routes": [r for r in _route_dicts(ipr, names) if r["device"] in
                       {names[i] for i in devices}]}


def add_arp_neighbors(ipr, args: dict) -> dict:
    raw = args.get("neighbors")
    if not isinstance(raw, list):
        raise ValidationError("neighbors", "must be a list")
    neigh = [Neighbor.parse(n, f"neighbors[{i}]") for i, n in enumerate(raw)]
    by_name = {info["name"]: i for i, info in _links(ipr).items()}
    for i, n in enumerate(neigh):
        if n.device not in by_name:
            raise ValidationError(f"neighbors[{i}].device", f"no link named {n.device!r}")
    for n in neigh:
        spec = {"dst": n.ip.address, "ifindex": by_name[n.device], "state": n.state,
                "family": n.ip.family}
        if n.lladdr:
            spec["lladdr"] = n.lladdr
        if n.flags:
            spec["flags"] = n.flags
        ipr.neigh("replace", **spec)
    return {}


ACTIONS = {"list_interfaces": list_interfaces, "list_routes": list_routes,
           "update_interface": update_interface, "update_routes": update_routes,
           "add_arp_neighbors": add_arp_neighbors}


def run(action: str, args: dict) -> dict:
    """Entry point of the forked worker."""
    try:
        from pyroute2 import IPRoute
    except ImportError:
        # init may run with -S (no site: smaller, faster): this worker is a fork of it,
        # so it adds site-packages itself before the one import that needs them.
        import site
        site.main()
        from pyroute2 import IPRoute
    fn = ACTIONS[action]
    with IPRoute() as ipr:
        return fn(ipr, args)
