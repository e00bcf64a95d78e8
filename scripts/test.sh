#!/usr/bin/env bash
# The test suite: sets itself up (venv; system tools for the ARM/SSH/browser tests when run as root), then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -m "not arm"`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$(id -u)" = "0" ] && [ -x .ci/system-deps.sh ]; then
  bash .ci/system-deps.sh
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
