"""Registry credentials: passed in, or looked up in a docker `config.json`.

Only static credentials are handled here; the challenge/token exchange itself is
done by oras-py's TokenAuth (see registry.py).  Credential helpers
(`credsStore`/`credHelpers`) run external programs and are deliberately not
supported inside the sandbox.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass, field

from .errors import PullError


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)

    @classmethod
    def parse(cls, text: str) -> "Credentials":
        """`user:pass` as given on a command line."""
        user, sep, password = text.partition(":")
        if not sep or not user:
            raise PullError("credentials must be given as USER:PASSWORD")
        return cls(user, password)

    def basic_token(self) -> str:
        return base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def _host_keys(host: str) -> list[str]:
    """Keys under which docker's config.json may store `host`'s credentials."""
    keys = [host, f"https://{host}", f"http://{host}", f"https://{host}/v1/", f"https://{host}/v2/"]
    if host in ("docker.io", "registry-1.docker.io", "index.docker.io"):
        keys = ["https://index.docker.io/v1/", "index.docker.io", "docker.io", "registry-1.docker.io"] + keys
    return keys


def credentials_from_docker_config(path: str | os.PathLike, host: str) -> Credentials | None:
    """Credentials for `host` in a docker config.json, or None if it has none."""
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise PullError(f"cannot read auth file {os.fspath(path)!r}: {exc}") from exc
    auths = cfg.get("auths") if isinstance(cfg, dict) else None
    if not isinstance(auths, dict):
        return None
    for key in _host_keys(host):
        entry = auths.get(key)
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("auth"), str) and entry["auth"]:
            try:
                decoded = base64.b64decode(entry["auth"], validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise PullError(f"auth file {os.fspath(path)!r}: entry {key!r} is not base64 user:pass") from exc
            user, sep, password = decoded.partition(":")
            if not sep:
                raise PullError(f"auth file {os.fspath(path)!r}: entry {key!r} has no ':' in its decoded auth")
            return Credentials(user, password)
        if isinstance(entry.get("username"), str) and isinstance(entry.get("password"), str):
            return Credentials(entry["username"], entry["password"])
    return None


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """Split a WWW-Authenticate value into (scheme, params); scheme lowercased."""
    scheme, _, rest = header.strip().partition(" ")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " ,":
            i += 1
        eq = rest.find("=", i)
        if eq < 0:
            break
        key = rest[i:eq].strip().lower()
        i = eq + 1
        if i < n and rest[i] == '"':
            i += 1
            value = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n:
                    i += 1
                value.append(rest[i])
                i += 1
            i += 1
            params[key] = "".join(value)
        else:
            end = rest.find(",", i)
            end = n if end < 0 else end
            params[key] = rest[i:end].strip()
            i = end
    return scheme.lower(), params
