#!/usr/bin/env bash
# The main job: the CPU benchmark table (fastfuse vs the paper's probe), JSON in out/.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
mkdir -p out
python -m fastfuse bench --quick --json out/bench.json "$@"
