#!/usr/bin/env bash
# The main job on the embedded default, offline: all-MiniLM-L6-v2 -> fuse -> save -> report what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/edgefuse fuse minilm runs/demo/minilm-fused --keep-ratio 0.5 --overwrite "$@"
