"""The frozen, JSON-serialisable result of :func:`edgefuse.optimize.api.optimize_onnx`."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from edgefuse.export.results import ValidationCase


@dataclass(frozen=True)
class OptimizeResult:
    """What was written, which fusions ran, what they produced, and how the graph compares with fp32."""

    src_path: Path
    onnx_path: Path
    model_type: str
    ort_model_type: str
    fusions: tuple[str, ...]
    op_counts: dict[str, int]
    op_counts_fp32: dict[str, int]
    fused_ops: dict[str, int]
    max_abs_diff: float
    min_cosine: float
    cases: tuple[ValidationCase, ...]
    size_bytes: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["src_path"], d["onnx_path"] = str(self.src_path), str(self.onnx_path)
        return d
