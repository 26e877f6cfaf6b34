#!/usr/bin/env bash
# The whole test suite: installs what it needs (idempotent), then runs pytest as root.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
