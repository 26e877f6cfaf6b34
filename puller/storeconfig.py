"""The OCI runtime config of a pulled image, from what the store holds.

Used by the CLI (`python -m puller config`) and meant for the agent's PullImage
answer: the image config blob plus the image's /etc/passwd and /etc/group, read
from the stored layers as the merged rootfs would show them.
"""
from __future__ import annotations

import json
import os
import stat

from .errors import PullError
from .imageconfig import UserDB, runtime_config


def read_in_layers(store, chain_ids: list[str], relpath: str, limit: int = 1 << 20) -> str:
    """A regular file as the merged rootfs shows it: from the top-most layer that has it,
    honouring overlay whiteouts (0/0 char devices) and opaque directories.  Never follows
    a symlink, so a hostile image cannot make us read a host file."""
    parts = [p for p in relpath.split("/") if p]
    for chain_id in reversed(chain_ids):
        fd = os.open(os.fspath(store.layer_path(chain_id)), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        hidden_below = False
        try:
            for i, part in enumerate(parts):
                last = i == len(parts) - 1
                try:
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                except OSError:
                    break
                if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:
                    return ""  # whiteout: deleted in this layer
                if not last and not stat.S_ISDIR(st.st_mode):
                    return ""  # a non-directory here hides whatever lower layers have below it
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
                try:
                    nfd = os.open(part, flags, dir_fd=fd)
                except OSError:
                    break
                os.close(fd)
                fd = nfd
                if last:
                    if stat.S_ISREG(os.fstat(fd).st_mode):
                        return os.read(fd, limit).decode("utf-8", "replace")
                    return ""
                try:
                    hidden_below = hidden_below or os.getxattr(fd, "trusted.overlay.opaque") == b"y"
                except OSError:
                    pass
        finally:
            os.close(fd)
        if hidden_below:
            return ""
    return ""


def runtime_config_from_store(store, ref_or_digest: str, *, args: list[str] | None = None) -> dict:
    """config.json skeleton for a container of an image already in `store`."""
    record = store.get_image(ref_or_digest)
    if record is None:
        raise PullError(f"image {ref_or_digest!r} is not in the store; pull it first")
    with store.open_blob(record["config_digest"]) as f:
        image_config = json.load(f)
    chain = record["chain_ids"]
    db = UserDB(read_in_layers(store, chain, "etc/passwd"), read_in_layers(store, chain, "etc/group"))
    spec = runtime_config(image_config, userdb=db, args=args)
    spec["annotations"]["org.opencontainers.image.ref.name"] = record.get("ref", ref_or_digest)
    spec["annotations"]["io.sandbox-agent.image.manifest-digest"] = record["manifest_digest"]
    return spec
