"""The scalar output ``f(x)`` whose per-example gradient defines the empirical NTK, and the example handling.

Every example is run on its own, without padding (one example at a time), so ``f(x)`` does not
depend on what else is in a batch. The outputs (:class:`edgefuse.config.ntk.NtkConfig`):

- ``class0-prob``: ``softmax(logits)[0]`` of a sequence classifier (the paper's repo);
- ``gold-logit``: ``logits[label]``;
- ``pooled-projection``: ``u . mean_t h_t(x)`` with ``h`` the last hidden state and ``u`` a fixed random unit
  vector drawn from ``head_seed``. It is the same vector for the original and the compressed model (it depends
  only on the seed and the hidden size), so it plays the role of a shared random head for a base model;
- ``last-token-logprob``: ``log p(x_L | x_<L)`` of a causal LM (of the decoder tokens for seq2seq).

Example:
    >>> import torch
    >>> ex = split_examples({"input_ids": torch.tensor([[5, 6, 7], [5, 6, 0]]),
    ...                      "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])})
    >>> [e["input_ids"].tolist() for e in ex]
    [[[5, 6, 7]], [[5, 6]]]
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from edgefuse.errors import ConfigError

# keys whose second axis is the encoder/decoder token axis; padding positions are removed from them
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids")
_DECODER_KEYS = ("decoder_input_ids", "decoder_attention_mask")
Example = dict[str, torch.Tensor]


def _split_batch(batch: Mapping[str, Any]) -> list[Example]:
    unknown = sorted(set(batch) - set(_TOKEN_KEYS) - set(_DECODER_KEYS))
    if unknown:
        raise ConfigError(
            f"input key(s) {unknown} are not supported; give {', '.join(_TOKEN_KEYS + _DECODER_KEYS)} only"
        )
    if "input_ids" not in batch:
        raise ConfigError(f"inputs need 'input_ids' (got keys {sorted(batch)})")
    tensors = {k: torch.as_tensor(v) for k, v in batch.items()}
    tensors = {k: v.unsqueeze(0) if v.dim() == 1 else v for k, v in tensors.items()}
    n = tensors["input_ids"].shape[0]
    examples = []
    for i in range(n):
        mask = tensors["attention_mask"][i].bool() if "attention_mask" in tensors else None
        dmask = tensors["decoder_attention_mask"][i].bool() if "decoder_attention_mask" in tensors else None
        ex: Example = {}
        for key, value in tensors.items():
            row = value[i]
            sel = dmask if key in _DECODER_KEYS else mask
            # drop padding (left or right): the example then runs exactly as it would alone
            ex[key] = (row[sel] if sel is not None else row).unsqueeze(0)
        if ex["input_ids"].shape[1] == 0:
            raise ConfigError(f"example {i} has no tokens (its attention mask is all zero)")
        examples.append(ex)
    return examples


def split_examples(inputs: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> list[Example]:
    """Turn a tokenizer batch (or a list of them) into unpadded single examples ``{key: [1, L_i]}``.

    Raises:
        ConfigError: an unsupported key, no ``input_ids``, or an example without tokens.
    """
    batches = [inputs] if isinstance(inputs, Mapping) else list(inputs)
    out: list[Example] = []
    for batch in batches:
        out.extend(_split_batch(batch))
    return out


def resolve_output(model: nn.Module, output: str) -> str:
    """The concrete output kind for ``output="auto"`` (else ``output`` itself, after a compatibility check).

    Raises:
        ConfigError: an output the model cannot give (e.g. class0-prob without a classification head).
    """
    name = type(model).__name__
    is_cls = name.endswith("ForSequenceClassification")
    is_lm = name.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration"))
    if output == "auto":
        return "class0-prob" if is_cls else "last-token-logprob" if is_lm else "pooled-projection"
    if output in ("class0-prob", "gold-logit") and not is_cls:
        raise ConfigError(
            f"output {output!r} needs a sequence-classification model, got {name}; load it with "
            "task sequence-classification or use output pooled-projection"
        )
    if output == "last-token-logprob" and not is_lm:
        raise ConfigError(f"output 'last-token-logprob' needs a language model, got {name}; use pooled-projection")
    return output


def projection_head(hidden_size: int, seed: int) -> torch.Tensor:
    """The fixed random unit vector ``u`` of ``pooled-projection`` (float32, from its own seeded generator)."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(hidden_size, generator=gen, dtype=torch.float32)
    return u / u.norm()


def forward_kwargs(model: nn.Module) -> dict[str, Any]:
    """Extra forward arguments: always a dict output, all hidden states, and no KV cache when supported."""
    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {"return_dict": True, "output_hidden_states": True}
    if "use_cache" in params:
        kwargs["use_cache"] = False
    return kwargs


def final_hidden(outputs: Any) -> torch.Tensor:
    """The last hidden state ``[1, L, d]`` (the decoder's for seq2seq models)."""
    for key in ("hidden_states", "decoder_hidden_states"):
        states = getattr(outputs, key, None)
        if states is not None:
            return states[-1]
    last = getattr(outputs, "last_hidden_state", None)
    if last is None:
        raise ConfigError(f"{type(outputs).__name__} has no hidden states; cannot measure hidden-state errors")
    return last


def hidden_stacks(outputs: Any) -> dict[str, tuple[torch.Tensor, ...]]:
    """All hidden states by stack: ``{"": (...)}`` for encoder-only/decoder-only models, ``{"encoder": ...,
    "decoder": ...}`` for seq2seq. Entry ``i + 1`` is the output of layer ``i`` (entry 0: the embeddings)."""
    states = getattr(outputs, "hidden_states", None)
    if states is not None:
        return {"": tuple(states)}
    out = {}
    for stack in ("encoder", "decoder"):
        st = getattr(outputs, f"{stack}_hidden_states", None)
        if st is not None:
            out[stack] = tuple(st)
    if not out:
        raise ConfigError(f"{type(outputs).__name__} returned no hidden states")
    return out


def scalar_output(
    outputs: Any, example: Example, kind: str, *, head: torch.Tensor | None = None, label: int | None = None
) -> torch.Tensor:
    """``f(x)`` for one example (a 0-dim tensor that keeps the autograd graph).

    Raises:
        ConfigError: a missing label for ``gold-logit``, a one-token example for ``last-token-logprob``.
    """
    if kind == "class0-prob":
        return torch.softmax(outputs.logits[0].float(), dim=-1)[0]
    if kind == "gold-logit":
        if label is None:
            raise ConfigError("output 'gold-logit' needs a label for every example; pass labels or a label column")
        n_labels = outputs.logits.shape[-1]
        if not 0 <= label < n_labels:
            raise ConfigError(f"label {label} is outside 0..{n_labels - 1} of the classification head")
        return outputs.logits[0, label]
    if kind == "pooled-projection":
        if head is None:
            raise ConfigError("output 'pooled-projection' needs the projection vector (see projection_head)")
        h = final_hidden(outputs)[0]  # (L, d): one unpadded example, so a plain mean over tokens
        return h.mean(dim=0) @ head.to(h.dtype)
    if kind == "last-token-logprob":
        ids = example.get("decoder_input_ids", example["input_ids"])[0]
        if ids.shape[0] < 2:
            raise ConfigError("output 'last-token-logprob' needs examples of at least 2 tokens")
        logp = torch.log_softmax(outputs.logits[0, -2].float(), dim=-1)
        return logp[ids[-1]]
    raise ConfigError(f"unknown output {kind!r}")
