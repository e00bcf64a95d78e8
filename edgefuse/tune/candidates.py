"""The default candidate set, and building one candidate graph (optimizer fusions, then int8) into a work folder.

Example:
    >>> [c.name for c in default_candidates("bert")][:3]
    ['fp32', 'int8', 'int8-noskipfusion']
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefuse.config.tune import CandidateConfig, SessionSpec

NO_SKIP_FUSION = SessionSpec(disabled_optimizers=["SkipLayerNormFusion"])
# the optimizer's fusions without the SkipLayerNormalization ones (measured slower on x86 with AVX-512 VNNI)
NO_SKIP = ["skip_layer_norm", "bias_skip_layer_norm"]


def default_candidates(ort_type: str | None, task: str = "feature-extraction") -> list[CandidateConfig]:
    """A small set that covers what a user could reach by hand: fp32; int8 per-channel with and without
    onnxruntime's SkipLayerNormFusion; the optimizer's fusions + int8 with and without SkipLayerNormalization;
    per-tensor int8; static QDQ int8 for encoders. ``ort_type`` None (no optimizer class for the architecture)
    leaves out the fused candidates."""
    out = [
        CandidateConfig(name="fp32", quantize="fp32"),
        CandidateConfig(name="int8"),
        CandidateConfig(name="int8-noskipfusion", session=NO_SKIP_FUSION),
    ]
    if ort_type is not None:
        out += [
            CandidateConfig(name="opt-int8", fusions="default"),
            CandidateConfig(name="opt-noskip-int8-noskipfusion", fusions="default", disable_fusions=NO_SKIP,
                            session=NO_SKIP_FUSION),
        ]
    out.append(CandidateConfig(name="int8-per-tensor-noskipfusion", per_channel=False, session=NO_SKIP_FUSION))
    if task != "causal-lm":
        out.append(CandidateConfig(name="qdq-int8", quantize="static", session=NO_SKIP_FUSION))
    return out


def op_types_for(cand: CandidateConfig) -> list[str]:
    """The operator types int8 quantizes for a candidate (its own list, else the default for its fusions)."""
    if cand.op_types is not None:
        return list(cand.op_types)
    fused = cand.fusion_list()
    ops = ["MatMul", "Gather"]
    if "attention" in fused:
        ops.append("Attention")
    if "embed_layer_norm" in fused:
        ops.append("EmbedLayerNormalization")
    return ops


def build(
    cand: CandidateConfig, src: Path, work: Path, *, ort_type: str | None, heads: int, hidden: int,
    feeds: Sequence[dict[str, np.ndarray]], optimized: dict[tuple[str, ...], Path],
) -> tuple[Path, dict[str, Any]]:
    """Build ``cand``'s graph in ``work`` (fp32 without fusions is ``src`` itself); returns (graph, settings).

    ``optimized`` caches the optimizer's output per fusion set, shared by the candidates that use it.

    Raises:
        UnsupportedArchitectureError: fusions asked for an architecture the optimizer does not cover.
        QuantizationError: the int8 graph quantized no MatMul.
    """
    import onnx

    from edgefuse.config.quantize import QuantizeConfig
    from edgefuse.errors import QuantizationError, UnsupportedArchitectureError
    from edgefuse.quantize import evaluate as qe
    from edgefuse.quantize.modes import get_mode
    from edgefuse.quantize.presets import resolve_preset

    fusions = cand.fusion_list()
    settings: dict[str, Any] = {"fusions": list(fusions), "quantize": cand.quantize}
    graph = src
    if cand.fusions != "none":
        if ort_type is None:
            raise UnsupportedArchitectureError(f"candidate {cand.name!r} asks for fusions, which do not cover this "
                                               "architecture")
        if fusions not in optimized:
            from edgefuse.optimize.api import run_optimizer

            path = work / f"opt-{len(optimized)}.onnx"
            settings["fused_ops"] = run_optimizer(src, path, ort_type=ort_type, heads=heads, hidden=hidden,
                                                  fusions=fusions, opt_level=0)
            optimized[fusions] = path
        graph = optimized[fusions]
    if cand.quantize == "fp32":
        return graph, settings
    qcfg = QuantizeConfig(mode=cand.quantize, per_channel=cand.per_channel, op_types=op_types_for(cand))
    preset = resolve_preset("auto")
    dst = work / f"{cand.name}.onnx"
    import logging

    logging.disable(logging.WARNING)  # onnxruntime's quantizer logs a pre-processing hint on the root logger
    mode = get_mode(cand.quantize)  # the one table of quantization modes: backend and quantized-node count
    try:
        settings.update(mode.backend(graph, dst, qcfg, preset, [], feeds, []))
    finally:
        logging.disable(logging.NOTSET)
    model = onnx.load(str(dst), load_external_data=False)
    counts = qe.op_counts(model)
    n = mode.count_quantized(model)
    n += counts.get("QAttention", 0)
    if n == 0:
        raise QuantizationError(f"candidate {cand.name!r}: {cand.quantize} quantization quantized no MatMul")
    settings.update({"preset": preset.name, "quantized_nodes": n,
                     "op_counts": {k: v for k, v in sorted(counts.items()) if k in KEY_OPS}})
    return dst, settings


# operators worth showing in the report (what the fusions and the quantizer produced)
KEY_OPS = frozenset({
    "MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention", "Attention", "QEmbedLayerNormalization",
    "EmbedLayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "LayerNormalization",
    "BiasGelu", "FastGelu", "Gelu", "RotaryEmbedding", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
})
