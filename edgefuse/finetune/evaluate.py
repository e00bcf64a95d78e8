"""Validation metrics of the recovery stage: accuracy (classification), perplexity (causal LM), greedy samples.

Evaluation is sharded over data-parallel ranks and the sums are all-reduced, so every rank gets the same
numbers as a single process would.

Example:
    >>> from edgefuse.finetune.evaluate import lower_is_better
    >>> lower_is_better("perplexity"), lower_is_better("accuracy")
    (True, False)
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgefuse.finetune.data import FinetuneData, TokenizedSplit, collate
from edgefuse.finetune.objectives import causal_lm_loss, classification_loss


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of ``metric`` is better (loss, perplexity, hidden-state distance)."""
    return metric in ("perplexity", "loss", "hidden_distance")


def main_metric(task: str, *, has_labels: bool = True, generation_metric: str | None = None) -> str:
    """The metric that selects the best weights: accuracy (classification; agreement with the teacher on
    unlabeled data), perplexity (causal LM; the ``generation_metric`` instead when one is set) or the embedding
    cosine to the teacher (feature extraction)."""
    if task == "causal-lm" and generation_metric:
        return generation_metric
    if task == "sequence-classification":
        return "accuracy" if has_labels else "teacher_agreement"
    return "perplexity" if task == "causal-lm" else "embedding_cosine"


def _all_reduce(values: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(values)
    return values


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)  # (batch, seq, 1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    split: TokenizedSplit,
    task: str,
    *,
    pad_token_id: int,
    batch_size: int = 64,
    teacher: nn.Module | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> dict[str, float]:
    """Validation metrics of ``model`` on ``split``.

    - classification: ``accuracy`` and mean cross-entropy ``loss`` (with labels), ``teacher_agreement`` (the
      fraction of argmax predictions equal to the teacher's, when a teacher is given);
    - causal LM: ``perplexity`` and per-token ``loss`` over the target tokens;
    - feature extraction (needs the teacher): ``embedding_cosine`` (mean-pooled last hidden state) and
      ``hidden_distance`` (mean squared L2 distance per token of the last hidden state).

    The model is put in eval mode for the call and its previous mode restored afterwards. An empty dict means
    there was nothing to measure (no labels and no teacher).

    Example (the skipped lines are not run: needs a model and tokenized data):
        >>> metrics = evaluate(model, data.validation, "sequence-classification", pad_token_id=0)  # doctest: +SKIP
        >>> sorted(metrics)  # doctest: +SKIP
        ['accuracy', 'examples', 'loss']
    """
    has_labels = split.labels is not None or task == "causal-lm"
    if not has_labels and teacher is None:
        return {}
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # loss sum, loss count, correct, agree, cosine sum, examples, hidden distance sum, tokens
    sums = torch.zeros(8, dtype=torch.float64)
    try:
        # sort by length so that dynamic padding wastes little; the metrics do not depend on the order
        order = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))[rank::world_size]
        for start in range(0, len(order), batch_size):
            batch = {
                k: v.to(device) for k, v in collate(split, order[start : start + batch_size], pad_token_id).items()
            }
            labels = batch.pop("labels", None)
            out = model(**batch)
            t_out = teacher(**batch) if teacher is not None else None
            sums[5] += batch["input_ids"].shape[0]
            if task == "sequence-classification":
                pred = out.logits.argmax(-1)
                if labels is not None:
                    loss, count = classification_loss(out.logits, labels)
                    sums[0] += loss.item()
                    sums[1] += count.item()
                    sums[2] += (pred == labels).sum().item()
                if t_out is not None:
                    sums[3] += (pred == t_out.logits.argmax(-1)).sum().item()
            elif task == "causal-lm":
                assert labels is not None  # collate always builds next-token labels for causal-LM splits
                loss, count = causal_lm_loss(out.logits, labels)
                sums[0] += loss.item()
                sums[1] += count.item()
            else:
                assert t_out is not None  # feature extraction has no labels: returned early without a teacher
                mask = batch["attention_mask"]
                h, ht = out.last_hidden_state, t_out.last_hidden_state
                sums[4] += F.cosine_similarity(_mean_pool(h, mask), _mean_pool(ht, mask), dim=-1).sum().item()
                sums[6] += (h - ht)[mask.bool()].pow(2).sum().item()
                sums[7] += mask.sum().item()
    finally:
        model.train(was_training)
    sums = _all_reduce(sums.to(device)).cpu()
    n = max(float(sums[5]), 1.0)
    mean = float(sums[0] / max(float(sums[1]), 1.0))
    if task == "causal-lm":
        return {"perplexity": math.exp(min(mean, 50.0)), "loss": mean, "tokens": float(sums[1])}
    if task == "feature-extraction":
        return {
            "embedding_cosine": float(sums[4]) / n,
            "hidden_distance": float(sums[6] / max(float(sums[7]), 1.0)),
            "examples": float(sums[5]),
        }
    metrics: dict[str, float] = {"examples": float(sums[5])}
    if split.labels is not None:
        metrics.update(accuracy=float(sums[2]) / n, loss=mean)
    if teacher is not None:
        metrics["teacher_agreement"] = float(sums[3]) / n
    return metrics


@torch.no_grad()
def greedy_samples(
    model: Any, data: FinetuneData, tokenizer: Any, *, num_samples: int = 3, max_new_tokens: int = 40
) -> list[dict[str, str]]:
    """Greedy continuations of the first ``num_samples`` distinct validation prompts (causal LM).

    Returns:
        ``[{"prompt": ..., "generated": ..., "reference": ...}, ...]`` (empty without prompts or tokenizer).
    """
    split = data.validation
    if split is None or tokenizer is None or num_samples == 0:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    seen: set[str] = set()
    out = []
    try:
        for prompt, ref in zip(split.prompts, split.references, strict=True):
            if not prompt or prompt in seen:  # nothing to condition on without a prompt column
                continue
            seen.add(prompt)
            ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=data.pad_token_id,
            )
            text = tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)
            out.append({"prompt": prompt, "generated": text.strip(), "reference": ref})
            if len(out) >= num_samples:
                break
    finally:
        model.train(was_training)
    return out


def generation_metrics(
    model: Any,
    split: TokenizedSplit,
    tokenizer: Any,
    *,
    max_prompts: int,
    max_new_tokens: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """BLEU, chrF, ROUGE-L, distinct-1/2 and the degenerate share of greedy generations for the first
    ``max_prompts`` distinct validation prompts, every reference of a prompt counted
    (:mod:`edgefuse.finetune.generation`). Every data-parallel rank computes the same numbers (greedy decoding
    is deterministic), so no rank waits on another's.

    Raises:
        ConfigError: the split has no prompts (no prompt column) or there is no tokenizer.

    Example:
        >>> generation_metrics(model, data.validation, tok, max_prompts=50, max_new_tokens=64)  # doctest: +SKIP
        {'bleu': 41.2, 'chrf': 60.3, 'rouge_l': 0.52, ...}
    """
    from edgefuse.errors import ConfigError
    from edgefuse.finetune.generation import evaluate_generation, generate_torch, group_references

    if tokenizer is None:
        raise ConfigError("generation_metric needs the model's tokenizer to decode the generations")
    if not split.prompts or not all(split.prompts):
        raise ConfigError("generation_metric needs prompts to generate from: set data.prompt_column (E2E: 'mr')")
    prompts, refs = group_references(split.prompts, split.references)
    prompts, refs = prompts[:max_prompts], refs[:max_prompts]
    scores = evaluate_generation(
        lambda ps: generate_torch(model, tokenizer, ps, max_new_tokens=max_new_tokens, batch_size=batch_size),
        prompts,
        refs,
        num_samples=0,
    )
    return {k: v for k, v in scores.metrics().items() if k != "references"}
