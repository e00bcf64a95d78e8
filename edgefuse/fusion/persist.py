"""Save and load fused models: safetensors only, per-MLP widths restored exactly.

Layout of a saved folder: the usual ``config.json`` + ``model.safetensors`` of ``save_pretrained`` (the config
carries ``edgefuse`` metadata with every fused MLP's width), ``edgefuse_scales.safetensors`` with the frozen
scales of an unfolded ``fusion`` model, and the tokenizer when given. If every MLP of a kind has the same
width, the config's own field (``intermediate_size``, ``n_inner``, ...) holds it and plain
``from_pretrained`` works too (after :func:`edgefuse.fusion.scale.fold_scales_`, or the scales are lost).

Example:
    >>> import tempfile, torch
    >>> from transformers import BertConfig, BertModel
    >>> from edgefuse.config.fusion import FusionConfig
    >>> from edgefuse.fusion.api import fuse_mlps_
    >>> m = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32))
    >>> _ = fuse_mlps_(m, FusionConfig(keep_ratio=0.5, layers=[1]))
    >>> out = save_fused(m, tempfile.mkdtemp() + "/fused")
    >>> type(load_fused(out)).__name__
    'BertModel'
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgefuse.errors import ConfigError, TargetNotFoundError
from edgefuse.io_utils import atomic_dir

logger = logging.getLogger(__name__)

SCALES_FILE = "edgefuse_scales.safetensors"


def save_fused(
    model: nn.Module, out_dir: str | Path, *, tokenizer: Any = None, overwrite: bool = False
) -> Path:
    """Save ``model`` (fused or not) to ``out_dir`` atomically, as safetensors.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is False.
    """
    from safetensors.torch import save_file

    from edgefuse.fusion.api import relative_name
    from edgefuse.fusion.scale import iter_scaled

    out = Path(out_dir)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        scales = {relative_name(model, n): m.edgefuse_scale.contiguous() for n, m in iter_scaled(model)}
        if scales:
            save_file(scales, str(tmp / SCALES_FILE), metadata={"format": "edgefuse-scales-v1"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


def _resize_to_metadata(model: nn.Module, meta: dict[str, Any]) -> None:
    """Give every MLP recorded in ``meta`` its saved width (or svd rank), with placeholder weights."""
    from edgefuse.fusion.api import relative_name
    from edgefuse.fusion.clustering import LowRank, MlpWeights
    from edgefuse.fusion.sites import find_mlps, read_weights, write_low_rank, write_weights

    widths: dict[str, int] = meta.get("widths", {})
    ranks: dict[str, int] = meta.get("svd_ranks", {})
    for site in find_mlps(model):
        key = relative_name(model, site.name)
        w = read_weights(site)
        if key in ranks:
            t = ranks[key]
            low = {"up": LowRank(torch.empty(t, w.up.shape[1]), torch.empty(w.width, t)),
                   "down": LowRank(torch.empty(t, w.width), torch.empty(w.down.shape[0], t))}
            if w.gate is not None:
                low["gate"] = LowRank(torch.empty(t, w.up.shape[1]), torch.empty(w.width, t))
            write_low_rank(site, low)
        elif key in widths and widths[key] != w.width:
            k = widths[key]
            write_weights(
                site,
                MlpWeights(up=torch.empty(k, w.up.shape[1]), down=torch.empty(w.down.shape[0], k),
                           up_bias=_placeholder(w.up_bias, k),
                           gate=None if w.gate is None else torch.empty(k, w.up.shape[1]),
                           gate_bias=_placeholder(w.gate_bias, k)),
            )


def _placeholder(bias: torch.Tensor | None, width: int) -> torch.Tensor | None:
    """An uninitialised bias of ``width`` where the MLP has one (the checkpoint overwrites it)."""
    return None if bias is None else torch.empty(width)


def _read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(p for p in folder.glob("*.safetensors") if p.name != SCALES_FILE)
    if not files:
        raise TargetNotFoundError(
            f"no *.safetensors weights in {str(folder)!r}; edgefuse loads safetensors only (never pickles)"
        )
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_fused(
    path: str | Path, *, model_class: type | None = None, config: Any = None, trust_remote_code: bool = False
) -> nn.Module:
    """Load a model saved by :func:`save_fused` (or any safetensors transformers folder), widths restored.

    Args:
        path: the saved folder.
        model_class: transformers class to build (default: the first of ``config.architectures``). A base
            checkpoint (e.g. ``BertModel``) loads into a task class (``BertForSequenceClassification``); the
            head is then freshly initialised.
        config: a config to use instead of the folder's (e.g. with ``num_labels`` set).
        trust_remote_code: passed to ``AutoConfig``; off unless you trust the folder.

    Raises:
        TargetNotFoundError: the folder, its config or its weights are missing.
        ConfigError: the weights do not fit the recorded shapes.
    """
    import transformers
    from safetensors.torch import load_file

    from edgefuse.fusion.api import META_KEY, relative_name
    from edgefuse.fusion.scale import attach_scale_

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise TargetNotFoundError(f"model folder {str(folder)!r} has no config.json (is the path right?)")
    if config is None:
        config = transformers.AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    meta = getattr(config, META_KEY, None) or {}
    if model_class is None:
        archs = getattr(config, "architectures", None) or []
        model_class = getattr(transformers, archs[0], None) if archs else None
        if model_class is None:
            model_class = transformers.AutoModel._model_mapping[type(config)]
    model = model_class(config)
    _resize_to_metadata(model, meta)
    state = _read_state_dict(folder)
    target = model
    prefix = getattr(model, "base_model_prefix", "")
    if prefix and hasattr(model, prefix) and not any(k.startswith(prefix + ".") for k in state):
        target = getattr(model, prefix)  # a base checkpoint into a task model: the head stays freshly initialised
    elif prefix and not hasattr(model, prefix) and any(k.startswith(prefix + ".") for k in state):
        # a task checkpoint into its base model (a classifier exported for feature extraction): the head is dropped
        state = {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")}
    missing, unexpected = target.load_state_dict(state, strict=False)
    model.tie_weights()
    loaded = {t.data_ptr() for k, t in target.state_dict().items() if k in state}
    params = dict(target.named_parameters(remove_duplicate=False))
    really_missing = [k for k in missing if k not in params or params[k].data_ptr() not in loaded]
    if really_missing or unexpected:
        raise ConfigError(
            f"weights in {str(folder)!r} do not fit {model_class.__name__}: missing {really_missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )
    scales_path = folder / SCALES_FILE
    if scales_path.is_file():
        scales = load_file(str(scales_path))
        by_rel = {relative_name(model, n): m for n, m in model.named_modules()}
        for name, scale in scales.items():
            if name not in by_rel:
                raise ConfigError(f"{SCALES_FILE} names module {name!r}, which {model_class.__name__} lacks")
            attach_scale_(by_rel[name], scale)
    model.eval()
    logger.info("loaded %s from %s (%d fused MLPs)", model_class.__name__, folder, len(meta.get("widths", {})))
    return model


def read_fusion_metadata(path: str | Path) -> dict[str, Any]:
    """The ``edgefuse`` metadata of a saved folder's config.json ({} when it was never fused)."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    return cfg.get("edgefuse", {}) or {}
