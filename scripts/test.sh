#!/usr/bin/env bash
# The test suite: sets itself up (venv; system tools for the ARM/SSH/browser tests when run as root), then the
# lint (ruff) and one pytest call over tests/ and every docstring example in edgefuse/ (pyproject: testpaths and
# --doctest-modules). Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not arm"`.
# The exit code is ruff's when the lint fails, else pytest's.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = "0" ] && [ -x .ci/system-deps.sh ]; then
  bash .ci/system-deps.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
.venv/bin/ruff check edgefuse tests benchmarks examples
exec .venv/bin/python -m pytest "$@"
