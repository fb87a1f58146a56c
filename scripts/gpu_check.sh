#!/usr/bin/env bash
# One command for the first GPU: tests on CUDA (every Triton config forced in turn), CUDA-graph
# capture without host syncs, a > 2^31-element layer, the traffic model, the kernel benchmark
# and the sweep speed, all written to one directory (default gpu_check/<UTC time>).
# Without a CUDA GPU it says why and exits 0. See fastfuse/bench/gpu_check.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-$( [ -x "$ROOT/.venv/bin/python" ] && echo "$ROOT/.venv/bin/python" || echo python3 )}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m fastfuse.bench.gpu_check "$@"
