"""``python -m edgefuse`` runs the CLI (on the Python versions edgefuse supports: 3.10 and 3.11)."""

import sys

SUPPORTED = ((3, 10), (3, 11))  # pyproject's requires-python; torch and optimum-onnx are pinned for these

if sys.version_info[:2] not in SUPPORTED:
    found = ".".join(map(str, sys.version_info[:3]))
    print(f"edgefuse: error: Python {found} is not supported; use Python 3.10 or 3.11 (e.g. PYTHON=python3.11 bash "
          "scripts/setup.sh)", file=sys.stderr)
    raise SystemExit(2)

from edgefuse.cli import main  # noqa: E402  (after the version check, which must run on any Python)

raise SystemExit(main())
