"""Command line: python -m puller {pull,snapshot,snapshot-rm,config,ls,gc,referrers} ..."""
from __future__ import annotations

import argparse
import json
import sys

from .auth import Credentials
from .errors import PullError
from .platform import Platform
from .registry import RegistryOptions


def _registry_options(args: argparse.Namespace) -> RegistryOptions:
    return RegistryOptions(
        plain_http=frozenset(args.plain_http or ()),
        ca_file=args.ca_file,
        credentials=Credentials.parse(args.creds) if args.creds else None,
        auth_file=args.auth_file,
        timeout=args.timeout,
    )


def _add_registry_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--plain-http", action="append", metavar="HOST:PORT",
                   help="talk plain HTTP to this registry (repeatable)")
    p.add_argument("--ca-file", help="PEM CA bundle to trust for the registry's TLS certificate")
    p.add_argument("--creds", metavar="USER:PASS", help="registry credentials")
    p.add_argument("--auth-file", metavar="CONFIG.JSON", help="docker config.json with credentials")
    p.add_argument("--timeout", type=float, default=30.0, help="total seconds per request incl. retries")


def _open_store(path: str):
    from .store import Store
    return Store(path)


def _image_record(store, ref: str) -> dict:
    record = store.get_image(ref)
    if record is None:
        raise PullError(f"image {ref!r} is not in the store; pull it first")
    return record


def cmd_pull(args: argparse.Namespace) -> int:
    from .cli_progress import Bars, JsonLines
    from .pull import PullOptions, pull
    progress = JsonLines() if args.json or not sys.stderr.isatty() else Bars()
    options = PullOptions(platform=Platform.parse(args.platform) if args.platform else None,
                          registry=_registry_options(args), parallel=args.parallel, progress=progress)
    if args.lazy:
        from .lazy.cli import pull_lazy_or_full
        record = pull_lazy_or_full(args.ref, _open_store(args.store), options)
    else:
        record = pull(args.ref, _open_store(args.store), options).record()
    if not isinstance(progress, JsonLines) or args.lazy:
        print(json.dumps(record, indent=2))
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    from .storeconfig import runtime_config_from_store
    print(json.dumps(runtime_config_from_store(_open_store(args.store), args.ref), indent=2))
    return 0


def cmd_snapshot(args: argparse.Namespace) -> int:
    from .snapshot import make_snapshot
    store = _open_store(args.store)
    record = _image_record(store, args.ref)
    from .lazy.cli import is_lazy, lazy_snapshot
    if is_lazy(store, record):
        lazy = lazy_snapshot(store, record, args.dest, args.container_id, whole=args.whole,
                             prefetch=args.prefetch, record_to=args.record_access)
        print(json.dumps({**lazy.record(), "image": record["manifest_digest"]}, sort_keys=True))
        return 0
    snap = make_snapshot(store, record["chain_ids"], args.dest, mode="copy" if args.copy else "auto",
                         snapshot_id=args.container_id)
    print(json.dumps({**snap.record(), "image": record["manifest_digest"]}, sort_keys=True))
    return 0


def cmd_snapshot_rm(args: argparse.Namespace) -> int:
    from .snapshot import load_snapshot
    from .lazy.cli import remove_lazy_snapshot
    if remove_lazy_snapshot(_open_store(args.store), args.id):
        return 0
    snap = load_snapshot(_open_store(args.store), args.id)
    if snap is None:
        raise PullError(f"no snapshot {args.id!r} in the store")
    snap.remove()
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    store = _open_store(args.store)
    for entry in store.list_images():
        print(json.dumps(entry, sort_keys=True))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    import dataclasses
    store = _open_store(args.store)
    out = dataclasses.asdict(store.gc())
    if args.chunk_cache_max is not None:
        from .lazy.cachegc import gc_chunks
        out["chunk_cache"] = dataclasses.asdict(gc_chunks(store, args.chunk_cache_max))
    print(json.dumps(out, sort_keys=True))
    return 0


def cmd_referrers(args: argparse.Namespace) -> int:
    from .pull import PullOptions, list_referrers
    found = list_referrers(args.ref, PullOptions(registry=_registry_options(args)), args.artifact_type)
    for d in found:
        print(json.dumps(d.to_json(), sort_keys=True))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m puller", description="OCI image puller")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pull", help="pull an image into the store")
    p.add_argument("ref")
    p.add_argument("--store", required=True)
    p.add_argument("--platform", help="os/arch[/variant]; default: this machine")
    p.add_argument("--parallel", type=int, default=3, help="layers downloaded at once")
    p.add_argument("--json", action="store_true", help="JSON lines progress even on a terminal")
    p.add_argument("--lazy", action="store_true", help="fetch only the lazy-pull metadata (full pull if none)")
    _add_registry_args(p)
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("snapshot", help="make a rootfs for a container from a pulled image")
    p.add_argument("ref")
    p.add_argument("--store", required=True)
    p.add_argument("--dest", required=True)
    p.add_argument("--container-id", help="name of the container the snapshot is for")
    p.add_argument("--copy", action="store_true", help="a plain copy instead of an overlay mount")
    p.add_argument("--whole", action="store_true", help="lazy image: fetch all chunks in the background")
    p.add_argument("--prefetch", metavar="FILE", help="lazy image: paths (one a line) to fetch first")
    p.add_argument("--record-access", metavar="FILE", help="lazy image: write the paths of files opened")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("snapshot-rm", help="unmount/delete a snapshot made by `snapshot`")
    p.add_argument("id", help="the snapshot id (--container-id, or the id `snapshot` printed)")
    p.add_argument("--store", required=True)
    p.set_defaults(func=cmd_snapshot_rm)

    p = sub.add_parser("config", help="print the OCI runtime config derived from the image")
    p.add_argument("ref")
    p.add_argument("--store", required=True)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("ls", help="list images in the store")
    p.add_argument("--store", required=True)
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("gc", help="remove content no image references")
    p.add_argument("--store", required=True)
    p.add_argument("--chunk-cache-max", type=int, metavar="BYTES",
                   help="also shrink the lazy-pull chunk cache to BYTES (chunks of mounted snapshots stay)")
    p.set_defaults(func=cmd_gc)

    from .lazy.cli import add_index_parser
    add_index_parser(sub, _add_registry_args)

    p = sub.add_parser("referrers", help="list manifests that refer to REF")
    p.add_argument("ref")
    p.add_argument("--artifact-type")
    _add_registry_args(p)
    p.set_defaults(func=cmd_referrers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except Exception as exc:
        # Errors of the store/unpacker (their own types) are reported the same way.
        if not isinstance(exc, PullError) and type(exc).__module__.split(".")[0] != "puller":
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
