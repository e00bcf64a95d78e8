"""The table of compression methods: one :class:`CompressionMethod` per name in ``FusionConfig.method``.

Each entry maps one MLP's weights (:class:`~edgefuse.fusion.clustering.MlpWeights`) to a smaller MLP at width
``k``, and says what the result carries: a frozen count scale (``fusion`` only, the paper's method) or low-rank
factors instead of a narrower MLP (``svd``). :func:`compress_mlp` looks the method up here; the config's
``FusionMethod`` literal lists the same names (a test keeps them equal).

Adding a method is one function and one entry in :data:`METHODS` (plus its name in ``FusionMethod`` and its
tests); improvements on the paper's method are new names, never a change to ``fusion``.

Example:
    >>> import torch
    >>> w = MlpWeights(up=torch.randn(8, 4), up_bias=torch.randn(8), down=torch.randn(4, 8))
    >>> out = compress_mlp(w, "fusion", k=3, seed=0)
    >>> out.weights.width, out.scale.sum().item()
    (3, 8.0)
    >>> sorted(m for m in METHODS if METHODS[m].frozen_scale)
    ['fusion', 'fusion-pruned']
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from edgefuse.errors import ConfigError
from edgefuse.fusion.clustering import (
    Compressed,
    MlpWeights,
    fuse_pruned,
    kmeans_units,
    scale_units,
    svd_rank,
    truncated_svd,
    unit_importance,
)
from edgefuse.names import table_entry

# fn(weights, k, seed, n_init, max_iter) -> Compressed
CompressFn = Callable[[MlpWeights, int, int, int, int], Compressed]


@dataclass(frozen=True)
class CompressionMethod:
    """One compression method.

    ``pooled``: the function also takes ``pool`` and ``importance`` (:func:`~edgefuse.fusion.clustering.fuse_pruned`).
    ``frozen_scale``: the result carries the per-unit count vector that :mod:`edgefuse.fusion.scale` attaches
    before the down projection. ``low_rank``: the MLP keeps its width and its matrices become two factors
    (``Compressed.low_rank``); the target width only sets the rank.
    """

    name: str
    description: str
    compress: CompressFn
    frozen_scale: bool = False
    low_rank: bool = False
    pooled: bool = False  # reads ``pool`` and ``importance`` (prune the tail, fuse the rest)


def _kmeans(w: MlpWeights, k: int, seed: int, n_init: int, max_iter: int) -> tuple[MlpWeights, dict]:
    cent, counts, labels, inertia = kmeans_units(w, k, seed=seed, n_init=n_init, max_iter=max_iter)
    return cent, {"counts": counts, "labels": labels, "inertia": inertia}


def _fusion(w: MlpWeights, k: int, seed: int, n_init: int, max_iter: int) -> Compressed:
    cent, common = _kmeans(w, k, seed, n_init, max_iter)
    # the counts stay a separate frozen scale between the activation and the down projection
    return Compressed(cent, scale=common["counts"].clone(), **common)


def _merge(w: MlpWeights, k: int, seed: int, n_init: int, max_iter: int) -> Compressed:
    cent, common = _kmeans(w, k, seed, n_init, max_iter)
    return Compressed(scale_units(cent, down=common["counts"]), **common)


def _cluster(w: MlpWeights, k: int, seed: int, n_init: int, max_iter: int) -> Compressed:
    cent, common = _kmeans(w, k, seed, n_init, max_iter)
    # sqrt(n) on both sides. Ungated: inside the activation (W1, b1), as the paper's baseline.
    # Gated: on the linear `up` branch, the only place sqrt(n) can enter multiplicatively.
    root = common["counts"].sqrt()
    return Compressed(scale_units(cent, up=root, down=root), **common)


def _centroid(w: MlpWeights, k: int, seed: int, n_init: int, max_iter: int) -> Compressed:
    cent, common = _kmeans(w, k, seed, n_init, max_iter)
    return Compressed(cent, **common)


def _prune(w: MlpWeights, k: int, seed: int, n_init: int, max_iter: int) -> Compressed:
    keep = torch.topk(unit_importance(w), k).indices.sort().values  # aligned units, original order kept
    return Compressed(w.select(keep))


def _sketch(w: MlpWeights, k: int, seed: int, n_init: int, max_iter: int) -> Compressed:
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(w.width, k, generator=gen, dtype=torch.float32) / math.sqrt(k)  # (p, k), N(0, 1/k)
    st = s.T
    return Compressed(
        MlpWeights(
            up=st @ w.up.float(),
            down=w.down.float() @ s,
            up_bias=None if w.up_bias is None else st @ w.up_bias.float(),
            gate=None if w.gate is None else st @ w.gate.float(),
            gate_bias=None if w.gate_bias is None else st @ w.gate_bias.float(),
        )
    )


def _svd(w: MlpWeights, k: int, seed: int, n_init: int, max_iter: int) -> Compressed:
    rank = svd_rank(w.width, w.up.shape[1], w.down.shape[0], k)
    low = {"up": truncated_svd(w.up, rank), "down": truncated_svd(w.down, rank)}
    if w.gate is not None:
        low["gate"] = truncated_svd(w.gate, rank)
    return Compressed(w, low_rank=low)


METHODS: dict[str, CompressionMethod] = {
    m.name: m
    for m in (
        CompressionMethod("fusion", "k-means centroids + frozen cluster-size scale (the method)", _fusion,
                          frozen_scale=True),
        CompressionMethod("fusion-pruned", "prune the least important units to a pool of pool*k, fuse the rest "
                          "(centroids + frozen counts summing to the pool); an improvement beside the paper's method",
                          fuse_pruned, frozen_scale=True, pooled=True),
        CompressionMethod("merge", "k-means centroids, sizes folded into the down projection", _merge),
        CompressionMethod("cluster", "k-means centroids, sqrt(sizes) folded into both sides", _cluster),
        CompressionMethod("centroid", "k-means centroids, no sizes", _centroid),
        CompressionMethod("svd", "baseline: truncated SVD, rank matched to the parameter count", _svd,
                          low_rank=True),
        CompressionMethod("prune", "baseline: structured pruning of the least important aligned units", _prune),
        CompressionMethod("sketch", "baseline: random Gaussian sketch of the units", _sketch),
    )
}


def get_method(name: str) -> CompressionMethod:
    """The table entry of ``name``.

    Raises:
        ConfigError: unknown method (the message lists the known ones).
    """
    return table_entry(METHODS, name, what="method")


def compress_mlp(
    w: MlpWeights, method: str, k: int, *, seed: int = 0, n_init: int = 1, max_iter: int = 300,
    pool: float = 1.25, importance: torch.Tensor | None = None,
) -> Compressed:
    """Compress one MLP to width ``k`` with ``method`` (see :data:`METHODS`); ``pool`` and ``importance`` are
    read by the pooled methods only (``fusion-pruned``).

    Raises:
        ConfigError: unknown method or a width outside ``[1, p]``.
    """
    entry = get_method(method)
    if not 1 <= k <= w.width:
        raise ConfigError(f"target width {k} must be between 1 and the MLP width {w.width}")
    if entry.pooled:
        return entry.compress(w, k, pool=pool, importance=importance, seed=seed, n_init=n_init,  # type: ignore[call-arg]
                              max_iter=max_iter)
    return entry.compress(w, k, seed, n_init, max_iter)
