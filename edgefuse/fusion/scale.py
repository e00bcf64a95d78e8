"""The frozen fusion scale: the cluster sizes ``n_j`` between the activation and the down projection.

It is a non-persistent float32 buffer ``edgefuse_scale`` on the down-projection module plus a forward
pre-hook that multiplies the module's input by it. So the model stays an ordinary transformers model of its
own class; the scale is not a parameter, is never in an optimizer and never trained , and
``save_pretrained`` leaves it out (edgefuse saves it in ``edgefuse_scales.safetensors``).

With the scale in front of ``W2``, the gradient of the loss with respect to centroid j is ``n_j`` times the
gradient of one sub-MLP at that centroid, which is exactly the gradient of the fusion variant (a), and
``sign(n_j v) = sign(v)``: Adam/AdamW then follows the sign-NTK of the original network.

Example:
    >>> import torch
    >>> lin = torch.nn.Linear(3, 2)
    >>> attach_scale_(lin, torch.tensor([1.0, 2.0, 3.0]))
    >>> x = torch.ones(1, 3)
    >>> y = lin(x)
    >>> _ = fold_module_(lin, layout="linear")
    >>> torch.allclose(lin(x), y)
    True
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from edgefuse.fusion.sites import MlpSite, find_mlps, layout_of

SCALE_ATTR = "edgefuse_scale"


def _apply_scale(module: nn.Module, args: tuple) -> tuple:
    x = args[0]
    return (x * getattr(module, SCALE_ATTR).to(x.dtype), *args[1:])


def attach_scale_(down: nn.Module, scale: torch.Tensor) -> None:
    """Attach ``scale`` (shape ``[k]``, the input width of ``down``) as a frozen pre-multiplier of ``down``."""
    detach_scale_(down)
    # fp32: bf16 holds integers exactly only up to 256
    down.register_buffer(SCALE_ATTR, scale.detach().to(torch.float32).clone(), persistent=False)
    down.register_forward_pre_hook(_apply_scale)


def detach_scale_(down: nn.Module) -> torch.Tensor | None:
    """Remove the scale and its hook from ``down``; return the scale (or None if there was none).

    Hooks are found by function, not by a stored handle, so this also works on deep copies of a model.
    """
    for key, fn in list(down._forward_pre_hooks.items()):
        if fn is _apply_scale:
            del down._forward_pre_hooks[key]
    scale = down._buffers.pop(SCALE_ATTR, None)
    return scale


def get_scale(module: nn.Module) -> torch.Tensor | None:
    """The attached scale of ``module``, or None."""
    return module._buffers.get(SCALE_ATTR)


def iter_scaled(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(name, module)`` for every module that carries a fusion scale."""
    for name, module in model.named_modules():
        if SCALE_ATTR in module._buffers:
            yield name, module


def has_scales(model: nn.Module) -> bool:
    """True when any module of ``model`` still carries an unfolded fusion scale."""
    return next(iter_scaled(model), None) is not None


@torch.no_grad()
def fold_module_(down: nn.Module, *, layout: str) -> torch.Tensor | None:
    """Fold the scale of ``down`` into its input-side weights (``W2[:, j] *= n_j``) and remove it."""
    scale = detach_scale_(down)
    if scale is None:
        return None
    w = down.weight
    if layout == "conv1d":  # HF Conv1D stores [in, out]
        w.mul_(scale.to(w.dtype)[:, None])
    else:  # nn.Linear stores [out, in]
        w.mul_(scale.to(w.dtype)[None, :])
    return scale


@torch.no_grad()
def fold_into_up_(up: nn.Module, down: nn.Module, *, layout: str) -> torch.Tensor | None:
    """Fold the scale into the up projection's rows and bias instead (exact only for positively homogeneous
    activations such as ReLU: ``relu(n z) = n relu(z)`` for ``n > 0``)."""
    scale = detach_scale_(down)
    if scale is None:
        return None
    s = scale.to(up.weight.dtype)
    if layout == "conv1d":
        up.weight.mul_(s[None, :])
    else:
        up.weight.mul_(s[:, None])
    if getattr(up, "bias", None) is not None:
        up.bias.mul_(s)
    return scale


def find_fused_sites(model: nn.Module) -> Iterator[MlpSite]:
    """The MLPs of ``model`` whose down projection carries a fusion scale."""
    for site in find_mlps(model):
        if get_scale(site.down_module) is not None:
            yield site


def fold_scales_(model: nn.Module, *, into: str = "down") -> int:
    """Fold every fusion scale of ``model`` into its weights for inference and export; return how many.

    Args:
        model: a model fused by :func:`edgefuse.fusion.api.fuse_mlps_`.
        into: ``"down"`` (multiply the down-projection columns; exact for every activation) or ``"up"``
            (multiply the up-projection rows and bias; exact only for ReLU-type activations, and it keeps the
            down projection's per-channel int8 range unchanged).

    Example:
        >>> from edgefuse.fusion.scale import fold_scales_
        >>> import torch
        >>> fold_scales_(torch.nn.Linear(2, 2))
        0
    """
    from edgefuse.errors import ConfigError

    if into not in ("down", "up"):
        raise ConfigError(f"fold target {into!r} is not one of 'down', 'up'")
    if into == "down":
        count = 0
        for _, module in list(iter_scaled(model)):
            fold_module_(module, layout=layout_of(module))
            count += 1
        return count
    count = 0
    for site in find_fused_sites(model):
        fold_into_up_(site.up_module, site.down_module, layout=site.kind.layout)
        count += 1
    return count
