"""Generation metrics: scores on known strings, repetition detection, the E2E split, PyTorch and ONNX greedy
decoding of a tiny decoder, and checkpoint selection by a generation metric in the recovery stage."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from test_finetune_fixtures import e2e_rows, word_tokenizer, write_csv
from tiny import tiny_model
from tolerances import FP32_EXACT_ATOL

from edgefuse.config.finetune import DataConfig, FinetuneConfig
from edgefuse.errors import ConfigError, MissingDependencyError
from edgefuse.finetune.api import finetune_
from edgefuse.finetune.data import load_finetune_data, split_rows
from edgefuse.finetune.generation import (
    decode_latency,
    decode_timing,
    distinct_n,
    evaluate_generation,
    generate_onnx,
    generate_torch,
    group_references,
    heldout_groups,
    is_degenerate,
    repeated_ngram_fraction,
    score_generations,
)

# ../shared/data beside the repository; EDGEFUSE_SHARED_DATA points elsewhere (a git worktree one level deeper)
SHARED = Path(os.environ.get("EDGEFUSE_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
E2E = SHARED / "e2e" / "devset.csv"
needs_e2e = pytest.mark.skipif(not E2E.is_file(), reason="the E2E devset is not in ../shared/data")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# ------------------------------------------------------------------------------------------------ metrics
def test_bleu_chrf_rouge_on_known_strings():
    # hand-computed: n-gram precisions 5/6, 3/5, 2/4, 1/3, equal lengths (no brevity penalty):
    # BLEU = (5/6 * 3/5 * 1/2 * 1/3) ** (1/4) = 0.5373
    s = score_generations(["the cat sat on the mat"], [["the cat sat on a mat"]])
    assert s.bleu == pytest.approx(53.73, abs=0.01)
    assert 0 < s.chrf < 100
    # ROUGE-L: LCS 5 of 6 words both ways -> F = 5/6
    assert s.rouge_l == pytest.approx(5 / 6, abs=FP32_EXACT_ATOL)
    # a second, exact reference makes it perfect: the references of an MR are all used
    multi = score_generations(["the cat sat on the mat"], [["the cat sat on a mat", "the cat sat on the mat"]])
    assert multi.bleu == pytest.approx(100.0) and multi.chrf == pytest.approx(100.0) and multi.rouge_l == 1.0
    # ROUGE-L recall: 3 of 6 reference words, precision 1 -> F = 2/3
    assert score_generations(["the cat sat"], [["the cat sat on the mat"]]).rouge_l == pytest.approx(2 / 3)


def test_uneven_reference_groups_and_samples():
    hyps = ["Aromi is a pub .", "Cotto is near the river ."]
    refs = [["Aromi is a pub .", "The pub Aromi ."], ["Cotto is near the river ."]]
    s = score_generations(hyps, refs, prompts=["name Aromi\n", "name Cotto\n"], num_samples=1)
    assert s.bleu == pytest.approx(100.0) and s.prompts == 2 and s.references == 3
    assert s.samples == ({"prompt": "name Aromi", "generated": hyps[0], "references": refs[0]},)
    assert set(s.metrics()) >= {"bleu", "chrf", "rouge_l", "distinct_1", "distinct_2", "degenerate_fraction"}


def test_wrong_output_scores_low_and_degenerate_output_is_counted():
    refs = [["Aromi is a pub in the city centre ."], ["Cotto is a coffee shop near the river ."]]
    bad = score_generations(["**AddAddAddAddAddAddAddAddAddAdd", ", but,,,,,,,,,,,,,,,,"], refs)
    good = score_generations(["Aromi is a pub in the centre .", "Cotto is a coffee shop by the river ."], refs)
    assert bad.bleu < 1.0 < 30.0 < good.bleu
    assert bad.degenerate_fraction == 1.0 and good.degenerate_fraction == 0.0


def test_scoring_fails_closed():
    with pytest.raises(ValueError, match="no hypotheses"):
        score_generations([], [])
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        score_generations(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="no reference"):
        score_generations(["a"], [[]])
    # an empty output is degenerate and has no distinct n-grams (0, never nan)
    s = score_generations([""], [["a b c"]])
    assert s.bleu == 0.0 and s.distinct_1 == 0.0 and s.degenerate_fraction == 1.0


def test_missing_metric_libraries_name_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "sacrebleu", None)
    with pytest.raises(MissingDependencyError, match=r"edgefuse\[generation\]"):
        score_generations(["a"], [["a"]])


def test_repetition_measures():
    assert repeated_ngram_fraction(["a", "b", "a", "b", "a", "b"], 2) == pytest.approx(3 / 5)
    assert repeated_ngram_fraction(["a", "b"], 3) == 0.0
    assert distinct_n(["a a a a"], 1) == 0.25 and distinct_n(["a b", "c d"], 2) == 1.0
    for text in ("AddAddAddAddAddAddAddAddAddAdd", ", but,,,,,,,,,,,,,,,,,,", "the the the the the the the", "  "):
        assert is_degenerate(text), text
    fluent = "The Vaults is a family-friendly pub near Café Adriatic in the city centre with a price range of £20-25."
    assert not is_degenerate(fluent)


@needs_e2e
def test_no_real_e2e_reference_is_degenerate():
    rows, _, _ = split_rows(DataConfig(train=str(E2E), text_column="ref"))
    flagged = [r["ref"] for r in rows if is_degenerate(r["ref"])]
    assert not flagged, flagged[:3]


# ------------------------------------------------------------------------------------------------ split
@needs_e2e
def test_e2e_split_is_grouped_by_mr_and_deterministic():
    cfg = DataConfig(train=str(E2E), validation_fraction=0.1, group_column="mr", prompt_column="mr",
                     text_column="ref", seed=0)
    prompts, refs = heldout_groups(cfg)
    assert (prompts, refs) == heldout_groups(cfg)  # same config, same split
    train, val, _ = split_rows(cfg)
    train_mrs, val_mrs = {r["mr"] for r in train}, {r["mr"] for r in val}
    assert not train_mrs & val_mrs
    assert [p[:-1] for p in prompts] == list(dict.fromkeys(r["mr"] for r in val))
    assert sum(len(r) for r in refs) == len(val) and all(refs)
    assert 0.08 < len(val_mrs) / len(train_mrs | val_mrs) < 0.12
    other, _ = heldout_groups(cfg.model_copy(update={"seed": 1}))
    assert other != prompts
    assert heldout_groups(cfg, max_prompts=5)[0] == prompts[:5]


def test_heldout_groups_needs_prompts_and_validation(tmp_path):
    path = write_csv(tmp_path / "e2e.csv", e2e_rows(20))
    with pytest.raises(ConfigError, match="prompt_column"):
        heldout_groups(DataConfig(train=str(path), validation_fraction=0.25, text_column="ref"))
    with pytest.raises(ConfigError, match="validation"):
        heldout_groups(DataConfig(train=str(path), text_column="ref", prompt_column="mr"))


def test_group_references_keeps_first_appearance_order():
    assert group_references(["b", "a", "b"], ["1", "2", "3"]) == (["b", "a"], [["1", "3"], ["2"]])
    with pytest.raises(ValueError):
        group_references(["a"], [])


# ------------------------------------------------------------------------------------------------ decoding
def _trained_tiny_lm(tmp_path: Path, steps: int = 60):
    """A tiny llama taught the toy E2E mapping, with its data and tokenizer."""
    tok = word_tokenizer("lm")
    path = write_csv(tmp_path / "e2e.csv", e2e_rows(80))
    cfg = DataConfig(train=str(path), validation_fraction=0.25, group_column="mr", prompt_column="mr",
                     text_column="ref", prompt_separator=" ")
    data = load_finetune_data(cfg, tok, "causal-lm")
    model = tiny_model("llama", head="lm")
    finetune_(model, FinetuneConfig(task="causal-lm", max_steps=steps, batch_size=8, learning_rate=1e-2,
                                    warmup_ratio=0.0, num_samples=0), data, tokenizer=tok, progress=False)
    return model, tok, cfg


def test_torch_and_onnx_greedy_generation_agree(tmp_path):
    from edgefuse.config.export import ExportConfig
    from edgefuse.export.api import export_onnx
    from edgefuse.ort import make_session

    model, tok, cfg = _trained_tiny_lm(tmp_path)
    prompts, refs = heldout_groups(cfg)
    # left padding is exercised: the prompts of one batch differ in length
    prompts = [*prompts, "name Cotto", "name Aromi area riverside area centre "]
    refs = [*refs, ["Cotto is a place ."], ["Aromi is a place in the riverside ."]]
    pt = generate_torch(model, tok, prompts, max_new_tokens=10, batch_size=3)
    res = export_onnx(model, ExportConfig(task="causal-lm", generate_tokens=4), tmp_path / "onnx", tokenizer=tok)
    ox = generate_onnx(make_session(res.onnx_path, threads=1), tok, prompts, max_new_tokens=10, batch_size=3)
    assert pt == ox
    scores = evaluate_generation(lambda ps: generate_torch(model, tok, ps, max_new_tokens=10), prompts[:-2], refs[:-2])
    # the toy mapping is learnt: the validation MRs are described, not repeated
    assert scores.bleu > 50 and scores.degenerate_fraction == 0.0, scores.samples
    # decode timing through the real graph: every step timed in wall and CPU time, none of them zero or nan
    lat = decode_latency({"g": make_session(res.onnx_path, threads=1)}, tok, prompts[0], n_tokens=3, rounds=2)["g"]
    assert lat["decode_steps"] == 4.0
    assert all(lat[k] > 0 for k in ("decode_ms_p50", "decode_ms_p90", "decode_cpu_ms_p50", "prefill_ms_p50",
                                    "prefill_cpu_ms_p50")), lat


def test_decode_timing_alternates_runners_and_fails_closed():
    calls: list[tuple[str, int]] = []

    def runner(label: str, step_ms: float):
        def run(n, wall, cpu):
            calls.append((label, n))
            wall.extend([100.0] + [step_ms] * (n - 1))
            cpu.extend([50.0] + [step_ms / 2] * (n - 1))
        return run

    t = decode_timing({"a": runner("a", 2.0), "b": runner("b", 4.0)}, n_tokens=5, rounds=3)
    # warm-up (2 tokens) once each, then a-b, b-a, a-b: load hits both alike
    assert calls == [("a", 2), ("b", 2), ("a", 5), ("b", 5), ("b", 5), ("a", 5), ("a", 5), ("b", 5)]
    assert (t["a"]["decode_ms_p50"], t["b"]["decode_ms_p50"], t["b"]["decode_cpu_ms_p50"]) == (2.0, 4.0, 2.0)
    assert t["a"]["prefill_ms_p50"] == 100.0 and t["a"]["prefill_cpu_ms_p50"] == 50.0
    assert t["a"]["decode_steps"] == 12.0

    def short(n, wall, cpu):  # stopped at EOS: the token counts of the engines would differ
        wall.extend([1.0] * (n - 1))
        cpu.extend([1.0] * (n - 1))

    with pytest.raises(ValueError, match="must decode exactly"):
        decode_timing({"short": short}, n_tokens=4, rounds=1)
    with pytest.raises(ValueError, match="n_tokens >= 2"):
        decode_timing({"a": runner("a", 1.0)}, n_tokens=1)


def test_checkpoints_are_selected_by_a_generation_metric(tmp_path):
    tok = word_tokenizer("lm")
    path = write_csv(tmp_path / "e2e.csv", e2e_rows(80))
    cfg = DataConfig(train=str(path), validation_fraction=0.25, group_column="mr", prompt_column="mr",
                     text_column="ref", prompt_separator=" ")
    model = tiny_model("llama", head="lm")
    ft = FinetuneConfig(task="causal-lm", max_steps=40, batch_size=8, learning_rate=1e-2, warmup_ratio=0.0,
                        eval_every_steps=10, eval_before=True, generation_metric="bleu", generation_prompts=4,
                        generation_max_new_tokens=10, num_samples=0)
    res = finetune_(model, ft, cfg, tokenizer=tok, progress=False)
    assert res.best_metric_name == "bleu"
    assert {"bleu", "chrf", "rouge_l", "degenerate_fraction", "perplexity"} <= set(res.eval_history[0])
    best = max(res.eval_history, key=lambda e: e["bleu"])
    assert res.best_metric == best["bleu"] and res.best_step == int(best["step"])
    assert res.initial_metrics["bleu"] < res.best_metric  # generation improved, and was measured before


def test_generation_metric_errors(tmp_path):
    with pytest.raises(ValueError, match="causal-lm"):
        FinetuneConfig(max_steps=1, generation_metric="bleu")
    path = write_csv(tmp_path / "e2e.csv", e2e_rows(40))
    cfg = DataConfig(train=str(path), validation_fraction=0.25, group_column="mr", prompt_column="mr",
                     text_column="ref")
    tok = word_tokenizer("lm")
    data = load_finetune_data(cfg, tok, "causal-lm")
    ft = FinetuneConfig(task="causal-lm", max_steps=1, generation_metric="chrf")
    with pytest.raises(ConfigError, match="tokenizer"):
        finetune_(tiny_model("llama", head="lm"), ft, data, progress=False)
    no_prompt = load_finetune_data(cfg.model_copy(update={"prompt_column": None}), tok, "causal-lm")
    with pytest.raises(ConfigError, match="prompt"):
        finetune_(tiny_model("llama", head="lm"), ft, no_prompt, tokenizer=tok, progress=False)
