"""Quantization-aware recovery: train the weights against the block grid the quantize stage will write.

While it is attached, every ``nn.Linear`` of the model (except a tied output embedding, which the int4 mode writes
with 8 bits or keeps in fp32 as ``quantize.int4_tied`` says) computes with its weight rounded to onnxruntime's
symmetric block grid (:func:`edgefuse.quantize.blocks.block_fake_quant`); gradients pass the rounding unchanged
(straight-through estimator), so the fp32 weights keep training. Evaluation during training (and the checkpoint
it selects) sees the rounded model. Detached, the model holds ordinary fp32 weights whose int4 graph
(``quantize.mode: int4``, same block size, symmetric, the default algorithm) contains exactly the weights training
used.

The fusion scale is respected: where the export folds the cluster sizes into the down projection (MLPs without a
gate and without a ReLU-type activation), the grid is applied to the folded weight ``W2 diag(n)``; where it folds
them into the up projection, rows scale whole blocks and the grid commutes with the fold.

The parameters are not replaced: the module's ``forward`` is overridden on the instance, so parameter names, the
optimiser, checkpoints and ``state_dict`` are those of the plain model.

Example:
    >>> import torch
    >>> model = torch.nn.Sequential(torch.nn.Linear(64, 8), torch.nn.Linear(8, 2))
    >>> x = torch.randn(3, 64)
    >>> names = attach_fake_quant_(model, bits=4, block_size=32)
    >>> names
    ['0', '1']
    >>> y_q = model(x)
    >>> detach_fake_quant_(model)
    2
    >>> bool((model(x) - y_q).abs().max() > 0)
    True
"""

from __future__ import annotations

import types

import torch
from torch import nn

from edgefuse.fusion.scale import get_scale
from edgefuse.quantize.blocks import block_fake_quant

_ATTR = "_edgefuse_fake_quant"
_CACHE = "_edgefuse_fake_quant_cache"


def _rounded(module: nn.Module) -> torch.Tensor:
    """The module's weight rounded to the grid (no gradient), computed once per weight update: the optimiser
    changes weights in place, which bumps their version counter, and generation calls every layer once a token."""
    bits, block, fold_down = getattr(module, _ATTR)
    w = module.weight
    key = (w._version, w.data_ptr())
    cached = module.__dict__.get(_CACHE)
    if cached is not None and cached[0] == key:
        return cached[1]
    mm = w.detach().T  # -> [K, N], MatMul layout
    scale = get_scale(module) if fold_down else None
    if scale is not None:  # the export multiplies input row j of W2 by n_j: round that weight
        s = scale.to(mm.dtype)[:, None]
        q = block_fake_quant(mm * s, block_size=block, bits=bits) / s
    else:
        q = block_fake_quant(mm, block_size=block, bits=bits)
    q = q.T.contiguous()
    module.__dict__[_CACHE] = (key, q)
    return q


def _grid_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight, rounded to the grid, with a straight-through gradient to the fp32 weight."""
    w = module.weight
    return w + (_rounded(module) - w).detach()


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x, _grid_weight(self), self.bias)


def _fold_is_down(model: nn.Module) -> bool:
    """Where ``export.fold_scales: auto`` puts the cluster sizes of a fused model (True: the down projection)."""
    from edgefuse.export.api import up_fold_is_exact
    from edgefuse.fusion.scale import has_scales

    return has_scales(model) and not up_fold_is_exact(model)


def _tied_head(model: nn.Module) -> nn.Module | None:
    """The output embedding when it shares its weight with the input embedding (else None)."""
    get_out, get_in = getattr(model, "get_output_embeddings", None), getattr(model, "get_input_embeddings", None)
    head = get_out() if callable(get_out) else None
    emb = get_in() if callable(get_in) else None
    if head is None or emb is None or getattr(head, "weight", None) is not getattr(emb, "weight", None):
        return None
    return head


def quantizable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The weight MatMuls that the int4 mode writes at 4 bits: every ``nn.Linear`` but a tied output embedding
    (the export computes it from the embedding table, and ``quantize.int4_tied`` governs it). GPT-2's ``Conv1D``
    exports as ``Gemm``, which the block modes leave in fp32, so it is not included."""
    head = _tied_head(model)
    out = []
    for name, module in model.named_modules():
        if module is head:
            continue
        if isinstance(module, nn.Linear):
            out.append((name, module))
    return out


def attach_fake_quant_(model: nn.Module, *, bits: int, block_size: int) -> list[str]:
    """Make every quantizable weight MatMul of ``model`` compute on the ``bits``-bit block grid; return their names.

    Args:
        model: any PyTorch model; fused models keep their frozen scales (see the module docstring).
        bits: 4 (``quantize.mode: int4``) or 8 (``int8-blocks``).
        block_size: the quantize stage's ``block_size``.

    Raises:
        ValueError: ``bits`` not 4 or 8, or ``block_size`` below 1.
    """
    if bits not in (4, 8) or block_size < 1:
        raise ValueError(f"quant-aware training needs bits 4 or 8 and a positive block size, got {bits}, {block_size}")
    fold_down = _fold_is_down(model)
    names = []
    for name, module in quantizable_modules(model):
        setattr(module, _ATTR, (bits, block_size, fold_down))
        module.forward = types.MethodType(_linear_forward, module)  # the instance's forward; the class is untouched
        names.append(name)
    return names


def detach_fake_quant_(model: nn.Module) -> int:
    """Give every module its own ``forward`` back (weights unchanged); return how many were detached."""
    count = 0
    for module in model.modules():
        if hasattr(module, _ATTR):
            delattr(module, _ATTR)
            module.__dict__.pop("forward", None)
            module.__dict__.pop(_CACHE, None)
            count += 1
    return count


def has_fake_quant(model: nn.Module) -> bool:
    """True while :func:`attach_fake_quant_` is in effect on any module of ``model``."""
    return any(hasattr(m, _ATTR) for m in model.modules())
