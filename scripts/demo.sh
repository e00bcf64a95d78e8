#!/usr/bin/env bash
# The main job on the embedded default, offline: all-MiniLM-L6-v2 -> fuse -> recover (distillation on the
# corpus shipped in edgefuse/data) -> export fp32 + int8 (validated) -> profile -> HTML report.
# Extra arguments go to `edgefuse run`, e.g. `bash scripts/demo.sh --set fusion.keep_ratio=0.25`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/edgefuse run export_configs/default.yaml "$@"
