"""Activation-aware channel scaling before int4 (``int4_scaling: activation``).

A weight-only 4-bit block shares one scale among 32 input channels, so the rounding error of every channel is set
by the block's largest weight. Channels whose *activations* are large matter most for the output, yet round as
coarsely as the rest. The remedy of AWQ (Lin et al., 2023, "activation-aware weight quantization") is an exact
rewrite of the fp32 graph: multiply the weight's rows by per-channel factors ``s`` and divide the activation by the
same ``s`` where it is produced, so ``(x / s) (s W) = x W``. Large-activation channels then get larger weights,
finer relative steps, and the output error drops. Nothing is added to the graph: the division is folded into the
operator that writes the activation, so the quantized graph runs exactly as fast as without scaling.

This module does that on the exported ONNX graph, for every activation ``x`` whose readers are only weight MatMuls
(and ``Shape``) and whose writer can absorb a per-channel factor:

- a normalisation with a scale (and bias) initializer: ``SimplifiedLayerNormalization``, ``LayerNormalization``
  and their ``Skip`` forms (output 0), or the exported RMSNorm's ``Mul(x, weight)``; also any ``Mul`` by a
  per-channel initializer (a fused MLP's cluster-size scale);
- the gated MLP's ``Mul(act(gate), up)``: the factor goes into the columns of ``up``'s weight (and bias), which
  changes nothing in ``up``'s own 4-bit grid (each column's blocks scale with it).

The attention output (``o_proj``'s input) is not scaled: its writer is the attention, not a foldable operator.

``s = mean|x| ** alpha`` per channel (normalised to a geometric mean of 1), with ``alpha`` searched on a grid from 0
to 1 per activation, on the calibration feeds, minimising the summed relative output error of its MatMuls with
4-bit weights on onnxruntime's own grid (:func:`edgefuse.quantize.blocks.block_fake_quant`). ``alpha = 0`` is
``s = 1``, the unscaled graph, so the search never picks a scaling that is worse on the calibration data.

Example:
    >>> import numpy as np
    >>> x = np.abs(np.random.default_rng(0).normal(size=(64, 32))).astype(np.float32)
    >>> x[:, 3] *= 50  # one channel with large activations
    >>> w = np.random.default_rng(1).normal(size=(32, 8)).astype(np.float32)
    >>> alpha, s, errs = search_scale(x, [w], block_size=32)
    >>> alpha > 0 and errs[alpha] < errs[0.0]
    True
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

ALPHAS = tuple(round(a / 20, 2) for a in range(21))  # 0, 0.05, ..., 1: AWQ's grid
MAX_ROWS = 512  # calibration tokens per activation (statistics and the error search)
_NORMS = {  # op type -> (scale input, bias input or None): where a normalisation's per-channel parameters are
    "SimplifiedLayerNormalization": (1, None),
    "LayerNormalization": (1, 2),
    "SkipSimplifiedLayerNormalization": (2, None),
    "SkipLayerNormalization": (2, 3),
}


@dataclass
class ScaleGroup:
    """One activation ``x``, the weight MatMuls that read it, and where its division by ``s`` is folded.

    ``fold`` is ``("init", node, [names])`` (divide these per-channel initializers of ``node``: a norm's scale and
    bias, or a Mul's factor) or ``("columns", matmul, bias)`` (divide the columns of that MatMul's weight and its
    bias initializer, None without one).
    """

    x: str
    members: list[Any]
    fold: tuple[Any, ...]


def _initializer_size(inits: dict[str, Any], name: str) -> int | None:
    t = inits.get(name)
    return None if t is None else int(np.prod(t.dims)) if len(t.dims) else 1


def _fold_target(model: Any, x: str, k: int, producers: dict[str, Any], uses: Counter,
                 inits: dict[str, Any]) -> tuple[Any, ...] | None:
    """How the writer of ``x`` (``k`` channels) can absorb ``1 / s``; None when it cannot."""
    node = producers.get(x)
    if node is None:
        return None

    def per_channel(name: str) -> bool:
        t = inits.get(name)
        return t is not None and len(t.dims) >= 1 and t.dims[-1] == k and _initializer_size(inits, name) == k

    if node.op_type in _NORMS and node.output[0] == x:
        si, bi = _NORMS[node.op_type]
        names = [node.input[i] for i in (si, bi) if i is not None and len(node.input) > i and node.input[i]]
        return ("init", node, names) if names and all(per_channel(n) for n in names) else None
    if node.op_type != "Mul":
        return None
    a, b = node.input[0], node.input[1]
    for factor in (a, b):
        if per_channel(factor):  # RMSNorm's weight, or a per-channel scale (e.g. the fused MLP's cluster sizes)
            return ("init", node, [factor])
    for other in (a, b):  # Mul(act(gate), up): the factor goes into up's columns
        up = producers.get(other)
        bias = None
        if up is not None and up.op_type == "Add" and uses[other] == 1:
            bias = next((i for i in up.input if per_channel(i)), None)
            feed = next((i for i in up.input if i != bias), None)
            up = producers.get(feed) if bias is not None and feed is not None else None
            if up is not None and uses[feed] != 1:
                up = None
        elif up is not None and uses[other] != 1:
            up = None
        if up is not None and up.op_type == "MatMul" and up.input[1] in inits:
            w = inits[up.input[1]]
            if len(w.dims) == 2 and w.dims[1] == k:
                return ("columns", up, bias)
    return None


def find_groups(model: Any) -> list[ScaleGroup]:
    """Every activation of ``model`` that can be scaled: all its readers are weight MatMuls (or ``Shape``), it is
    not a graph output, and its writer can absorb the factor (see the module's docstring).

    Example:
        >>> import numpy as np
        >>> from onnx import helper, numpy_helper, TensorProto
        >>> inits = [numpy_helper.from_array(np.ones(4, np.float32), "g"),
        ...          numpy_helper.from_array(np.ones((4, 2), np.float32), "w")]
        >>> g = helper.make_graph([helper.make_node("Mul", ["x", "g"], ["h"]),
        ...     helper.make_node("MatMul", ["h", "w"], ["y"], name="proj")], "g",
        ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], inits)
        >>> [(grp.x, [m.name for m in grp.members], grp.fold[0]) for grp in find_groups(helper.make_model(g))]
        [('h', ['proj'], 'init')]
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[Any]] = {}
    uses: Counter = Counter()
    for n in graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
            uses[i] += 1
    outputs = {o.name for o in graph.output}
    groups = []
    for x, nodes in readers.items():
        if x in outputs or x in inits:
            continue
        members = [n for n in nodes if n.op_type == "MatMul" and n.input[0] == x and n.input[1] in inits
                   and len(inits[n.input[1]].dims) == 2 and n.input[1] != x]
        if not members or any(n.op_type != "Shape" and n not in members for n in nodes):
            continue
        k = {int(inits[m.input[1]].dims[0]) for m in members}
        if len(k) != 1:
            continue
        fold = _fold_target(model, x, k.pop(), producers, uses, inits)
        if fold is not None:
            groups.append(ScaleGroup(x, members, fold))
    return groups


def search_scale(x: np.ndarray, weights: Sequence[np.ndarray], *, block_size: int,
                 alphas: Sequence[float] = ALPHAS) -> tuple[float, np.ndarray, dict[float, float]]:
    """(best alpha, its factors ``s``, error per alpha) for activations ``x`` ``[tokens, K]`` read by ``weights``
    (each ``[K, N]``): the error is the sum over the weights of ``||x W - (x / s) Q(s W)||^2 / ||x W||^2`` with
    ``Q`` onnxruntime's symmetric 4-bit block grid. ``alpha = 0`` (``s = 1``) is always among the candidates.

    Example:
        >>> import numpy as np
        >>> x = np.ones((8, 32), np.float32); w = np.eye(32, 4, dtype=np.float32)
        >>> search_scale(x, [w], block_size=32)[0]  # uniform activations: nothing to gain, no scaling
        0.0
    """
    import torch

    from edgefuse.quantize.blocks import block_fake_quant

    xs = torch.from_numpy(np.array(x, dtype=np.float32))  # a writable copy: torch refuses read-only arrays
    importance = xs.abs().mean(0).clamp_min(1e-8)
    ws = [torch.from_numpy(np.array(w, dtype=np.float32)) for w in weights]
    refs = [xs @ w for w in ws]
    norms = [float(r.pow(2).sum()) or 1.0 for r in refs]
    errors: dict[float, float] = {}
    best = (float("inf"), 0.0, torch.ones_like(importance))
    for alpha in sorted(set(alphas) | {0.0}):
        s = importance.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # a geometric-mean-1 range: neither side drifts
        xq = xs / s
        err = sum(float((xq @ block_fake_quant(w * s[:, None], block_size=block_size, bits=4) - r).pow(2).sum()) / n
                  for w, r, n in zip(ws, refs, norms, strict=True))
        errors[alpha] = err
        if err < best[0] - 1e-12 * max(1.0, best[0]) or (alpha == 0.0 and err <= best[0]):
            best = (err, alpha, s)
    return best[1], best[2].numpy(), errors


def _private_initializer(model: Any, node: Any, index: int, uses: Counter) -> Any:
    """``node.input[index]``'s initializer, copied under a new name first when anything else reads it."""
    from onnx import numpy_helper

    name = node.input[index]
    init = next(i for i in model.graph.initializer if i.name == name)
    if uses[name] <= 1:
        return init
    new = numpy_helper.from_array(numpy_helper.to_array(init).copy(), f"{name}_scaled_for_{node.name or index}")
    model.graph.initializer.append(new)  # protobuf appends a copy: return the graph's own message
    uses[name] -= 1
    node.input[index] = new.name
    return model.graph.initializer[-1]


def _scale_initializer(init: Any, factor: np.ndarray, *, axis: int) -> None:
    from onnx import numpy_helper

    a = numpy_helper.to_array(init).astype(np.float32)
    shape = [1] * a.ndim
    shape[axis] = -1
    init.CopyFrom(numpy_helper.from_array((a * factor.reshape(shape)).astype(a.dtype), init.name))


def apply_scale(model: Any, group: ScaleGroup, s: np.ndarray) -> None:
    """Rewrite ``model`` in place: the rows of each member's weight times ``s``, the writer of the activation
    divided by ``s`` (an exact rewrite in real arithmetic)."""
    uses: Counter = Counter(i for n in model.graph.node for i in n.input)
    uses.update(o.name for o in model.graph.output)
    for m in group.members:
        _scale_initializer(_private_initializer(model, m, 1, uses), s, axis=0)
    kind = group.fold[0]
    if kind == "init":
        node, names = group.fold[1], group.fold[2]
        for idx, name in enumerate(node.input):
            if name in names:
                _scale_initializer(_private_initializer(model, node, idx, uses), 1.0 / s, axis=-1)
    else:
        up, bias = group.fold[1], group.fold[2]
        _scale_initializer(_private_initializer(model, up, 1, uses), 1.0 / s, axis=1)
        if bias is not None:
            add = next(n for n in model.graph.node if n.op_type == "Add" and bias in n.input)
            _scale_initializer(_private_initializer(model, add, list(add.input).index(bias), uses), 1.0 / s, axis=-1)


CLIP_RATIOS = tuple(round(1 - i / 20, 2) for i in range(10))  # 1, 0.95, ..., 0.55: AWQ's clip grid (max shrink 0.5)


def search_clip(x: np.ndarray, w: np.ndarray, *, block_size: int, bits: int = 4,
                ratios: Sequence[float] = CLIP_RATIOS) -> tuple[np.ndarray, dict[float, float]]:
    """``w`` ``[K, N]`` with each block (``block_size`` rows of one column) clipped to the ratio of its largest
    magnitude that minimises that block's share of the output error ``||x[:, blk] (w - Q(w))[blk]||^2`` on the
    activations ``x`` ``[tokens, K]``, and the total error per ratio (for the record). Ratio 1 (no clip) is always
    a candidate, so no block gets worse on ``x``. onnxruntime's grid is then set by the clipped extreme: a finer
    step for the bulk of the block at the cost of its few largest weights.

    Example:
        >>> import numpy as np
        >>> rng = np.random.default_rng(0)
        >>> w = rng.normal(size=(32, 4)).astype(np.float32); w[0, 0] = 12.0  # one outlier weight in a block
        >>> x = rng.normal(size=(64, 32)).astype(np.float32); x[:, 0] *= 0.01  # ... on a quiet channel
        >>> clipped, errors = search_clip(x, w, block_size=32)
        >>> bool(abs(clipped[0, 0]) < 12.0) and min(errors.values()) <= errors[1.0]
        True
    """
    import torch

    from edgefuse.quantize.blocks import block_fake_quant

    k, n = w.shape
    pad = (-k) % block_size
    xs = torch.from_numpy(np.array(x, dtype=np.float64))
    xs = torch.nn.functional.pad(xs, (0, pad)).reshape(len(xs), -1, block_size)  # (tokens, blocks, block)
    gram = torch.einsum("tbk,tbl->bkl", xs, xs)  # per block: the error of d is d^T G d (blocks independent)
    wt = torch.nn.functional.pad(torch.from_numpy(np.array(w, dtype=np.float32)), (0, 0, 0, pad))
    blocks = wt.reshape(-1, block_size, n)  # (blocks, block, N)
    peak = blocks.abs().amax(dim=1, keepdim=True)
    best_err = torch.full((blocks.shape[0], n), float("inf"), dtype=torch.float64)
    best = blocks.clone()
    errors: dict[float, float] = {}
    for ratio in sorted(set(ratios) | {1.0}, reverse=True):  # 1.0 first: ties keep the unclipped block
        c = blocks.clamp(-peak * ratio, peak * ratio)
        q = block_fake_quant(c.reshape(-1, n), block_size=block_size, bits=bits).reshape(blocks.shape)
        d = (blocks - q).double()
        err = torch.einsum("bkn,bkl,bln->bn", d, gram, d)
        errors[ratio] = float(err.sum())
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[:, None, :], c, best)
    return best.reshape(-1, n)[:k].numpy(), errors


def clip_model(model: Any, src: Path, feeds: Sequence[dict[str, np.ndarray]], nodes: Sequence[str], *,
               block_size: int) -> dict[str, Any]:
    """Clip the weights of the MatMuls ``nodes`` of ``model`` (loaded from ``src``) in place, block by block, as
    :func:`search_clip` finds on the calibration ``feeds`` (4-bit grid); return what was clipped (for the
    manifest): MatMuls, blocks clipped, the summed output error unclipped (``error_before``) and with the best
    single ratio per MatMul (``error_after``; the per-block choice that is written is at least as good).

    Raises:
        ValueError: ``feeds`` is empty.
    """
    from onnx import numpy_helper

    from edgefuse.quantize.probe import activation_rows, feeds_for_rows, probe_tensors

    if not feeds:
        raise ValueError("weight clipping needs calibration feeds")
    by_name = {n.name: n for n in model.graph.node if n.name in set(nodes)}
    inits = {i.name: i for i in model.graph.initializer}
    todo = [n for n in by_name.values() if n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    if not todo:
        return {"matmuls": 0, "blocks_clipped": 0}
    used = feeds_for_rows(feeds, MAX_ROWS)
    values = probe_tensors(model, src, feeds[:used], sorted({n.input[0] for n in todo}))
    report: dict[str, Any] = {"matmuls": 0, "blocks_clipped": 0, "error_before": 0.0, "error_after": 0.0,
                              "names": [n.name for n in todo]}
    for i, node in enumerate(todo, 1):
        init = inits[node.input[1]]
        w = numpy_helper.to_array(init)
        clipped, errors = search_clip(activation_rows(values, feeds[:used], node.input[0], MAX_ROWS), w,
                                      block_size=block_size)
        moved = np.pad(np.abs(clipped - w), ((0, (-w.shape[0]) % block_size), (0, 0)))
        blocks = int(np.count_nonzero(moved.reshape(-1, block_size, w.shape[1]).max(axis=1)))
        report["matmuls"] += 1
        report["blocks_clipped"] += blocks
        report["error_before"] += errors[1.0]
        report["error_after"] += min(errors.values())
        if blocks:
            init.CopyFrom(numpy_helper.from_array(clipped.astype(w.dtype), init.name))
        if i % 30 == 0 or i == len(todo):
            logger.info("weight clipping: %d/%d MatMuls searched", i, len(todo))
    return report


def scale_graph(src: Path, dst: Path, feeds: Sequence[dict[str, np.ndarray]], *, block_size: int) -> dict[str, Any]:
    """Write ``dst``: the graph ``src`` with activation-aware channel scaling (see the module's docstring) searched
    on ``feeds``; return what was done (for the manifest): groups scaled, their alphas, calibration rows.

    Raises:
        ValueError: ``feeds`` is empty (the search needs calibration data).
    """
    import onnx
    from onnx import numpy_helper

    from edgefuse.quantize.probe import activation_rows, feeds_for_rows, needs_external_data, probe_tensors

    if not feeds:
        raise ValueError("activation-aware scaling needs calibration feeds")
    model = onnx.load(str(src))
    groups = find_groups(model)
    used = feeds_for_rows(feeds, MAX_ROWS)
    values = probe_tensors(model, src, feeds[:used], [g.x for g in groups]) if groups else []
    report: dict[str, Any] = {"method": "activation", "groups": 0, "alphas": {}, "unscaled": [],
                              "calibration_rows": 0}
    for n, g in enumerate(groups, 1):
        x = activation_rows(values, feeds[: len(values)], g.x, MAX_ROWS)
        report["calibration_rows"] = max(report["calibration_rows"], len(x))
        inits = {i.name: i for i in model.graph.initializer}  # afresh: a shared weight may have been copied
        weights = [numpy_helper.to_array(inits[m.input[1]]) for m in g.members]
        alpha, s, errors = search_scale(x, weights, block_size=block_size)
        name = ",".join(m.name for m in g.members)
        if alpha == 0.0:
            report["unscaled"].append(name)
        else:
            apply_scale(model, g, s)
            report["groups"] += 1
            report["alphas"][name] = {"alpha": alpha, "error": errors[alpha], "error_unscaled": errors[0.0]}
        if n % 10 == 0 or n == len(groups):
            logger.info("activation-aware scaling: %d/%d activations searched (%d scaled)", n, len(groups),
                        report["groups"])
    kw = {"location": f"{dst.name}.data", "all_tensors_to_one_file": True} if needs_external_data(src) else {}
    onnx.save_model(model, str(dst), save_as_external_data=needs_external_data(src), **kw)
    return report
