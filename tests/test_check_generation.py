"""``edgefuse check`` judging a decoder by generating: a tiny llama taught a toy E2E task (teacher fine-tune),
fused, recovered with checkpoints selected by BLEU, exported with the KV cache, int4; the evaluate stage decodes
the held-out MRs with every graph and the budgets limit the BLEU drop, the degenerate share and the per-token
decode latency."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from test_finetune_fixtures import e2e_rows, saved_tiny, write_csv

from edgefuse.check.budgets import judge
from edgefuse.config.check import BudgetsConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_generation_budgets_fail_closed() -> None:
    budgets = BudgetsConfig(max_bleu_drop=2.0, max_degenerate_fraction=0.0, max_decode_ratio=1.0)
    verdicts = judge(budgets, {"bleu_drop": 1.9, "degenerate_fraction": 0.05, "decode_ratio": None})
    assert [(v.budget, v.passed) for v in verdicts] == [
        ("max_bleu_drop", True), ("max_degenerate_fraction", False), ("max_decode_ratio", False)]


def test_a_bleu_drop_from_a_teacher_at_zero_bleu_is_not_judged() -> None:
    from edgefuse.pipeline.measure import judged_bleu_drop

    assert judged_bleu_drop(0.0, 0.0) is None  # both write nothing that matches: no evidence, fails closed
    assert judged_bleu_drop(float("nan"), 1.0) is None and judged_bleu_drop(None, 1.0) is None
    assert judged_bleu_drop(40.0, 1.5) == 1.5
    verdict = judge(BudgetsConfig(max_bleu_drop=2.0), {"bleu_drop": judged_bleu_drop(0.0, 0.0)})[0]
    assert not verdict.passed and verdict.measured is None


def _recipe(tmp_path: Path, budgets: dict, **evaluate: Any) -> dict[str, Any]:
    model = saved_tiny(tmp_path / "model", "llama", "lm")
    data = write_csv(tmp_path / "e2e.csv", e2e_rows(80))
    phase = {"task_weight": 1.0, "logits_weight": 1.0, "temperature": 1.0, "batch_size": 8, "learning_rate": 1e-2,
             "warmup_ratio": 0.0, "generation_metric": "bleu", "generation_prompts": 4, "generation_max_new_tokens": 10,
             "num_samples": 0}
    return {
        "schema_version": 1,
        "run_dir": str(tmp_path / "run"),
        "model": {"name_or_path": str(model), "task": "causal-lm"},
        "data": {"train": str(data), "validation_fraction": 0.25, "group_column": "mr", "prompt_column": "mr",
                 "text_column": "ref", "prompt_separator": " "},
        "teacher": {"max_steps": 60, "batch_size": 8, "learning_rate": 1e-2, "warmup_ratio": 0.0, "num_samples": 0},
        "fusion": {"keep_ratio": 0.5, "layers": [1]},
        # the shipped recipe's shape: an fp32 recovery phase, then a quant-aware one on the int4 grid
        "finetune": [{**phase, "max_steps": 30, "eval_every_steps": 15},
                     {**phase, "max_steps": 10, "eval_before": True, "quant_aware_bits": 4,
                      "quant_aware_block_size": 16}],
        "export": {"generate_tokens": 4, "validate_shapes": [[1, 5], [2, 7]]},
        "optimize": {"atol": 1e-3, "validate_shapes": [[1, 5], [2, 7]]},
        "quantize": {"mode": "int4", "block_size": 16, "min_cosine": None, "int4_8bit_share": 0.0,
                     "int4_scaling": "none", "int4_algorithm": "default"},
        "evaluate": {"max_examples": 8, "batch_size": 4, "threads": 1, "generation_prompts": 6,
                     "generation_max_new_tokens": 10, "decode_tokens": 6, "decode_rounds": 2, **evaluate},
        "check": {"candidate": "quantized", "reference": "original-fp32", "budgets": budgets},
    }


def test_check_budgets_bleu_drop_and_decode_latency(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from edgefuse.cli import main

    raw = _recipe(tmp_path, {"max_bleu_drop": 100.0, "max_degenerate_fraction": 1.0, "max_decode_ratio": 100.0,
                             "max_decode_ms": 1000.0})
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["check", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    measured = {b["budget"]: b["measured"] for b in data["budgets"]}
    assert set(measured) == {"max_bleu_drop", "max_degenerate_fraction", "max_decode_ms", "max_decode_ratio"}
    assert all(v is not None for v in measured.values())
    assert measured["max_decode_ms"] > 0 and measured["max_decode_ratio"] > 0
    # the stage record: teacher, PyTorch and every graph scored on the same held-out prompts
    gen = json.loads((tmp_path / "run" / "evaluate" / "record.json").read_text())["result"]["generation"]
    phases = json.loads((tmp_path / "run" / "finetune" / "record.json").read_text())["result"]["phases"]
    assert [p["steps_run"] for p in phases] == [30, 10] and phases[1]["initial_metrics"]  # the quant-aware phase ran
    assert gen["prompts"] >= 1 and set(gen["graphs"]) == {"reference", "fp32", "optimized", "quantized"}
    assert gen["teacher"]["bleu"] > 50  # the teacher learnt the toy task: the comparison is not between two zeros
    cand = gen["graphs"]["quantized"]
    assert measured["max_bleu_drop"] == pytest.approx(gen["teacher"]["bleu"] - cand["bleu"])
    ref_ms = gen["graphs"]["reference"]["decode_ms_p50"]
    assert measured["max_decode_ratio"] == pytest.approx(cand["decode_ms_p50"] / ref_ms)
    # a latency nothing can meet fails with exit 11; every stage is reused
    code = main(["check", str(path), "--set", "check.budgets.max_decode_ms=0.000001"])
    err = capsys.readouterr().err
    assert code == 11 and "max_decode_ms: measured" in err


def test_generation_budgets_need_the_evaluate_generation(tmp_path: Path) -> None:
    from edgefuse.config.pipeline import config_from_dict
    from edgefuse.errors import ConfigError

    raw = _recipe(tmp_path, {"max_bleu_drop": 2.0})
    raw["evaluate"].pop("generation_prompts")
    with pytest.raises(ConfigError, match=r"need evaluate\.generation_prompts"):
        config_from_dict(raw)
    raw = _recipe(tmp_path / "second", {"max_bleu_drop": 2.0})
    raw["data"].pop("prompt_column")
    with pytest.raises(ConfigError, match="prompt_column"):
        config_from_dict(raw)


def test_the_run_summary_shows_bleu_and_decode_only_for_generation() -> None:
    from edgefuse.cli.run import summary_table

    plain = summary_table([{"variant": "final fp32", "size_mib": 1.0, "accuracy": 0.9}])
    assert "BLEU" not in plain and "decode ms" not in plain
    gen = summary_table([{"variant": "final quantized", "size_mib": 1.0, "bleu": 57.31, "degenerate_fraction": 0.0,
                          "decode_ms": 23.5}, {"variant": "unfused fp32", "size_mib": 2.0}])
    header, _, first, second = gen.splitlines()
    assert header.split()[-4:] == ["BLEU", "degenerate", "decode", "ms"]
    assert first.split()[-3:] == ["57.31", "0.000", "23.50"] and second.split()[-3:] == ["-", "-", "-"]
