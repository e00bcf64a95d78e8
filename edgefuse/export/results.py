"""Frozen, JSON-serialisable results of the export and quantize stages (units in the field names)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class OutputCheck:
    """One output of one validation case: ONNX Runtime against the reference (PyTorch or the fp32 graph)."""

    name: str
    shape: tuple[int, ...]
    max_abs_diff: float
    cosine: float
    passed: bool


@dataclass(frozen=True)
class ValidationCase:
    """One input case (e.g. ``batch 3 x seq 21, padded``) with its per-output figures."""

    label: str
    outputs: tuple[OutputCheck, ...]

    @property
    def passed(self) -> bool:
        return all(o.passed for o in self.outputs)


@dataclass(frozen=True)
class GreedyCheck:
    """Greedy generation through the exported graph against PyTorch."""

    tokens_compared: int
    match: bool
    torch_tokens: tuple[int, ...]
    onnx_tokens: tuple[int, ...]


@dataclass(frozen=True)
class ExportResult:
    """What :func:`edgefuse.export.api.export_onnx` wrote and how it validated."""

    out_dir: Path
    onnx_path: Path
    task: str
    model_type: str
    exporter: str
    opset: int
    fold_scales: str
    fused_mlps: int
    graph_size_bytes: int
    sha256: str
    atol: float
    rtol: float
    max_abs_diff: float
    min_cosine: float
    cases: tuple[ValidationCase, ...]
    greedy: GreedyCheck | None
    export_seconds: float
    validate_seconds: float
    # dense-routing export of sparse MoE blocks (edgefuse.export.moe): blocks and compute factor; None if no MoE
    moe_routing: dict[str, Any] | None = None
    # the onnxruntime Mobile conversion (ExportConfig.ort): files and its check against model.onnx
    ort: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["out_dir"], d["onnx_path"] = str(self.out_dir), str(self.onnx_path)
        return d


@dataclass(frozen=True)
class QuantizeResult:
    """What :func:`edgefuse.quantize.api.quantize_onnx` wrote, what it counted and how it compares with fp32."""

    src_path: Path
    onnx_path: Path
    mode: str
    preset: str
    settings: dict[str, Any]
    op_counts: dict[str, int]
    quantized_nodes: int
    kept_fp32: tuple[str, ...]
    size_bytes_fp32: int
    size_bytes: int
    cosine_mean: float
    cosine_min: float
    max_abs_diff: float
    samples: int
    accuracy_fp32: float | None = None
    accuracy: float | None = None
    auto_steps: tuple[dict[str, Any], ...] = field(default_factory=tuple)
    seconds: float = 0.0
    held_out: bool = False  # the check's texts were not calibrated on (quantize.evaluate.fit_and_check_texts)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["src_path"], d["onnx_path"] = str(self.src_path), str(self.onnx_path)
        return d
