"""The optimized graph against the fp32 graph it came from: every output, on padded batches of several shapes,
real text when the folder has a tokenizer, and one decoding step with a non-empty KV cache for decoders.

The fp32 graph was validated against PyTorch by ``edgefuse export``; agreement with it (to fp32 rounding) carries
that validation over to the optimized graph.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgefuse.export.results import ValidationCase
from edgefuse.export.validate import SAMPLE_TEXTS, compare_outputs
from edgefuse.ort import PAST_PREFIX, build_feed, past_inputs, random_batch, tokenize


def _run(session: Any, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(None, {k: v for k, v in feed.items() if k in wanted}), strict=True))


def compare_graphs(
    reference: Any, candidate: Any, *, task: str, vocab: int, shapes: list[tuple[int, int]], atol: float,
    rtol: float, seed: int = 0, tokenizer: Any = None,
) -> list[ValidationCase]:
    """Run two onnxruntime sessions on the same inputs; one :class:`ValidationCase` per input case.

    Both graphs must have the same inputs and outputs (an optimizer keeps them); an output the candidate lacks
    fails its case.

    Example:
        >>> cases = compare_graphs(ref_session, opt_session, task="feature-extraction", vocab=30522,
        ...                        shapes=[(1, 13), (3, 21)], atol=1e-4, rtol=1e-3)  # doctest: +SKIP
        >>> all(c.passed for c in cases)  # doctest: +SKIP
        True
    """
    left = task == "causal-lm"
    inputs = [(f"batch {b} x seq {s}" + (", padded" if b > 1 else ""),
               *random_batch(vocab, b, s, seed + i, left_pad=left)) for i, (b, s) in enumerate(shapes)]
    if tokenizer is not None:
        inputs.append(("real text, padded", *tokenize(tokenizer, SAMPLE_TEXTS, 64, left_pad=left)))
    cases = []
    for label, ids, mask in inputs:
        feed = build_feed(reference, ids, mask)
        ref = _run(reference, feed)
        got = _run(candidate, feed)
        cases.append(compare_outputs(label, {k: got.get(k, np.zeros(0)) for k in ref} | got, ref, atol, rtol,
                                     mask=mask if left else None))
    if past_inputs(reference):
        cases.append(_decode_case(reference, candidate, vocab, shapes[-1], seed, atol, rtol))
    return cases


def _decode_case(reference: Any, candidate: Any, vocab: int, shape: tuple[int, int], seed: int, atol: float,
                 rtol: float) -> ValidationCase:
    """One decoding step with the fp32 graph's own prefill cache fed to both graphs."""
    batch, seq = shape
    ids, mask = random_batch(vocab, batch, seq, seed + 100, left_pad=True)
    prefill = _run(reference, build_feed(reference, ids, mask))
    past = {k.replace("present.", PAST_PREFIX): v for k, v in prefill.items() if k.startswith("present.")}
    nxt = random_batch(vocab, batch, 1, seed + 101)[0]
    full = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    feed = build_feed(reference, nxt, full[:, -1:], past=past, full_mask=full)
    ref, got = _run(reference, feed), _run(candidate, feed)
    return compare_outputs(f"decode step: batch {batch}, past {seq} + 1 token", got, ref, atol, rtol, mask=full)
