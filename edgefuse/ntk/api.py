"""Empirical NTKs of an original and a compressed model, and how far the compressed one is from the original.

For ``n`` examples and a parameter set ``theta``, stack the per-example gradients ``g(x) = df(x)/dtheta`` as the
rows of ``G`` (``n x P``). The kernels are

- the Adam / SignGD kernel ``K = G sign(G)^T`` (asymmetric; the one fine-tuning with Adam follows), and
- the GD kernel ``G G^T``.

Both are ``n x n`` whatever ``P`` is, so the kernels of models with different parameter counts are comparable.
Errors are relative Frobenius norms against the original's kernel. Fusion keeps the cluster sizes as a frozen
buffer, so it is never part of the parameter set (checked); with it the gradient of centroid ``j`` is ``n_j``
times a sub-MLP gradient and ``sign(n_j v) = sign(v)``: the sign kernel of exactly duplicated sub-MLPs is
reproduced to rounding error (tested), while the GD kernel is not (it is scaled by ``n_j^2``).

Both kernels are additive over parameter blocks, so they are accumulated over chunks of parameters that fit
``max_gradient_mib``, one forward/backward pass per example and chunk, and reported per fused layer, for all
fused MLPs and (``params="all"``) for every trainable parameter.

Example:
    >>> import copy, torch
    >>> from transformers import BertConfig, BertModel
    >>> from edgefuse.config.fusion import FusionConfig
    >>> from edgefuse.config.ntk import NtkConfig
    >>> from edgefuse.fusion.api import fuse_mlps_
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> orig = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...                             intermediate_size=32)).eval()
    >>> comp = copy.deepcopy(orig)
    >>> _ = fuse_mlps_(comp, FusionConfig(keep_ratio=1.0))
    >>> res = measure_ntk(orig, comp, {"input_ids": torch.randint(5, 99, (4, 6))}, NtkConfig(n_examples=4))
    >>> res.kernel.sign_rel_error < 1e-5
    True
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from edgefuse.config.ntk import NtkConfig
from edgefuse.errors import ConfigError, TargetNotFoundError, UnsupportedArchitectureError
from edgefuse.fusion.sites import MlpSite
from edgefuse.ntk.params import (
    ALL,
    FUSED,
    MODULES,
    embedding_rows,
    fused_site_pairs,
    layer_key,
    module_entries,
    param_groups,
    plan_chunks,
)
from edgefuse.ntk.scalar import (
    Example,
    forward_kwargs,
    hidden_stacks,
    projection_head,
    resolve_output,
    scalar_output,
    split_examples,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class KernelError:
    """Kernel errors of one parameter group: relative (``||K_c - K_o||_F / ||K_o||_F``) and absolute."""

    group: str
    params_original: int
    params_compressed: int
    sign_rel_error: float
    gd_rel_error: float
    sign_abs_error: float
    gd_abs_error: float


@dataclass(frozen=True)
class NtkResult:
    """What :func:`measure_ntk` measured. ``kernel`` is the whole chosen parameter set, ``fused_mlp`` the fused
    MLPs only (the same as ``kernel`` for ``params="fused-mlp"``), ``per_layer`` each fused layer.
    ``output_rel_error`` is the relative error of the scalar outputs f(x), ``final_hidden_rel_error`` that of
    the last hidden states over all tokens, ``layer_hidden_rel_error`` that of each fused layer's output."""

    param_set: str
    output: str
    n_examples: int
    fused_mlps: tuple[str, ...]
    kernel: KernelError
    fused_mlp: KernelError | None
    per_layer: tuple[KernelError, ...]
    output_rel_error: float
    final_hidden_rel_error: float
    layer_hidden_rel_error: dict[str, float]
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelKernels:
    """The kernels and outputs of one model (reusable as ``reference`` across many compressed models).

    ``sign``/``gd`` map a group (a fused layer key or ``"other"``) to its ``n x n`` float64 kernel; ``hidden``
    holds, per example, every hidden state by stack (see :func:`edgefuse.ntk.scalar.hidden_stacks`).
    """

    output: str
    param_set: str
    n_examples: int
    params: dict[str, int]
    sign: dict[str, np.ndarray]
    gd: dict[str, np.ndarray]
    scalars: np.ndarray
    hidden: tuple[dict[str, tuple[torch.Tensor, ...]], ...]
    seconds: float


def _run(model: nn.Module, ex: Example, kind: str, head: torch.Tensor | None, label: int | None) -> tuple[Any, Any]:
    outputs = model(**ex, **forward_kwargs(model))
    return outputs, scalar_output(outputs, ex, kind, head=head, label=label)


def model_kernels(
    model: nn.Module,
    examples: Sequence[Example],
    entries: Sequence[tuple[str, str, nn.Parameter]],
    *,
    kind: str,
    param_set: str,
    max_gradient_mib: float,
    head: torch.Tensor | None = None,
    labels: Sequence[int] | None = None,
) -> ModelKernels:
    """Sign and GD kernels of ``model`` over ``entries`` (see :func:`param_groups`), plus outputs and hidden
    states. The model is run in eval mode; its ``requires_grad`` flags and train/eval mode are restored."""
    start = time.perf_counter()
    n = len(examples)
    groups = list(dict.fromkeys(g for g, _, _ in entries))
    sign = {g: np.zeros((n, n)) for g in groups}
    gd = {g: np.zeros((n, n)) for g in groups}
    params = {g: sum(p.numel() for gg, _, p in entries if gg == g) for g in groups}
    lab = (lambda i: None) if labels is None else (lambda i: int(labels[i]))
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    try:
        scalars, hidden = [], []
        with torch.no_grad():
            for i, ex in enumerate(examples):
                outputs, f = _run(model, ex, kind, head, lab(i))
                scalars.append(float(f))
                hidden.append({k: tuple(h[0].detach().clone() for h in v) for k, v in hidden_stacks(outputs).items()})
        plan = plan_chunks(entries, n, max_gradient_mib, embedding_rows(model, examples))
        for c, chunk in enumerate(plan):
            chunk_params = list({id(pc.param): pc.param for pc in chunk}.values())
            index = {id(p): i for i, p in enumerate(chunk_params)}
            for p, _ in flags:
                p.requires_grad_(False)  # backward then only computes what this chunk needs
            for p in chunk_params:
                p.requires_grad_(True)
            width = chunk[-1].offset + chunk[-1].stop - chunk[-1].start
            grads_buf = torch.zeros(n, width)  # (n, chunk width) fp32
            with torch.enable_grad():
                for i, ex in enumerate(examples):
                    _, f = _run(model, ex, kind, head, lab(i))
                    if not f.requires_grad:  # no parameter of this chunk reaches f (e.g. BERT's pooler)
                        continue
                    grads = torch.autograd.grad(f, chunk_params, allow_unused=True)
                    for pc in chunk:
                        g = grads[index[id(pc.param)]]
                        if g is None:
                            continue
                        flat = (g if pc.rows is None else g[pc.rows]).reshape(-1)
                        grads_buf[i, pc.offset : pc.offset + pc.stop - pc.start] = flat[pc.start : pc.stop]
            signs = torch.sign(grads_buf)
            for group in dict.fromkeys(pc.group for pc in chunk):
                lo = min(pc.offset for pc in chunk if pc.group == group)
                hi = max(pc.offset + pc.stop - pc.start for pc in chunk if pc.group == group)
                g_blk = grads_buf[:, lo:hi]
                sign[group] += (g_blk @ signs[:, lo:hi].T).double().numpy()
                gd[group] += (g_blk @ g_blk.T).double().numpy()
            logger.debug("kernel chunk %d/%d: %d columns", c + 1, len(plan), width)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)
    return ModelKernels(
        kind, param_set, n, params, sign, gd, np.asarray(scalars), tuple(hidden), time.perf_counter() - start
    )


def _rel(a: np.ndarray | float, b: np.ndarray | float, diff: float | None = None) -> float:
    num = float(np.linalg.norm(np.asarray(a) - np.asarray(b))) if diff is None else diff
    den = float(np.linalg.norm(np.asarray(b)))
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def _kernel_error(name: str, groups: Sequence[str], ref: ModelKernels, comp: ModelKernels) -> KernelError:
    """Errors of the kernel summed over ``groups`` (both kernels are additive over parameter blocks)."""
    n = ref.n_examples

    def total(mk: ModelKernels, which: str) -> np.ndarray:
        return sum((getattr(mk, which)[g] for g in groups), np.zeros((n, n)))

    sign_o, sign_c, gd_o, gd_c = total(ref, "sign"), total(comp, "sign"), total(ref, "gd"), total(comp, "gd")
    return KernelError(
        group=name,
        params_original=sum(ref.params[g] for g in groups),
        params_compressed=sum(comp.params[g] for g in groups),
        sign_rel_error=_rel(sign_c, sign_o),
        gd_rel_error=_rel(gd_c, gd_o),
        sign_abs_error=float(np.linalg.norm(sign_c - sign_o)),
        gd_abs_error=float(np.linalg.norm(gd_c - gd_o)),
    )


def _hidden_error(ref: ModelKernels, comp: ModelKernels, stack: str, index: int) -> float:
    pairs = zip(ref.hidden, comp.hidden, strict=True)
    num = sum(float(((c[stack][index] - o[stack][index]) ** 2).sum()) for o, c in pairs)
    den = sum(float((o[stack][index] ** 2).sum()) for o in ref.hidden)
    return math.sqrt(num) / math.sqrt(den) if den > 0 else (0.0 if num == 0 else math.inf)


@dataclass(frozen=True)
class _Setup:
    examples: list[Example]
    kind: str
    pairs: list[tuple[MlpSite, MlpSite]]
    frozen: frozenset[str]
    head: torch.Tensor | None


def _setup(original: nn.Module, compressed: nn.Module, inputs: Any, cfg: NtkConfig, labels: Any) -> _Setup:
    """Check the pair and the inputs; find the fused MLPs, the output kind and the projection head."""
    if type(original) is not type(compressed):
        raise ConfigError(
            f"original is a {type(original).__name__} but compressed a {type(compressed).__name__}; load both "
            "with the same task so that they share the head"
        )
    for which, m in (("original", original), ("compressed", compressed)):
        dtypes = {p.dtype for p in m.parameters()}
        if dtypes != {torch.float32}:
            raise ConfigError(f"the {which} model has dtype(s) {sorted(map(str, dtypes))}; the NTK is measured in "
                              "float32: call model.float() first")
    examples = split_examples(inputs)
    if len(examples) < cfg.n_examples:
        raise ConfigError(f"got {len(examples)} examples but n_examples={cfg.n_examples}; pass more or lower it")
    examples = [{k: v[:, : cfg.max_length] for k, v in ex.items()} for ex in examples[: cfg.n_examples]]
    if labels is not None and len(labels) < len(examples):
        raise ConfigError(f"got {len(labels)} labels for {len(examples)} examples; give one label per example")
    kind = resolve_output(compressed, cfg.output)
    try:
        pairs = fused_site_pairs(original, compressed)
    except UnsupportedArchitectureError:
        if cfg.params not in (ALL, MODULES):
            raise
        pairs = []  # no MLP adapter: only the all-parameter kernel and the final hidden states
    if not pairs and cfg.params == FUSED:
        raise TargetNotFoundError(
            "the compressed model has no compressed MLP (no fusion scale, changed width or svd factors); "
            "compress it first or measure params 'all'"
        )
    # parameters the compression froze (MoE routers) are left out of both models' 'all' sets
    frozen = frozenset(n for n, p in compressed.named_parameters() if not p.requires_grad)
    head = None
    if kind == "pooled-projection":
        head = projection_head(int(compressed.config.hidden_size), cfg.head_seed)
    return _Setup(examples, kind, pairs, frozen, head)


def _entries(model: nn.Module, sites: Sequence[MlpSite], st: _Setup, cfg: NtkConfig) -> list[Any]:
    if cfg.params == MODULES:
        return module_entries(model, cfg.modules or [])
    return param_groups(model, sites, cfg.params, exclude=st.frozen)


def _kernels_of(model: nn.Module, sites: Sequence[MlpSite], st: _Setup, cfg: NtkConfig, labels: Any) -> ModelKernels:
    entries = _entries(model, sites, st, cfg)
    if not entries:
        raise TargetNotFoundError(f"the parameter set {cfg.params!r} of {type(model).__name__} is empty")
    return model_kernels(model, st.examples, entries, kind=st.kind, param_set=cfg.params,
                         max_gradient_mib=cfg.max_gradient_mib, head=st.head, labels=labels)


def measure_ntk(
    original: nn.Module,
    compressed: nn.Module,
    inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    cfg: NtkConfig | None = None,
    *,
    labels: Sequence[int] | None = None,
    reference: ModelKernels | None = None,
) -> NtkResult:
    """Compare the empirical NTKs and the outputs of ``compressed`` with those of ``original``.

    Measure right after compression, before any fine-tuning: both models must share the tokenisation and the
    head (copy the original with ``copy.deepcopy`` before fusing it). Both run in eval mode and float32.

    Args:
        original: the uncompressed model.
        compressed: the same model after :func:`edgefuse.fusion.api.fuse_mlps_` (any method).
        inputs: a tokenizer batch (padding is removed per example) or a list of them; the first
            ``cfg.n_examples`` examples are used, in order.
        cfg: what to measure (:class:`edgefuse.config.ntk.NtkConfig`).
        labels: class labels, needed for ``output="gold-logit"``.
        reference: the original's kernels from :func:`reference_kernels`, to reuse across compressed models.

    Returns:
        The kernel errors (whole set, fused MLPs, per layer) and the output errors.

    Raises:
        ConfigError: mismatched model classes, non-fp32 weights, too few examples, an output the model cannot
            give, or a ``reference`` computed for other settings.
        TargetNotFoundError: ``params="fused-mlp"`` but the compressed model has no compressed MLP.
        FusionError: a fusion scale that is a trainable parameter.

    Example (the skipped lines are not run: needs two models and a tokenizer):
        >>> measure_ntk(orig, comp, tok(texts, padding=True, return_tensors="pt"))  # doctest: +SKIP
    """
    cfg = cfg or NtkConfig()
    start = time.perf_counter()
    st = _setup(original, compressed, inputs, cfg, labels)
    if reference is None:
        reference = _kernels_of(original, [o for o, _ in st.pairs], st, cfg, labels)
    else:
        expected: dict[str, int] = {}
        for g, _, p in _entries(original, [o for o, _ in st.pairs], st, cfg):
            expected[g] = expected.get(g, 0) + p.numel()
        if (reference.output, reference.param_set, reference.n_examples, reference.params) != (
            st.kind, cfg.params, len(st.examples), expected
        ):
            raise ConfigError(
                "the reference kernels were computed for other settings (output, params, n_examples or fused "
                "layers differ); compute them with reference_kernels() for this pair and config"
            )
    comp = _kernels_of(compressed, [c for _, c in st.pairs], st, cfg, labels)
    layers: dict[str, tuple[str, int]] = {}  # group -> (hidden-state stack, layer index)
    for _, c in ([] if cfg.params == MODULES else st.pairs):  # a module set has no per-layer groups
        key = layer_key(c, compressed)
        layers.setdefault(key, (key.rpartition("layer.")[0].rstrip("."), c.layer))
    per_layer = tuple(_kernel_error(g, [g], reference, comp) for g in layers)
    fused = _kernel_error(FUSED, list(layers), reference, comp) if layers else None
    final_stack = "decoder" if "decoder" in reference.hidden[0] else ""
    return NtkResult(
        param_set=cfg.params,
        output=st.kind,
        n_examples=len(st.examples),
        fused_mlps=tuple(c.name for _, c in st.pairs),
        kernel=_kernel_error(cfg.params, list(reference.params), reference, comp),
        fused_mlp=fused,
        per_layer=per_layer,
        output_rel_error=_rel(comp.scalars, reference.scalars),
        final_hidden_rel_error=_hidden_error(reference, comp, final_stack, -1),
        layer_hidden_rel_error={g: _hidden_error(reference, comp, s, i + 1) for g, (s, i) in layers.items()},
        seconds=time.perf_counter() - start,
    )


def reference_kernels(
    original: nn.Module,
    compressed: nn.Module,
    inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]],
    cfg: NtkConfig | None = None,
    *,
    labels: Sequence[int] | None = None,
) -> ModelKernels:
    """The original's kernels for the MLPs that ``compressed`` changed, to pass as ``reference`` to
    :func:`measure_ntk` for every model compressed at the same layers (e.g. several methods or seeds).

    Example (the skipped lines are not run: needs two models and a tokenized batch):
        >>> ref = reference_kernels(orig, comp, batch, cfg)  # doctest: +SKIP
        >>> measure_ntk(orig, comp, batch, cfg, reference=ref)  # doctest: +SKIP
    """
    cfg = cfg or NtkConfig()
    st = _setup(original, compressed, inputs, cfg, labels)
    return _kernels_of(original, [o for o, _ in st.pairs], st, cfg, labels)
