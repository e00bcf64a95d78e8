"""Rank weight MatMuls by what their 4-bit error does to the model's output, not to their own output.

The int4 8-bit share (``int4_8bit_share``) writes the most sensitive MatMuls as 8-bit blocks. The first ranking
(:func:`edgefuse.quantize.modes.rank_matmuls`, ``int4_8bit_rank: error``) scores each MatMul by the relative error
of its *own* output. That ignores where the MatMul sits: a narrow ``v_proj`` has a large relative error yet a
small effect on the logits, while the down projection of a fused MLP, whose columns carry the cluster sizes, sums
fewer and heavier units, so its error reaches the residual stream less averaged out.

This module measures the effect itself (``int4_8bit_rank: output``): one onnxruntime session of the graph with the
candidate weights as inputs, one fp32 run of a batch of calibration texts for the reference, then per candidate
MatMul one run of the same batch with only that weight on the 4-bit grid (round to nearest, onnxruntime's
symmetric blocks), scored by the mean KL divergence of the output distribution from the fp32 one over every
token. Errors of a few MatMuls add up
roughly independently at this size, so the worst individual ones are the ones to keep at 8 bits.

Example:
    >>> import numpy as np, tempfile
    >>> from pathlib import Path
    >>> from onnx import helper, numpy_helper, TensorProto
    >>> rng = np.random.default_rng(0)
    >>> inits = [numpy_helper.from_array(rng.normal(size=(32, 8)).astype(np.float32), "w_big"),
    ...          numpy_helper.from_array(rng.normal(size=(8, 5)).astype(np.float32) * 1e-3, "w_small")]
    >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "w_big"], ["h"], name="big"),
    ...     helper.make_node("MatMul", ["h", "w_small"], ["y"], name="small")], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 32])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 5])], inits)
    >>> src = Path(tempfile.mkdtemp()) / "m.onnx"
    >>> import onnx; onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    >>> feeds = [{"x": rng.normal(size=(1, 4, 32)).astype(np.float32)}]
    >>> [name for name, _ in rank_by_output(src, feeds, ["big", "small"], block_size=32)]
    ['big', 'small']
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MAX_TEXTS = 8  # calibration texts per candidate run: 8 E2E texts (~520 tokens) rank SmolLM2's 210 MatMuls in 225 s


def _batched(feeds: Sequence[dict[str, np.ndarray]], session: Any, max_texts: int) -> list[dict[str, np.ndarray]]:
    """``max_texts`` texts of the token ``feeds`` (evenly spaced over all their rows; a feed may hold several),
    their real tokens only, right-padded into one batch: one run instead of one per feed, and no padding to pay
    for (cost is per token). Feeds without ``input_ids``/``attention_mask`` are run as they are (``max_texts`` of
    them)."""
    from edgefuse.ort import build_feed
    from edgefuse.records import spread

    if not all(f.get("input_ids") is not None and f.get("attention_mask") is not None for f in feeds):
        return spread(list(feeds), max_texts)
    rows = []
    for f in feeds:
        t = f["input_ids"].shape[1]
        for ids, mask in zip(f["input_ids"], f["attention_mask"][:, -t:], strict=True):
            real = ids[mask.astype(bool)]
            if len(real):
                rows.append(real)
    rows = spread(rows, max_texts)
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), np.int64)
    mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return [build_feed(session, ids, mask)]


def _scores(output: np.ndarray, mask: np.ndarray | None, kind: str) -> Any:
    """What a run's output is compared by: log-probabilities of the unmasked positions (``kl``), or the output
    itself (``mse``)."""
    import torch

    out = torch.from_numpy(np.ascontiguousarray(output, dtype=np.float32))
    if kind == "mse":
        return out
    rows = out.reshape(-1, out.shape[-1])
    if mask is not None and mask.size == len(rows):
        rows = rows[torch.from_numpy(mask.reshape(-1).astype(bool))]
    return torch.log_softmax(rows.double(), dim=-1)


class _Reference:
    """The fp32 run's scores, with what every comparison against them shares computed once: for ``kl`` the
    probabilities ``p`` and ``sum p log p`` per position, so that a candidate costs one product instead of an
    ``exp`` and two over the whole vocabulary at every position."""

    def __init__(self, scores: Any, kind: str) -> None:
        self.kind = kind
        if kind == "kl":  # the log-probabilities themselves are not needed again: only p and sum p log p
            self.probs = scores.exp()
            self.neg_entropy = (self.probs * scores).sum(-1)
        else:
            self.scores = scores

    def divergence(self, got: Any) -> float:
        """Mean KL(ref || got) over positions (``kl``: float64, exactly ``sum p (log p - log q)`` rearranged), or
        the relative squared error of the output (``mse``)."""
        if self.kind == "mse":
            return float((got - self.scores).double().pow(2).sum()
                         / self.scores.double().pow(2).sum().clamp_min(1e-30))
        return float((self.neg_entropy - (self.probs * got).sum(-1)).mean())


def rank_by_output(src: Path, feeds: Sequence[dict[str, np.ndarray]], candidates: Sequence[str], *,
                   block_size: int, bits: int = 4, max_texts: int = MAX_TEXTS,
                   threads: int = 2) -> list[tuple[str, float]]:
    """``candidates`` (weight MatMul names of the graph ``src``) sorted by the mean KL divergence of the graph's
    first output (a causal LM's logits; softmax over its last axis) from fp32 when that MatMul alone is on the
    ``bits``-bit block grid, worst first. ``max_texts`` of ``feeds`` (evenly spaced) are run.

    Raises:
        QuantizationError: no feeds, or the fp32 graph's output is not finite on them (nothing to rank against).
    """
    import onnx
    import onnxruntime as ort
    import torch
    from onnx import numpy_helper

    from edgefuse.errors import QuantizationError
    from edgefuse.progress import progress_bar
    from edgefuse.quantize.blocks import block_fake_quant

    if not feeds:
        raise QuantizationError("ranking MatMuls by their output error needs calibration texts; pass "
                                "--calibration-data")
    model = onnx.load(str(src))
    graph = model.graph
    nodes = {n.name: n for n in graph.node if n.name in set(candidates)}
    weight_of = {name: node.input[1] for name, node in nodes.items()}
    wanted = set(weight_of.values())
    weights: dict[str, np.ndarray] = {}
    kept = []
    for init in graph.initializer:  # the candidates' weights become graph inputs: one session serves every run
        if init.name in wanted:
            weights[init.name] = np.array(numpy_helper.to_array(init), dtype=np.float32)  # writable: torch reads it
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, onnx.TensorProto.FLOAT,
                                                                  list(init.dims)))
        else:
            kept.append(init)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 4
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    del model, graph, kept
    first = session.get_outputs()[0].name
    kind = "kl" if first == "logits" else "mse"  # a language model's distribution, else the output's values
    batches = _batched(feeds, session, max_texts)

    def run(ws: dict[str, np.ndarray]) -> list[Any]:
        return [_scores(session.run([first], {**feed, **ws})[0], feed.get("attention_mask"), kind)
                for feed in batches]

    ref_scores = run(weights)
    if not all(bool(r.isfinite().all()) for r in ref_scores):
        raise QuantizationError(f"{src.name}: the fp32 graph's output is not finite on the calibration texts; "
                                "nothing to rank MatMuls against")
    refs = [_Reference(r, kind) for r in ref_scores]
    del ref_scores
    ranked = []
    # one forward pass per MatMul takes minutes on a decoder: a bar on a terminal, a line every 30 s in a log
    bar = progress_bar(len(candidates), desc="int4 8-bit share: ranking by output error", unit="MatMul")
    try:
        for name in candidates:
            if name in weight_of:
                wname = weight_of[name]
                q = block_fake_quant(torch.from_numpy(weights[wname]), block_size=block_size, bits=bits).numpy()
                got = run({**weights, wname: np.ascontiguousarray(q, dtype=np.float32)})
                score = float(np.mean([r.divergence(g) for r, g in zip(refs, got, strict=True)]))
                ranked.append((name, score if np.isfinite(score) else float("inf")))  # non-finite: the worst
            bar.update(1)  # counts MatMuls done, so the time left is estimated from finished work
    finally:
        bar.close()
    return sorted(ranked, key=lambda t: -t[1])
