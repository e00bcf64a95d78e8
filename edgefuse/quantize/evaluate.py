"""Inputs and checks for the quantize stage: calibration/evaluation texts, token batches, the comparison of a
quantized graph with fp32 (cosine, max difference, accuracy) and the node counts of a graph (how many run
quantized is each mode's own count, :data:`edgefuse.quantize.modes.MODES`).

Without calibration data the texts are the built-in corpus (:func:`edgefuse.records.builtin_texts`).

Example:
    >>> TEXT_COLUMNS
    ('sentence', 'text', 'ref', 'mr')
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefuse.errors import DataError
from edgefuse.metrics import rowwise_cosine
from edgefuse.ort import random_batch, task_vectors, tokenize
from edgefuse.records import builtin_texts, read_records, spread

TEXT_COLUMNS = ("sentence", "text", "ref", "mr")
BATCH = 8
RANDOM_ROWS = 16  # rows of random ids when there is no tokenizer (a graph exported without one)


def read_texts(path: Path, limit: int | None) -> list[str]:
    """Up to ``limit`` texts (all when None), evenly spaced over a data file with a header (column
    sentence/text/ref/mr, else the first column): see :func:`edgefuse.records.spread`.

    Raises:
        TargetNotFoundError, DataError: see :func:`edgefuse.records.read_records`.
    """
    rows = read_records(str(path))
    header = list(rows[0])
    col = next((c for c in TEXT_COLUMNS if c in header), header[0])
    texts = [str(r[col]) for r in rows if r.get(col) is not None]
    return texts if limit is None else spread(texts, limit)


def fit_and_check_texts(n: int, data: Path | None, texts: Sequence[str] | None = None
                        ) -> tuple[list[str], list[str], bool]:
    """(texts to calibrate on, texts to check the quantized graph on, whether no check text was calibrated on).

    GPTQ and the activation search fit their calibration texts, so a check on those texts flatters the graph.
    From the texts (``texts`` when given, else the data file, else the built-in corpus), when they hold at least
    ``2 n``: ``n`` taken evenly spaced to calibrate on and ``n`` others, evenly spaced over the rest, to check on.
    Fewer texts are used for both (up to ``n`` of them; the third value says so).

    Example:
        >>> fit, check, held_out = fit_and_check_texts(2, None)
        >>> len(fit), len(check), held_out, set(fit) & set(check)
        (2, 2, True, set())
        >>> fit_and_check_texts(2, None, ["a b", "c d", "e f", "g h"])
        (['a b', 'e f'], ['c d', 'g h'], True)
        >>> fit_and_check_texts(2, None, ["a b", "c d"])
        (['a b', 'c d'], ['a b', 'c d'], False)
    """
    pool = list(texts) if texts else read_texts(data, None) if data else builtin_texts()
    fit_at = spread(range(len(pool)), n)
    fit = [pool[i] for i in fit_at]
    if len(pool) < 2 * n:
        return fit, fit, False
    taken = set(fit_at)
    return fit, spread([t for i, t in enumerate(pool) if i not in taken], n), True


def read_labelled(path: Path, limit: int | None) -> tuple[list[str], list[int]]:
    """``sentence`` and integer ``label`` columns of a labelled data file (GLUE format).

    Raises:
        DataError: a column is missing or a label is not an integer.
    """
    rows = read_records(str(path))
    missing = [c for c in ("sentence", "label") if c not in rows[0]]
    if missing:
        raise DataError(f"{str(path)!r} lacks column(s) {missing}; its header is {list(rows[0])}")
    rows = rows[:limit] if limit else rows
    try:
        return [str(r["sentence"]) for r in rows], [int(r["label"]) for r in rows]
    except (ValueError, TypeError) as exc:
        raise DataError(f"{str(path)!r}: bad row ({exc}); labels must be integers") from None


def folder_tokenizer(folder: Path) -> Any:
    """The tokenizer saved in an export folder, or None when it has none."""
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")):
        return None
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def folder_vocab(folder: Path) -> int:
    cfg = folder / "config.json"
    try:
        return int(json.loads(cfg.read_text()).get("vocab_size", 100)) if cfg.is_file() else 100
    except (OSError, ValueError):
        return 100


def token_batches(
    texts: Sequence[str] | None, tokenizer: Any, *, task: str, max_length: int, vocab: int, seed: int = 0,
    uniform: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Batches of (ids, mask): tokenized ``texts`` when there is a tokenizer, else seeded random ids.

    ``uniform`` gives one row per batch, all padded to the same length: onnxruntime's histogram calibrators
    (percentile, entropy) stack every batch's tensors and need equal shapes.
    """
    left = task == "causal-lm"
    n = len(texts) if texts else RANDOM_ROWS
    if tokenizer is None or not texts:
        if uniform:
            return [random_batch(vocab, 1, min(max_length, 24), seed + i, left_pad=left) for i in range(n)]
        return [random_batch(vocab, min(BATCH, n - i), min(max_length, 24), seed + i, left_pad=left)
                for i in range(0, n, BATCH)]
    if uniform:
        ids, mask = tokenize(tokenizer, texts, max_length, left_pad=left)
        return [(ids[i : i + 1], mask[i : i + 1]) for i in range(ids.shape[0])]
    return [tokenize(tokenizer, texts[i : i + BATCH], max_length, left_pad=left) for i in range(0, len(texts), BATCH)]


def reference_vectors(session: Any, task: str, batches: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """The fp32 task outputs per batch (computed once, compared with every candidate)."""
    return [task_vectors(session, task, ids, mask) for ids, mask in batches]


def compare(
    session: Any, task: str, batches: list[tuple[np.ndarray, np.ndarray]], refs: list[np.ndarray]
) -> tuple[float, float, float, int]:
    """(mean cosine, min cosine, max |diff|, rows) of ``session``'s task outputs against ``refs``."""
    cos, diff = [], 0.0
    for (ids, mask), ref in zip(batches, refs, strict=True):
        got = task_vectors(session, task, ids, mask)
        cos.append(rowwise_cosine(got, ref))
        diff = max(diff, float(np.abs(got - ref).max()))
    allc = np.concatenate(cos)
    return float(allc.mean()), float(allc.min()), diff, int(allc.size)


def accuracy(session: Any, batches: list[tuple[np.ndarray, np.ndarray]], labels: Sequence[int]) -> float:
    """Share of argmax(logits) equal to ``labels`` (sequence-classification graphs).

    Raises:
        DataError: a label that the graph's head cannot output (label >= number of logits, or negative).
    """
    logits = [task_vectors(session, "sequence-classification", i, m) for i, m in batches]
    classes = int(logits[0].shape[-1]) if logits else 0
    bad = sorted({int(v) for v in labels if not 0 <= int(v) < classes})
    if bad:
        raise DataError(f"labels {bad[:5]} do not fit the graph's head of {classes} classes (0..{classes - 1}); "
                        "use the data the model was trained on, or re-export it with --num-labels")
    preds = np.concatenate([lg.argmax(-1) for lg in logits])
    return float((preds == np.asarray(labels[: preds.size])).mean())


def op_counts(model: Any) -> dict[str, int]:
    """Node count per operator type of an ``onnx.ModelProto`` (main graph)."""
    return dict(Counter(n.op_type for n in model.graph.node))


def weight_matmuls(model: Any) -> list[str]:
    """Names of the MatMul nodes whose second input is an initializer (the ones quantization targets)."""
    inits = {i.name for i in model.graph.initializer}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in inits]
