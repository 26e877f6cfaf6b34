"""Container state kept under --root: survives the launcher's exit.

Layout: ``<root>/<id>/state.json`` (what ``state`` prints plus what later commands need) and
``<root>/<id>/exec.fifo`` (present while the container is "created"), ``<root>/<id>/paused``
(present while it is frozen by ``pause``). The status is derived
from the process, not stored: a stored "running" would go stale the moment the process dies.
"""
from __future__ import annotations

import os

from .. import jsonlite

DEFAULT_ROOT = "/run/oci-launcher"
OCI_VERSION = "1.0.2"


class StateError(RuntimeError):
    """The container does not exist, already exists, or is in the wrong status."""


def valid_id(cid: str) -> None:
    if not cid or cid in (".", "..") or "/" in cid or "\0" in cid or len(cid) > 1024:
        raise StateError(f"invalid container id {cid!r}")


class Store:
    def __init__(self, root: str | None) -> None:
        self.root = root or DEFAULT_ROOT

    def dir(self, cid: str) -> str:
        valid_id(cid)
        return os.path.join(self.root, cid)

    def fifo(self, cid: str) -> str:
        return os.path.join(self.dir(cid), "exec.fifo")

    def paused_marker(self, cid: str) -> str:
        """Present while ``pause`` has frozen the container's cgroup (until ``resume``)."""
        return os.path.join(self.dir(cid), "paused")

    def reserve(self, cid: str) -> str:
        """Create the container's directory; fails if the id is taken."""
        os.makedirs(self.root, mode=0o711, exist_ok=True)
        d = self.dir(cid)
        try:
            os.mkdir(d, 0o711)
        except FileExistsError:
            raise StateError(f"container {cid!r} already exists (state in {d})") from None
        return d

    def save(self, cid: str, record: dict) -> None:
        path = os.path.join(self.dir(cid), "state.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(jsonlite.dumps(record))
        os.replace(tmp, path)

    def load(self, cid: str) -> dict:
        path = os.path.join(self.dir(cid), "state.json")
        try:
            with open(path, "rb") as f:
                return jsonlite.loads(f.read())  # type: ignore[return-value]
        except FileNotFoundError:
            raise StateError(f"container {cid!r} does not exist") from None

    def ids(self) -> list[str]:
        try:
            return sorted(n for n in os.listdir(self.root)
                          if os.path.exists(os.path.join(self.root, n, "state.json")))
        except FileNotFoundError:
            return []

    def remove(self, cid: str) -> None:
        d = self.dir(cid)
        for n in os.listdir(d) if os.path.isdir(d) else ():
            os.unlink(os.path.join(d, n))
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass


def proc_start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks); None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    rest = data[data.rindex(b")") + 2:].split()
    if rest[0] in (b"Z", b"X"):
        return None
    return int(rest[19])


def status(store: Store, cid: str, record: dict) -> str:
    pid = record.get("pid") or 0
    if pid <= 0:
        return "stopped"
    st = proc_start_time(pid)
    if st is None or st != record.get("starttime"):
        return "stopped"
    if os.path.exists(store.fifo(cid)):
        return "created"
    if os.path.exists(store.paused_marker(cid)):
        return "paused"
    return "running"


def oci_state(store: Store, cid: str, record: dict, status_override: str | None = None) -> dict:
    """The runtime-spec state object."""
    st = status_override or status(store, cid, record)
    out = {"ociVersion": OCI_VERSION, "id": cid, "status": st,
           "bundle": record["bundle"], "annotations": record.get("annotations") or {}}
    if st != "stopped":
        out["pid"] = record["pid"]
    else:
        out["pid"] = 0
    # runc's extra fields that tools read
    out["rootfs"] = record.get("rootfs", "")
    out["created"] = record.get("created", "")
    return out
