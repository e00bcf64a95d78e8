"""How close two models are on the same text: PyTorch or ONNX Runtime, per example, with accuracy on labels.

Used by the pipeline's ``evaluate`` stage (every graph against the PyTorch model it came from and against the
unfused teacher) and by the keep_ratio ``search``. Outputs are compared as *task vectors*: the mean-pooled
embedding (feature-extraction, as sentence-transformers pools), the logits (sequence-classification), or the
next-token logits of every real token (causal-lm).

Example:
    >>> import numpy as np
    >>> acc = Agreement()
    >>> acc.update(np.array([[1.0, 0.0], [0.0, 2.0]]), np.array([[1.0, 0.1], [0.0, 2.0]]))
    >>> round(acc.result()["cosine_min"], 4), acc.result()["max_abs_diff"]
    (0.995, 0.1)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EvalBatch:
    """Padded token arrays of a few examples, and their class labels when the task has them."""

    input_ids: np.ndarray  # (batch, seq) int64
    attention_mask: np.ndarray  # (batch, seq) int64
    token_type_ids: np.ndarray | None = None
    labels: np.ndarray | None = None  # (batch,) class ids


class Agreement:
    """Running mean/min cosine and max absolute difference between reference and candidate task vectors."""

    def __init__(self) -> None:
        self._cos_sum = 0.0
        self._cos_min = 1.0
        self._n = 0
        self._max_diff = 0.0

    def update(self, reference: np.ndarray, candidate: np.ndarray) -> None:
        """Add rows (one per example or token) of both; shapes must match."""
        if reference.shape != candidate.shape:
            raise ValueError(f"output shapes differ: reference {reference.shape} vs candidate {candidate.shape}")
        a = reference.reshape(reference.shape[0], -1).astype(np.float64)
        b = candidate.reshape(candidate.shape[0], -1).astype(np.float64)
        cos = rowwise_cosine(a, b)
        if not cos.size:
            return
        self._n += int(cos.size)
        self._cos_sum += float(cos.sum())
        # np.minimum / np.maximum propagate nan (Python's min/max would drop it): a nan row keeps every gate failing
        self._cos_min = float(np.minimum(self._cos_min, cos.min()))
        self._max_diff = float(np.maximum(self._max_diff, np.abs(a - b).max()))

    def result(self) -> dict[str, float]:
        """``cosine_mean``, ``cosine_min``, ``max_abs_diff`` and the number of compared rows."""
        mean = self._cos_sum / self._n if self._n else float("nan")
        return {"cosine_mean": mean, "cosine_min": self._cos_min if self._n else float("nan"),
                "max_abs_diff": self._max_diff, "rows": self._n}


def rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of ``a`` with the same row of ``b``, in float64; the one cosine rule of edgefuse.

    It fails closed: a row that is all zeros on either side has no direction, so its cosine is 0.0 (an output
    that went to zeros never passes a cosine gate); a row with nan or inf gives nan, which every gate treats as a
    failure. Identical rows give exactly 1.0 (rounding in the norms would otherwise put them a hair below).

    Example:
        >>> a = np.array([[1.0, 0.0], [0.0, 0.0], [3.0, 4.0]])
        >>> rowwise_cosine(a, np.array([[1.0, 1.0], [0.0, 0.0], [3.0, 4.0]]))
        array([0.70710678, 0.        , 1.        ])
    """
    a64 = np.asarray(a, dtype=np.float64).reshape(np.shape(a)[0], -1)
    b64 = np.asarray(b, dtype=np.float64).reshape(np.shape(b)[0], -1)
    if a64.shape != b64.shape:
        raise ValueError(f"cannot compare shapes {np.shape(a)} and {np.shape(b)}")
    with np.errstate(invalid="ignore", over="ignore"):
        num = (a64 * b64).sum(axis=1)
        den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
        cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    finite = np.isfinite(a64).all(axis=1) & np.isfinite(b64).all(axis=1)
    same = (a64 == b64).all(axis=1) & finite & (den > 0)
    cos = np.where(same, 1.0, np.clip(cos, -1.0, 1.0))
    return np.where(finite, cos, np.nan)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of two arrays flattened, by :func:`rowwise_cosine`'s rule (0.0 when either is all zeros).

    Example:
        >>> cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0]))
        0.7071067811865475
        >>> cosine(np.zeros(3), np.zeros(3))
        0.0
    """
    return float(rowwise_cosine(np.reshape(a, (1, -1)), np.reshape(b, (1, -1)))[0])


def passes_min(value: float | None, minimum: float) -> bool:
    """``value >= minimum``, failing closed: ``None`` (not measured) and nan never pass.

    Example:
        >>> passes_min(0.99, 0.98), passes_min(float("nan"), 0.98), passes_min(None, 0.0)
        (True, False, False)
    """
    return value is not None and not np.isnan(value) and value >= minimum


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked mean over the sequence: ``[B, S, D] -> [B, D]`` (sentence-transformers' pooling)."""
    m = mask[..., None].astype(np.float64)
    return (hidden.astype(np.float64) * m).sum(axis=1) / np.clip(m.sum(axis=1), 1e-9, None)


def task_vectors(task: str, first_output: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Rows to compare: pooled embeddings, logits, or the logits of every real token (causal-lm)."""
    if task == "feature-extraction":
        return mean_pool(first_output, mask)
    if task == "sequence-classification":
        return first_output.astype(np.float64)
    return first_output[mask.astype(bool)].astype(np.float32)  # (real tokens, vocab): float32 keeps it small


def torch_vectors(model: Any, task: str, batch: EvalBatch) -> np.ndarray:
    """Task vectors of a PyTorch model on ``batch`` (no gradients)."""
    import torch

    inputs = {"input_ids": torch.from_numpy(batch.input_ids), "attention_mask": torch.from_numpy(batch.attention_mask)}
    if batch.token_type_ids is not None:
        inputs["token_type_ids"] = torch.from_numpy(batch.token_type_ids)
    with torch.no_grad():
        out = model(**inputs)
    first = out[0] if isinstance(out, tuple) else next(iter(out.values()))
    return task_vectors(task, first.float().numpy(), batch.attention_mask)


def accuracy(batches: Iterable[EvalBatch], vectors: Iterable[np.ndarray]) -> float | None:
    """Share of examples whose argmax equals the label (None when the batches carry no labels)."""
    correct = total = 0
    for batch, vec in zip(batches, vectors, strict=True):
        if batch.labels is None:
            return None
        correct += int((vec.argmax(axis=-1) == batch.labels).sum())
        total += int(batch.labels.size)
    return correct / total if total else None


def random_batches(
    vocab_size: int, *, batches: int = 4, batch_size: int = 4, seq: int = 32, seed: int = 0
) -> list[EvalBatch]:
    """Seeded random token batches (with padding) for models without text data or tokenizer."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(batches):
        ids = rng.integers(min(3, vocab_size - 1), vocab_size, size=(batch_size, seq), dtype=np.int64)
        mask = np.ones_like(ids)
        mask[0, seq - seq // 4 :] = 0  # one padded row, so padding is part of what is compared
        out.append(EvalBatch(ids, mask))
    return out
