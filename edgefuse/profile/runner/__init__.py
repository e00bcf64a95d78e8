"""The self-contained onnxruntime runner script, shipped as package data and copied to every target.

Example:
    >>> RUNNER_PATH.name
    'ort_runner.py'
"""

from __future__ import annotations

from pathlib import Path

RUNNER_PATH: Path = Path(__file__).with_name("ort_runner.py")

__all__ = ["RUNNER_PATH"]
