"""Every stage of the pipeline on a tiny BERT classifier (teacher fine-tune, fusion, recovery, export, int8,
reference, evaluation with accuracy, profile, report), the accuracy budget, and a recovery killed mid-training
that resumes from its checkpoints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from pipeline_tiny import FAST_PROFILE, base_config, save_tiny_bert, write_tsv
from tolerances import FP32_ONNX_MIN_COSINE, INT4_TINY_LM_MIN_COSINE

from edgefuse.config.pipeline import config_from_dict
from edgefuse.pipeline.api import run_pipeline

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _classifier_config(tmp_path: Path, **extra: object) -> dict:
    model = save_tiny_bert(tmp_path / "bert")
    train = write_tsv(tmp_path / "train.tsv", 96, seed=0)
    val = write_tsv(tmp_path / "val.tsv", 32, seed=1)
    raw = base_config(
        model,
        model={"name_or_path": str(model), "task": "sequence-classification", "num_labels": 2},
        data={"train": str(train), "validation": str(val), "max_length": 16},
        teacher={"max_steps": 4, "batch_size": 8, "learning_rate": 1e-3},
        finetune=[  # two recovery phases: layer-wise distillation of the fused MLPs, then task + logits
            {"max_steps": 2, "batch_size": 8, "task_weight": 0.0, "hidden_weight": 1.0, "trainable": "fused-mlps"},
            {"max_steps": 3, "batch_size": 8, "task_weight": 1.0, "logits_weight": 1.0},
        ],
        export={"validate_shapes": [[1, 5], [2, 7]]},
        quantize={"mode": "dynamic", "preset": "avx512-vnni", "min_cosine": None, "calibration_samples": 16},
        profile=FAST_PROFILE,
        report={"formats": ["json", "md", "html"], "plots": False},
    )
    raw.update(extra)
    return raw


def test_every_stage_on_a_tiny_classifier(tmp_path: Path) -> None:
    raw = _classifier_config(tmp_path, check={"budgets": {"max_accuracy_drop": 1.0, "min_cosine": 0.5}})
    result = run_pipeline(config_from_dict(raw), tmp_path / "run")
    assert result.ran == ("teacher", "fuse", "finetune", "export", "quantize", "reference", "evaluate", "profile",
                          "report")
    run = tmp_path / "run"
    # the teacher is the fine-tuned unfused model: the fusion starts from it, the reference export is of it
    fuse = json.loads((run / "fuse" / "record.json").read_text())
    assert set(fuse["inputs"]) == {"teacher", "edgefuse"}  # edgefuse: its version and code
    assert set(json.loads((run / "reference" / "record.json").read_text())["inputs"]) == {"teacher", "edgefuse"}
    phases = result.stage("finetune").result["phases"]
    assert [p["steps_run"] for p in phases] == [2, 3]
    assert phases[0]["objective_weights"]["hidden"] == 1.0 and phases[0]["objective_weights"]["task"] == 0.0
    assert result.stage("finetune").result["finetune"] == phases[-1]
    quant = result.stage("quantize").result
    assert quant["graph"] == "quantized/model.onnx" and quant["quantize"]["quantized_nodes"] > 0
    # 16 training rows to calibrate on, 16 others to check on
    assert quant["quantize"]["held_out"] is True and quant["quantize"]["samples"] == 16
    # optimum-loadable folder: config and tokenizer beside the int8 graph
    assert (run / "quantize" / "quantized" / "config.json").is_file()
    assert (run / "quantize" / "quantized" / "tokenizer.json").is_file()

    ev = result.stage("evaluate").result
    assert ev["examples"] == 32 and ev["text"] == "validation"
    for role in ("fp32", "quantized", "reference"):
        graph = ev["graphs"][role]
        assert 0.0 <= graph["accuracy"] <= 1.0
        assert graph["vs_pytorch"]["rows"] == 32
    assert ev["graphs"]["fp32"]["vs_pytorch"]["cosine_mean"] > FP32_ONNX_MIN_COSINE  # fp32 ONNX == PyTorch
    assert ev["graphs"]["reference"]["vs_teacher"]["cosine_mean"] > FP32_ONNX_MIN_COSINE  # the reference IS the teacher
    assert ev["graphs"]["fp32"]["accuracy_drop_vs_teacher"] == pytest.approx(
        ev["pytorch"]["teacher_accuracy"] - ev["graphs"]["fp32"]["accuracy"])

    prof = result.stage("profile").result
    assert prof["reference_role"] == "reference" and set(prof["roles"]) == {"reference", "fp32", "quantized"}
    assert prof["roles"]["reference"]["ratio_vs_reference_p50"] == pytest.approx(1.0)
    html = result.summary["report_files"]["html"]
    assert Path(html).is_file() and "Agreement with PyTorch" in Path(html).read_text()
    rows = {r["variant"]: r for r in result.summary["graphs"]}
    assert set(rows) == {"unfused fp32", "final fp32", "final quantized"}
    # (on a model this small the int8 graph is not smaller: quantization parameters outweigh the weights)
    assert all(r["size_mib"] > 0 and r["latency_ms"] > 0 and r["peak_rss_mib"] > 0 for r in rows.values())

    # the accuracy budget is measured from the same run (every stage reused)
    from edgefuse.check.api import run_check

    check = run_check(config_from_dict(raw), tmp_path / "run")
    assert check.pipeline.ran == ()
    (drop,) = [v for v in check.verdicts if v.budget == "max_accuracy_drop"]
    assert drop.measured == pytest.approx(ev["graphs"]["quantized"]["accuracy_drop_vs_teacher"])
    assert check.passed


@pytest.mark.slow  # 16 s: a recovery killed with SIGKILL in a subprocess, then resumed
def test_a_killed_recovery_resumes_from_its_checkpoints(tmp_path: Path) -> None:
    raw = _classifier_config(tmp_path)
    for key in ("teacher", "export", "quantize", "profile", "report"):
        raw.pop(key)
    raw["finetune"] = {"max_steps": 80, "batch_size": 8, "checkpoint_every_steps": 2, "task_weight": 1.0}
    raw["run_dir"] = str(tmp_path / "run")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "edgefuse", "run", str(path), "--no-progress"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        found: list[Path] = []
        while time.monotonic() < deadline and not found:
            found = list((tmp_path / "run").glob(".finetune-checkpoints-*/checkpoints/step-*"))
            if proc.poll() is not None:
                pytest.fail(f"the run ended before its first checkpoint: {proc.stderr.read()[-2000:]}")
            time.sleep(0.2)
        assert found, "no checkpoint appeared within 240 s"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (tmp_path / "run" / "finetune").exists()  # the killed stage left no folder that looks complete

    result = run_pipeline(config_from_dict(raw), tmp_path / "run")
    assert result.cached == ("fuse",)
    ft = result.stage("finetune").result["finetune"]
    assert ft["resumed_from_step"] is not None and ft["resumed_from_step"] >= 2
    assert ft["total_steps"] == 80 and ft["steps_run"] == 80 - ft["resumed_from_step"]
    assert not list((tmp_path / "run").glob(".finetune-checkpoints-*"))  # spent checkpoints are removed


def test_a_causal_lm_with_kv_cache_through_int4(tmp_path: Path) -> None:
    from tiny import tiny_model

    from edgefuse.fusion.persist import save_fused

    model = save_fused(tiny_model("llama"), tmp_path / "llama")  # no tokenizer: evaluation uses random tokens
    raw = {
        "schema_version": 1,
        "model": {"name_or_path": str(model), "task": "causal-lm"},
        "fusion": {"keep_ratio": 0.5},
        "export": {"validate_shapes": [[1, 5], [2, 7]], "generate_tokens": 3},
        "quantize": {"mode": "int4", "block_size": 16, "min_cosine": None},
        "profile": {"threads": [1], "batch_sizes": [1], "sequence_lengths": [8], "runs": 3, "warmup_runs": 1,
                    "op_profile": False, "memory": False},
    }
    result = run_pipeline(config_from_dict(raw), tmp_path / "run")
    assert result.stage("export").result["export"]["greedy"]["match"] is True
    assert "MatMulNBits" in result.stage("quantize").result["quantize"]["op_counts"]
    ev = result.stage("evaluate").result
    assert ev["text"] == "random tokens" and ev["task_vector"].startswith("next-token logits")
    assert ev["graphs"]["fp32"]["vs_pytorch"]["cosine_mean"] > FP32_ONNX_MIN_COSINE
    int4 = ev["graphs"]["quantized"]["vs_pytorch"]["cosine_mean"]
    assert INT4_TINY_LM_MIN_COSINE < int4 < 1.0  # int4 moved it, but not far
    # the prefill of a prompt with an empty KV cache is what gets timed
    assert (tmp_path / "run" / "profile" / "prefill_inputs.npz").is_file()
    assert set(result.stage("profile").result["roles"]) == {"reference", "fp32", "quantized"}
