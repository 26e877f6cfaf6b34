"""The puller as the agent runs it: ``python -m puller.agentjob pull|snapshot|unsnapshot``.

Init starts these as short-lived jobs for the PullImage RPC and prints nothing but one JSON
object on stdout (the job's answer) - errors go to stderr with a non-zero exit.

``pull`` is the helper container of the design: before it opens a connection it puts itself
in its own mount namespace where every mount is read-only except the image store, drops
every capability but the few that unpacking a rootfs needs (ownership, modes, device nodes,
overlay whiteouts and xattrs) and sets no_new_privs. A hostile registry or layer that
somehow beat the unpacker's checks can write nowhere but the store.

``snapshot`` runs in init's mount namespace (the containers must see the mount): it mounts
the pulled layers as the container's rootfs and answers the image's runtime config.
``unsnapshot`` undoes it.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys

CLONE_NEWNS = 0x00020000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_REMOUNT, MS_BIND, MS_REC, MS_SLAVE = 1, 2, 4, 32, 4096, 16384, 1 << 19
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24
# What writing an image's files needs: chown, chmod/utime on others' files, setuid bits,
# mknod (device nodes, 0/0 whiteouts), file capabilities, trusted.* xattrs (overlay opaque).
KEEP_CAPS = {0: "CAP_CHOWN", 1: "CAP_DAC_OVERRIDE", 3: "CAP_FOWNER", 4: "CAP_FSETID", 27: "CAP_MKNOD",
             31: "CAP_SETFCAP", 21: "CAP_SYS_ADMIN"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]


def _check(rc: int, what: str) -> None:
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"{what}: {os.strerror(e)}")


def _mount(src, dst, fstype, flags, data=None) -> None:
    enc = lambda v: v.encode() if isinstance(v, str) else v  # noqa: E731
    _check(_libc.mount(enc(src), enc(dst), enc(fstype), flags, enc(data)), f"mount {dst}")


def _mount_points() -> list[str]:
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4]
            out.append(mp.encode().decode("unicode_escape"))
    return out


def confine_to_store(store: str) -> None:
    """Own mount namespace, everything read-only but `store`, few capabilities, no_new_privs."""
    if os.geteuid() != 0:
        return  # an unprivileged puller (tests, development) is confined by its uid already
    store = os.path.realpath(store)
    _check(_libc.unshare(CLONE_NEWNS), "unshare(CLONE_NEWNS)")
    _mount(None, "/", None, MS_REC | MS_SLAVE)  # nothing we do propagates back to init
    _mount(store, store, None, MS_BIND | MS_REC)  # its own mount, so it can stay writable
    for mp in sorted(set(_mount_points()), key=len, reverse=True):
        if mp == store or mp.startswith(store + "/"):
            continue
        try:
            _mount(None, mp, None, MS_REMOUNT | MS_BIND | MS_RDONLY)
        except OSError:
            pass  # a mount that refuses a read-only remount (e.g. a locked one) stays as it is
    for cap in range(64):
        if cap in KEEP_CAPS:
            continue
        if _libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() == 22:
            break  # EINVAL: past the last capability the kernel knows
    _check(_libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")


def cmd_pull(a: argparse.Namespace) -> dict:
    from .auth import Credentials
    from .platform import Platform
    from .pull import PullOptions, pull
    from .registry import RegistryOptions
    from .store import Store

    os.makedirs(a.store, exist_ok=True)
    if not a.in_container:
        confine_to_store(a.store)
    creds = os.environ.pop("PULLER_CREDS", "")
    opts = PullOptions(
        platform=Platform.parse(a.platform) if a.platform else None,
        registry=RegistryOptions(plain_http=frozenset(a.plain_http or ()),
                                 credentials=Credentials.parse(creds) if creds else None,
                                 auth_file=a.auth_file, timeout=a.timeout))
    if a.lazy:
        from .lazy.cli import pull_lazy_or_full
        rec = pull_lazy_or_full(a.ref, Store(a.store), opts)
        return {"manifest_digest": rec["manifest_digest"], "chain_ids": rec["chain_ids"],
                "config_digest": rec["config_digest"], "reference": rec["reference"], "lazy": "lazy" in rec}
    img = pull(a.ref, Store(a.store), opts)
    return {"manifest_digest": img.manifest_digest, "chain_ids": img.chain_ids, "config_digest": img.config_digest,
            "reference": img.reference}


def cmd_snapshot(a: argparse.Namespace) -> dict:
    from .snapshot import make_snapshot
    from .store import Store
    from .storeconfig import runtime_config_from_store

    store = Store(a.store)
    record = store.get_image(a.ref)
    if record is None:
        raise SystemExit(f"error: image {a.ref!r} is not in the store")
    from .lazy.cli import is_lazy, lazy_snapshot, runtime_config_lazy
    if is_lazy(store, record):
        lazy = lazy_snapshot(store, record, a.dest, a.id, whole=a.lazy_whole)
        return {"rootfs": os.fspath(lazy.dest), "manifest_digest": record["manifest_digest"], "lazy": True,
                "config": runtime_config_lazy(store, record, os.fspath(lazy.dest))}
    snap = make_snapshot(store, record["chain_ids"], a.dest, snapshot_id=a.id)
    return {"rootfs": os.fspath(snap.dest),
            "manifest_digest": record["manifest_digest"],
            "config": runtime_config_from_store(store, a.ref)}


def cmd_unsnapshot(a: argparse.Namespace) -> dict:
    from .snapshot import load_snapshot
    from .store import Store

    from .lazy.cli import remove_lazy_snapshot
    if remove_lazy_snapshot(Store(a.store), a.id):
        return {"removed": True}
    snap = load_snapshot(Store(a.store), a.id)
    if snap is not None:
        snap.remove()
    return {"removed": snap is not None}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m puller.agentjob")
    sub = p.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("pull")
    q.add_argument("ref")
    q.add_argument("--store", required=True)
    q.add_argument("--platform")
    q.add_argument("--plain-http", action="append")
    q.add_argument("--auth-file")
    q.add_argument("--in-container", action="store_true",
                   help="already confined as the helper container: skip the self-confinement")
    q.add_argument("--timeout", type=float, default=20.0, help="bound of each registry request, retries included")
    q.add_argument("--lazy", action="store_true", help="fetch only lazy-pull metadata (full pull if there is none)")
    q = sub.add_parser("snapshot")
    q.add_argument("ref")
    q.add_argument("--store", required=True)
    q.add_argument("--dest", required=True)
    q.add_argument("--id", required=True)
    q.add_argument("--lazy", action="store_true", help="accepted for symmetry: a lazily pulled image is "
                   "always mounted lazily until it is pulled in full")
    q.add_argument("--lazy-whole", action="store_true", help="lazy image: fetch every chunk in the background")
    q = sub.add_parser("unsnapshot")
    q.add_argument("id")
    q.add_argument("--store", required=True)
    a = p.parse_args(argv)
    try:
        out = {"pull": cmd_pull, "snapshot": cmd_snapshot, "unsnapshot": cmd_unsnapshot}[a.cmd](a)
    except SystemExit:
        raise
    except Exception as exc:  # noqa: BLE001 - the job's answer is its message and exit code
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
