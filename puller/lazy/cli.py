"""The lazy parts of `python -m puller` and `python -m puller.agentjob`, kept here so those
two entry points only gain a few lines each."""
from __future__ import annotations

import json
import sys

from ..pull import PullOptions


def pull_lazy_or_full(ref: str, store, options: PullOptions) -> dict:
    """Metadata only when the image has lazy metadata; else a full pull, saying so on stderr."""
    from ..pull import pull
    from .locate import pull_lazy
    record = pull_lazy(ref, store, options)
    if record is not None:
        return record
    print(f"puller: {ref} has no lazy metadata (run `python -m puller index {ref}`); "
          "falling back to a full pull", file=sys.stderr)
    return pull(ref, store, options).record()


def is_lazy(store, record: dict) -> bool:
    """True when the image must be served lazily: pulled lazily and its layers not unpacked."""
    return bool(record.get("lazy")) and not all(store.has_layer(c) for c in record.get("chain_ids", []))


def lazy_snapshot(store, record: dict, dest: str, snapshot_id: str | None, *, whole: bool = False,
                  prefetch: str | None = None, record_to: str | None = None):
    """The FUSE daemon is forked from this process: the CLI and the agent's job are
    single-threaded and exit right after, and a fork saves a second interpreter start (~0.2 s)."""
    from .mount import make_lazy_snapshot
    return make_lazy_snapshot(store, record["reference"], dest, snapshot_id=snapshot_id, whole=whole,
                              prefetch=prefetch, record=record_to, fork=True)


def remove_lazy_snapshot(store, snapshot_id: str) -> bool:
    """Remove it if `snapshot_id` is a lazy snapshot; False if it is not one."""
    from .mount import load_lazy_snapshot
    snap = load_lazy_snapshot(store, snapshot_id)
    if snap is None:
        return False
    snap.remove()
    return True


def runtime_config_lazy(store, record: dict, rootfs: str) -> dict:
    """The OCI config of a lazily pulled image, users and groups read from its mounted rootfs."""
    import os
    from ..imageconfig import UserDB, runtime_config
    with store.open_blob(record["config_digest"]) as f:
        image_config = json.load(f)

    def read(rel: str) -> str:
        try:
            fd = os.open(os.path.join(rootfs, rel), os.O_RDONLY | os.O_NOFOLLOW)
        except OSError:
            return ""
        with os.fdopen(fd, "rb") as fh:
            return fh.read(1 << 20).decode(errors="replace")

    spec = runtime_config(image_config, userdb=UserDB(read("etc/passwd"), read("etc/group")))
    spec["annotations"]["org.opencontainers.image.ref.name"] = record.get("ref", record["reference"])
    spec["annotations"]["io.sandbox-agent.image.manifest-digest"] = record["manifest_digest"]
    return spec


def add_index_parser(sub, add_registry_args) -> None:
    p = sub.add_parser("index", help="build lazy-pull metadata for an image and push it beside the image")
    p.add_argument("ref")
    p.add_argument("--chunk-size", type=int, default=1 << 20, help="bytes per chunk (default 1 MiB)")
    p.add_argument("--platform", help="os/arch[/variant]; default: this machine")
    p.add_argument("--prefetch", metavar="FILE",
                   help="paths (one a line) a container reads first, e.g. from `snapshot --record-access`: "
                        "carried in the metadata, fetched first by every lazy mount")
    add_registry_args(p)
    p.set_defaults(func=cmd_index)


def cmd_index(args) -> int:
    from ..__main__ import _registry_options
    from ..platform import Platform
    from .convert import index_image
    opts = PullOptions(platform=Platform.parse(args.platform) if args.platform else None,
                       registry=_registry_options(args))
    prefetch = None
    if args.prefetch:
        with open(args.prefetch) as f:
            prefetch = [line.strip() for line in f if line.strip()]
    print(json.dumps(index_image(args.ref, opts, chunk_size=args.chunk_size, prefetch=prefetch).record(),
                     sort_keys=True))
    return 0
