#!/usr/bin/env bash
# The main job: a small complete probing study that downloads nothing. Two randomly initialised
# timm ViTs x two datasets (scikit-learn's digits, synthetic gratings): features extracted once
# per cell, the linear probes and AttentiveFusion swept in lockstep, the report printed and
# written (table, gain figure, attention heatmaps) into out/study_demo/report.
# Rerunning continues the study (finished units are kept). Extra arguments go to `study demo`.
set -euo pipefail
source "$(dirname "$0")/setup_env.sh"
cd "$ROOT"
python -m fastfuse study demo --out out/study_demo "$@"
