"""The weight grid of onnxruntime's symmetric block quantizer (MatMulNBits), reproduced in PyTorch.

One implementation, used twice: the quantize stage simulates the error of a 4-bit or 8-bit MatMul with it (to rank
which MatMuls keep 8 bits), and quantization-aware recovery (:mod:`edgefuse.finetune.quant_aware`) trains against
it, so the graph that onnxruntime writes from the trained weights holds exactly the weights that training saw.

The grid: the weight ``[K, N]`` (the MatMul's layout) is cut into blocks of ``block_size`` along ``K``; each block
has one scale, ``extreme / -2**(bits-1)`` where ``extreme`` is the block's value of largest magnitude, sign
included; values are rounded half up to the integers ``-2**(bits-1) .. 2**(bits-1) - 1``. So the extreme lands
exactly on the grid's end, and the other side has one step fewer. ``tests/test_quantize_blocks.py`` checks this
against the weights that onnxruntime's quantizer writes.

Example:
    >>> import torch
    >>> w = torch.tensor([[0.5], [-1.0], [0.26], [0.0]])
    >>> block_fake_quant(w, block_size=4, bits=4).flatten().tolist()
    [0.5, -1.0, 0.25, 0.0]
"""

from __future__ import annotations

import torch


def block_fake_quant(w: torch.Tensor, *, block_size: int, bits: int) -> torch.Tensor:
    """``w`` ``[K, N]`` quantized to symmetric ``bits``-bit blocks along ``K`` and dequantized (same dtype).

    Args:
        w: a weight in MatMul layout (``x @ w``); an ``nn.Linear`` weight is ``w.T``.
        block_size: values of ``K`` that share a scale (onnxruntime pads the last block with zeros).
        bits: 4 or 8.

    Example:
        >>> import torch
        >>> w = torch.randn(64, 3)
        >>> q = block_fake_quant(w, block_size=32, bits=8)
        >>> bool((q - w).abs().max() < 0.05)
        True
    """
    if w.dim() != 2:
        raise ValueError(f"block_fake_quant needs a 2-D weight [K, N], got shape {list(w.shape)}")
    if bits not in (4, 8) or block_size < 1:
        raise ValueError(f"bits must be 4 or 8 and block_size positive, got bits={bits}, block_size={block_size}")
    k, n = w.shape
    lo = -(2 ** (bits - 1))
    pad = (-k) % block_size
    wf = w.float()
    wp = torch.nn.functional.pad(wf, (0, 0, 0, pad)).reshape(-1, block_size, n)  # (blocks, block, N)
    idx = wp.abs().argmax(dim=1, keepdim=True)
    scale = torch.gather(wp, 1, idx) / lo  # the extreme maps to lo exactly
    # onnxruntime multiplies by the reciprocal; an all-zero block (scale 0) stays 0 with any finite reciprocal
    inv = 1.0 / torch.where(scale == 0, torch.ones_like(scale), scale)
    # onnxruntime rounds v + zero_point (a positive number) half away from zero: half up on v
    q = torch.clamp(torch.floor(wp * inv + 0.5), lo, -lo - 1)
    return (q * scale).reshape(-1, n)[:k].to(w.dtype)
