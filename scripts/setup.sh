#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 machine: apt packages, then a venv in .venv with the
# project installed editable plus its dev extras. Safe to run again: it only installs what is
# missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

mapfile -t PKGS < <(grep -vE '^\s*(#|$)' scripts/apt-packages.txt)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "setup: installing apt packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
stamp=.venv/.installed-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -e "$stamp" ]; then
    log=$(mktemp)
    if ! { .venv/bin/python -m pip install -q --upgrade pip &&
           .venv/bin/python -m pip install -q -e ".[dev]"; } >"$log" 2>&1; then
        cat "$log" >&2; rm -f "$log"
        echo "setup: pip install failed" >&2
        exit 1
    fi
    rm -f "$log"
    rm -f .venv/.installed-* && touch "$stamp"
fi
echo "setup: ready ($ROOT/.venv)"
