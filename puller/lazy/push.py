"""The few Distribution push calls the converter needs (the puller itself only reads).

Blob upload is the monolithic POST-then-PUT of the distribution spec; manifests are PUT by
digest (and by tag for the referrers tag schema).
"""
from __future__ import annotations

import hashlib
import os
from urllib.parse import quote

from ..registry import RegistryClient


def file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(1 << 20):
            h.update(buf)
    return "sha256:" + h.hexdigest()


def blob_exists(client: RegistryClient, repo: str, digest: str) -> bool:
    resp = client.request("HEAD", f"{repo}/blobs/{digest}", ok=(200, 404), what=f"HEAD blob {repo}@{digest}")
    resp.close()
    return resp.status_code == 200


def push_blob(client: RegistryClient, repo: str, data: bytes | None = None, *, path: str | None = None) -> str:
    """Upload bytes or a file as a blob unless the registry has it; its digest."""
    if path is not None:
        digest = file_digest(path)
    else:
        digest = "sha256:" + hashlib.sha256(data or b"").hexdigest()
    if blob_exists(client, repo, digest):
        return digest
    resp = client.request("POST", f"{repo}/blobs/uploads/", ok=(202,), what=f"start upload to {repo}")
    resp.close()
    loc = resp.headers.get("Location", "")
    if loc.startswith("/"):
        loc = client.base[: -len("/v2/")] + loc
    sep = "&" if "?" in loc else "?"
    url = f"{loc}{sep}digest={quote(digest, safe='')}"
    headers = {"Content-Type": "application/octet-stream"}
    if path is not None:
        headers["Content-Length"] = str(os.path.getsize(path))
        with open(path, "rb") as f:
            resp = client.session.put(url, data=f, headers={**headers, **client._auth_header},
                                      timeout=(client.options.connect_timeout, 300), verify=client._verify)
    else:
        resp = client.session.put(url, data=data or b"", headers={**headers, **client._auth_header},
                                  timeout=(client.options.connect_timeout, 300), verify=client._verify)
    if resp.status_code != 201:
        raise OSError(f"upload of blob {digest} to {client.host}/{repo} failed: {resp.status_code} {resp.text[:200]}")
    return digest


def push_manifest(client: RegistryClient, repo: str, ref: str, body: bytes, media_type: str) -> str:
    """PUT a manifest under a digest or tag; its digest."""
    resp = client.session.put(f"{client.base}{repo}/manifests/{ref}", data=body,
                              headers={"Content-Type": media_type, **client._auth_header},
                              timeout=(client.options.connect_timeout, 60), verify=client._verify)
    if resp.status_code != 201:
        raise OSError(f"push of manifest {repo}:{ref} to {client.host} failed: {resp.status_code} {resp.text[:300]}")
    return "sha256:" + hashlib.sha256(body).hexdigest()
