#!/usr/bin/env bash
# The main job: extract features of a small timm ViT on the bundled digits, sweep a grid of
# AttentiveFusion probes in lockstep beside the linear baselines, print the table and the time
# against the paper's probe trained one configuration at a time (both measured).
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
python -m fastfuse.sweep.demo --out out/demo "$@"
