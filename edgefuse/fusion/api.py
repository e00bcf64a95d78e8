"""Plan and apply MLP fusion on a transformers model, in place (the module surgery around ``clustering``).

Example:
    >>> from transformers import BertConfig, BertModel
    >>> from edgefuse.config.fusion import FusionConfig
    >>> model = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...                              intermediate_size=32))
    >>> result = fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    >>> [s.width_after for s in result.steps], model.config.intermediate_size
    ([16, 16], 16)
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from edgefuse.config.fusion import FusionConfig
from edgefuse.errors import ConfigError, TargetNotFoundError
from edgefuse.fusion.clustering import activation_importance, svd_rank
from edgefuse.fusion.methods import compress_mlp, get_method
from edgefuse.fusion.results import FusionResult, MlpPlanStep
from edgefuse.fusion.scale import attach_scale_
from edgefuse.fusion.sites import (
    MlpSite,
    find_mlps,
    mlp_param_count,
    model_arch,
    read_weights,
    write_low_rank,
    write_weights,
)
from edgefuse.names import match_names

logger = logging.getLogger(__name__)

META_KEY = "edgefuse"  # attribute of model.config, serialised into config.json by save_pretrained
META_VERSION = 1


def relative_name(model: nn.Module, name: str) -> str:
    """``name`` without the task model's base prefix (``bert.encoder.layer.0`` -> ``encoder.layer.0``), so
    metadata written by one head class applies to another."""
    prefix = getattr(model, "base_model_prefix", "")
    return name[len(prefix) + 1 :] if prefix and name.startswith(prefix + ".") else name


def select_sites(model: nn.Module, cfg: FusionConfig) -> list[MlpSite]:
    """The MLPs that ``cfg`` selects.

    Raises:
        TargetNotFoundError: a layer index or target entry that matches no MLP, or an empty selection.
    """
    sites = find_mlps(model)
    if not sites:
        raise TargetNotFoundError(f"no MLP found in {type(model).__name__}; is it a supported architecture?")
    if not cfg.include_shared_experts:
        sites = [s for s in sites if s.kind.role != "shared_expert"]
    if cfg.layers is not None:
        present = sorted({s.layer for s in sites})
        missing = [i for i in cfg.layers if i not in present]
        if missing:
            raise TargetNotFoundError(
                f"layer index(es) {missing} not in the model; it has MLP layers {present[0]}..{present[-1]}"
            )
        sites = [s for s in sites if s.layer in set(cfg.layers)]
    if cfg.targets is not None:
        chosen = set(match_names(cfg.targets, [s.name for s in find_mlps(model)], what="target"))
        sites = [s for s in sites if s.name in chosen]
    if not sites:
        raise TargetNotFoundError(f"the selection layers={cfg.layers} targets={cfg.targets} matched no MLP")
    return sites


def _params_after(site: MlpSite, cfg: FusionConfig, k: int) -> int:
    w = read_weights(site)
    d_in, p, d_out = w.up.shape[1], w.width, w.down.shape[0]
    n_in = 2 if w.gate is not None else 1
    in_bias = (w.up_bias is not None) + (w.gate_bias is not None)
    out_bias = getattr(site.down_module, "bias", None) is not None
    if get_method(cfg.method).low_rank:
        t = svd_rank(p, d_in, d_out, k)
        return n_in * t * (d_in + p) + in_bias * p + t * (p + d_out) + out_bias * d_out
    return n_in * k * d_in + in_bias * k + d_out * k + out_bias * d_out


def plan_fusion(model: nn.Module, cfg: FusionConfig) -> FusionResult:
    """What :func:`fuse_mlps_` would do, without touching the model: one step per MLP, with the totals.

    Raises:
        UnsupportedArchitectureError, TargetNotFoundError: see :func:`select_sites`.
    """
    spec = model_arch(model)
    method = get_method(cfg.method)
    steps = []
    for site in select_sites(model, cfg):
        p = read_weights(site).width
        if cfg.width is not None and cfg.width > p:
            raise ConfigError(
                f"width {cfg.width} is larger than the MLP {site.name!r} ({p} units): nothing would be compressed; "
                f"give a width below {p} or use --keep-ratio"
            )
        k = cfg.target_width(p)
        steps.append(
            MlpPlanStep(
                name=site.name,
                role=site.kind.role,
                layer=site.layer,
                expert=site.expert,
                width_before=p,
                width_after=p if method.low_rank else k,
                params_before=mlp_param_count(site),
                params_after=_params_after(site, cfg, k),
                frozen_scale_entries=k if method.frozen_scale else 0,
            )
        )
    total = sum(p.numel() for p in model.parameters())
    delta = sum(s.params_before - s.params_after for s in steps)
    return FusionResult(spec.model_type, cfg.method, tuple(steps), total, total - delta)


def freeze_routers_(model: nn.Module) -> list[str]:
    """Set ``requires_grad=False`` on every MoE router/gate parameter; return their names."""
    spec = model_arch(model)
    frozen = []
    for name, param in model.named_parameters():
        if any(re.search(p, "." + name) for p in spec.router_patterns):
            param.requires_grad_(False)
            frozen.append(name)
    return frozen


def _update_config(model: nn.Module, sites_done: dict[str, int], cfg: FusionConfig) -> dict[str, int]:
    """Write uniform widths to the config's own field so that plain ``from_pretrained`` works; record all
    per-MLP widths (and svd ranks) under ``config.edgefuse`` so that partial fusion reloads exactly."""
    config = model.config
    meta = dict(getattr(config, META_KEY, None) or {})
    widths = dict(meta.get("widths", {}))
    ranks = dict(meta.get("svd_ranks", {}))
    low_rank = get_method(cfg.method).low_rank
    for name, value in sites_done.items():
        (ranks if low_rank else widths)[relative_name(model, name)] = value
    updates: dict[str, int] = {}
    if not low_rank:
        by_kind: dict[str, list[int]] = {}
        for site in find_mlps(model):
            w = site.up_module.weight
            width = w.shape[1] if site.kind.layout == "conv1d" else w.shape[0]
            by_kind.setdefault(site.kind.config_field, []).append(width)
        for field_name, kind_widths in by_kind.items():
            if len(set(kind_widths)) == 1 and getattr(config, field_name, None) != kind_widths[0]:
                setattr(config, field_name, kind_widths[0])
                updates[field_name] = kind_widths[0]
    meta.update(
        {"version": META_VERSION, "method": cfg.method, "seed": cfg.seed, "n_init": cfg.n_init,
         "widths": widths, "svd_ranks": ranks}
    )
    if cfg.method == "fusion-pruned":
        meta.update({"pool": cfg.pool, "importance": cfg.importance})
    setattr(config, META_KEY, meta)
    return updates


def _activation_stats(
    model: nn.Module, cfg: FusionConfig, sites: list[MlpSite], texts: Sequence[str] | None, tokenizer: Any
) -> dict[str, torch.Tensor]:
    """Per-site mean |down input| for ``fusion-pruned`` + ``importance: activations``; else empty."""
    if cfg.method != "fusion-pruned" or cfg.importance != "activations":
        return {}
    from edgefuse.fusion.calibrate import down_input_stats
    from edgefuse.records import builtin_texts

    if tokenizer is None:
        raise ConfigError(
            "fusion-pruned with importance: activations needs the model's tokenizer to read calibration text; "
            "pass one (or use importance: weights)"
        )
    chosen = list(texts)[: cfg.calibration_examples] if texts is not None else builtin_texts(cfg.calibration_examples)
    return down_input_stats(model, sites, chosen, tokenizer)


@torch.no_grad()
def fuse_mlps_(
    model: nn.Module,
    cfg: FusionConfig,
    *,
    progress: bool = False,
    texts: Sequence[str] | None = None,
    tokenizer: Any = None,
) -> FusionResult:
    """Compress the selected MLPs of ``model`` in place with ``cfg.method``; return what was done.

    ``fusion`` and ``fusion-pruned`` attach the cluster sizes as a frozen scale before each down projection (see
    :mod:`edgefuse.fusion.scale`); call :func:`edgefuse.fusion.scale.fold_scales_` before inference-only export.
    MoE routers are frozen and never changed. The model keeps its class; its config records the new widths.

    Args:
        model: a transformers model of a supported architecture (``edgefuse.fusion.archs.supported_model_types()``).
        cfg: the fusion settings.
        progress: show a progress bar over the MLPs (on stderr).
        texts: calibration text for ``fusion-pruned`` with ``importance: activations`` (the first
            ``cfg.calibration_examples`` are used); None: the built-in corpus.
        tokenizer: the model's tokenizer (needed only for ``importance: activations``).

    Raises:
        UnsupportedArchitectureError: the model type has no adapter.
        TargetNotFoundError: the layer/target selection matched nothing.
        FusionError: a surgery step failed (its message names the module).
    """
    plan = plan_fusion(model, cfg)
    start = time.perf_counter()
    sites = {s.name: s for s in select_sites(model, cfg)}
    done: dict[str, int] = {}
    steps = []
    bar = None
    act_stats = _activation_stats(model, cfg, list(sites.values()), texts, tokenizer)
    if progress:
        from edgefuse.progress import progress_bar  # tqdm on a terminal, a 30 s heartbeat line in logs

        bar = progress_bar(len(plan.steps), desc=f"{cfg.method} k-means", unit="mlp")
    for step in plan.steps:
        site = sites[step.name]
        weights = read_weights(site)
        k = cfg.target_width(weights.width)
        score = None if site.name not in act_stats else activation_importance(weights, act_stats[site.name])
        out = compress_mlp(weights, cfg.method, k, seed=cfg.seed, n_init=cfg.n_init, max_iter=cfg.max_iter,
                           pool=cfg.pool, importance=score)
        if out.low_rank:
            write_low_rank(site, out.low_rank)
            done[site.name] = int(out.low_rank["up"].a.shape[0])
        else:
            write_weights(site, out.weights)
            done[site.name] = k
        if out.scale is not None:
            attach_scale_(site.down_module, out.scale)
        steps.append(
            replace(
                step,
                params_after=mlp_param_count(site),
                kmeans_inertia=out.inertia,
                max_cluster_size=None if out.counts is None else int(out.counts.max().item()),
            )
        )
        logger.debug("fused %s: %d -> %d", site.name, step.width_before, step.width_after)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    freeze_routers_(model)
    updates = _update_config(model, done, cfg)
    total_after = sum(p.numel() for p in model.parameters())
    return replace(
        plan,
        steps=tuple(steps),
        params_total_after=total_after,
        seconds=time.perf_counter() - start,
        applied=True,
        config_field_updates=updates,
    )
