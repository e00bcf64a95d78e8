"""Validation of an exported graph against the PyTorch model it came from, in the optimum order: output names,
shapes, then values (absolute + relative tolerance), on shapes other than the traced one, padding included.

Every problem is collected; :func:`edgefuse.export.api.export_onnx` raises one :class:`ExportValidationError` with
all of them (optimum only warns on a tolerance miss; edgefuse fails).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edgefuse.config.export import ExportConfig
from edgefuse.export.results import GreedyCheck, OutputCheck, ValidationCase
from edgefuse.metrics import cosine
from edgefuse.ort import (
    PAST_PREFIX,
    build_feed,
    greedy_generate,
    make_session,
    past_inputs,
    random_batch,
    tokenize,
)

logger = logging.getLogger(__name__)

SAMPLE_TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Edge devices run small language models without a network connection.",
    "A man is eating food.",
)
PROMPT = "The capital of France is"


def _legacy_past(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(key, value), ...]`` from a transformers Cache object or a legacy tuple."""
    if hasattr(cache, "to_legacy_cache"):
        return list(cache.to_legacy_cache())
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(cache)


def _torch_outputs(model: Any, feed: dict[str, np.ndarray], past: Any = None) -> dict[str, np.ndarray]:
    """Run PyTorch on the same inputs as the graph; name its outputs as the graph does."""
    kwargs: dict[str, Any] = {k: torch.from_numpy(v) for k, v in feed.items() if not k.startswith(PAST_PREFIX)}
    if past is not None:
        kwargs["past_key_values"] = past
        kwargs["use_cache"] = True
    with torch.inference_mode():
        out = model(**kwargs)
    named: dict[str, np.ndarray] = {}
    for key in ("last_hidden_state", "logits"):
        value = getattr(out, key, None)
        if value is not None:
            named[key] = value.float().numpy()
    # the pooled head, when the graph has one (an encoder-decoder's last_hidden_state is the decoder's: no pooling)
    if "last_hidden_state" in named and "attention_mask" in feed \
            and named["last_hidden_state"].shape[:2] == feed["attention_mask"].shape:
        from edgefuse.export.pooling import reference_embedding

        named["sentence_embedding"] = reference_embedding(named["last_hidden_state"], feed["attention_mask"])
    pkv = getattr(out, "past_key_values", None)
    if past is not None and pkv is not None:
        for i, (k, v) in enumerate(_legacy_past(pkv)):
            named[f"present.{i}.key"], named[f"present.{i}.value"] = k.float().numpy(), v.float().numpy()
    return named


def _real_positions(name: str, got: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """Index of the non-padded positions of an output (``[B, S, ...]`` or ``present`` ``[B, H, T, D]``)."""
    if mask is None:
        return None
    if name.startswith("present.") and got.ndim == 4 and got.shape[2] == mask.shape[1]:
        return np.nonzero(mask)
    if got.ndim >= 2 and got.shape[:2] == mask.shape:
        return np.nonzero(mask)
    return None


def compare_outputs(
    label: str, onnx_out: dict[str, np.ndarray], ref: dict[str, np.ndarray], atol: float, rtol: float,
    mask: np.ndarray | None = None,
) -> ValidationCase:
    """Per output: the shape must match, then |onnx - ref| <= atol + rtol * |ref| everywhere (at the real,
    non-padded positions when ``mask`` is given: a left-padded decoder position attends to nothing, so its
    values are arbitrary in both runtimes)."""
    checks = []
    for name, got in onnx_out.items():
        want = ref.get(name)
        if want is None:
            checks.append(OutputCheck(name, tuple(got.shape), float("inf"), float("nan"), False))
            continue
        if got.shape != want.shape:
            checks.append(OutputCheck(name, tuple(got.shape), float("inf"), float("nan"), False))
            continue
        shape = tuple(got.shape)
        idx = _real_positions(name, got, mask)
        if idx is not None:
            rows, cols = idx
            got, want = ((x[rows, :, cols] if name.startswith("present.") else x[rows, cols]) for x in (got, want))
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        finite = bool(np.isfinite(got).all())
        ok = finite and bool(np.all(diff <= atol + rtol * np.abs(want.astype(np.float64))))
        max_diff = float(diff.max()) if diff.size else 0.0
        checks.append(OutputCheck(name, shape, max_diff, cosine(got, want) if diff.size else 1.0, ok))
    return ValidationCase(label, tuple(checks))


def _missing_outputs(session: Any, cfg: ExportConfig) -> list[str]:
    names = [o.name for o in session.get_outputs()]
    expected = {"feature-extraction": "last_hidden_state"}.get(cfg.task, "logits")
    problems = [] if expected in names else [f"output {expected!r} missing (graph outputs: {names})"]
    if cfg.task == "causal-lm" and cfg.with_past and not past_inputs(session):
        problems.append("the KV-cache graph has no past_key_values inputs")
    if past_inputs(session):
        n_layers = len(past_inputs(session)) // 2
        want = {f"present.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")}
        if not want <= set(names):
            problems.append(f"KV-cache outputs {sorted(want - set(names))[:4]} missing")
    return problems


def _encoder_cases(model: Any, session: Any, cfg: ExportConfig, vocab: int, tokenizer: Any) -> list[ValidationCase]:
    names = [o.name for o in session.get_outputs()]
    left = cfg.task == "causal-lm"
    inputs = [
        (f"batch {b} x seq {s}" + (", padded" if b > 1 else ""),
         *random_batch(vocab, b, s, cfg.seed + i, left_pad=left))
        for i, (b, s) in enumerate(cfg.validate_shapes)
    ]
    if tokenizer is not None:
        inputs.append(("real text, padded", *tokenize(tokenizer, SAMPLE_TEXTS, 64, left_pad=left)))
    cases = []
    for label, ids, mask in inputs:
        feed = build_feed(session, ids, mask)
        got = dict(zip(names, session.run(None, feed), strict=True))
        ref = _torch_outputs(model, feed, past=_empty_cache() if past_inputs(session) else None)
        cases.append(compare_outputs(label, got, ref, cfg.atol, cfg.rtol, mask=mask if left else None))
    return cases


def _empty_cache() -> Any:
    from transformers import DynamicCache

    return DynamicCache()


def _decode_case(model: Any, session: Any, cfg: ExportConfig, vocab: int) -> ValidationCase:
    """One decoding step with a non-empty past: PyTorch's prefill cache fed to both sides."""
    from transformers import DynamicCache

    batch, seq = cfg.validate_shapes[-1]
    ids, mask = random_batch(vocab, batch, seq, cfg.seed + 100, left_pad=True)
    prefill = _torch_outputs(model, build_feed(session, ids, mask), past=_empty_cache())
    n_layers = len(past_inputs(session)) // 2
    past_np = {f"{PAST_PREFIX}{i}.{kv}": prefill[f"present.{i}.{kv}"]
               for i in range(n_layers) for kv in ("key", "value")}
    nxt = random_batch(vocab, batch, 1, cfg.seed + 101)[0]
    full_mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
    feed = build_feed(session, nxt, full_mask[:, -1:], past=past_np, full_mask=full_mask)
    names = [o.name for o in session.get_outputs()]
    got = dict(zip(names, session.run(None, feed), strict=True))
    cache = DynamicCache()
    for i in range(n_layers):
        key, value = past_np[f"{PAST_PREFIX}{i}.key"], past_np[f"{PAST_PREFIX}{i}.value"]
        cache.update(torch.from_numpy(key), torch.from_numpy(value), i)
    ref = _torch_outputs(model, feed, past=cache)
    return compare_outputs(f"decode step: batch {batch}, past {seq} + 1 token", got, ref, cfg.atol, cfg.rtol,
                           mask=full_mask)


def greedy_check(model: Any, session: Any, n_tokens: int, vocab: int, tokenizer: Any, seed: int) -> GreedyCheck:
    """Greedy tokens from PyTorch's ``generate`` and from the graph, ``n_tokens`` each (EOS suppressed on both
    sides, as ``min_new_tokens`` does, so both run the full length)."""
    if tokenizer is not None:
        ids, mask = tokenize(tokenizer, [PROMPT], 32)
    else:
        ids, mask = random_batch(vocab, 1, 6, seed + 7)
    gen_cfg = getattr(model, "generation_config", None)
    eos = None if gen_cfg is None else gen_cfg.eos_token_id
    # EOS ids outside the vocabulary (tiny test configs) can never be generated: nothing to suppress
    eos_ids = [e for e in ([] if eos is None else ([eos] if isinstance(eos, int) else list(eos))) if e < vocab]
    pad = None if gen_cfg is None else gen_cfg.pad_token_id
    kwargs: dict[str, Any] = {"min_new_tokens": n_tokens} if eos_ids else {}
    with torch.inference_mode():
        out = model.generate(
            input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), max_new_tokens=n_tokens,
            do_sample=False, num_beams=1, pad_token_id=pad if pad is not None else (eos_ids[0] if eos_ids else 0),
            **kwargs,
        )
    torch_tokens = tuple(int(t) for t in out[0, ids.shape[1] :].tolist())
    onnx_tokens = tuple(int(t) for t in greedy_generate(session, ids, mask, n_tokens, suppress=eos_ids)[0].tolist())
    return GreedyCheck(n_tokens, torch_tokens == onnx_tokens, torch_tokens, onnx_tokens)


def validate_export(
    model: Any, onnx_path: Path, cfg: ExportConfig, *, tokenizer: Any = None
) -> tuple[list[ValidationCase], GreedyCheck | None, list[str]]:
    """Run the graph and the PyTorch model side by side; return (cases, greedy check, structural problems).

    The caller decides what a failure means (``export_onnx`` raises); nothing here raises on a mismatch.
    """
    session = make_session(onnx_path)
    vocab = int(getattr(model.config, "vocab_size", 100))
    problems = _missing_outputs(session, cfg)
    if problems:
        return [], None, problems
    cases: list[ValidationCase] = []
    greedy = None
    try:
        cases = _encoder_cases(model, session, cfg, vocab, tokenizer)
        if cfg.task == "causal-lm":
            if past_inputs(session):
                cases.append(_decode_case(model, session, cfg, vocab))
            if cfg.generate_tokens > 0:
                greedy = greedy_check(model, session, cfg.generate_tokens, vocab, tokenizer, cfg.seed)
    except Exception as exc:  # a graph that cannot run on another shape is a validation failure
        if "onnxruntime" not in type(exc).__module__:
            raise
        first_line = str(exc).splitlines()[0][:300]
        return cases, greedy, [f"ONNX Runtime could not run the graph on a validation shape: {first_line}"]
    for case in cases:
        for o in case.outputs:
            logger.info("%s: %s max|diff| %.3g cos %.6f %s", case.label, o.name, o.max_abs_diff, o.cosine,
                        "ok" if o.passed else "FAIL")
    return cases, greedy, []
