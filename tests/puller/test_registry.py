"""Registry client and resolution against a real docker-registry (no store needed)."""
from __future__ import annotations

import base64
import json
import socket
import threading
import time

import pytest

from puller.auth import Credentials
from puller.errors import (ManifestError, NotFound, PlatformNotFound, RegistryError, RegistryUnavailable,
                           Unauthorized, VerificationError)
from puller.fetch import fetch_small_blob
from puller.platform import Platform
from puller.reference import parse_reference
from puller.registry import RegistryClient, RegistryOptions
from puller.resolve import fetch_manifest, referrers, resolve

pytestmark = pytest.mark.registry


def client(reg, options_for, **kw) -> RegistryClient:
    return RegistryClient(reg.host, options_for(reg, **kw))


def test_resolve_oci_image_by_tag_and_digest(registry, busybox_image, options_for):
    c = client(registry, options_for)
    r = resolve(c, parse_reference(f"{registry.host}/test/busybox:latest"))
    assert r.manifest.digest == busybox_image.digest
    assert r.index is None
    assert r.config["rootfs"]["diff_ids"] == [busybox_image.layers[0].diff_id]
    r2 = resolve(c, parse_reference(f"{registry.host}/test/busybox@{busybox_image.digest}"))
    assert r2.manifest.raw == busybox_image.manifest


def test_docker_v2s2_and_manifest_without_media_type(registry, pusher, busybox_layer, options_for):
    c = client(registry, options_for)
    d = pusher.image("test/docker", "v2s2", [busybox_layer], docker=True)
    r = resolve(c, parse_reference(f"{registry.host}/test/docker:v2s2"))
    assert r.manifest.media_type == "application/vnd.docker.distribution.manifest.v2+json"
    assert r.manifest.digest == d.digest
    nomt = pusher.image("test/nomt", "v1", [busybox_layer], omit_media_type=True)
    assert b"mediaType\": \"application/vnd.oci.image.manifest" not in nomt.manifest
    r = resolve(c, parse_reference(f"{registry.host}/test/nomt:v1"))
    assert r.manifest.media_type == "application/vnd.oci.image.manifest.v1+json"
    assert r.manifest.digest == nomt.digest


@pytest.mark.parametrize("docker", [False, True], ids=["oci-index", "docker-list"])
def test_multi_platform_selection(registry, pusher, kit, tmp_path, options_for, docker):
    imgs = {}
    plats = [("linux", "amd64", ""), ("linux", "arm64", "v8"), ("linux", "arm", "v7"), ("linux", "arm", "v6")]
    for os_, arch, var in plats:
        layer = kit.unique_layer(tmp_path, f"{arch}{var}", 1000)
        imgs[(arch, var)] = pusher.image("test/multi", f"{arch}{var}{docker}", [layer], docker=docker,
                                         platform=(os_, arch, var))
    entries = [(imgs[(a, v)], {"os": o, "architecture": a, **({"variant": v} if v else {})}) for o, a, v in plats]
    idx = pusher.index("test/multi", f"all{docker}", entries, docker=docker)
    c = client(registry, options_for)
    ref = parse_reference(f"{registry.host}/test/multi:all{docker}")
    for want, key in [("linux/amd64", ("amd64", "")), ("linux/arm64", ("arm64", "v8")),
                      ("linux/arm64/v8", ("arm64", "v8")), ("linux/arm/v6", ("arm", "v6")),
                      ("linux/arm/v7", ("arm", "v7"))]:
        r = resolve(c, ref, Platform.parse(want))
        assert r.manifest.digest == imgs[key].digest, want
        assert r.index.digest == idx and r.top_digest == idx
        assert r.config["architecture"] == key[0]
    # Default: the machine's own platform.
    host = Platform.host()
    if (host.architecture, host.variant) in imgs:
        assert resolve(c, ref).manifest.digest == imgs[(host.architecture, host.variant)].digest
    with pytest.raises(PlatformNotFound, match="linux/s390x.*it has: linux/amd64"):
        resolve(c, ref, Platform.parse("linux/s390x"))


def test_missing_tag_and_repo(registry, options_for):
    c = client(registry, options_for)
    with pytest.raises(NotFound, match="nope"):
        resolve(c, parse_reference(f"{registry.host}/test/busybox:nope"))
    with pytest.raises(NotFound):
        resolve(c, parse_reference(f"{registry.host}/no/such:latest"))


def test_artifact_and_referrers_tag_schema(registry, pusher, busybox_image, kit, options_for):
    """An SBOM-like artifact referring to the busybox image, found through the fallback tag."""
    c = client(registry, options_for)
    repo = "test/busybox"
    payload = b'{"sbom": "busybox", "packages": 1}'
    empty = b"{}"
    pusher.blob(repo, payload)
    pusher.blob(repo, empty)
    subject = {"mediaType": kit.OCI_MANIFEST, "digest": busybox_image.digest, "size": len(busybox_image.manifest)}
    art = {"schemaVersion": 2, "mediaType": kit.OCI_MANIFEST, "artifactType": "application/vnd.example.sbom+json",
           "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": kit.sha256(empty), "size": 2},
           "layers": [{"mediaType": "application/json", "digest": kit.sha256(payload), "size": len(payload)}],
           "subject": subject, "annotations": {"org.example.kind": "sbom"}}
    art_body = json.dumps(art).encode()
    art_digest = pusher.manifest(repo, kit.sha256(art_body), art_body, kit.OCI_MANIFEST)
    # Distribution 2.8 has no referrers API: publish the referrers tag as a client would.
    hexpart = busybox_image.digest.split(":")[1]
    tag_index = {"schemaVersion": 2, "mediaType": kit.OCI_INDEX, "manifests": [
        {"mediaType": kit.OCI_MANIFEST, "digest": art_digest, "size": len(art_body),
         "artifactType": art["artifactType"], "annotations": art["annotations"]}]}
    pusher.manifest(repo, f"sha256-{hexpart}", json.dumps(tag_index).encode(), kit.OCI_INDEX)

    found = referrers(c, repo, busybox_image.digest)
    assert [d.digest for d in found] == [art_digest]
    assert found[0].artifact_type == "application/vnd.example.sbom+json"
    assert referrers(c, repo, busybox_image.digest, "application/other") == []
    assert referrers(c, repo, "sha256:" + "0" * 64) == []

    doc = fetch_manifest(c, repo, art_digest)
    assert not doc.is_image and doc.subject.digest == busybox_image.digest
    with pytest.raises(ManifestError, match="artifact"):
        resolve(c, parse_reference(f"{registry.host}/{repo}@{art_digest}"))
    blob = fetch_small_blob(c, repo, doc.layers[0].digest, doc.layers[0].size, cap=1 << 20, what="sbom")
    assert blob == payload


def test_referrers_api_used_when_present(registry, busybox_image, fault_proxy, kit, options_for):
    """Registries with the referrers API answer directly; the proxy plays such a registry."""
    entry = {"mediaType": kit.OCI_MANIFEST, "digest": "sha256:" + "e" * 64, "size": 10,
             "artifactType": "application/vnd.example.sig"}
    fault_proxy.rules[f"/v2/test/busybox/referrers/{busybox_image.digest}"] = {
        "status": 200, "headers": {"Content-Type": kit.OCI_INDEX},
        "body": json.dumps({"schemaVersion": 2, "mediaType": kit.OCI_INDEX, "manifests": [entry]}).encode()}
    c = RegistryClient(fault_proxy.host, RegistryOptions(plain_http=frozenset({fault_proxy.host}), timeout=10))
    found = referrers(c, "test/busybox", busybox_image.digest)
    assert [d.digest for d in found] == [entry["digest"]]


def test_basic_auth_registry(auth_registry, kit, tmp_path, options_for):
    p = kit.Pusher(auth_registry)
    img = p.image("priv/img", "v1", [kit.unique_layer(tmp_path, "auth", 1000)])
    ref = parse_reference(f"{auth_registry.host}/priv/img:v1")
    with pytest.raises(Unauthorized, match="refused access"):
        resolve(client(auth_registry, options_for), ref)
    with pytest.raises(Unauthorized):
        resolve(client(auth_registry, options_for, credentials=Credentials("alice", "wrong")), ref)
    r = resolve(client(auth_registry, options_for, credentials=Credentials("alice", "s3cret")), ref)
    assert r.manifest.digest == img.digest
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {auth_registry.host: {"auth": base64.b64encode(b"alice:s3cret").decode()}}}))
    r = resolve(client(auth_registry, options_for, auth_file=str(cfg)), ref)
    assert r.manifest.digest == img.digest


def test_tls_with_custom_ca(tls_registry, kit, tmp_path, options_for):
    p = kit.Pusher(tls_registry)
    img = p.image("tls/img", "v1", [kit.unique_layer(tmp_path, "tls", 1000)])
    ref = parse_reference(f"{tls_registry.host}/tls/img:v1")
    c = client(tls_registry, options_for, ca_file=tls_registry.verify)
    r = resolve(c, ref)
    assert r.manifest.digest == img.digest
    assert c._oras_registry is None  # all on the lean path: TLS verified against the CA there too
    # Without the CA the certificate is refused at once, not retried.
    start = time.monotonic()
    with pytest.raises(RegistryError, match="TLS"):
        resolve(client(tls_registry, options_for), ref)
    assert time.monotonic() - start < 5


def test_dead_registry_fails_within_budget(kit):
    port = kit.free_port()  # nothing listens here
    c = RegistryClient(f"127.0.0.1:{port}", RegistryOptions(plain_http=frozenset({f"127.0.0.1:{port}"}), timeout=2))
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable, match=r"within 2s \(\d+ attempts"):
        resolve(c, parse_reference(f"127.0.0.1:{port}/x:y"))
    assert time.monotonic() - start < 4


def test_silent_registry_fails_within_budget():
    """A peer that accepts connections and never answers: read timeouts, bounded total."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    host = f"127.0.0.1:{srv.getsockname()[1]}"
    conns = []
    stop = threading.Event()

    def accept():
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        c = RegistryClient(host, RegistryOptions(plain_http=frozenset({host}), timeout=2, read_timeout=1))
        start = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="ReadTimeout|Timeout"):
            resolve(c, parse_reference(f"{host}/x:y"))
        assert time.monotonic() - start < 4
    finally:
        stop.set()
        t.join()
        for s in conns:
            s.close()
        srv.close()


def test_manifest_content_type_mismatch_refused(registry, busybox_image, fault_proxy, options_for):
    fault_proxy.rules["/v2/test/busybox/manifests/latest"] = {
        "headers": {"Content-Type": "application/vnd.docker.distribution.manifest.v2+json"}}
    c = RegistryClient(fault_proxy.host, RegistryOptions(plain_http=frozenset({fault_proxy.host}), timeout=10))
    with pytest.raises(ManifestError, match="contradicts Content-Type"):
        resolve(c, parse_reference(f"{fault_proxy.host}/test/busybox:latest"))


def test_manifest_digest_lie_refused(registry, busybox_image, fault_proxy, options_for):
    """Served bytes differ from the digest asked for / the Docker-Content-Digest header."""
    other = busybox_image.manifest.replace(b'"layers"', b'"layers" ', 1)
    fault_proxy.rules[f"/v2/test/busybox/manifests/{busybox_image.digest}"] = {"body": other}
    fault_proxy.rules["/v2/test/busybox/manifests/latest"] = {"body": other}
    c = RegistryClient(fault_proxy.host, RegistryOptions(plain_http=frozenset({fault_proxy.host}), timeout=10))
    with pytest.raises(ManifestError, match="does not match digest"):
        resolve(c, parse_reference(f"{fault_proxy.host}/test/busybox@{busybox_image.digest}"))
    with pytest.raises(ManifestError, match="Docker-Content-Digest"):
        resolve(c, parse_reference(f"{fault_proxy.host}/test/busybox:latest"))


def test_bad_digest_strings_from_registry_refused(registry, busybox_image, fault_proxy, kit):
    """A manifest naming a layer/config by a path-like digest never reaches a URL or path."""
    doc = json.loads(busybox_image.manifest)
    doc["config"]["digest"] = "sha256:../../../../etc/passwd"
    bad = json.dumps(doc).encode()
    fault_proxy.rules["/v2/test/busybox/manifests/bad"] = {
        "status": 200, "body": bad, "headers": {"Content-Type": kit.OCI_MANIFEST, "Docker-Content-Digest": kit.sha256(bad)}}
    c = RegistryClient(fault_proxy.host, RegistryOptions(plain_http=frozenset({fault_proxy.host}), timeout=10))
    with pytest.raises(ManifestError, match="config digest"):
        resolve(c, parse_reference(f"{fault_proxy.host}/test/busybox:bad"))
    fault_proxy.rules["/v2/test/busybox/manifests/latest"] = {"headers": {"Docker-Content-Digest": "sha256:/etc"}}
    with pytest.raises(ManifestError, match="Docker-Content-Digest"):
        resolve(c, parse_reference(f"{fault_proxy.host}/test/busybox:latest"))


def test_config_blob_lie_refused(registry, pusher, kit, tmp_path, options_for):
    """The registry's stored config blob is altered: the verifying reader refuses it."""
    img = pusher.image("test/cfglie", "v1", [kit.unique_layer(tmp_path, "cfglie", 1000)],
                       config={"Cmd": ["/x"], "Env": ["NONCE=cfglie"]})
    cfg_digest = json.loads(img.manifest)["config"]["digest"]
    f = registry.blob_file(cfg_digest)
    data = f.read_bytes()
    f.write_bytes(data.replace(b"cfglie", b"cfgLIE"))
    with pytest.raises(VerificationError, match="does not match descriptor digest"):
        resolve(client(registry, options_for), parse_reference(f"{registry.host}/test/cfglie:v1"))


def test_bearer_token_flow(token_registry, kit, tmp_path, options_for):
    """WWW-Authenticate: Bearer challenge -> token request (oras TokenAuth) -> retry with the token."""
    p = kit.Pusher(token_registry)
    priv = p.image("private/img", "v1", [kit.unique_layer(tmp_path, "tokpriv", 1000)])
    pub = p.image("public/img", "v1", [kit.unique_layer(tmp_path, "tokpub", 1000)])
    tokens = token_registry.tokens
    tokens.requests.clear()

    # Anonymous: a token is fetched without credentials; enough for public/, not for private/.
    anon = client(token_registry, options_for)
    assert resolve(anon, parse_reference(f"{token_registry.host}/public/img:v1")).manifest.digest == pub.digest
    assert tokens.requests and tokens.requests[0]["user"] is None
    assert tokens.requests[0]["scope"] == ["repository:public/img:pull"]
    with pytest.raises(Unauthorized):
        resolve(client(token_registry, options_for), parse_reference(f"{token_registry.host}/private/img:v1"))

    # With credentials: basic auth goes to the token server, the bearer token to the registry.
    tokens.requests.clear()
    authed = client(token_registry, options_for, credentials=Credentials("alice", "s3cret"))
    r = resolve(authed, parse_reference(f"{token_registry.host}/private/img:v1"))
    assert r.manifest.digest == priv.digest
    assert {q["user"] for q in tokens.requests} == {"alice"}
    assert all(q["service"] == ["test-registry"] for q in tokens.requests)

    with pytest.raises(Unauthorized):
        resolve(client(token_registry, options_for, credentials=Credentials("alice", "bad")),
                parse_reference(f"{token_registry.host}/private/img:v1"))


def test_transient_errors_are_retried(registry, busybox_image, fault_proxy):
    path = "/v2/test/busybox/manifests/latest"
    fault_proxy.rules[path] = {"status": 503, "body": b'{"errors":[{"code":"UNAVAILABLE"}]}', "times": 2}
    c = RegistryClient(fault_proxy.host, RegistryOptions(plain_http=frozenset({fault_proxy.host}), timeout=10))
    r = resolve(c, parse_reference(f"{fault_proxy.host}/test/busybox:latest"))
    assert r.manifest.digest == busybox_image.digest
    assert fault_proxy.hits[path] == 3
    # A persistent 503 ends within the budget with the registry's last answer in the message.
    fault_proxy.rules[path] = {"status": 503, "body": b'{"errors":[{"code":"UNAVAILABLE","message":"down"}]}'}
    c = RegistryClient(fault_proxy.host, RegistryOptions(plain_http=frozenset({fault_proxy.host}), timeout=1.5))
    start = time.monotonic()
    with pytest.raises(RegistryUnavailable, match="HTTP 503 UNAVAILABLE: down"):
        resolve(c, parse_reference(f"{fault_proxy.host}/test/busybox:latest"))
    assert time.monotonic() - start < 4
