"""How far a model or graph is from a reference model (the original, or the teacher): cosine of their task
outputs on the first 16 sentences of the built-in corpus (:func:`edgefuse.records.builtin_texts`). ``edgefuse
fuse`` says with it whether to recover; ``edgefuse export --teacher`` and ``edgefuse quantize --teacher`` print
it for the graph, so ``fuse -> export -> quantize`` does not report "ok" all the way for a model nobody should
ship.

Feature extraction compares the mean-pooled embedding, classification the logits, causal LMs the next-token
logits of every real token. Without a tokenizer, seeded random token ids are compared instead.

Example:
    >>> import copy, transformers
    >>> m = transformers.BertModel(transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
    ...                                                    intermediate_size=32, vocab_size=50))
    >>> round(distance_to_original(m, copy.deepcopy(m), None, "feature-extraction")["cosine_mean"], 6)
    1.0
"""

from __future__ import annotations

from typing import Any

from edgefuse.metrics import Agreement, EvalBatch, torch_vectors

AGREEMENT_TEXTS = 16  # one batch: a quick distance, printed on every fuse/export/quantize with a teacher


def distance_to_original(original: Any, fused: Any, tokenizer: Any, task: str, *,
                         max_length: int = 64) -> dict[str, Any]:
    """``{cosine_mean, cosine_min, max_abs_diff, rows, text}``: the fused model's task output against the
    original's on the built-in sentences (``text``: "built-in sentences" or "random token ids")."""
    batch, text = builtin_batch(original, tokenizer, task, max_length)
    agreement = Agreement()
    agreement.update(torch_vectors(original.eval(), task, batch), torch_vectors(fused.eval(), task, batch))
    return {**agreement.result(), "text": text}


def graph_vs_teacher(graph: Any, teacher: Any, tokenizer: Any, task: str, *, max_length: int = 64) -> dict[str, Any]:
    """The same figures for an ONNX graph (a path) against a PyTorch teacher, in a real onnxruntime session."""
    from edgefuse.ort import make_session, onnx_vectors

    batch, text = builtin_batch(teacher, tokenizer, task, max_length)
    agreement = Agreement()
    agreement.update(torch_vectors(teacher.eval(), task, batch), onnx_vectors(make_session(graph), task, batch))
    return {**agreement.result(), "text": text}


def describe(d: dict[str, Any], task: str, reference: str) -> str:
    """One line: ``vs the teacher on 16 built-in sentences: mean cosine 0.88 (min 0.80) of the logits``."""
    what = {"feature-extraction": "mean-pooled embedding", "sequence-classification": "logits",
            "causal-lm": "next-token logits"}[task]
    return (f"vs {reference} on {d['text']}: mean cosine {d['cosine_mean']:.4f} (min {d['cosine_min']:.4f}) "
            f"of the {what}")


def builtin_batch(model: Any, tokenizer: Any, task: str, max_length: int) -> tuple[EvalBatch, str]:
    """The built-in sentences as one batch (random ids of the model's vocabulary without a tokenizer)."""
    from edgefuse.ort import random_batch, tokenize
    from edgefuse.records import builtin_texts

    texts = builtin_texts(AGREEMENT_TEXTS)
    left = task == "causal-lm"
    if tokenizer is not None:
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        ids, mask = tokenize(tokenizer, texts, max_length, left_pad=left)
        text = f"{len(texts)} built-in sentences"
    else:
        ids, mask = random_batch(int(model.config.vocab_size), len(texts), 24, 0, left_pad=left)
        text = f"{len(texts)} rows of random token ids (no tokenizer)"
    return EvalBatch(ids, mask), text
