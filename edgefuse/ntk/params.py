"""Which parameters the NTK is taken over, and how they are split into chunks that fit in memory.

``fused-mlp``: the up/gate/down modules (weights and biases) of every MLP that compression changed, in both
models; ``all``: every trainable parameter. Each parameter belongs to a group (its fused layer, or ``other``),
and both kernels are sums of per-group kernels. The frozen fusion scale is a buffer, never a parameter
(:func:`check_scale_is_buffer`).

Example:
    >>> from transformers import BertConfig, BertModel
    >>> m = BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    >>> from edgefuse.fusion.sites import find_mlps
    >>> sorted({g for g, _, _ in param_groups(m, find_mlps(m), "all")})
    ['layer.0', 'other']
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from edgefuse.errors import FusionError, TargetNotFoundError
from edgefuse.fusion.api import relative_name
from edgefuse.fusion.scale import SCALE_ATTR, get_scale
from edgefuse.fusion.sites import MlpSite, find_mlps
from edgefuse.ntk.scalar import Example

OTHER = "other"  # the group of every parameter outside the fused MLPs (params="all")
FUSED = "fused-mlp"
ALL = "all"
MODULES = "modules"  # the group of a named-module parameter set (params="modules")



def layer_key(site: MlpSite, model: nn.Module) -> str:
    """``layer.3`` (``encoder.layer.3`` / ``decoder.layer.3`` for seq2seq): the group of a fused MLP."""
    if getattr(model.config, "is_encoder_decoder", False):
        stack = "decoder" if ".decoder." in f".{site.name}." else "encoder"
        return f"{stack}.layer.{site.layer}"
    return f"layer.{site.layer}"


def _site_modules(site: MlpSite) -> list[nn.Module]:
    return [site.up_module, site.down_module] + ([site.gate_module] if site.gate_module is not None else [])


def _shapes(site: MlpSite) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for m in _site_modules(site) for n, p in m.named_parameters()]


def fused_site_pairs(original: nn.Module, compressed: nn.Module) -> list[tuple[MlpSite, MlpSite]]:
    """The MLPs that compression changed, as ``(original site, compressed site)`` pairs in module order.

    An MLP counts as changed when it carries a fusion scale, is listed in the compressed config's ``edgefuse``
    metadata, or its parameter shapes differ from the original's (e.g. svd's two-factor modules).

    Raises:
        TargetNotFoundError: an MLP of the compressed model is not in the original (different architectures).
    """
    orig = {s.name: s for s in find_mlps(original)}
    meta = getattr(compressed.config, "edgefuse", None) or {}
    recorded = set(meta.get("widths", {})) | set(meta.get("svd_ranks", {}))
    pairs = []
    for site in find_mlps(compressed):
        o = orig.get(site.name)
        if o is None:
            raise TargetNotFoundError(
                f"MLP {site.name!r} of the compressed model is not in the original; compare a model with its own "
                "compressed version"
            )
        if get_scale(site.down_module) is not None or relative_name(compressed, site.name) in recorded or _shapes(
            site
        ) != _shapes(o):
            pairs.append((o, site))
    return pairs


def check_scale_is_buffer(model: nn.Module) -> None:
    """The frozen scale must be a buffer, never a parameter (it is not trained)."""
    for name, _ in model.named_parameters():
        if name.rsplit(".", 1)[-1] == SCALE_ATTR:
            raise FusionError(f"{name} is a Parameter; the fusion scale must stay a frozen buffer")


def param_groups(
    model: nn.Module, sites: Sequence[MlpSite], param_set: str, *, exclude: frozenset[str] = frozenset()
) -> list[tuple[str, str, nn.Parameter]]:
    """``(group, name, parameter)`` of the kernel's parameter set, grouped by fused layer (then ``other``)."""
    check_scale_is_buffer(model)
    owner: dict[int, str] = {}
    order: list[str] = []
    for site in sites:
        key = layer_key(site, model)
        if key not in order:
            order.append(key)
        for module in _site_modules(site):
            for p in module.parameters():
                owner[id(p)] = key
    entries = []
    for name, p in model.named_parameters():
        key = owner.get(id(p))
        if key is None:
            if param_set != ALL or not p.requires_grad or name in exclude:
                continue
            key = OTHER
        entries.append((key, name, p))
    rank = {k: i for i, k in enumerate([*order, OTHER])}
    return sorted(entries, key=lambda e: rank[e[0]])  # stable: module order inside a group


def module_entries(model: nn.Module, patterns: Sequence[str]) -> list[tuple[str, str, nn.Parameter]]:
    """``(MODULES, name, parameter)`` for the parameters of the modules named by ``patterns`` (and of their
    sub-modules), each once, in model order.

    Raises:
        TargetNotFoundError: a pattern that names no module of ``model``.
    """
    from edgefuse.names import match_names

    check_scale_is_buffer(model)
    modules = dict(model.named_modules())
    chosen = match_names(patterns, [n for n in modules if n], what="NTK module")
    wanted = {id(p) for n in chosen for p in modules[n].parameters()}
    return [(MODULES, name, p) for name, p in model.named_parameters() if id(p) in wanted]


@dataclass(frozen=True)
class Piece:
    group: str
    param: nn.Parameter
    rows: torch.Tensor | None  # embedding rows whose gradient can be non-zero (None: all of it)
    start: int  # slice [start, stop) of the flattened (row-selected) gradient
    stop: int
    offset: int  # column of the chunk buffer where the slice goes


def embedding_rows(model: nn.Module, examples: Sequence[Example]) -> tuple[nn.Parameter, torch.Tensor] | None:
    """The input embedding and the token rows used by ``examples``: the gradient of every other row is exactly
    zero, so it adds nothing to either kernel and need not be stored. Not for tied embeddings (the LM head makes
    their gradient dense)."""
    try:
        emb = model.get_input_embeddings()
        out = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if not isinstance(emb, nn.Embedding) or (out is not None and getattr(out, "weight", None) is emb.weight):
        return None
    ids = [ex[k].reshape(-1) for ex in examples for k in ("input_ids", "decoder_input_ids") if k in ex]
    return emb.weight, torch.cat(ids).unique()


def plan_chunks(
    entries: Sequence[tuple[str, str, nn.Parameter]], n: int, max_mib: float, rows: tuple | None
) -> list[list[Piece]]:
    """Split the parameters into chunks whose gradients (and signs) for ``n`` examples fit ``max_mib``."""
    cap = max(1, int(max_mib * 2**20) // (n * 4 * 2))  # fp32 gradients + fp32 signs
    chunks: list[list[Piece]] = [[]]
    used = 0
    for group, _, p in entries:
        sel = rows[1] if rows is not None and p is rows[0] else None
        size = p.numel() if sel is None else int(sel.numel()) * p.shape[1]
        start = 0
        while start < size:
            if used == cap:
                chunks.append([])
                used = 0
            stop = min(size, start + cap - used)
            chunks[-1].append(Piece(group, p, sel, start, stop, used))
            used += stop - start
            start = stop
    return [c for c in chunks if c]
