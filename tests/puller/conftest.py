"""Fixtures for the puller tests: real registries and an offline image builder.

`registry` is Debian's docker-registry on 127.0.0.1 (plain HTTP), `auth_registry`
the same with htpasswd (Basic) auth, `tls_registry` one with a test CA.  Images are
built from /bin/busybox with GNU tar and pushed with the small push client below
(or skopeo, where a test is about interoperability).
"""
from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

REGISTRY_BIN = "/usr/bin/docker-registry"
BUSYBOX = "/bin/busybox"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
OCI_LAYER = {"gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
             "zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
             "": "application/vnd.oci.image.layer.v1.tar"}
DOCKER_LAYER = {"gzip": "application/vnd.docker.image.rootfs.diff.tar.gzip",
                "": "application/vnd.docker.image.rootfs.diff.tar"}


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------- registry
@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    root: Path  # filesystem storage root
    proc: subprocess.Popen
    scheme: str = "http"
    auth: tuple[str, str] | None = None
    verify: bool | str = True
    tokens: object = None  # the TokenServer of a token-auth registry

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    def blob_file(self, digest: str) -> Path:
        hexpart = digest.split(":", 1)[1]
        return self.root / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def start_registry(tmp: Path, *, htpasswd: tuple[str, str] | None = None,
                   tls: tuple[Path, Path, Path] | None = None,
                   token: tuple[str, str, str, Path] | None = None, blob_cache: str = "") -> Registry:
    """`tls` is (certificate, key, CA that signed it).  `blob_cache`: the registry's blob
    descriptor cache, off by default (tests change blobs under it); "inmemory" is what
    Debian's stock configuration uses."""
    if not os.path.exists(REGISTRY_BIN):
        pytest.skip("Debian's docker-registry is not installed")
    port = free_port()
    storage = tmp / "storage"
    storage.mkdir(parents=True)
    lines = [
        "version: 0.1",
        "log: {level: error, accesslog: {disabled: true}}",
        "storage:",
        f"  filesystem: {{rootdirectory: {storage}}}",
        "  delete: {enabled: true}",
        f"  cache: {{blobdescriptor: '{blob_cache}'}}",
        "http:",
        f"  addr: 127.0.0.1:{port}",
        f"  secret: test-{port}",
    ]
    if tls:
        lines += ["  tls:", f"    certificate: {tls[0]}", f"    key: {tls[1]}"]
    if htpasswd:
        pwfile = tmp / "htpasswd"
        out = subprocess.run(["htpasswd", "-Bbn", *htpasswd], check=True, capture_output=True, text=True).stdout
        pwfile.write_text(out)
        lines += ["auth:", "  htpasswd:", "    realm: test-realm", f"    path: {pwfile}"]
    if token:
        realm, service, issuer, bundle = token
        lines += ["auth:", "  token:", f"    realm: {realm}", f"    service: {service}",
                  f"    issuer: {issuer}", f"    rootcertbundle: {bundle}"]
    cfg = tmp / "config.yml"
    cfg.write_text("\n".join(lines) + "\n")
    log = open(tmp / "registry.log", "wb")
    proc = subprocess.Popen([REGISTRY_BIN, "serve", str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    log.close()
    reg = Registry(f"127.0.0.1:{port}", storage, proc, "https" if tls else "http", htpasswd,
                   str(tls[2]) if tls else True)
    deadline = time.monotonic() + 20
    while True:
        try:
            r = requests.get(f"{reg.url}/v2/", timeout=1, verify=reg.verify)  # explicit verify wins over env
            if r.status_code in (200, 401):
                return reg
        except requests.RequestException:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            reg.stop()
            raise RuntimeError(f"docker-registry did not start: {(tmp / 'registry.log').read_text()[-2000:]}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def registry(tmp_path_factory):
    reg = start_registry(tmp_path_factory.mktemp("registry"))
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def auth_registry(tmp_path_factory):
    reg = start_registry(tmp_path_factory.mktemp("authreg"), htpasswd=("alice", "s3cret"))
    yield reg
    reg.stop()


def make_ca_and_cert(tmp: Path) -> tuple[Path, Path, Path]:
    """A CA and a server certificate for 127.0.0.1, made with openssl."""
    ca_key, ca_crt = tmp / "ca.key", tmp / "ca.crt"
    key, csr, crt, ext = tmp / "srv.key", tmp / "srv.csr", tmp / "srv.crt", tmp / "ext.cnf"
    run = lambda *a: subprocess.run(a, check=True, capture_output=True)  # noqa: E731
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_crt,
        "-days", "2", "-subj", "/CN=puller test CA")
    run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run("openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
        "-out", crt, "-days", "2", "-extfile", ext)
    return ca_crt, crt, key


@pytest.fixture(scope="session")
def tls_registry(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tlsreg")
    ca, crt, key = make_ca_and_cert(tmp)
    reg = start_registry(tmp, tls=(crt, key, ca))
    yield reg
    reg.stop()


# ---------------------------------------------------------------- image building
def tar_dir(src: Path, *, xattrs: bool = False) -> bytes:
    """A reproducible tar of `src` made by GNU tar."""
    args = ["tar", "-C", str(src), "--sort=name", "--mtime=@0", "--owner=0", "--group=0",
            "--numeric-owner", "--format=posix", "--pax-option=delete=atime,delete=ctime"]
    if xattrs:
        args += ["--xattrs", "--xattrs-include=*"]
    return subprocess.run(args + ["-cf", "-", "."], check=True, capture_output=True).stdout


def compress(data: bytes, compression: str) -> bytes:
    if compression == "gzip":
        return gzip.compress(data, compresslevel=1, mtime=0)
    if compression == "zstd":
        import zstandard
        return zstandard.ZstdCompressor(level=3).compress(data)
    return data


def busybox_tree(root: Path) -> Path:
    (root / "bin").mkdir(parents=True)
    shutil.copy2(BUSYBOX, root / "bin/busybox")
    for applet in ("sh", "ls", "cat", "echo", "true", "id"):
        os.symlink("busybox", root / "bin" / applet)
    (root / "etc").mkdir()
    (root / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000::/home/user:/bin/sh\n")
    (root / "etc/group").write_text("root:x:0:\nuser:x:1000:\nwheel:x:10:user\n")
    (root / "tmp").mkdir()
    os.chmod(root / "tmp", 0o1777)
    return root


@dataclass
class Layer:
    tar: bytes
    compression: str = "gzip"
    blob: bytes = b""
    media_type: str = ""

    def __post_init__(self) -> None:
        if not self.blob:
            self.blob = compress(self.tar, self.compression)

    @property
    def diff_id(self) -> str:
        return sha256(self.tar)


@dataclass
class Pushed:
    repo: str
    tag: str
    digest: str
    manifest: bytes
    config: dict
    layers: list[Layer] = field(default_factory=list)
    descriptors: list[dict] = field(default_factory=list)


class Pusher:
    """Just enough of the Distribution push API to publish test images."""

    def __init__(self, reg: Registry) -> None:
        self.reg = reg
        self.session = requests.Session()
        if reg.auth:
            self.session.auth = reg.auth
        self.session.verify = reg.verify
        self.session.trust_env = False  # REQUESTS_CA_BUNDLE would override verify

    def _bearer(self, repo: str) -> None:
        tokens = getattr(self.reg, "tokens", None)
        if tokens is not None:
            token = tokens.sign("alice", [{"type": "repository", "name": repo, "actions": ["pull", "push"]}])
            self.session.headers["Authorization"] = f"Bearer {token}"

    def blob(self, repo: str, data: bytes) -> str:
        self._bearer(repo)
        digest = sha256(data)
        r = self.session.head(f"{self.reg.url}/v2/{repo}/blobs/{digest}", timeout=10)
        if r.status_code == 200:
            return digest
        r = self.session.post(f"{self.reg.url}/v2/{repo}/blobs/uploads/", timeout=10)
        assert r.status_code == 202, r.text
        loc = r.headers["Location"]
        if loc.startswith("/"):
            loc = self.reg.url + loc
        sep = "&" if "?" in loc else "?"
        r = self.session.put(f"{loc}{sep}digest={digest}", data=data,
                             headers={"Content-Type": "application/octet-stream"}, timeout=60)
        assert r.status_code == 201, r.text
        return digest

    def manifest(self, repo: str, ref: str, body: bytes, media_type: str) -> str:
        self._bearer(repo)
        r = self.session.put(f"{self.reg.url}/v2/{repo}/manifests/{ref}", data=body,
                             headers={"Content-Type": media_type}, timeout=10)
        assert r.status_code == 201, f"{r.status_code} {r.text}"
        return sha256(body)

    def image(self, repo: str, tag: str, layers: list[Layer], *, docker: bool = False,
              config: dict | None = None, platform: tuple[str, str, str] = ("linux", "amd64", ""),
              diff_ids: list[str] | None = None, omit_media_type: bool = False,
              push_tag: bool = True, extra: dict | None = None) -> Pushed:
        os_, arch, variant = platform
        cfg = {
            "architecture": arch, "os": os_,
            "config": config if config is not None else {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids if diff_ids is not None else [l.diff_id for l in layers]},
        }
        if variant:
            cfg["variant"] = variant
        cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
        cfg_type = DOCKER_CONFIG if docker else OCI_CONFIG
        self.blob(repo, cfg_bytes)
        descs = []
        for layer in layers:
            mtype = layer.media_type or (DOCKER_LAYER if docker else OCI_LAYER)[layer.compression]
            descs.append({"mediaType": mtype, "digest": self.blob(repo, layer.blob), "size": len(layer.blob)})
        mtype = DOCKER_MANIFEST if docker else OCI_MANIFEST
        doc: dict = {"schemaVersion": 2, "mediaType": mtype,
                     "config": {"mediaType": cfg_type, "digest": sha256(cfg_bytes), "size": len(cfg_bytes)},
                     "layers": descs}
        if omit_media_type:
            del doc["mediaType"]
        doc.update(extra or {})
        body = json.dumps(doc, indent=2).encode()
        digest = self.manifest(repo, tag if push_tag else sha256(body), body, mtype)
        return Pushed(repo, tag, digest, body, cfg, layers, descs)

    def index(self, repo: str, tag: str, images: list[tuple[Pushed, dict]], *, docker: bool = False) -> str:
        mtype = DOCKER_LIST if docker else OCI_INDEX
        entries = [{"mediaType": DOCKER_MANIFEST if docker else OCI_MANIFEST, "digest": p.digest,
                    "size": len(p.manifest), "platform": plat} for p, plat in images]
        body = json.dumps({"schemaVersion": 2, "mediaType": mtype, "manifests": entries}).encode()
        return self.manifest(repo, tag, body, mtype)


@pytest.fixture(scope="session")
def pusher(registry) -> Pusher:
    return Pusher(registry)


@pytest.fixture(scope="session")
def busybox_layer(tmp_path_factory) -> Layer:
    if not os.path.exists(BUSYBOX):
        pytest.skip("busybox-static is not installed")
    root = busybox_tree(tmp_path_factory.mktemp("bb") / "rootfs")
    return Layer(tar_dir(root), "gzip")


@pytest.fixture(scope="session")
def busybox_image(pusher, busybox_layer) -> Pushed:
    return pusher.image("test/busybox", "latest", [busybox_layer],
                        config={"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["PATH=/bin", "A=1"],
                                "WorkingDir": "/tmp", "User": "user",
                                "ExposedPorts": {"80/tcp": {}}, "Volumes": {"/data": {}},
                                "Labels": {"org.example.x": "y"}})


def unique_layer(tmp: Path, name: str, size: int = 200_000, compression: str = "gzip") -> Layer:
    """A layer with random content, so tampering with its blob hurts no other test."""
    root = tmp / f"u-{name}"
    (root / "data").mkdir(parents=True)
    (root / "data" / name).write_bytes(os.urandom(size))
    return Layer(tar_dir(root), compression)


# ---------------------------------------------------------------- fault proxy
class FaultProxy:
    """An HTTP proxy in front of a real registry that rewrites chosen answers.

    Only for faults a correct registry cannot be made to produce (a
    Content-Type that contradicts the manifest, a manifest served with content
    the registry would have refused on push).
    """

    def __init__(self, upstream: Registry) -> None:
        self.upstream = upstream
        # path -> {"body": bytes, "headers": {...}, "status": int, "content_length": int,
        #          "rate": bytes/s, "times": n (only the first n requests)}
        self.rules: dict[str, dict] = {}
        self.hits: dict[str, int] = {}
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a):  # keep test output clean
                pass

            def _forward(self, method: str) -> None:
                rule = proxy.rules.get(self.path.split("?")[0])
                proxy.hits[self.path.split("?")[0]] = proxy.hits.get(self.path.split("?")[0], 0) + 1
                if rule and "times" in rule:  # a transient fault: applies to the first N requests
                    rule["times"] -= 1
                    if rule["times"] < 0:
                        rule = None
                r = requests.request(method, upstream.url + self.path, timeout=10,
                                     headers={k: v for k, v in self.headers.items() if k.lower() != "host"})
                body = r.content
                headers = {k: v for k, v in r.headers.items()
                           if k.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding")}
                status = r.status_code
                if rule:
                    body = rule.get("body", body)
                    headers.update(rule.get("headers", {}))
                    status = rule.get("status", status)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(rule.get("content_length", len(body)) if rule else len(body)))
                if rule and "content_length" in rule:
                    self.send_header("Connection", "close")
                self.end_headers()
                if method != "HEAD":
                    rate = rule.get("rate") if rule else None
                    step = 16384
                    for off in range(0, len(body), step if rate else max(1, len(body))):
                        self.wfile.write(body[off:off + (step if rate else len(body))])
                        if rate:
                            time.sleep(step / rate)
                if rule and "content_length" in rule:
                    self.close_connection = True  # the rest of the announced body never comes

            def do_GET(self):
                self._forward("GET")

            def do_HEAD(self):
                self._forward("HEAD")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fault_proxy(registry):
    proxy = FaultProxy(registry)
    yield proxy
    proxy.close()


@pytest.fixture
def store(tmp_path):
    from puller.store import Store
    return Store(str(tmp_path / "store"))


@pytest.fixture(scope="session")
def kit():
    """The helpers above, for test modules (importlib mode cannot import conftest)."""
    import types
    return types.SimpleNamespace(
        Layer=Layer, Pusher=Pusher, FaultProxy=FaultProxy, sha256=sha256, tar_dir=tar_dir,
        compress=compress, busybox_tree=busybox_tree, unique_layer=unique_layer, free_port=free_port,
        start_registry=start_registry, OCI_MANIFEST=OCI_MANIFEST, OCI_INDEX=OCI_INDEX, OCI_CONFIG=OCI_CONFIG,
        DOCKER_MANIFEST=DOCKER_MANIFEST, DOCKER_LIST=DOCKER_LIST,
    )


def client_options(reg: Registry, **kw):
    from puller.registry import RegistryOptions
    kw.setdefault("timeout", 10)
    if reg.scheme == "http":
        kw.setdefault("plain_http", frozenset({reg.host}))
    return RegistryOptions(**kw)


@pytest.fixture(scope="session")
def options_for():
    return client_options


# ---------------------------------------------------------------- token auth
def _b64url(data: bytes) -> str:
    import base64
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """A Docker token-auth server (docker/distribution's spec/auth/token.md) for tests.

    alice:s3cret gets every action she asks for; anonymous callers get `pull` on
    repositories under `public/` only.  Tokens are RS256 JWTs signed with openssl.
    """

    def __init__(self, tmp: Path, service: str, issuer: str) -> None:
        self.key, self.cert = tmp / "token.key", tmp / "token.crt"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", self.key,
                        "-out", self.cert, "-days", "2", "-subj", "/CN=token issuer"], check=True, capture_output=True)
        der = subprocess.run(["openssl", "x509", "-in", self.cert, "-outform", "DER"], check=True,
                             capture_output=True).stdout
        import base64
        self.x5c = base64.b64encode(der).decode()
        self.service, self.issuer = service, issuer
        self.requests: list[dict] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                import base64 as b64
                from urllib.parse import parse_qs, urlparse
                q = parse_qs(urlparse(self.path).query)
                user = None
                auth = self.headers.get("Authorization", "")
                if auth.startswith("Basic "):
                    name, _, pw = b64.b64decode(auth[6:]).decode().partition(":")
                    if (name, pw) != ("alice", "s3cret"):
                        self.send_response(401)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    user = name
                server.requests.append({"user": user, "scope": q.get("scope", []), "service": q.get("service")})
                access = []
                for scope in q.get("scope", []):
                    kind, name, actions = scope.split(":", 2)
                    allowed = actions.split(",") if user else (["pull"] if name.startswith("public/") else [])
                    access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a in allowed]})
                body = json.dumps({"token": server.sign(user or "", access), "expires_in": 300}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.realm = f"http://127.0.0.1:{self.httpd.server_address[1]}/token"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def sign(self, subject: str, access: list[dict]) -> str:
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self.x5c]}
        claims = {"iss": self.issuer, "sub": subject, "aud": self.service, "exp": now + 300, "nbf": now - 10,
                  "iat": now, "jti": os.urandom(8).hex(), "access": access}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        sig = subprocess.run(["openssl", "dgst", "-sha256", "-sign", str(self.key)], input=signing_input.encode(),
                             check=True, capture_output=True).stdout
        return f"{signing_input}.{_b64url(sig)}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="session")
def token_registry(tmp_path_factory):
    """docker-registry with token (Bearer) auth, and its token server."""
    tmp = tmp_path_factory.mktemp("tokenreg")
    tokens = TokenServer(tmp, "test-registry", "test-issuer")
    reg = start_registry(tmp, token=(tokens.realm, "test-registry", "test-issuer", tokens.cert))
    reg.tokens = tokens
    yield reg
    reg.stop()
    tokens.close()
