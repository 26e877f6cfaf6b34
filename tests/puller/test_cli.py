"""`python -m puller ...` as a user runs it, against the real registry."""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.registry, pytest.mark.root]
REPO_ROOT = Path(__file__).resolve().parents[2]


def cli(*args, check=True, timeout=120) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "puller", *map(str, args)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"puller {args} failed ({proc.returncode}): {proc.stderr}")
    return proc


def test_pull_config_snapshot_ls_gc(registry, busybox_image, pusher, kit, tmp_path):
    store = tmp_path / "store"
    ref = f"{registry.host}/test/busybox:latest"
    out = cli("pull", ref, "--store", store, "--plain-http", registry.host, "--json")
    events = [json.loads(line) for line in out.stdout.splitlines()]
    assert events[0]["event"] == "resolved" and events[0]["manifest"] == busybox_image.digest
    assert any(e["event"] == "layer" and e["status"] == "done" for e in events)
    assert events[-1]["event"] == "done"

    spec = json.loads(cli("config", ref, "--store", store).stdout)
    assert spec["process"]["args"] == ["/bin/sh", "-c", "echo hi"]
    assert spec["process"]["cwd"] == "/tmp"
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10]}
    assert "A=1" in spec["process"]["env"]
    assert spec["annotations"]["org.opencontainers.image.exposedPorts"] == "80/tcp"
    assert spec["annotations"]["org.opencontainers.image.volumes"] == "/data"
    assert spec["annotations"]["org.example.x"] == "y"

    dest = tmp_path / "rootfs"
    snap = json.loads(cli("snapshot", ref, "--store", store, "--dest", dest, "--copy",
                          "--container-id", "c1").stdout)
    assert snap["mode"] == "copy" and snap["id"] == "c1"
    assert (dest / "bin/busybox").read_bytes() == Path("/bin/busybox").read_bytes()

    # The default snapshot is an overlay mount of the shared layers; snapshot-rm undoes it.
    over = tmp_path / "overlay-rootfs"
    snap2 = json.loads(cli("snapshot", ref, "--store", store, "--dest", over, "--container-id", "c2").stdout)
    assert snap2["mode"] == "overlay" and os.path.ismount(over)
    assert (over / "bin/busybox").stat().st_size == Path("/bin/busybox").stat().st_size
    (over / "tmp/written").write_text("upper")  # writable: goes to the snapshot's upper dir
    cli("snapshot-rm", "c2", "--store", store)
    assert not os.path.ismount(over) and not over.exists()
    assert not (store / "layers" / snap["chain_ids"][0].split(":")[1] / "tmp/written").exists()
    cli("snapshot-rm", "c1", "--store", store)
    assert not dest.exists()
    assert cli("snapshot-rm", "c1", "--store", store, check=False).returncode == 1

    listed = [json.loads(l) for l in cli("ls", "--store", store).stdout.splitlines()]
    assert [r["manifest_digest"] for r in listed] == [busybox_image.digest]

    # A second image, then forget it: gc removes exactly its layer.
    other = pusher.image("test/gc", "v1", [kit.unique_layer(tmp_path, "gc", 3000)])
    cli("pull", f"{registry.host}/test/gc:v1", "--store", store, "--plain-http", registry.host, "--json")
    from puller.store import Store
    s = Store(store)
    assert s.remove_image(f"{registry.host}/test/gc:v1")
    stats = json.loads(cli("gc", "--store", store).stdout)
    assert stats["layers_removed"] == 1 and stats["layers_kept"] == 1
    assert not s.has_blob(other.digest) and s.has_blob(busybox_image.digest)


def test_platform_option(registry, pusher, kit, tmp_path):
    a = pusher.image("test/cliplat", "amd", [kit.unique_layer(tmp_path, "pa", 1000)], platform=("linux", "amd64", ""))
    b = pusher.image("test/cliplat", "arm", [kit.unique_layer(tmp_path, "pb", 1000)], platform=("linux", "arm64", "v8"))
    pusher.index("test/cliplat", "multi", [(a, {"os": "linux", "architecture": "amd64"}),
                                           (b, {"os": "linux", "architecture": "arm64", "variant": "v8"})])
    store = tmp_path / "store"
    cli("pull", f"{registry.host}/test/cliplat:multi", "--store", store, "--plain-http", registry.host,
        "--platform", "linux/arm64", "--json")
    from puller.store import Store
    rec = Store(store).get_image(f"{registry.host}/test/cliplat:multi")
    assert rec["manifest_digest"] == b.digest and rec["platform"] == "linux/arm64/v8"
    bad = cli("pull", f"{registry.host}/test/cliplat:multi", "--store", store, "--plain-http", registry.host,
              "--platform", "linux/riscv64", check=False)
    assert bad.returncode == 1 and "no manifest for linux/riscv64" in bad.stderr


def test_credentials_options(auth_registry, kit, tmp_path):
    p = kit.Pusher(auth_registry)
    pushed = p.image("priv/cli", "v1", [kit.unique_layer(tmp_path, "privcli", 1000)])
    ref = f"{auth_registry.host}/priv/cli:v1"
    store = tmp_path / "store"
    denied = cli("pull", ref, "--store", store, "--plain-http", auth_registry.host, check=False)
    assert denied.returncode == 1 and "refused access (401)" in denied.stderr
    cli("pull", ref, "--store", store, "--plain-http", auth_registry.host, "--creds", "alice:s3cret", "--json")
    auth = tmp_path / "config.json"
    auth.write_text(json.dumps({"auths": {auth_registry.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    store2 = tmp_path / "store2"
    cli("pull", ref, "--store", store2, "--plain-http", auth_registry.host, "--auth-file", auth, "--json")
    from puller.store import Store
    assert Store(store2).get_image(ref)["manifest_digest"] == pushed.digest


def test_dead_registry_cli_fails_fast(kit, tmp_path):
    host = f"127.0.0.1:{kit.free_port()}"
    start = time.monotonic()
    out = cli("pull", f"{host}/x:y", "--store", tmp_path / "s", "--plain-http", host, "--timeout", "2", check=False)
    assert out.returncode == 1 and "no usable answer within 2s" in out.stderr
    assert time.monotonic() - start < 6


def test_referrers_command(registry, pusher, kit, tmp_path):
    img = pusher.image("test/clirefs", "v1", [kit.unique_layer(tmp_path, "refs", 1000)])
    hexpart = img.digest.split(":")[1]
    entry = {"mediaType": kit.OCI_MANIFEST, "digest": img.digest, "size": len(img.manifest),
             "artifactType": "application/vnd.example.sig"}
    pusher.manifest("test/clirefs", f"sha256-{hexpart}",
                    json.dumps({"schemaVersion": 2, "mediaType": kit.OCI_INDEX, "manifests": [entry]}).encode(),
                    kit.OCI_INDEX)
    out = cli("referrers", f"{registry.host}/test/clirefs:v1", "--plain-http", registry.host)
    assert [json.loads(l)["artifactType"] for l in out.stdout.splitlines()] == ["application/vnd.example.sig"]
