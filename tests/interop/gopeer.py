"""Build (once, cached) and run the Go ttRPC peer in ttrpcpeer/, which uses containerd's own
Go ttrpc library from Debian's golang-github-containerd-ttrpc-dev, offline in GOPATH mode."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SRC = HERE / "ttrpcpeer"
GOCODE = Path("/usr/share/gocode")


class GoUnavailable(Exception):
    pass


def build() -> Path:
    """Path of the built peer binary; raise GoUnavailable with the reason if it cannot be built."""
    go = shutil.which("go")
    if go is None:
        raise GoUnavailable("the Go toolchain (Debian golang-go) is not installed")
    if not (GOCODE / "src/github.com/containerd/ttrpc").is_dir():
        raise GoUnavailable("containerd/ttrpc Go sources (Debian golang-github-containerd-ttrpc-dev) are not installed")
    digest = hashlib.sha256((SRC / "main.go").read_bytes()).hexdigest()[:16]
    cache = REPO / ".cache" / "go"
    out = cache / f"ttrpcpeer-{digest}"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as gopath:
        pkg = Path(gopath) / "src" / "ttrpcpeer"
        pkg.parent.mkdir(parents=True)
        shutil.copytree(SRC, pkg)
        env = dict(os.environ, GO111MODULE="off", GOPATH=f"{gopath}:{GOCODE}", GOFLAGS="",
                   GOCACHE=str(cache / "build-cache"), GOPROXY="off")
        tmp = out.with_suffix(".tmp")
        r = subprocess.run([go, "build", "-o", str(tmp), "."], cwd=pkg, env=env,
                           capture_output=True, text=True, timeout=600)
        if r.returncode != 0:
            raise GoUnavailable(f"go build of the ttrpc peer failed: {r.stderr.strip()[-2000:]}")
        tmp.rename(out)
    return out


def start_server(binary: Path, sock: str) -> subprocess.Popen:
    p = subprocess.Popen([str(binary), "server", "-addr", sock], stdout=subprocess.PIPE, text=True)
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise RuntimeError(f"go peer server did not start: {line!r}")
    return p
