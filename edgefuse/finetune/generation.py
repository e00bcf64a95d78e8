"""Judging a causal LM by the text it writes: greedy decoding of held-out prompts, scored against references.

Perplexity can look fine while the generator is broken (a model that writes ``AddAddAdd...`` at a perplexity
close to its teacher's), so generation tasks such as E2E NLG are judged by generating:

- the prompts are the *distinct* meaning representations of the held-out split (E2E has several references per
  MR; they are grouped, and every reference of an MR is a reference of its one hypothesis);
- decoding is greedy, through PyTorch (:func:`generate_torch`) or an ONNX graph (:func:`generate_onnx`, the
  KV-cache loop of :func:`edgefuse.ort.greedy_generate`), stopping at EOS; the hypothesis is the first line of
  the continuation (an E2E reference is one line);
- scores come from maintained libraries: ``sacrebleu`` (corpus BLEU and chrF, multi-reference) and
  ``rouge-score`` (ROUGE-L F-measure, best reference per hypothesis, averaged). Install them with
  ``pip install edgefuse[generation]``;
- repetition is measured without references: corpus distinct-1/2 (unique n-grams / n-grams) and the share of
  *degenerate* outputs (:func:`is_degenerate`: empty, or mostly repeats of its own earlier word or character
  n-grams).

The split is the recovery stage's (:func:`edgefuse.finetune.data.split_rows`: grouped by MR, seeded), so a model
is never scored on a meaning representation it was trained on.

Example:
    >>> prompts, refs = group_references(["a\\n", "a\\n", "b\\n"], ["x y", "x z", "w"])
    >>> prompts, refs
    (['a\\n', 'b\\n'], [['x y', 'x z'], ['w']])
    >>> is_degenerate("AddAddAddAddAddAddAddAddAddAdd"), is_degenerate("Aromi is a pub in the city centre.")
    (True, False)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from edgefuse.errors import ConfigError, MissingDependencyError

# metric name -> higher is better for all of them; the names a recovery run may select checkpoints by
GENERATION_METRICS: tuple[str, ...] = ("bleu", "chrf", "rouge_l")
# An output is degenerate when more than this share of its word 3-grams (or character 8-grams) repeat an earlier
# one of the same output. A fluent E2E sentence of 20 words repeats none or one ("in the" twice is a 2-gram);
# `**AddAddAdd...` and `, but,,,,,` repeat nearly all of theirs.
DEGENERATE_WORD_N, DEGENERATE_CHAR_N, DEGENERATE_SHARE = 3, 8, 0.5


@dataclass(frozen=True)
class GenerationScores:
    """Scores of one set of hypotheses against grouped references (all in [0, 100] for BLEU/chrF, [0, 1] else).

    ``samples`` holds the first few (prompt, generated, references) triples for a reader to judge.
    """

    bleu: float
    chrf: float
    rouge_l: float
    distinct_1: float
    distinct_2: float
    degenerate_fraction: float
    mean_words: float
    prompts: int
    references: int
    samples: tuple[dict[str, Any], ...] = field(default=())

    def metrics(self) -> dict[str, float]:
        """The numeric fields (for eval histories, JSON and budgets)."""
        return {k: float(v) for k, v in asdict(self).items() if k != "samples"}


# ------------------------------------------------------------------------------------------------ data
def group_references(prompts: Sequence[str], references: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """Distinct prompts in first-appearance order, each with all of its references."""
    if len(prompts) != len(references):
        raise ValueError(f"{len(prompts)} prompts but {len(references)} references")
    grouped: dict[str, list[str]] = {}
    for p, r in zip(prompts, references, strict=True):
        grouped.setdefault(p, []).append(r)
    return list(grouped), list(grouped.values())


def heldout_groups(cfg: Any, *, max_prompts: int | None = None) -> tuple[list[str], list[list[str]]]:
    """The validation prompts (``prompt + prompt_separator``) and their references that the data config ``cfg``
    (:class:`~edgefuse.config.finetune.DataConfig`) holds out: the same rows the recovery stage validates on.

    Raises:
        ConfigError: the config has no prompt column or no validation part.
    """
    from edgefuse.finetune.data import split_rows
    from edgefuse.records import check_columns

    if not cfg.prompt_column:
        raise ConfigError("generation metrics need data.prompt_column (E2E: 'mr'): the prompts to generate from")
    _, val_rows, source = split_rows(cfg)
    if not val_rows:
        raise ConfigError(
            "generation metrics need validation data: set data.validation or data.validation_fraction (E2E: 0.1)"
        )
    check_columns(val_rows, [cfg.prompt_column, cfg.text_column], source)
    prompts = [str(r[cfg.prompt_column]) + cfg.prompt_separator for r in val_rows]
    ps, refs = group_references(prompts, [str(r[cfg.text_column]) for r in val_rows])
    return (ps[:max_prompts], refs[:max_prompts]) if max_prompts else (ps, refs)


# ------------------------------------------------------------------------------------------------ repetition
def repeated_ngram_fraction(tokens: Sequence[Any], n: int) -> float:
    """Share of the n-grams of ``tokens`` that already occurred earlier in the same sequence (0 without n-grams).

    Example:
        >>> repeated_ngram_fraction("a b a b a b".split(), 2), repeated_ngram_fraction("a b c d".split(), 2)
        (0.6, 0.0)
    """
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    if not grams:
        return 0.0
    seen: set[tuple[Any, ...]] = set()
    repeats = 0
    for g in grams:
        repeats += g in seen
        seen.add(g)
    return repeats / len(grams)


def is_degenerate(text: str) -> bool:
    """Empty, or more than half of its word 3-grams or character 8-grams repeat an earlier one of its own."""
    text = text.strip()
    if not text:
        return True
    return (
        repeated_ngram_fraction(text.split(), DEGENERATE_WORD_N) > DEGENERATE_SHARE
        or repeated_ngram_fraction(text, DEGENERATE_CHAR_N) > DEGENERATE_SHARE
    )


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Corpus distinct-n: unique word n-grams over all n-grams of all ``texts`` (0.0 when there are none, so an
    all-empty output fails closed rather than scoring nan).

    Example:
        >>> distinct_n(["a b c", "a b d"], 1), distinct_n([""], 2)
        (0.6666666666666666, 0.0)
    """
    grams = [tuple(w[i : i + n]) for t in texts for w in [t.split()] for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


# ------------------------------------------------------------------------------------------------ scoring
def _libraries() -> tuple[Any, Any]:
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError:
        raise MissingDependencyError(
            "generation metrics need sacrebleu and rouge-score: pip install 'edgefuse[generation]'"
        ) from None
    return sacrebleu, rouge_scorer


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str | None]]:
    # sacrebleu wants one stream per reference slot; a shorter group is padded with None (no reference)
    width = max(len(r) for r in references)
    return [[refs[k] if k < len(refs) else None for refs in references] for k in range(width)]


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU of ``hypotheses`` against their reference groups, exactly as :func:`score_generations` computes
    it (sacrebleu, default tokenization, multi-reference), without the other scores: for resampling.

    Example:
        >>> round(corpus_bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]), 1)
        100.0
    """
    sacrebleu, _ = _libraries()
    return float(sacrebleu.corpus_bleu([h.strip() for h in hypotheses], _reference_streams(references)).score)


def score_generations(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    prompts: Sequence[str] | None = None,
    num_samples: int = 5,
) -> GenerationScores:
    """Corpus BLEU and chrF (sacrebleu, default tokenization, multi-reference), ROUGE-L (rouge-score, F-measure of
    the best reference, averaged), distinct-1/2 and the degenerate share of ``hypotheses``.

    Raises:
        ValueError: nothing to score, a length mismatch or a hypothesis without reference (fails closed).
        MissingDependencyError: sacrebleu / rouge-score are not installed.

    Example:
        >>> s = score_generations(["the cat sat on the mat"], [["the cat sat on the mat", "a cat sat"]])
        >>> round(s.bleu, 1), round(s.chrf, 1), s.rouge_l, s.degenerate_fraction
        (100.0, 100.0, 1.0, 0.0)
    """
    if not hypotheses:
        raise ValueError("no hypotheses to score (nothing was generated)")
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference groups")
    if any(not refs for refs in references):
        raise ValueError("a hypothesis has no reference; every prompt needs at least one")
    sacrebleu, rouge_scorer = _libraries()
    hyps = [h.strip() for h in hypotheses]
    streams = _reference_streams(references)
    bleu = sacrebleu.corpus_bleu(hyps, streams).score
    chrf = sacrebleu.corpus_chrf(hyps, streams).score
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = float(np.mean([scorer.score_multi(list(refs), h)["rougeL"].fmeasure for h, refs in
                           zip(hyps, references, strict=True)]))
    samples = tuple(
        {"prompt": (prompts[i] if prompts else "").strip(), "generated": hyps[i], "references": list(references[i])}
        for i in range(min(num_samples, len(hyps)))
    )
    return GenerationScores(
        bleu=float(bleu),
        chrf=float(chrf),
        rouge_l=rouge,
        distinct_1=distinct_n(hyps, 1),
        distinct_2=distinct_n(hyps, 2),
        degenerate_fraction=sum(is_degenerate(h) for h in hyps) / len(hyps),
        mean_words=float(np.mean([len(h.split()) for h in hyps])),
        prompts=len(hyps),
        references=sum(len(r) for r in references),
        samples=samples,
    )


# ------------------------------------------------------------------------------------------------ decoding
def _stop_ids(tokenizer: Any) -> list[int]:
    eos = tokenizer.eos_token_id
    return [] if eos is None else [int(eos)]


def first_line(text: str) -> str:
    """The hypothesis of a continuation: its first non-empty line, stripped (an E2E reference is one line)."""
    for line in text.splitlines():
        if line.strip():
            return line.strip()
    return ""


def _decode(tokenizer: Any, rows: np.ndarray) -> list[str]:
    stop = set(_stop_ids(tokenizer))
    out = []
    for row in rows.tolist():
        cut = next((i for i, t in enumerate(row) if t in stop), len(row))
        out.append(first_line(tokenizer.decode(row[:cut], skip_special_tokens=True)))
    return out


def _in_length_order(
    prompts: Sequence[str], batch_size: int, run: Callable[[list[str]], list[str]]
) -> list[str]:
    """``run`` over batches of prompts of similar length (little left padding), results in the caller's order."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    done: dict[int, str] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        done.update(zip(chunk, run([prompts[i] for i in chunk]), strict=True))
    return [done[i] for i in range(len(prompts))]


def generate_torch(
    model: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of ``prompts`` by a transformers causal LM (left-padded batches, stop at EOS).

    The model is put in eval mode for the call and its previous mode restored.
    """
    import torch

    from edgefuse.ort import tokenize

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device

    def run(chunk: list[str]) -> list[str]:
        ids, mask = tokenize(tokenizer, chunk, 10**6, left_pad=True)
        with torch.no_grad():
            gen = model.generate(
                input_ids=torch.from_numpy(ids).to(device),
                attention_mask=torch.from_numpy(mask).to(device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                num_beams=1,
                pad_token_id=pad,
                eos_token_id=_stop_ids(tokenizer) or None,
            )
        return _decode(tokenizer, gen[:, ids.shape[1] :].cpu().numpy())

    try:
        return _in_length_order(prompts, batch_size, run)
    finally:
        model.train(was_training)


def generate_onnx(
    session: Any, tokenizer: Any, prompts: Sequence[str], *, max_new_tokens: int = 64, batch_size: int = 16
) -> list[str]:
    """Greedy continuations of ``prompts`` through an exported causal-LM graph (KV cache when it has one), with
    :func:`edgefuse.ort.greedy_generate`; a batch stops once every row has produced EOS."""
    from edgefuse.ort import greedy_generate, tokenize

    def run(chunk: list[str]) -> list[str]:
        ids, mask = tokenize(tokenizer, chunk, 10**6, left_pad=True)
        return _decode(tokenizer, greedy_generate(session, ids, mask, max_new_tokens, stop=_stop_ids(tokenizer)))

    return _in_length_order(prompts, batch_size, run)


def evaluate_generation(
    generate: Callable[[list[str]], list[str]],
    prompts: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    num_samples: int = 5,
) -> GenerationScores:
    """Generate a hypothesis for every prompt with ``generate`` and score it (:func:`score_generations`).

    Example:
        >>> s = evaluate_generation(lambda ps: [p.upper() for p in ps], ["a b c d e"], [["A B C D E"]])
        >>> round(s.bleu, 6), s.prompts
        (100.0, 1)
    """
    hyps = generate(list(prompts))
    if len(hyps) != len(prompts):
        raise RuntimeError(f"internal error: {len(prompts)} prompts gave {len(hyps)} generations")
    return score_generations(hyps, references, prompts=prompts, num_samples=num_samples)


# One greedy decode of ``n`` new tokens that appends the wall and CPU milliseconds of every step (the first step
# is the prefill) to the two lists it is given: what :func:`decode_timing` times. Any engine fits (an onnxruntime
# session, onnxruntime-genai's generator, llama.cpp).
DecodeRunner = Callable[[int, list[float], list[float]], Any]


def decode_timing(runners: dict[str, DecodeRunner], *, n_tokens: int = 32, rounds: int = 3,
                  warmup_tokens: int = 2) -> dict[str, dict[str, float]]:
    """Per-token decode latency of each runner, interleaved: after one short warm-up run each, every round runs
    every runner once, in an order that alternates between rounds, so load on a shared machine hits all of them
    alike. The runner must decode exactly ``n_tokens`` (EOS suppressed).

    Returns:
        label -> ``decode_ms_p50``/``p90`` and ``decode_cpu_ms_p50`` (over all decode steps of all rounds),
        ``prefill_ms_p50``, ``prefill_cpu_ms_p50`` and ``decode_steps``.

    Raises:
        ValueError: ``n_tokens`` < 2, ``rounds`` < 1, or a runner that timed another number of steps.

    Example:
        >>> def runner(n, wall, cpu):
        ...     wall.extend([10.0] + [2.0] * (n - 1)); cpu.extend([9.0] + [1.0] * (n - 1))
        >>> t = decode_timing({"a": runner}, n_tokens=4, rounds=2)["a"]
        >>> t["decode_ms_p50"], t["decode_cpu_ms_p50"], t["prefill_ms_p50"], t["decode_steps"]
        (2.0, 1.0, 10.0, 6.0)
    """
    if n_tokens < 2 or rounds < 1:
        raise ValueError(f"decode timing needs n_tokens >= 2 and rounds >= 1 (got {n_tokens}, {rounds})")
    labels = list(runners)
    wall: dict[str, list[float]] = {k: [] for k in labels}
    cpu: dict[str, list[float]] = {k: [] for k in labels}
    prefill: dict[str, list[float]] = {k: [] for k in labels}
    prefill_cpu: dict[str, list[float]] = {k: [] for k in labels}
    for label in labels:  # warm-up: first runs allocate (arenas, prepacked weights)
        runners[label](warmup_tokens, [], [])
    for r in range(rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            times: list[float] = []
            cpu_times: list[float] = []
            runners[label](n_tokens, times, cpu_times)
            if len(times) != n_tokens or len(cpu_times) != n_tokens:
                raise ValueError(f"runner {label!r} timed {len(times)} wall / {len(cpu_times)} CPU steps, "
                                 f"not {n_tokens}: it must decode exactly n_tokens (EOS suppressed)")
            prefill[label].append(times[0])
            prefill_cpu[label].append(cpu_times[0])
            wall[label].extend(times[1:])
            cpu[label].extend(cpu_times[1:])
    return {k: {"decode_ms_p50": float(np.percentile(wall[k], 50)),
                "decode_ms_p90": float(np.percentile(wall[k], 90)),
                "decode_cpu_ms_p50": float(np.percentile(cpu[k], 50)),
                "prefill_ms_p50": float(np.percentile(prefill[k], 50)),
                "prefill_cpu_ms_p50": float(np.percentile(prefill_cpu[k], 50)),
                "decode_steps": float(len(wall[k]))}
            for k in labels}


def decode_latency(
    sessions: dict[str, Any], tokenizer: Any, prompt: str, *, n_tokens: int = 32, rounds: int = 3
) -> dict[str, dict[str, float]]:
    """Per-token greedy decode latency of each graph (batch 1, KV cache when the graph has one), timed by
    :func:`decode_timing` (interleaved rounds, EOS suppressed so each run decodes exactly ``n_tokens``).

    Returns:
        label -> ``decode_ms_p50``, ``decode_ms_p90`` (over all decode steps of all rounds), ``prefill_ms_p50`` and
        the CPU times of :func:`decode_timing`.

    Example:
        >>> decode_latency({"int4": session}, tok, "name[Aromi]\\n")["int4"]["decode_ms_p50"]  # doctest: +SKIP
        5.1
    """
    from edgefuse.ort import greedy_generate, tokenize

    if n_tokens < 2 or rounds < 1:
        raise ValueError(f"decode latency needs n_tokens >= 2 and rounds >= 1 (got {n_tokens}, {rounds})")
    ids, mask = tokenize(tokenizer, [prompt], 10**6)
    eos = _stop_ids(tokenizer)

    def runner(session: Any) -> DecodeRunner:
        return lambda n, wall, cpu: greedy_generate(session, ids, mask, n, suppress=eos, step_ms=wall,
                                                    step_cpu_ms=cpu)

    return decode_timing({k: runner(s) for k, s in sessions.items()}, n_tokens=n_tokens, rounds=rounds)
