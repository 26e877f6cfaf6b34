"""scripts/gen-protos.sh reproduces the checked-in generated modules byte for byte."""

import filecmp
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTOS = REPO / "agent" / "protos"
SCRIPT = REPO / "scripts" / "gen-protos.sh"
STEMS = ["agent", "oci", "types", "health", "csi"]
GENERATED = [f"{s}_pb2.py" for s in STEMS] + [f"{s}_pb2.pyi" for s in STEMS]

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("grpc_tools") is None,
    reason="grpcio-tools (dev extra) is not installed; it provides protoc",
)


def _generate(out: Path) -> None:
    subprocess.run(
        ["bash", str(SCRIPT), str(out)], check=True, env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable}
    )


def test_checked_in_files_match_a_fresh_generation(tmp_path: Path) -> None:
    _generate(tmp_path)
    out = tmp_path / "agent" / "protos"
    assert sorted(p.name for p in out.iterdir()) == sorted(GENERATED)
    match, mismatch, errors = filecmp.cmpfiles(PROTOS, out, GENERATED, shallow=False)
    assert mismatch == [] and errors == [], (
        f"stale or missing generated files {mismatch + errors}: run scripts/gen-protos.sh"
    )


def test_generation_is_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    _generate(a)
    _generate(b)
    for name in GENERATED:
        assert (a / "agent/protos" / name).read_bytes() == (b / "agent/protos" / name).read_bytes(), name


def test_generated_code_imports_as_a_package() -> None:
    text = (PROTOS / "agent_pb2.py").read_text()
    assert "from agent.protos import oci_pb2" in text
    assert "from agent.protos import types_pb2" in text
    assert "# source: agent/protos/agent.proto" in text


def test_script_fails_clearly_without_grpc_tools(tmp_path: Path) -> None:
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 1\n")
    fake.chmod(0o755)
    res = subprocess.run(
        ["bash", str(SCRIPT), str(tmp_path / "out")],
        env={"PATH": "/usr/bin:/bin", "PYTHON": str(fake)},
        capture_output=True,
        text=True,
    )
    assert res.returncode != 0
    assert "grpc_tools is missing" in res.stderr
    assert not (tmp_path / "out").exists()


def test_ttrpc_envelope_matches_a_fresh_generation(tmp_path: Path) -> None:
    _generate(tmp_path)
    for name in ("ttrpc_pb2.py", "ttrpc_pb2.pyi"):
        fresh = (tmp_path / "agent" / "ttrpc" / name).read_bytes()
        assert fresh == (REPO / "agent" / "ttrpc" / name).read_bytes(), f"stale agent/ttrpc/{name}"
