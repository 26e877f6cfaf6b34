#!/usr/bin/env bash
# Regenerates the Python modules of the agent API (agent/protos/*.proto) and of the ttRPC
# envelope (agent/ttrpc/ttrpc.proto).
#
#   scripts/gen-protos.sh            # writes agent/protos/*_pb2.py and *_pb2.pyi in the repo
#   scripts/gen-protos.sh OUT_DIR    # writes OUT_DIR/agent/protos/... instead (used by the
#                                    # reproducibility test; the repo is left untouched)
#
# Uses protoc bundled with grpcio-tools (pinned in pyproject's dev extra), so the output only
# depends on the .proto files and that pin: running it twice gives byte-identical files.
# Only message classes are generated, no gRPC stubs: the agent speaks ttRPC, and
# agent/protos/registry.py builds its method table from the service descriptors.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
out="${1:-$repo}"

if ! "$python" -c 'import grpc_tools.protoc' 2>/dev/null; then
    echo "gen-protos: grpc_tools is missing for $python (pip install 'grpcio-tools==1.71.0')" >&2
    exit 1
fi

# Another protoc writes different (still valid) code; say so rather than silently churn the files.
want="libprotoc 29.0"
have="$("$python" -m grpc_tools.protoc --version)"
if [ "$have" != "$want" ]; then
    echo "gen-protos: warning: $have, the checked-in files come from $want (grpcio-tools 1.71.0)" >&2
fi

mkdir -p "$out/agent/protos" "$out/agent/ttrpc"
out="$(cd "$out" && pwd)"  # relative OUT_DIR means relative to the caller, not the repo
# Relative proto paths with -I . are what end up in the descriptors
# ("agent/protos/agent.proto") and in the generated imports
# ("from agent.protos import oci_pb2"), so run from the repo root.
cd "$repo"
protos=(agent/protos/types.proto agent/protos/oci.proto agent/protos/csi.proto
        agent/protos/health.proto agent/protos/agent.proto
        agent/ttrpc/ttrpc.proto)
"$python" -m grpc_tools.protoc -I . \
    --python_out="$out" --pyi_out="$out" \
    "${protos[@]}"
