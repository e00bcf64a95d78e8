"""Automatic fp32 fallback: rank MatMuls by their simulated quantization error, then keep the worst ones in
fp32, one at a time, until the measured end-to-end cosine reaches the target.

The ranking is cheap (one fp32 run that also returns every MatMul input, then numpy): for each weight
MatMul ``Y = X W`` it simulates the mode's arithmetic (int8: per-tensor uint8 activations x per-channel int8
weights, as MatMulInteger does; int4: symmetric blocks along the reduction axis) and measures the mean over
tokens (rows) of ``||y - q(x) Q(W)|| / ||y||``. Per token, not over the whole tensor: decoders such as SmolLM2
have "massive activations" (one token, e.g. the first, with a down-projection input ~1000x the others); a
per-tensor int8 scale then rounds every other token's input to zero, yet that token dominates a whole-tensor
norm and hid the damage (measured on SmolLM2-135M, benchmarks/results/export.md). The decision is made on the
real quantized graph, never on the estimate.

Example:
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    >>> 0 < relative_error(np.ones((4, 64), np.float32), w, mode="int4", per_channel=True, reduce_range=False,
    ...                    block_size=32) < 0.2
    True
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefuse.errors import QuantizationError

logger = logging.getLogger(__name__)

MAX_TOKENS = 256  # rows of X kept per MatMul for the estimate (bounds memory on large decoders)


def _fake_quant_weight(
    w: np.ndarray, *, mode: str, per_channel: bool, reduce_range: bool, block_size: int
) -> np.ndarray:
    """``w`` [K, N] after symmetric quantization and dequantization."""
    if mode == "int4":
        k, n = w.shape
        pad = (-k) % block_size
        wp = np.pad(w, ((0, pad), (0, 0))).reshape(-1, block_size, n)  # (blocks, block, N)
        scale = np.abs(wp).max(axis=1, keepdims=True) / 7.0
        scale[scale == 0] = 1.0
        return (np.clip(np.round(wp / scale), -8, 7) * scale).reshape(-1, n)[:k]
    qmax = 63.0 if reduce_range else 127.0
    absmax = np.abs(w).max(axis=0, keepdims=True) if per_channel else np.abs(w).max(keepdims=True)
    scale = np.where(absmax > 0, absmax / qmax, 1.0)
    return np.clip(np.round(w / scale), -qmax, qmax) * scale


def _fake_quant_activation(x: np.ndarray) -> np.ndarray:
    """Per-tensor asymmetric uint8, as DynamicQuantizeLinear does."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def relative_error(
    x: np.ndarray, w: np.ndarray, *, mode: str, per_channel: bool, reduce_range: bool, block_size: int
) -> float:
    """Mean over the rows (tokens) of ``||x w - q(x) q(w)|| / ||x w||`` for one MatMul (activations quantized only
    in int8 modes; the activation scale is still per tensor, as at run time). Rows whose output is zero are
    skipped."""
    x64 = x.reshape(-1, x.shape[-1]).astype(np.float64)[:MAX_TOKENS]
    w64 = w.astype(np.float64)
    ref = x64 @ w64  # (tokens, N)
    xq = x64 if mode == "int4" else _fake_quant_activation(x64)
    wq = _fake_quant_weight(w64, mode=mode, per_channel=per_channel, reduce_range=reduce_range, block_size=block_size)
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

    from edgefuse.ort import make_session

    model = onnx.load(str(src))
    nodes = {n.name: n for n in model.graph.node if n.name in set(candidates)}
    inits = {i.name: i for i in model.graph.initializer}
    outputs = {o.name for o in model.graph.output}
    extra = sorted({nodes[c].input[0] for c in candidates} - outputs)
    for name in extra:
        model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    tmp = src.with_name(f".{src.stem}.probe.onnx")
    try:
        onnx.save(model, str(tmp))
        session = make_session(tmp, optimize=False)  # unoptimised: the probed tensors must survive fusion passes
        wanted = [n for n in extra]
        values = dict(zip(wanted, session.run(wanted, feed), strict=True))
    finally:
        tmp.unlink(missing_ok=True)
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


def auto_keep(
    ranked: Sequence[tuple[str, float]], base_exclude: list[str], target: float, max_kept: int,
    attempt: Callable[[list[str]], float], first_cosine: float,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Keep ranked MatMuls in fp32 one by one until ``attempt(exclude) >= target``; return (kept, steps).

    Raises:
        QuantizationError: the target was not reached with ``max_kept`` MatMuls in fp32.
    """
    steps: list[dict[str, Any]] = [{"kept": 0, "node": None, "estimated_error": None, "cosine": first_cosine}]
    kept: list[str] = []
    cos = first_cosine
    for name, err in ranked[:max_kept]:
        if cos >= target:
            break
        kept.append(name)
        cos = attempt(base_exclude + kept)
        steps.append({"kept": len(kept), "node": name, "estimated_error": err, "cosine": cos})
        logger.info("auto: kept %d in fp32 (latest %s, est. error %.3g): cosine %.5f", len(kept), name, err, cos)
    if cos < target:
        raise QuantizationError(
            f"auto mode kept {len(kept)} MatMul(s) in fp32 and reached cosine {cos:.5f}, below the target "
            f"{target}; raise --auto-max-kept (now {max_kept}) or lower --auto-target-cosine"
        )
    return kept, steps
