"""OCI runtime config (config.json) derived from an image config.

Follows the OCI image spec's conversion rules: Entrypoint+Cmd -> process.args,
Env -> process.env, WorkingDir -> process.cwd, User -> process.user,
ExposedPorts/StopSignal/os/architecture -> the `org.opencontainers.image.*`
annotations, Labels -> annotations.  Volumes have no runtime-spec field; they
go into the `org.opencontainers.image.volumes` annotation for the agent.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import PullError

DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class UserDB:
    """The contents of the image's /etc/passwd and /etc/group (may be empty)."""

    passwd: str = ""
    group: str = ""

    def _rows(self, text: str) -> list[list[str]]:
        return [line.split(":") for line in text.splitlines() if line and not line.startswith("#")]

    def user(self, name: str) -> tuple[int, int] | None:
        for row in self._rows(self.passwd):
            if len(row) >= 4 and row[0] == name and row[2].isdigit() and row[3].isdigit():
                return int(row[2]), int(row[3])
        return None

    def uid_name(self, uid: int) -> str | None:
        for row in self._rows(self.passwd):
            if len(row) >= 3 and row[2] == str(uid):
                return row[0]
        return None

    def group_id(self, name: str) -> int | None:
        for row in self._rows(self.group):
            if len(row) >= 3 and row[0] == name and row[2].isdigit():
                return int(row[2])
        return None

    def supplementary(self, user_name: str | None, primary: int) -> list[int]:
        if not user_name:
            return []
        gids = []
        for row in self._rows(self.group):
            if len(row) >= 4 and row[2].isdigit() and user_name in row[3].split(","):
                gid = int(row[2])
                if gid != primary and gid not in gids:
                    gids.append(gid)
        return gids


def resolve_user(spec: str, db: UserDB) -> dict:
    """`user`, `uid`, `user:group`, `uid:gid` ... -> runtime-spec process.user."""
    if not spec:
        return {"uid": 0, "gid": 0}
    user_part, _, group_part = spec.partition(":")
    if user_part.isdigit():
        uid = int(user_part)
        found_name = db.uid_name(uid)
        entry = db.user(found_name) if found_name else None
        gid = entry[1] if entry else 0
    else:
        entry = db.user(user_part)
        if entry is None:
            raise PullError(f"image user {spec!r}: no user {user_part!r} in the image's /etc/passwd")
        uid, gid = entry
        found_name = user_part
    if group_part:
        if group_part.isdigit():
            gid = int(group_part)
        else:
            g = db.group_id(group_part)
            if g is None:
                raise PullError(f"image user {spec!r}: no group {group_part!r} in the image's /etc/group")
            gid = g
    out: dict = {"uid": uid, "gid": gid}
    extra = db.supplementary(found_name, gid) if not group_part else []
    if extra:
        out["additionalGids"] = extra
    return out


def runtime_config(image_config: dict, *, userdb: UserDB | None = None,
                   args: list[str] | None = None) -> dict:
    """A runtime-spec config.json skeleton for a container of this image."""
    cfg = image_config.get("config") or {}
    if not isinstance(cfg, dict):
        raise PullError("image config: 'config' is not an object")

    def strlist(key: str) -> list[str]:
        value = cfg.get(key) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise PullError(f"image config: {key} must be a list of strings, got {value!r:.80}")
        return value

    entrypoint, cmd, env = strlist("Entrypoint"), strlist("Cmd"), strlist("Env")
    process_args = entrypoint + (args if args is not None else cmd)
    if not process_args:
        raise PullError("image config has neither Entrypoint nor Cmd and no command was given")
    if not any(e.startswith("PATH=") for e in env):
        env = [DEFAULT_PATH] + env
    cwd = cfg.get("WorkingDir") or "/"
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise PullError(f"image config: WorkingDir {cwd!r} is not an absolute path")
    user = cfg.get("User") or ""
    if not isinstance(user, str):
        raise PullError("image config: User is not a string")

    annotations: dict[str, str] = {}
    labels = cfg.get("Labels") or {}
    if isinstance(labels, dict):
        annotations.update({str(k): str(v) for k, v in labels.items()})
    ports = cfg.get("ExposedPorts") or {}
    if isinstance(ports, dict) and ports:
        annotations["org.opencontainers.image.exposedPorts"] = ",".join(sorted(ports))
    volumes = cfg.get("Volumes") or {}
    if isinstance(volumes, dict) and volumes:
        annotations["org.opencontainers.image.volumes"] = ",".join(sorted(volumes))
    if isinstance(cfg.get("StopSignal"), str):
        annotations["org.opencontainers.image.stopSignal"] = cfg["StopSignal"]
    for key in ("os", "architecture", "variant", "author", "created"):
        if isinstance(image_config.get(key), str) and image_config[key]:
            annotations[f"org.opencontainers.image.{key}"] = image_config[key]

    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": resolve_user(user, userdb or UserDB()),
            "args": process_args,
            "env": env,
            "cwd": cwd,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": "",
        "annotations": annotations,
    }
