"""The table of quantization modes: one :class:`QuantMode` per name in ``QuantizeConfig.mode``.

Each entry says everything the quantize stage needs about a mode: the onnxruntime backend that writes the
graph, the variant name (what distinguishes the graph's bytes), whether it calibrates activation ranges on
data, how to count the MatMuls that really run quantized (the proof that quantization did something), and how
to simulate its error on one MatMul for the auto fp32 fallback (:mod:`edgefuse.quantize.auto`). The config's
``QuantMode`` literal lists the same names (a test keeps them equal).

Adding a mode is one backend function and one entry in :data:`MODES` (plus its name in ``QuantMode``, a
row in the docs, and its tests).

Example:
    >>> from edgefuse.config.quantize import QuantizeConfig
    >>> from edgefuse.quantize.presets import resolve_preset
    >>> MODES["int4"].variant(QuantizeConfig(mode="int4", block_size=64), resolve_preset("avx2"))
    'int4-b64'
    >>> MODES["int4"].variant(QuantizeConfig(mode="int4", int4_algorithm="hqq"), resolve_preset("avx512-vnni"))
    'int4-hqq-b32'
    >>> [m.name for m in MODES.values() if m.needs_calibration]
    ['static']
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefuse.config.quantize import QuantizeConfig
from edgefuse.errors import QuantizationError
from edgefuse.names import table_entry
from edgefuse.quantize.presets import QuantPreset
from edgefuse.quantize.probe import probe_tensors

# backend(src, dst, cfg, preset, exclude, calibration feeds, kept) -> the settings it used (for the manifest);
# ``kept`` are the MatMuls of ``exclude`` that the auto mode took out of the mode (not the user's exclusions):
# a mode with a fallback (int4 -> int8) quantizes them with it instead of leaving them fp32
Backend = Callable[
    [Path, Path, QuantizeConfig, QuantPreset, list[str], Sequence[dict[str, Any]], Sequence[str]], dict[str, Any]
]


@dataclass(frozen=True)
class QuantMode:
    """One quantization mode.

    ``count_quantized(model)`` counts the MatMuls of a quantized ``onnx.ModelProto`` that run quantized.
    ``simulate_weight(w, per_channel=, reduce_range=, block_size=)`` returns the weight ``[K, N]`` after
    quantization and dequantization; ``quantizes_activations`` says whether the activations are quantized
    too (per tensor, uint8, as ``DynamicQuantizeLinear`` does). ``int8`` marks the modes whose u8 x s8
    products can saturate int16 on x86 without VNNI (the error message then suggests ``--reduce-range``).
    """

    name: str
    description: str
    backend: Backend
    variant: Callable[[QuantizeConfig, QuantPreset], str]  # the name part; per-tensor/reduce-range are added
    needs_calibration: bool
    count_quantized: Callable[[Any], int]
    simulate_weight: Callable[..., np.ndarray]
    quantizes_activations: bool
    int8: bool


def _dynamic(src: Path, dst: Path, cfg: QuantizeConfig, preset: QuantPreset, exclude: list[str],
             feeds: Sequence[dict[str, Any]], kept: Sequence[str]) -> dict[str, Any]:
    from edgefuse.quantize.backends import quantize_dynamic_int8

    return quantize_dynamic_int8(src, dst, cfg, preset, exclude)


def _static(src: Path, dst: Path, cfg: QuantizeConfig, preset: QuantPreset, exclude: list[str],
            feeds: Sequence[dict[str, Any]], kept: Sequence[str]) -> dict[str, Any]:
    from edgefuse.quantize.backends import quantize_static_qdq

    return quantize_static_qdq(src, dst, cfg, preset, exclude, feeds)


def _int4(src: Path, dst: Path, cfg: QuantizeConfig, preset: QuantPreset, exclude: list[str],
          feeds: Sequence[dict[str, Any]], kept: Sequence[str]) -> dict[str, Any]:
    from edgefuse.quantize.backends import quantize_int4

    # the auto mode's choices (beyond the user's own exclusions) become 8-bit with int4_fallback int8 or nbits8
    int8_nodes = list(kept) if cfg.int4_fallback != "fp32" else []
    scaling = None
    if cfg.int4_scaling != "none":  # the clipping half of "activation" runs in quantize_int4, after the ranking
        src, scaling = scaled_source(src, cfg, feeds)
    sensitive: list[str] = []
    if cfg.int4_8bit_share:  # ranked on the graph that is quantized: after scaling
        sensitive = sensitive_matmuls(src, cfg, feeds, exclude)
    settings = quantize_int4(src, dst, cfg, exclude, feeds, preset=preset, int8_nodes=int8_nodes,
                             sensitive_8bit=sensitive)
    return {**settings, "scaling": scaling} if scaling is not None else settings


_SCALED: dict[tuple[str, int, int], tuple[Path, dict[str, Any]]] = {}  # per process: the auto mode's attempts


def scaled_source(src: Path, cfg: QuantizeConfig, feeds: Sequence[dict[str, Any]]) -> tuple[Path, dict[str, Any]]:
    """``src`` with activation-aware scaling (:mod:`edgefuse.quantize.scaling`), written once per graph and block
    size beside it as ``.<name>.scaled.onnx`` (the quantize stage's private workspace), and what was scaled."""
    from edgefuse.quantize.scaling import scale_graph

    if not feeds:
        raise QuantizationError("int4_scaling activation needs calibration texts; pass --calibration-data or set "
                                "--int4-scaling none")
    key = (str(src.resolve()), src.stat().st_mtime_ns, cfg.block_size)
    if key not in _SCALED or not _SCALED[key][0].is_file():
        dst = src.with_name(f".{src.stem}.scaled{src.suffix}")
        _SCALED[key] = dst, scale_graph(src, dst, feeds, block_size=cfg.block_size)
    return _SCALED[key]


def _int8_blocks(src: Path, dst: Path, cfg: QuantizeConfig, preset: QuantPreset, exclude: list[str],
                 feeds: Sequence[dict[str, Any]], kept: Sequence[str]) -> dict[str, Any]:
    from edgefuse.quantize.backends import quantize_int8_blocks

    return quantize_int8_blocks(src, dst, cfg, exclude)


def _int8_blocks_variant(cfg: QuantizeConfig, preset: QuantPreset) -> str:
    return f"int8-blocks-b{cfg.block_size}" + ("" if cfg.int4_symmetric else "-asym")


def resolve_mode(cfg: QuantizeConfig, task: str) -> QuantizeConfig:
    """``cfg`` with the default mode ``int8`` replaced by the int8 form for a graph of ``task``: ``int8-blocks``
    for causal LMs, ``dynamic`` for everything else; any other mode is returned as it is.

    Example:
        >>> resolve_mode(QuantizeConfig(), "causal-lm").mode, resolve_mode(QuantizeConfig(), "feature-extraction").mode
        ('int8-blocks', 'dynamic')
        >>> resolve_mode(QuantizeConfig(mode="dynamic"), "causal-lm").mode
        'dynamic'
    """
    if cfg.mode != "int8":
        return cfg
    return cfg.model_copy(update={"mode": "int8-blocks" if task == "causal-lm" else "dynamic"})


def _int4_variant(cfg: QuantizeConfig, preset: QuantPreset) -> str:
    # the algorithm, symmetry, 8-bit parts and an int8 fallback (with its reduce_range) change the bytes: each
    # setting other than the default is part of the name (int4-b32 is the default mix: see QuantizeConfig)
    fields = QuantizeConfig.model_fields
    algo = "" if cfg.int4_algorithm == fields["int4_algorithm"].default else f"{cfg.int4_algorithm}-"
    name = f"int4-{algo}b{cfg.block_size}"
    name += "" if cfg.int4_symmetric else "-asym"
    if cfg.int4_8bit_share != fields["int4_8bit_share"].default:
        name += f"-8bit{round(cfg.int4_8bit_share * 100)}"
    if cfg.int4_scaling != fields["int4_scaling"].default:
        name += f"-scaling-{cfg.int4_scaling}"
    if cfg.int4_tied != fields["int4_tied"].default:
        name += f"-tied-{cfg.int4_tied}"
    if cfg.int4_fallback != "fp32" and cfg.auto_target_cosine is not None:
        name += f"-{cfg.int4_fallback}-fallback"
        if cfg.int4_fallback == "int8" and (preset.reduce_range if cfg.reduce_range is None else cfg.reduce_range):
            name += "-reduce-range"
    return name


def _static_variant(cfg: QuantizeConfig, preset: QuantPreset) -> str:
    # static graphs differ by activation type: u8 (x86 presets) or s8 (arm64, VNNI)
    return f"qdq-int8-a{'u8' if preset.activation_static == 'QUInt8' else 's8'}"


def _count_ops(*op_types: str) -> Callable[[Any], int]:
    def count(model: Any) -> int:
        return sum(1 for n in model.graph.node if n.op_type in op_types)

    return count


def count_qdq_matmuls(model: Any) -> int:
    """MatMul nodes whose weight input comes from a DequantizeLinear (QDQ-quantized MatMuls)."""
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    return sum(1 for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1
               and producers.get(n.input[1]) == "DequantizeLinear")


def int8_weight(w: np.ndarray, *, per_channel: bool, reduce_range: bool, block_size: int = 0) -> np.ndarray:
    """``w`` [K, N] after symmetric int8 quantization (per output channel or per tensor) and dequantization."""
    qmax = 63.0 if reduce_range else 127.0
    absmax = np.abs(w).max(axis=0, keepdims=True) if per_channel else np.abs(w).max(keepdims=True)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def _block_weight(w: np.ndarray, block_size: int, bits: int) -> np.ndarray:
    """``w`` [K, N] after onnxruntime's symmetric ``bits``-bit blocks along the reduction axis (MatMulNBits' layout),
    and dequantization (:func:`edgefuse.quantize.blocks.block_fake_quant`)."""
    import torch

    from edgefuse.quantize.blocks import block_fake_quant

    return block_fake_quant(torch.from_numpy(np.ascontiguousarray(w)), block_size=block_size, bits=bits).numpy()


def int8_block_weight(w: np.ndarray, *, block_size: int, per_channel: bool = True,
                      reduce_range: bool = False) -> np.ndarray:
    """``w`` [K, N] after symmetric 8-bit blocks along the reduction axis, and dequantization."""
    return _block_weight(w, block_size, 8)


def int4_weight(w: np.ndarray, *, block_size: int, per_channel: bool = True, reduce_range: bool = False) -> np.ndarray:
    """``w`` [K, N] after symmetric 4-bit blocks along the reduction axis, and dequantization."""
    return _block_weight(w, block_size, 4)


MODES: dict[str, QuantMode] = {
    m.name: m
    for m in (
        QuantMode(
            "dynamic", "int8 weights, activations quantized at run time (MatMulInteger)", _dynamic,
            variant=lambda cfg, preset: "int8", needs_calibration=False,
            count_quantized=_count_ops("MatMulInteger", "DynamicQuantizeMatMul"),
            simulate_weight=int8_weight, quantizes_activations=True, int8=True,
        ),
        QuantMode(
            "static", "int8 QDQ with activation ranges calibrated on data", _static,
            variant=_static_variant, needs_calibration=True, count_quantized=count_qdq_matmuls,
            simulate_weight=int8_weight, quantizes_activations=True, int8=True,
        ),
        QuantMode(
            "int8-blocks", "weight-only 8-bit blocks (MatMulNBits bits 8), activations quantized per block of "
            "each token at run time", _int8_blocks, variant=_int8_blocks_variant, needs_calibration=False,
            count_quantized=_count_ops("MatMulNBits"), simulate_weight=int8_block_weight,
            # per-block 8-bit activations: far below the weight error, unlike dynamic int8's per-tensor scale
            quantizes_activations=False, int8=False,
        ),
        QuantMode(
            "int4", "weight-only 4-bit blocks (MatMulNBits)", _int4,
            variant=_int4_variant, needs_calibration=False,
            count_quantized=_count_ops("MatMulNBits"), simulate_weight=int4_weight, quantizes_activations=False,
            int8=False,
        ),
    )
}


def get_mode(name: str) -> QuantMode:
    """The table entry of ``name``.

    Raises:
        ConfigError: unknown mode (the message lists the known ones).
        ValueError: ``int8``, which names no graph form until :func:`resolve_mode` chose one for the task.
    """
    if name == "int8":
        raise ValueError("internal error: quantization mode 'int8' must be resolved for the graph's task first "
                         "(edgefuse.quantize.modes.resolve_mode)")
    return table_entry(MODES, name, what="quantization mode")


# ------------------------------------------------------------------ simulated error and ranking (auto mode)
MAX_TOKENS = 256  # rows of X kept per MatMul for the estimate (bounds memory on large decoders)


def _fake_quant_activation(x: np.ndarray) -> np.ndarray:
    """Per-tensor asymmetric uint8, as DynamicQuantizeLinear does."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def relative_error(
    x: np.ndarray, w: np.ndarray, *, mode: str, per_channel: bool, reduce_range: bool, block_size: int
) -> float:
    """Mean over the rows (tokens) of ``||x w - q(x) q(w)|| / ||x w||`` for one MatMul, simulated as the mode's
    table entry says (:data:`edgefuse.quantize.modes.MODES`: activations quantized only in the int8 modes, with
    a per-tensor scale as at run time). Rows whose output is zero are skipped."""
    x64 = x.reshape(-1, x.shape[-1]).astype(np.float64)[:MAX_TOKENS]
    w64 = w.astype(np.float64)
    ref = x64 @ w64  # (tokens, N)
    spec = get_mode(mode)
    xq = _fake_quant_activation(x64) if spec.quantizes_activations else x64
    wq = spec.simulate_weight(w64, per_channel=per_channel, reduce_range=reduce_range, block_size=block_size)
    num, den = np.linalg.norm(ref - xq @ wq, axis=1), np.linalg.norm(ref, axis=1)
    live = den > 0
    return float(np.mean(num[live] / den[live])) if live.any() else 0.0


def rank_matmuls(
    src: Path, feed: dict[str, np.ndarray], candidates: Sequence[str], *, mode: str, per_channel: bool,
    reduce_range: bool, block_size: int,
) -> list[tuple[str, float]]:
    """``candidates`` (weight MatMul names) sorted by simulated relative error, worst first."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    nodes = {n.name: n for n in model.graph.node if n.name in set(candidates)}
    inits = {i.name: i for i in model.graph.initializer}
    values = probe_tensors(model, src, [feed], sorted({nodes[c].input[0] for c in candidates}))[0]
    ranked = []
    for name in candidates:
        node = nodes[name]
        x = values.get(node.input[0])
        if x is None:
            continue
        w = numpy_helper.to_array(inits[node.input[1]])
        ranked.append((name, relative_error(x, w, mode=mode, per_channel=per_channel, reduce_range=reduce_range,
                                            block_size=block_size)))
    return sorted(ranked, key=lambda t: -t[1])


_RANKED: dict[tuple[str, int, int, str], list[tuple[str, float]]] = {}  # (graph, mtime, block, rank) -> ranking


def int4_ranking(src: Path, cfg: QuantizeConfig,
                 feeds: Sequence[dict[str, np.ndarray]]) -> list[tuple[str, float]]:
    """Every weight MatMul of ``src`` with its 4-bit score, most sensitive first, ranked as ``cfg.int4_8bit_rank``
    says: ``output``, by the measured effect of each one's 4-bit error on the graph's output
    (:func:`edgefuse.quantize.sensitivity.rank_by_output`, one forward pass per MatMul); ``error``, by the
    simulated int4 error of its own output on the first calibration feed (:func:`rank_matmuls`, one fp32 run and
    numpy). Computed once per graph, block size and ranking in a process: the 8-bit share and the auto mode's
    fallbacks (which call the backend once per MatMul they keep) share it.

    Raises:
        QuantizationError: no calibration feeds to rank on.
    """
    if not feeds:
        raise QuantizationError("ranking the MatMuls for int4 needs calibration texts; pass --calibration-data")
    key = (str(src.resolve()), src.stat().st_mtime_ns, cfg.block_size, cfg.int4_8bit_rank)
    if key not in _RANKED:
        import onnx

        from edgefuse.quantize.evaluate import weight_matmuls

        names = weight_matmuls(onnx.load(str(src), load_external_data=False))
        if cfg.int4_8bit_rank == "output":
            from edgefuse.quantize.sensitivity import rank_by_output

            _RANKED[key] = rank_by_output(src, feeds, names, block_size=cfg.block_size)
        else:
            _RANKED[key] = rank_matmuls(src, feeds[0], names, mode="int4", per_channel=True, reduce_range=False,
                                        block_size=cfg.block_size)
    return _RANKED[key]


def sensitive_matmuls(src: Path, cfg: QuantizeConfig, feeds: Sequence[dict[str, np.ndarray]],
                      exclude: Sequence[str]) -> list[str]:
    """The ``ceil(cfg.int4_8bit_share x n)`` weight MatMuls (n: all of them; those in ``exclude`` are skipped) that
    4-bit hurts most, in the order of :func:`int4_ranking`.

    Raises:
        QuantizationError: no calibration feeds to rank on.
    """
    import math

    if not feeds:
        raise QuantizationError("int4_8bit_share needs calibration texts to rank the MatMuls; pass --calibration-data")
    ranked = int4_ranking(src, cfg, feeds)
    # the count comes from every weight MatMul, so the auto mode's exclusions (one more per attempt) do not move it
    k = math.ceil(cfg.int4_8bit_share * len(ranked))
    skip = set(exclude)
    return [n for n, _ in ranked if n not in skip][:k]
