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


def gptq_grid(w: torch.Tensor, h: torch.Tensor, *, block_size: int, bits: int = 4, damp: float = DAMP,
              lazy: int = 128) -> torch.Tensor:
    """``w`` ``[K, N]`` (MatMul layout) quantized by GPTQ with Hessian ``h`` ``[K, K]`` onto the symmetric block
    grid of ``bits`` (blocks of ``block_size`` along ``K``), dequantized, in ``w``'s dtype.

    Each block's scale is taken when GPTQ reaches the block, from its current (error-updated) values; the value
    of largest magnitude keeps code ``-2**(bits-1)`` exactly, so onnxruntime recomputes the same scale.
    """
    if w.dim() != 2 or h.shape != (w.shape[0], w.shape[0]):
        raise ValueError(f"gptq_grid needs w [K, N] and h [K, K], got {list(w.shape)} and {list(h.shape)}")
    k, n = w.shape
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lazy = max(block_size, lazy // block_size * block_size)  # whole blocks per lazy batch
    W = w.detach().float().clone()
    H = h.detach().double().clone()
    dead = torch.diag(H) == 0  # channels never active: their weights cannot matter
    H[dead, dead] = 1.0
    W[dead, :] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(k, dtype=H.dtype)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    Q = torch.zeros_like(W)
    scale = torch.zeros(n)
    forced = torch.zeros(n, dtype=torch.long)
    cols = torch.arange(n)
    for i1 in range(0, k, lazy):
        i2 = min(i1 + lazy, k)
        W1, U1 = W[i1:i2].clone(), U[i1:i2, i1:i2]
        Err = torch.zeros_like(W1)
        for i in range(i2 - i1):
            row = i1 + i
            if row % block_size == 0:  # a new block: its scale from the values as they are now
                vals = W1[i:i + block_size]
                idx = vals.abs().argmax(dim=0)
                scale = vals[idx, cols] / lo
                forced = row + idx
            inv = 1.0 / torch.where(scale == 0, torch.ones_like(scale), scale)
            q = torch.clamp(torch.floor(W1[i] * inv + 0.5), lo, hi)
            q = torch.where(forced == row, torch.full_like(q, lo), q)  # the extreme keeps the grid's end
            deq = q * scale
            Q[row] = deq
            err = (W1[i] - deq) / U1[i, i]
            Err[i] = err
            W1[i + 1:] -= U1[i, i + 1:, None] * err[None, :]
        W[i2:] -= U[i1:i2, i2:].T @ Err
    return Q.to(w.dtype)


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
    from edgefuse.quantize.modes import activation_rows, feeds_for_rows, probe_tensors

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
    for i, node in enumerate(todo, 1):
        x = torch.from_numpy(np.array(activation_rows(values, feeds[:used], node.input[0], MAX_ROWS),
                                      dtype=np.float32))
        init = inits[node.input[1]]
        w = torch.from_numpy(np.array(numpy_helper.to_array(init), dtype=np.float32))
        q = gptq_grid(w, x.double().T @ x.double(), block_size=block_size, bits=bits)
        ref = (x @ w).pow(2).sum().clamp_min(1e-30)
        report["error_rtn"] += float((x @ (w - block_fake_quant(w, block_size=block_size, bits=bits))).pow(2).sum()
                                     / ref)
        report["error_gptq"] += float((x @ (w - q)).pow(2).sum() / ref)
        report["matmuls"] += 1
        report["calibration_rows"] = max(report["calibration_rows"], len(x))
        init.CopyFrom(numpy_helper.from_array(q.numpy().astype(numpy_helper.to_array(init).dtype), init.name))
        if i % 30 == 0 or i == len(todo):
            logger.info("gptq: %d/%d MatMuls", i, len(todo))
    return report
