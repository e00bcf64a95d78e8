"""How far a fused model is from the original before recovery: cosine of their task outputs on built-in
sentences (the quantize stage's calibration sentences), so ``edgefuse fuse`` can say whether to recover.

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


def distance_to_original(original: Any, fused: Any, tokenizer: Any, task: str, *,
                         max_length: int = 64) -> dict[str, Any]:
    """``{cosine_mean, cosine_min, max_abs_diff, rows, text}``: the fused model's task output against the
    original's on the built-in sentences (``text``: "built-in sentences" or "random token ids")."""
    from edgefuse.ort import random_batch, tokenize
    from edgefuse.quantize.evaluate import BUILTIN_TEXTS

    left = task == "causal-lm"
    if tokenizer is not None:
        if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
            tokenizer.pad_token = tokenizer.eos_token
        ids, mask = tokenize(tokenizer, list(BUILTIN_TEXTS), max_length, left_pad=left)
        text = f"{len(BUILTIN_TEXTS)} built-in sentences"
    else:
        ids, mask = random_batch(int(original.config.vocab_size), len(BUILTIN_TEXTS), 24, 0, left_pad=left)
        text = f"{len(BUILTIN_TEXTS)} rows of random token ids (no tokenizer)"
    batch = EvalBatch(ids, mask)
    agreement = Agreement()
    agreement.update(torch_vectors(original.eval(), task, batch), torch_vectors(fused.eval(), task, batch))
    return {**agreement.result(), "text": text}
