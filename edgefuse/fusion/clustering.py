"""The fusion math, as pure functions on tensors: no nn.Module, no I/O.

An MLP ``f(x) = W2 act(W1 x + b1) + b2`` (or, gated, ``W2 (act(G x) * (U x))``) is a sum of ``p`` width-1
sub-MLPs ``theta_i = [g_i ; u_i ; b1_i ; w2_i]`` (method.md 1.1). Every function here maps the weights of one
MLP to a smaller one at a target width ``k``; ``b2`` is never touched.

Example:
    >>> import torch
    >>> w = MlpWeights(up=torch.randn(8, 4), up_bias=torch.randn(8), down=torch.randn(4, 8))
    >>> out = compress_mlp(w, "fusion", k=3, seed=0)
    >>> out.weights.width, out.scale.sum().item()
    (3, 8.0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from edgefuse.errors import ConfigError, FusionError


@dataclass(frozen=True)
class MlpWeights:
    """The weights of one MLP in a canonical layout.

    ``up``/``gate`` are ``[p, d]`` (row i belongs to unit i), ``up_bias``/``gate_bias`` are ``[p]`` and ``down``
    is ``[d_out, p]`` (column i belongs to unit i), whatever the module layout was.
    """

    up: torch.Tensor
    down: torch.Tensor
    up_bias: torch.Tensor | None = None
    gate: torch.Tensor | None = None
    gate_bias: torch.Tensor | None = None

    @property
    def width(self) -> int:
        return int(self.up.shape[0])

    def parts(self) -> list[torch.Tensor]:
        """The per-unit blocks in feature order, each ``[p, ·]``: gate, gate_bias, up, up_bias, down^T."""
        blocks: list[torch.Tensor] = []
        for t in (self.gate, self.gate_bias, self.up, self.up_bias):
            if t is not None:
                blocks.append(t.reshape(t.shape[0], -1))
        blocks.append(self.down.T)
        return blocks

    def select(self, index: torch.Tensor) -> MlpWeights:
        """Keep the units ``index`` (aligned across gate, up and down)."""
        def pick(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index].clone()

        return MlpWeights(
            up=self.up[index].clone(),
            down=self.down[:, index].clone(),
            up_bias=pick(self.up_bias),
            gate=pick(self.gate),
            gate_bias=pick(self.gate_bias),
        )


@dataclass(frozen=True)
class LowRank:
    """``M ≈ B @ A`` with ``A: [t, in]`` and ``B: [out, t]`` (the truncated SVD ``U_t diag(s_t)``, ``V_t^T``)."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass(frozen=True)
class Compressed:
    """The result of compressing one MLP.

    ``weights`` is the new MLP (for ``svd`` the original, untouched weights: use ``low_rank``). ``scale`` is
    the frozen per-unit count vector (``fusion`` only), float32. ``counts``/``labels``/``inertia`` come from
    k-means for the clustering methods.
    """

    weights: MlpWeights
    scale: torch.Tensor | None = None
    counts: torch.Tensor | None = None
    labels: np.ndarray | None = None
    inertia: float | None = None
    low_rank: dict[str, LowRank] = field(default_factory=dict)


def subml_features(w: MlpWeights) -> np.ndarray:
    """Stack the sub-MLP vectors ``theta_i`` as rows: ``[p, F]`` float32, raw (no normalisation, method.md 1.2)."""
    return torch.cat([b.detach().to(torch.float32) for b in w.parts()], dim=1).cpu().numpy()


def split_features(theta: np.ndarray | torch.Tensor, like: MlpWeights) -> MlpWeights:
    """Inverse of :func:`subml_features`: split ``[k, F]`` rows back into weights in the order they were stacked."""
    t = torch.as_tensor(theta, dtype=torch.float32)
    out: dict[str, torch.Tensor | None] = {}
    col = 0
    for name in ("gate", "gate_bias", "up", "up_bias"):
        ref = getattr(like, name)
        if ref is None:
            out[name] = None
            continue
        n = 1 if ref.dim() == 1 else ref.shape[1]
        block = t[:, col : col + n]
        out[name] = block[:, 0].contiguous() if ref.dim() == 1 else block.contiguous()
        col += n
    d_out = like.down.shape[0]
    if t.shape[1] - col != d_out:
        raise FusionError(f"feature width {t.shape[1]} does not match the MLP layout (expected {col + d_out})")
    return MlpWeights(
        up=out["up"],  # type: ignore[arg-type]
        down=t[:, col:].T.contiguous(),
        up_bias=out["up_bias"],
        gate=out["gate"],
        gate_bias=out["gate_bias"],
    )


def kmeans_plusplus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (the algorithm of scikit-learn's ``init="k-means++"``: ``2 + ln k`` local
    trials per centre, keep the one that lowers the potential most), vectorised in torch.

    scikit-learn's own seeding dominates the cost of fusing a layer (1.5 s of 1.7 s for a MiniLM layer at
    k=768, measured here); this one takes a fraction of that and is seeded by ``gen`` alone.

    Args:
        x: ``[n, F]`` float32 points.
        k: number of centres.
        gen: the seeded generator.

    Returns:
        ``[k, F]`` initial centres (rows of ``x``).
    """
    n = x.shape[0]
    x64 = x.to(torch.float32)  # float32 distances: ample for choosing seeds, 2x faster than float64
    sq = (x64 * x64).sum(1)  # (n,)
    trials = 2 + int(math.log(k))

    def sqdist(idx: torch.Tensor) -> torch.Tensor:  # (len(idx), n)
        return (sq[idx][:, None] + sq[None, :] - 2.0 * (x64[idx] @ x64.T)).clamp_min_(0.0)

    # k sequential steps of small ops: one thread avoids an OpenMP barrier per op, which on a busy (shared)
    # machine made this 10x slower with 2 threads than with 1 (measured: 82 s vs 12 s for MiniLM)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        chosen = [int(torch.randint(n, (1,), generator=gen).item())]
        closest = sqdist(torch.tensor(chosen))[0]
        pot = closest.sum()
        for _ in range(1, k):
            cum = torch.cumsum(closest.double(), 0)  # float64: a float32 running sum over 1000s of terms drifts
            r = torch.rand(trials, generator=gen, dtype=torch.float64) * pot.double()
            cand = torch.searchsorted(cum, r).clamp_(max=n - 1)
            cand_closest = torch.minimum(closest[None, :], sqdist(cand))  # (trials, n)
            pots = cand_closest.sum(1)
            best = int(torch.argmin(pots))
            chosen.append(int(cand[best]))
            closest, pot = cand_closest[best], pots[best]
    finally:
        torch.set_num_threads(threads)
    return x[torch.tensor(chosen)]


def kmeans_units(
    w: MlpWeights, k: int, *, seed: int = 0, n_init: int = 1, max_iter: int = 300
) -> tuple[MlpWeights, torch.Tensor, np.ndarray, float]:
    """Cluster the sub-MLPs of ``w`` into ``k`` centroids: k-means++ seeding, then scikit-learn's Lloyd k-means.

    ``n_init`` seedings are tried and the run with the lowest inertia is kept (method.md 1.3). Returns the
    centroid MLP (centroids are the exact member means of the final labels), the counts ``n_j`` (float32,
    aligned with the centroid rows by a bincount of length k), the labels and the inertia. Deterministic for a
    given seed (its own generator; no global RNG).

    Raises:
        FusionError: a cluster came out empty (only when the MLP has fewer distinct units than ``k``).
    """
    from sklearn.cluster import KMeans

    p = w.width
    if not 1 <= k <= p:
        raise ConfigError(f"target width {k} must be between 1 and the MLP width {p}")
    x = subml_features(w)  # (p, F)
    if k == p:
        labels = np.arange(p)
        inertia = 0.0
    else:
        gen = torch.Generator().manual_seed(seed)
        best: tuple[float, np.ndarray] | None = None
        for _ in range(n_init):
            init = kmeans_plusplus(torch.from_numpy(x), k, gen).numpy()
            km = KMeans(n_clusters=k, init=init, n_init=1, max_iter=max_iter, algorithm="lloyd").fit(x)
            if best is None or km.inertia_ < best[0]:
                best = (float(km.inertia_), km.labels_)
        assert best is not None
        inertia, labels = best
    counts = np.bincount(labels, minlength=k)
    if (counts == 0).any():
        raise FusionError(
            f"k-means left {(counts == 0).sum()} of {k} clusters empty (the MLP has fewer distinct units "
            f"than the target width); lower the target width"
        )
    # exact member means in float64, then back to float32 (theta_bar_j in method.md 1.3)
    sums = np.zeros((k, x.shape[1]), dtype=np.float64)
    np.add.at(sums, labels, x.astype(np.float64))
    centroids = (sums / counts[:, None]).astype(np.float32)
    return split_features(centroids, w), torch.as_tensor(counts, dtype=torch.float32), labels, inertia


def _scale_units(w: MlpWeights, *, up: torch.Tensor | None = None, down: torch.Tensor | None = None) -> MlpWeights:
    """Multiply unit j's up-side entries by ``up[j]`` and its down column by ``down[j]``."""
    new = w
    if up is not None:
        new = replace(
            new,
            up=new.up * up[:, None],
            up_bias=None if new.up_bias is None else new.up_bias * up,
        )
    if down is not None:
        new = replace(new, down=new.down * down[None, :])
    return new


def svd_rank(width: int, d_in: int, d_out: int, k: int) -> int:
    """Rank ``t`` whose two factors match the parameters of a ``k``-wide fused matrix: ``t(in+out) ≈ k·d``.

    For RoBERTa-base (768/3072, k=768) this is 153, as in the paper's code.
    """
    d = min(d_in, d_out)
    return max(1, (k * d) // (d + width))


def truncated_svd(m: torch.Tensor, rank: int) -> LowRank:
    """``m [out, in] ≈ B @ A`` with ``B = U_t diag(s_t)`` and ``A = V_t^T``."""
    u, s, vh = torch.linalg.svd(m.to(torch.float32), full_matrices=False)
    return LowRank(a=vh[:rank].contiguous(), b=(u[:, :rank] * s[:rank]).contiguous())


def unit_importance(w: MlpWeights) -> torch.Tensor:
    """Data-free importance of unit i: ``‖up_i‖·‖down_i‖`` (times ``‖gate_i‖`` when gated), biases included."""
    up = w.up if w.up_bias is None else torch.cat([w.up, w.up_bias[:, None]], dim=1)
    score = up.norm(dim=1) * w.down.norm(dim=0)
    if w.gate is not None:
        gate = w.gate if w.gate_bias is None else torch.cat([w.gate, w.gate_bias[:, None]], dim=1)
        score = score * gate.norm(dim=1)
    return score


def pool_size(width: int, k: int, pool: float) -> int:
    """Size ``m`` of the pool that ``fusion-pruned`` keeps: ``round(pool * k)``, clamped to ``[k, width]``.

    Example:
        >>> pool_size(1536, 768, 1.25), pool_size(1536, 768, 4.0), pool_size(1536, 768, 1.0)
        (960, 1536, 768)
    """
    return int(min(width, max(k, round(pool * k))))


def activation_importance(w: MlpWeights, mean_abs_activation: torch.Tensor) -> torch.Tensor:
    """Data-scored importance of unit i: ``‖down_i‖ · mean|a_i|``, with ``a_i`` the unit's input to the down
    projection (the activation, times the up branch when gated) averaged over calibration tokens.

    Example:
        >>> w = MlpWeights(up=torch.ones(3, 2), down=torch.tensor([[1.0, 0.0, 2.0]]))
        >>> activation_importance(w, torch.tensor([1.0, 5.0, 0.5])).tolist()
        [1.0, 0.0, 1.0]
    """
    a = torch.as_tensor(mean_abs_activation, dtype=torch.float32).reshape(-1)
    if a.shape[0] != w.width:
        raise FusionError(f"activation statistics have {a.shape[0]} units, the MLP has {w.width}")
    if not torch.isfinite(a).all():
        raise FusionError("activation statistics contain nan/inf; check the calibration text and the model")
    return w.down.detach().to(torch.float32).norm(dim=0) * a


def fuse_pruned(
    w: MlpWeights,
    k: int,
    *,
    pool: float = 1.25,
    importance: torch.Tensor | None = None,
    seed: int = 0,
    n_init: int = 1,
    max_iter: int = 300,
) -> Compressed:
    """"Prune the tail, fuse the rest": keep the ``m = pool_size(p, k, pool)`` most important units and fuse
    only those into ``k`` centroids with the frozen count scale (counts sum to ``m``).

    The tail that plain k-means pools into near-zero centroids (then multiplied by counts of hundreds) is
    dropped instead; inside the kept pool the construction is the paper's, so the Adam-NTK argument of
    fusion holds there. With ``m = p`` this is exactly ``fusion`` (same k-means on the same features).

    Args:
        w: the MLP.
        k: the target width.
        pool: ``R`` in ``m = R k`` (>= 1).
        importance: a score per unit (``[p]``, larger is kept); None: :func:`unit_importance` (data-free).
        seed, n_init, max_iter: as for :func:`kmeans_units`.

    Returns:
        :class:`Compressed` with the centroid MLP, the frozen ``scale`` (= counts), the counts, ``labels`` of
        length ``p`` (``-1`` for pruned units) and the inertia over the pool.

    Example:
        >>> w = MlpWeights(up=torch.randn(10, 4), up_bias=torch.randn(10), down=torch.randn(4, 10))
        >>> out = fuse_pruned(w, 4, pool=1.5, seed=0)
        >>> out.weights.width, out.scale.sum().item(), int((out.labels < 0).sum())
        (4, 6.0, 4)
    """
    p = w.width
    if not 1 <= k <= p:
        raise ConfigError(f"target width {k} must be between 1 and the MLP width {p}")
    if not pool >= 1.0:
        raise ConfigError(f"pool {pool} must be >= 1 (the pool holds pool * k units); use 1.0 for plain prune-size")
    m = pool_size(p, k, pool)
    if m == p:  # nothing to prune: the paper's fusion, bit for bit
        cent, counts, labels, inertia = kmeans_units(w, k, seed=seed, n_init=n_init, max_iter=max_iter)
        return Compressed(cent, scale=counts.clone(), counts=counts, labels=labels, inertia=inertia)
    score = unit_importance(w) if importance is None else torch.as_tensor(importance, dtype=torch.float32)
    if score.shape != (p,):
        raise FusionError(f"importance has shape {tuple(score.shape)}, expected ({p},)")
    # stable: equal scores keep the lower unit index, so the pool is deterministic
    order = torch.sort(score.detach().cpu(), descending=True, stable=True).indices
    keep = order[:m].sort().values
    cent, counts, sub_labels, inertia = kmeans_units(w.select(keep), k, seed=seed, n_init=n_init, max_iter=max_iter)
    labels = np.full(p, -1, dtype=np.int64)
    labels[keep.numpy()] = sub_labels
    return Compressed(cent, scale=counts.clone(), counts=counts, labels=labels, inertia=inertia)


def compress_mlp(
    w: MlpWeights,
    method: str,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 1,
    max_iter: int = 300,
    pool: float = 1.25,
    importance: torch.Tensor | None = None,
) -> Compressed:
    """Compress one MLP to width ``k`` with ``method`` (see :class:`edgefuse.config.fusion.FusionConfig`).

    ``pool`` and ``importance`` are read by ``fusion-pruned`` only (see :func:`fuse_pruned`).

    Raises:
        ConfigError: unknown method or a width outside ``[1, p]``.
    """
    p = w.width
    if not 1 <= k <= p:
        raise ConfigError(f"target width {k} must be between 1 and the MLP width {p}")
    if method == "fusion-pruned":
        return fuse_pruned(w, k, pool=pool, importance=importance, seed=seed, n_init=n_init, max_iter=max_iter)
    if method in ("fusion", "merge", "cluster", "centroid"):
        cent, counts, labels, inertia = kmeans_units(w, k, seed=seed, n_init=n_init, max_iter=max_iter)
        common = {"counts": counts, "labels": labels, "inertia": inertia}
        if method == "fusion":
            # the counts stay a separate frozen scale between the activation and the down projection
            return Compressed(cent, scale=counts.clone(), **common)
        if method == "merge":
            return Compressed(_scale_units(cent, down=counts), **common)
        if method == "centroid":
            return Compressed(cent, **common)
        # cluster: sqrt(n) on both sides. Ungated: inside the activation (W1, b1), as the paper's baseline.
        # Gated: on the linear `up` branch, the only place sqrt(n) can enter multiplicatively.
        root = counts.sqrt()
        return Compressed(_scale_units(cent, up=root, down=root), **common)
    if method == "prune":
        keep = torch.topk(unit_importance(w), k).indices.sort().values  # aligned units, original order kept
        return Compressed(w.select(keep))
    if method == "sketch":
        gen = torch.Generator().manual_seed(seed)
        s = torch.randn(p, k, generator=gen, dtype=torch.float32) / math.sqrt(k)  # (p, k), N(0, 1/k)
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
    if method == "svd":
        d_in = w.up.shape[1]
        d_out = w.down.shape[0]
        rank = svd_rank(p, d_in, d_out, k)
        low = {"up": truncated_svd(w.up, rank), "down": truncated_svd(w.down, rank)}
        if w.gate is not None:
            low["gate"] = truncated_svd(w.gate, rank)
        return Compressed(w, low_rank=low)
    raise ConfigError(
        f"unknown method {method!r}; choose one of fusion, fusion-pruned, merge, cluster, centroid, svd, prune, sketch"
    )
