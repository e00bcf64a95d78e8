"""Small helpers shared by the benchmark scripts for the environment they record.

Example:
    >>> len(git_commit()) in (7, 40) or git_commit() == "unknown"
    True
"""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git_commit(root: Path = ROOT) -> str:
    """The checked-out commit of ``root`` ("unknown" outside a git checkout or without git)."""
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
