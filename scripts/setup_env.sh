#!/usr/bin/env bash
# Creates (or reuses) the virtual environment and installs fastfuse with its test tools.
# Sourced by scripts/test.sh and scripts/demo.sh; FASTFUSE_VENV overrides the location.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTFUSE_VENV:-$ROOT/.venv}"
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null || PYTHON=python3
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements-dev.txt"
# --no-build-isolation: the extension must be built against the torch installed above.
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation -e "$ROOT"
export PATH="$VENV/bin:$PATH"
