"""Unit tests: references, digests, credentials, challenges, platforms (no registry)."""
from __future__ import annotations

import base64
import json

import pytest

from puller.auth import Credentials, credentials_from_docker_config, parse_challenge
from puller.digest import chain_ids, parse_digest, sha256_of
from puller.errors import InvalidDigest, InvalidReference, PullError
from puller.platform import Platform
from puller.reference import parse_reference

HEX = "a" * 64


@pytest.mark.parametrize("text,registry,api,repo,tag,digest", [
    ("busybox", "docker.io", "registry-1.docker.io", "library/busybox", "latest", None),
    ("busybox:1.36", "docker.io", "registry-1.docker.io", "library/busybox", "1.36", None),
    ("docker.io/busybox", "docker.io", "registry-1.docker.io", "library/busybox", "latest", None),
    ("index.docker.io/user/img:t", "docker.io", "registry-1.docker.io", "user/img", "t", None),
    ("user/img", "docker.io", "registry-1.docker.io", "user/img", "latest", None),
    ("localhost/img", "localhost", "localhost", "img", "latest", None),
    ("localhost:5000/a/b/c:v1", "localhost:5000", "localhost:5000", "a/b/c", "v1", None),
    ("127.0.0.1:5000/x@sha256:" + HEX, "127.0.0.1:5000", "127.0.0.1:5000", "x", None, "sha256:" + HEX),
    ("quay.io/a/b:t@sha256:" + HEX, "quay.io", "quay.io", "a/b", "t", "sha256:" + HEX),
    ("[::1]:5000/img:tag", "[::1]:5000", "[::1]:5000", "img", "tag", None),
    ("ghcr.io/o/x__y.z-w:V_1.0-rc", "ghcr.io", "ghcr.io", "o/x__y.z-w", "V_1.0-rc", None),
])
def test_parse_reference(text, registry, api, repo, tag, digest):
    ref = parse_reference(text)
    assert (ref.registry, ref.api_host, ref.repository, ref.tag, ref.digest) == (registry, api, repo, tag, digest)
    assert ref.selector == (digest or tag)
    assert parse_reference(str(ref)) == ref  # the canonical form parses back to itself


@pytest.mark.parametrize("text", [
    "", "Busybox", "a b", "x/../y", "x//y", "-x", "x-", "a:b:c", "img:" + "t" * 129, "img:-tag",
    "img@sha256:abc", "img@sha256:" + "A" * 64, "img@md5:" + "0" * 32, "img@sha256:" + "g" * 64,
    "img@", "host:port/img", "/img", "img/",
])
def test_parse_reference_rejects(text):
    with pytest.raises(InvalidReference):
        parse_reference(text)


@pytest.mark.parametrize("value", [
    "sha256:" + "a" * 63, "sha256:" + "a" * 65, "sha256:" + "A" * 64, "sha256:../../../etc/passwd",
    "sha256:" + "a" * 62 + "/x", "sha512:" + "a" * 64, "foo:" + "a" * 64, "a" * 64, None, 5, "sha256:",
    "sha256:" + "a" * 63 + "\n",
])
def test_bad_digests_refused(value):
    with pytest.raises(InvalidDigest):
        parse_digest(value)


def test_good_digest_and_chain_ids():
    d = parse_digest("sha512:" + "0" * 128)
    assert (d.algorithm, d.hex) == ("sha512", "0" * 128)
    a, b, c = (sha256_of(x) for x in (b"a", b"b", b"c"))
    ids = chain_ids([a, b, c])
    assert ids[0] == a
    assert ids[1] == sha256_of(f"{a} {b}".encode())
    assert ids[2] == sha256_of(f"{ids[1]} {c}".encode())


def test_docker_config_credentials(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps({"auths": {
        "127.0.0.1:5000": {"auth": base64.b64encode(b"alice:pa:ss").decode()},
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"bob:x").decode()},
        "other.io": {"username": "carol", "password": "y"},
    }}))
    assert credentials_from_docker_config(cfg, "127.0.0.1:5000") == Credentials("alice", "pa:ss")
    assert credentials_from_docker_config(cfg, "registry-1.docker.io") == Credentials("bob", "x")
    assert credentials_from_docker_config(cfg, "other.io") == Credentials("carol", "y")
    assert credentials_from_docker_config(cfg, "nowhere.io") is None
    cfg.write_text(json.dumps({"auths": {"h": {"auth": "!!notbase64"}}}))
    with pytest.raises(PullError, match="not base64"):
        credentials_from_docker_config(cfg, "h")
    with pytest.raises(PullError, match="cannot read"):
        credentials_from_docker_config(tmp_path / "missing.json", "h")


def test_credentials_parse():
    assert Credentials.parse("u:p:q") == Credentials("u", "p:q")
    assert "p:q" not in repr(Credentials.parse("u:p:q"))
    with pytest.raises(PullError):
        Credentials.parse("nopassword")


def test_parse_challenge():
    scheme, params = parse_challenge(
        'Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push"')
    assert scheme == "bearer"
    assert params == {"realm": "https://auth.example/token", "service": "registry.example",
                      "scope": "repository:a/b:pull,push"}
    assert parse_challenge('Basic realm="test-realm"') == ("basic", {"realm": "test-realm"})
    assert parse_challenge('Bearer realm="x\\"y", error=invalid_token') == (
        "bearer", {"realm": 'x"y', "error": "invalid_token"})


def test_platform_matching():
    amd64 = Platform.parse("linux/amd64")
    assert amd64.matches({"os": "linux", "architecture": "amd64"})
    assert amd64.matches({"os": "linux", "architecture": "amd64", "variant": "v3"})
    assert not amd64.matches({"os": "windows", "architecture": "amd64"})
    assert not amd64.matches(None)
    v7 = Platform.parse("linux/arm/v7")
    assert v7.matches({"os": "linux", "architecture": "arm", "variant": "v7"})
    assert not v7.matches({"os": "linux", "architecture": "arm", "variant": "v6"})
    arm64 = Platform.parse("linux/arm64/v8")
    assert arm64.matches({"os": "linux", "architecture": "arm64"})
    assert str(v7) == "linux/arm/v7"
    host = Platform.host()
    assert host.os == "linux" and host.architecture
    with pytest.raises(PullError):
        Platform.parse("linux")
