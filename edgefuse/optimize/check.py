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


def _split_keys(label: str, got: dict[str, np.ndarray], ref: dict[str, np.ndarray], mask: np.ndarray, atol: float,
                rtol: float) -> tuple[dict, dict, ValidationCase | None]:
    """For a graph that rotates cached keys at absolute positions: the outputs without ``present.*.key``, and a
    case comparing those keys on the rows without padding (None when every row is padded)."""
    keys = [k for k in ref if k.startswith("present.") and k.endswith(".key")]
    rows = mask.all(axis=1)
    case = None
    if rows.any():
        case = compare_outputs(f"{label}: cached keys of the unpadded rows",
                               {k: got[k][rows] for k in keys if k in got}, {k: ref[k][rows] for k in keys}, atol, rtol)
    drop = set(keys)
    return ({k: v for k, v in got.items() if k not in drop}, {k: v for k, v in ref.items() if k not in drop}, case)


def compare_graphs(
    reference: Any, candidate: Any, *, task: str, vocab: int, shapes: list[tuple[int, int]], atol: float,
    rtol: float, seed: int = 0, tokenizer: Any = None, own_cache: bool = False,
) -> list[ValidationCase]:
    """Run two onnxruntime sessions on the same inputs; one :class:`ValidationCase` per input case.

    Both graphs must have the same inputs and outputs (an optimizer keeps them); an output the candidate lacks
    fails its case. ``own_cache``: the candidate rotates cached keys at absolute positions (``GroupQueryAttention``),
    so on left-padded rows its cache differs from the reference's while every logit agrees; the decoding steps
    then feed each graph its own cache, and cached keys are compared on unpadded rows only.

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
        if own_cache:
            got, ref, keys = _split_keys(label, got, ref, mask, atol, rtol)
            cases += [keys] if keys is not None else []
        cases.append(compare_outputs(label, {k: got.get(k, np.zeros(0)) for k in ref} | got, ref, atol, rtol,
                                     mask=mask if left else None))
    if past_inputs(reference):
        cases += _decode_cases(reference, candidate, vocab, shapes[-1], seed, atol, rtol, own_cache)
    return cases


def _decode_cases(reference: Any, candidate: Any, vocab: int, shape: tuple[int, int], seed: int, atol: float,
                  rtol: float, own_cache: bool) -> list[ValidationCase]:
    """Decoding steps after a left-padded prefill: one step with the fp32 graph's prefill cache fed to both
    graphs, or (``own_cache``) three steps with each graph carrying its own cache."""
    batch, seq = shape
    ids, mask = random_batch(vocab, batch, seq, seed + 100, left_pad=True)
    steps = 3 if own_cache else 1
    sessions = (reference, candidate) if own_cache else (reference,)
    pasts = []
    for sess in sessions:
        prefill = _run(sess, build_feed(reference, ids, mask))
        pasts.append({k.replace("present.", PAST_PREFIX): v for k, v in prefill.items() if k.startswith("present.")})
    if not own_cache:
        pasts.append(pasts[0])
    cases = []
    full = mask
    for step in range(steps):
        nxt = random_batch(vocab, batch, 1, seed + 101 + step)[0]
        full = np.concatenate([full, np.ones((batch, 1), dtype=np.int64)], axis=1)
        feeds = [build_feed(reference, nxt, full[:, -1:], past=p, full_mask=full) for p in pasts]
        ref, got = _run(reference, feeds[0]), _run(candidate, feeds[1])
        label = f"decode step {step + 1}: batch {batch}, past {seq + step} + 1 token" + (
            ", each graph's own cache" if own_cache else "")
        if own_cache:
            pasts = [{k.replace("present.", PAST_PREFIX): v for k, v in o.items() if k.startswith("present.")}
                     for o in (ref, got)]
            got, ref, keys = _split_keys(label, got, ref, full, atol, rtol)
            cases += [keys] if keys is not None else []
        cases.append(compare_outputs(label, got, ref, atol, rtol, mask=full))
    return cases
