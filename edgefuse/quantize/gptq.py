"""GPTQ (Frantar et al., 2022) onto onnxruntime's own symmetric block grid (``int4_algorithm: gptq``).

GPTQ quantizes a weight one input channel at a time and spreads each channel's rounding error over the channels
not yet quantized, weighted by the inverse Hessian of the layer's output error, ``H = X^T X`` on calibration
activations ``X``. The result here is written back into the fp32 graph as weights that already lie on the grid
that onnxruntime's default block quantizer computes (:mod:`edgefuse.quantize.blocks`): each block's scale is its
value of largest magnitude over ``-2**(bits-1)``, and that value is kept exactly (its code is forced to the grid's
end). onnxruntime's quantizer then recomputes the same scale from the same extreme and writes these weights
unchanged, so the graph runs the standard MatMulNBits kernel: the same speed as round to nearest.

(onnxruntime's own ``GPTQWeightOnlyQuantConfig`` did not finish one SmolLM2-135M graph in 20 CPU minutes here;
this one takes about a minute, because it runs on the activations edgefuse already probes.)

Example:
    >>> import torch
    >>> from edgefuse.quantize.blocks import block_fake_quant
    >>> g = torch.Generator().manual_seed(0)
    >>> x, w = torch.randn(256, 64, generator=g), torch.randn(64, 8, generator=g)
    >>> q = gptq_grid(w, x.T @ x, block_size=32)
    >>> bool(torch.equal(block_fake_quant(q, block_size=32, bits=4), q))  # on onnxruntime's grid exactly
    True
    >>> rtn = block_fake_quant(w, block_size=32, bits=4)
    >>> bool((x @ (w - q)).norm() < (x @ (w - rtn)).norm())  # a smaller output error than round to nearest
    True
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

DAMP = 0.01  # the reference implementation's dampening: 1 % of the mean diagonal of H keeps it invertible
MAX_ROWS = 4096  # calibration tokens for H (a K x K sum: more rows cost little)
# Fewer calibration tokens than half a MatMul's inputs and GPTQ would fit the few directions it sees: such a MatMul
# stays round to nearest. Half, not all: with 1,197 tokens for the 1,536 inputs of SmolLM2's down projections,
# GPTQ on them wrote BLEU 69.54 against 62.73 with them left to round to nearest (benchmarks/results/int4_gptq_plain
# .md, and the stopped first run of int4_default_plain: 29 of 30 down projections under a full-size threshold).
MIN_ROWS_FRACTION = 0.5
# The choices of gptq_model, each measured on SmolLM2 (benchmarks/results/int4_gptq_*.md); module constants so the
# benchmark can switch them off one at a time, not user settings
# (ppl, logit cosine against fp32 on the fusion-pruned model: in order, dynamic scales 3.511, 0.985; act order
# 3.532, 0.982; clipped static scales with act order 3.521, 0.975; static scales in order 3.514, 0.965)
ACT_ORDER = False  # channels by decreasing activity (static block scales)
CLIP_SCALES = False  # static block scales from the searched clipping (search_clip), not from the largest weight


def _block_scales(ref: torch.Tensor, block_size: int, lo: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale ``[blocks, N]``, row of each block's extreme ``[blocks, N]``) of ``ref`` ``[K, N]`` on the grid."""
    k, n = ref.shape
    pad = (-k) % block_size
    blocks = torch.nn.functional.pad(ref, (0, 0, 0, pad)).reshape(-1, block_size, n)
    idx = blocks.abs().argmax(dim=1)  # (blocks, N)
    scale = torch.gather(blocks, 1, idx[:, None, :])[:, 0, :] / lo
    rows = idx + torch.arange(blocks.shape[0])[:, None] * block_size
    return scale, rows


def gptq_grid(w: torch.Tensor, h: torch.Tensor, *, block_size: int, bits: int = 4, damp: float = DAMP,
              lazy: int = 128, act_order: bool = False, scale_from: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` ``[K, N]`` (MatMul layout) quantized by GPTQ with Hessian ``h`` ``[K, K]`` onto the symmetric block
    grid of ``bits`` (blocks of ``block_size`` along ``K``), dequantized, in ``w``'s dtype.

    By default the channels are taken in order and each block's scale is set when GPTQ reaches the block, from
    its current (error-updated) values. ``act_order`` (channels by decreasing ``H`` diagonal, as GPTQ's
    reference code offers) or ``scale_from`` (e.g. the weights with searched clipping,
    :func:`edgefuse.quantize.scaling.search_clip`) fix every block's scale before the updates instead ("static
    groups"). Either way each block's value of largest magnitude keeps code ``-2**(bits-1)`` exactly, so
    onnxruntime recomputes the same scale from the result.
    """
    if w.dim() != 2 or h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"gptq_grid needs w [K, N] and h [K, K], got {list(w.shape)} and {list(h.shape)}")
    k = w.shape[0]
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    W = w.detach().float().clone()
    H = h.detach().double().clone()
    dead = torch.diag(H) == 0  # channels never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[dead, :] = 0.0
    static = act_order or scale_from is not None
    if static:
        ref = W.clone() if scale_from is None else scale_from.detach().float().clone()
        ref[dead, :] = 0.0
        scales, extreme_rows = _block_scales(ref, block_size, lo)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k)
    W, H = W[perm], H[perm][:, perm]
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    if static:
        inv = 1.0 / torch.where(scales == 0, torch.ones_like(scales), scales)
    else:  # scales taken when a block is reached: whole blocks per lazy batch
        lazy = max(block_size, lazy // block_size * block_size)
        scales = torch.zeros((-(-k // block_size), W.shape[1]))
        inv = torch.zeros_like(scales)
        extreme_rows = torch.zeros(scales.shape, dtype=torch.long)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1, U1 = W[i1:i2].clone(), U[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            row = int(perm[i1 + i])  # the channel in w's own order
            b = row // block_size
            if not static and row % block_size == 0:  # the block's scale from its values as they are now
                scales[b], extreme_rows[b] = (t[0] for t in _block_scales(W1[i:i + block_size], block_size, lo))
                extreme_rows[b] += row
                inv[b] = 1.0 / torch.where(scales[b] == 0, torch.ones_like(scales[b]), scales[b])
            q = torch.clamp(torch.floor(W1[i] * inv[b] + 0.5), lo, hi)
            q = torch.where(extreme_rows[b] == row, torch.full_like(q, lo), q)  # the extreme keeps the grid's end
            deq = q * scales[b]
            Q[i1 + i] = deq
            err = (W1[i] - deq) / U1[i, i]
            Err[i] = err
            W1[i + 1:] -= U1[i, i + 1:, None] * err[None, :]
        W[i2:] -= U[i1:i2, i2:].T @ Err
    out = torch.empty_like(Q)
    out[perm] = Q
    return out.to(w.dtype)


def gptq_model(model: Any, src: Path, feeds: Sequence[dict[str, np.ndarray]], nodes: Sequence[str], *,
               block_size: int, bits: int = 4) -> dict[str, Any]:
    """Replace, in place, the weights of the MatMuls ``nodes`` of ``model`` (loaded from ``src``) by their GPTQ
    quantization on onnxruntime's grid (:func:`gptq_grid`), with ``H`` from the calibration ``feeds``; return
    what was done (for the manifest): MatMuls, calibration rows, and the summed relative output error on the
    calibration activations of round to nearest and of GPTQ.

    Raises:
        ValueError: ``feeds`` is empty.
    """
    from onnx import numpy_helper

    from edgefuse.quantize.blocks import block_fake_quant
    from edgefuse.quantize.probe import activation_rows, feeds_for_rows, probe_tensors
    from edgefuse.quantize.scaling import search_clip

    if not feeds:
        raise ValueError("GPTQ needs calibration feeds")
    inits = {i.name: i for i in model.graph.initializer}
    todo = [n for n in model.graph.node if n.name in set(nodes) and n.op_type == "MatMul"
            and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    report: dict[str, Any] = {"matmuls": 0, "calibration_rows": 0, "error_rtn": 0.0, "error_gptq": 0.0}
    if not todo:
        return report
    used = feeds_for_rows(feeds, MAX_ROWS)
    values = probe_tensors(model, src, feeds[:used], sorted({n.input[0] for n in todo}))
    report.update({"act_order": ACT_ORDER, "clip_scales": CLIP_SCALES, "too_few_rows": [],
                   "calibration_rows": len(activation_rows(values, feeds[:used], todo[0].input[0], MAX_ROWS))})
    for i, node in enumerate(todo, 1):
        x_np = activation_rows(values, feeds[:used], node.input[0], MAX_ROWS)
        init = inits[node.input[1]]
        w_np = numpy_helper.to_array(init)
        if len(x_np) < MIN_ROWS_FRACTION * w_np.shape[0]:
            # far fewer tokens than input channels: GPTQ would fit these few tokens; the MatMul is left to round
            # to nearest (the graph stays correct), and the report says so
            report["too_few_rows"].append(node.name)
            continue
        x = torch.from_numpy(np.array(x_np, dtype=np.float32))
        w = torch.from_numpy(np.array(w_np, dtype=np.float32))
        ref = torch.from_numpy(search_clip(x_np, w_np, block_size=block_size, bits=bits)[0]) if CLIP_SCALES else None
        q = gptq_grid(w, x.double().T @ x.double(), block_size=block_size, bits=bits, act_order=ACT_ORDER,
                      scale_from=ref)
        energy = (x @ w).pow(2).sum().clamp_min(1e-30)
        rtn = block_fake_quant(w, block_size=block_size, bits=bits)
        report["error_rtn"] += float((x @ (w - rtn)).pow(2).sum() / energy)
        report["error_gptq"] += float((x @ (w - q)).pow(2).sum() / energy)
        report["matmuls"] += 1
        init.CopyFrom(numpy_helper.from_array(q.numpy().astype(w_np.dtype), init.name))
        if i % 30 == 0 or i == len(todo):
            logger.info("gptq: %d/%d MatMuls", i, len(todo))
    if report["too_few_rows"]:
        logger.warning("gptq: %d MatMuls kept round to nearest: the calibration texts give %d tokens, fewer than "
                       "half their input size; pass more --calibration-data (--calibration-samples)",
                       len(report["too_few_rows"]), report["calibration_rows"])
    return report
