"""Unit tests: manifest/index parsing, media types, config mapping (no registry)."""
from __future__ import annotations

import json

import pytest

from puller import mediatypes as mt
from puller.errors import ManifestError, PullError
from puller.imageconfig import UserDB, runtime_config
from puller.manifest import Index, Manifest, parse_manifest
from puller.digest import sha256_of

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64


def manifest_doc(**over) -> dict:
    doc = {"schemaVersion": 2, "mediaType": mt.OCI_MANIFEST,
           "config": {"mediaType": mt.OCI_CONFIG, "digest": D1, "size": 10},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2, "size": 20}]}
    doc.update(over)
    return {k: v for k, v in doc.items() if v is not None}


def body(doc) -> bytes:
    return json.dumps(doc).encode()


def test_oci_manifest_parses_and_digest_checked():
    b = body(manifest_doc())
    m = parse_manifest(b, mt.OCI_MANIFEST, source="t", expected_digest=sha256_of(b))
    assert isinstance(m, Manifest) and m.is_image
    assert m.digest == sha256_of(b) and m.layers[0].size == 20
    with pytest.raises(ManifestError, match="does not match digest"):
        parse_manifest(b + b" ", mt.OCI_MANIFEST, source="t", expected_digest=sha256_of(b))


def test_manifest_without_media_type_uses_content_type_or_shape():
    b = body(manifest_doc(mediaType=None))
    assert parse_manifest(b, mt.DOCKER_MANIFEST, source="t").media_type == mt.DOCKER_MANIFEST
    assert parse_manifest(b, "application/json", source="t").media_type == mt.OCI_MANIFEST
    idx = body({"schemaVersion": 2, "manifests": []})
    assert isinstance(parse_manifest(idx, "", source="t"), Index)


@pytest.mark.parametrize("declared,content_type", [
    (mt.OCI_MANIFEST, mt.DOCKER_MANIFEST),
    (mt.OCI_MANIFEST, mt.OCI_INDEX),
    (mt.DOCKER_MANIFEST, mt.OCI_MANIFEST),
])
def test_media_type_contradicting_content_type_refused(declared, content_type):
    with pytest.raises(ManifestError, match="contradicts Content-Type"):
        parse_manifest(body(manifest_doc(mediaType=declared)), content_type, source="t")


def test_shape_contradicting_type_refused():
    # Content-Type says index but the document is a manifest without mediaType.
    with pytest.raises(ManifestError, match="does not fit"):
        parse_manifest(body(manifest_doc(mediaType=None)), mt.OCI_INDEX, source="t")
    with pytest.raises(ManifestError, match="both"):
        parse_manifest(body({**manifest_doc(), "manifests": []}), mt.OCI_MANIFEST, source="t")
    with pytest.raises(ManifestError, match="not a manifest media type"):
        parse_manifest(body(manifest_doc()), "text/html", source="t")
    with pytest.raises(ManifestError, match="schema 1"):
        parse_manifest(body(manifest_doc(mediaType=mt.DOCKER_SCHEMA1[0])), "", source="t")
    with pytest.raises(ManifestError, match="schemaVersion"):
        parse_manifest(body(manifest_doc(schemaVersion=1)), "", source="t")


@pytest.mark.parametrize("bad", [
    "sha256:../../../../etc/passwd", "sha256:" + "A" * 64, "sha256:" + "a" * 10, "sha1:" + "a" * 40,
    "", None, 123, "sha256:" + "a" * 64 + "/../x",
])
def test_bad_digest_string_in_manifest_refused(bad):
    doc = manifest_doc()
    doc["layers"][0]["digest"] = bad
    with pytest.raises(ManifestError, match=r"layers\[0\] digest|digest"):
        parse_manifest(body(doc), mt.OCI_MANIFEST, source="t")


@pytest.mark.parametrize("size", [-1, "20", 1.5, True, None])
def test_bad_sizes_refused(size):
    doc = manifest_doc()
    doc["layers"][0]["size"] = size
    with pytest.raises(ManifestError, match="invalid size"):
        parse_manifest(body(doc), mt.OCI_MANIFEST, source="t")


def test_artifact_is_not_image():
    doc = manifest_doc(artifactType="application/vnd.example.sbom")
    m = parse_manifest(body(doc), mt.OCI_MANIFEST, source="t")
    assert not m.is_image and m.artifact_type == "application/vnd.example.sbom"
    doc = manifest_doc()
    doc["config"]["mediaType"] = "application/vnd.example.config"
    assert not parse_manifest(body(doc), mt.OCI_MANIFEST, source="t").is_image


def test_runtime_config_mapping():
    image = {"os": "linux", "architecture": "amd64", "config": {
        "Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["A=1"], "WorkingDir": "/srv",
        "User": "user", "ExposedPorts": {"80/tcp": {}, "53/udp": {}}, "Volumes": {"/data": {}},
        "Labels": {"org.example.x": "y"}, "StopSignal": "SIGQUIT"}}
    db = UserDB("root:x:0:0::/root:/bin/sh\nuser:x:1000:1001::/home:/bin/sh\n",
                "root:x:0:\nuser:x:1001:\nwheel:x:10:user\n")
    spec = runtime_config(image, userdb=db)
    p = spec["process"]
    assert p["args"] == ["/bin/sh", "-c", "echo hi"]
    assert p["env"][0].startswith("PATH=") and "A=1" in p["env"]
    assert p["cwd"] == "/srv"
    assert p["user"] == {"uid": 1000, "gid": 1001, "additionalGids": [10]}
    a = spec["annotations"]
    assert a["org.opencontainers.image.exposedPorts"] == "53/udp,80/tcp"
    assert a["org.opencontainers.image.volumes"] == "/data"
    assert a["org.opencontainers.image.stopSignal"] == "SIGQUIT"
    assert a["org.example.x"] == "y" and a["org.opencontainers.image.architecture"] == "amd64"
    assert runtime_config(image, userdb=db, args=["x"])["process"]["args"] == ["/bin/sh", "-c", "x"]


@pytest.mark.parametrize("user,expect", [
    ("", {"uid": 0, "gid": 0}), ("1000", {"uid": 1000, "gid": 1001, "additionalGids": [10]}),
    ("5:6", {"uid": 5, "gid": 6}), ("user:wheel", {"uid": 1000, "gid": 10}), ("123", {"uid": 123, "gid": 0}),
])
def test_user_forms(user, expect):
    db = UserDB("user:x:1000:1001::/:/bin/sh\n", "user:x:1001:\nwheel:x:10:user\n")
    assert runtime_config({"config": {"Cmd": ["x"], "User": user}}, userdb=db)["process"]["user"] == expect


def test_unknown_user_and_bad_config_refused():
    with pytest.raises(PullError, match="no user 'nobody'"):
        runtime_config({"config": {"Cmd": ["x"], "User": "nobody"}})
    with pytest.raises(PullError, match="neither Entrypoint nor Cmd"):
        runtime_config({"config": {}})
    with pytest.raises(PullError, match="WorkingDir"):
        runtime_config({"config": {"Cmd": ["x"], "WorkingDir": "rel"}})
