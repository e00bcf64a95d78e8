"""Calibration for ``fusion-pruned`` with ``importance: activations``: the mean absolute input of every
selected MLP's down projection (one value per intermediate unit) over a few texts.

Texts run one at a time, unpadded, so that the mean is over real tokens only. Statistics are taken on the
unfused model, before any MLP is changed.

Without texts the built-in corpus is used (:func:`edgefuse.records.builtin_texts`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from edgefuse.errors import ConfigError, FusionError
from edgefuse.fusion.sites import MlpSite

logger = logging.getLogger(__name__)


@torch.no_grad()
def down_input_stats(
    model: nn.Module, sites: Sequence[MlpSite], texts: Sequence[str], tokenizer: Any, *, max_length: int = 64
) -> dict[str, torch.Tensor]:
    """Mean ``|a_i|`` per unit of each site's down-projection input over the tokens of ``texts``.

    A site that saw no token (an MoE expert the router never chose) gets no entry: the caller falls back to
    the data-free score for it.

    Raises:
        ConfigError: no text to calibrate on.
        FusionError: a statistic came out nan/inf.
    """
    if not texts:
        raise ConfigError("importance: activations needs calibration text; got none (give data or use weights)")
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {s.name: 0 for s in sites}

    def hook_for(name: str):  # one closure per site: the pre-hook sees only its module
        def hook(_module: nn.Module, args: tuple) -> None:
            x = args[0].detach().float()
            flat = x.reshape(-1, x.shape[-1]).abs()
            sums[name] = flat.sum(0) + sums.get(name, 0.0)
            tokens[name] += flat.shape[0]

        return hook

    handles = [s.down_module.register_forward_pre_hook(hook_for(s.name)) for s in sites]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    try:
        for text in texts:
            # one unpadded sequence: no mask needed, and only input_ids (not every model takes token_type_ids)
            ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")["input_ids"]
            enc = {"input_ids": ids.to(device)}
            if encoder_decoder:  # the decoder's MLPs need decoder tokens too: feed the same text
                enc["decoder_input_ids"] = enc["input_ids"]
            model(**enc)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    out: dict[str, torch.Tensor] = {}
    for name, n in tokens.items():
        if n == 0:
            logger.warning("%s saw no calibration token; ranking its units by weights", name)
            continue
        mean = sums[name] / n
        if not torch.isfinite(mean).all():
            raise FusionError(f"{name}: calibration activations contain nan/inf; check the model and the text")
        out[name] = mean.cpu()
    return out
