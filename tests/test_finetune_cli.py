"""``edgefuse finetune`` end to end on tiny saved models: train, fold, save, resume, errors and exit codes."""

from __future__ import annotations

import json

import pytest
from test_finetune_fixtures import e2e_rows, saved_tiny, sentiment_rows, write_csv, write_tsv

from edgefuse.cli import main
from edgefuse.fusion.persist import SCALES_FILE
from edgefuse.models import load_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture
def sst(tmp_path):
    rows = sentiment_rows(80)
    return write_tsv(tmp_path / "train.tsv", rows[:64]), write_tsv(tmp_path / "val.tsv", rows[64:])


COMMON = ["--batch-size", "8", "--lr", "1e-2", "--no-progress", "--threads", "1"]


def test_help_explains_objectives_and_examples(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["finetune", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for word in ("logits", "hidden", "--teacher", "--resume", "--no-fold", "torchrun", "examples:"):
        assert word in out


def test_recovers_folds_and_saves(tmp_path, sst, capsys):
    fused = saved_tiny(tmp_path / "fused", fuse=0.5)
    teacher = saved_tiny(tmp_path / "teacher")
    out = tmp_path / "out"
    code = main(
        [
            "finetune",
            str(fused),
            str(out),
            "--task",
            "sequence-classification",
            "--train",
            str(sst[0]),
            "--validation",
            str(sst[1]),
            "--objective",
            "task",
            "--objective",
            "logits",
            "--teacher",
            str(teacher),
            "--max-steps",
            "6",
            "--eval-every",
            "3",
            "--eval-before",
            *COMMON,
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "validation before: accuracy" in printed and "teacher_agreement" in printed
    assert "validation: accuracy" in printed and "scale(s) folded" in printed
    result = json.loads((out / "finetune_result.json").read_text())
    assert result["steps_run"] == 6 and result["folded_scales"] == 3
    assert set(result["initial_metrics"]) == {"accuracy", "loss", "teacher_agreement", "examples"}
    assert result["objective_weights"] == {"task": 1.0, "logits": 1.0, "hidden": 0.0}
    assert not (out / "model" / SCALES_FILE).exists()  # folded: ready for export
    model = load_model(str(out / "model"), "sequence-classification")
    assert model.config.intermediate_size == 16  # the fused width survives the round trip


def test_no_fold_keeps_the_scales_for_more_training(tmp_path, sst):
    fused = saved_tiny(tmp_path / "fused", fuse=0.5)
    out = tmp_path / "out"
    assert (
        main(["finetune", str(fused), str(out), "--train", str(sst[0]), "--max-steps", "2", "--no-fold", *COMMON]) == 0
    )
    assert (out / "model" / SCALES_FILE).is_file()


def test_resume_continues_from_the_last_checkpoint(tmp_path, sst):
    fused = saved_tiny(tmp_path / "fused", fuse=0.5)
    out = tmp_path / "out"
    args = ["finetune", str(fused), str(out), "--train", str(sst[0]), "--checkpoint-every", "2", *COMMON]
    assert main([*args, "--max-steps", "4"]) == 0
    assert (out / "checkpoints" / "step-00000004").is_dir()
    # the same output folder again without --resume is refused
    assert main([*args, "--max-steps", "4"]) == 12
    # resuming with other training settings is refused (exit 2: bad config)
    assert main([*args, "--max-steps", "6", "--resume"]) == 2
    assert main([*args, "--max-steps", "4", "--resume"]) == 0
    result = json.loads((out / "finetune_result.json").read_text())
    assert result["resumed_from_step"] == 4 and result["steps_run"] == 0


def test_missing_column_exits_6_with_the_file_and_column(tmp_path, sst, capsys):
    fused = saved_tiny(tmp_path / "fused", fuse=0.5)
    code = main(
        [
            "finetune",
            str(fused),
            str(tmp_path / "o"),
            "--train",
            str(sst[0]),
            "--text-column",
            "review",
            "--max-steps",
            "1",
            *COMMON,
        ]
    )
    assert code == 6
    err = capsys.readouterr().err
    assert "train.tsv" in err and "'review'" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "extra, code, match",
    [
        (["--objective", "distill-hidden"], 2, "needs a teacher model"),
        (["--lr", "-1"], 2, "learning_rate"),
        ([], 2, "give max_steps or epochs"),
    ],
)
def test_bad_settings_exit_2(tmp_path, sst, capsys, extra, code, match):
    fused = saved_tiny(tmp_path / "fused", fuse=0.5)
    steps = [] if match.startswith("give") else ["--max-steps", "1"]
    assert (
        main(["finetune", str(fused), str(tmp_path / "o"), "--train", str(sst[0]), *steps, *extra, "--no-progress"])
        == code
    )
    assert match in capsys.readouterr().err


def test_missing_train_file_exits_3(tmp_path, capsys):
    fused = saved_tiny(tmp_path / "fused", fuse=0.5)
    assert (
        main(
            [
                "finetune",
                str(fused),
                str(tmp_path / "o"),
                "--train",
                str(tmp_path / "none.tsv"),
                "--max-steps",
                "1",
                "--no-progress",
            ]
        )
        == 3
    )
    assert "none.tsv" in capsys.readouterr().err


def test_config_file_and_print_config(tmp_path, sst, capsys):
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"finetune:\n  max_steps: 3\n  learning_rate: 0.001\ndata:\n  train: {sst[0]}\n  max_length: 32\n")
    assert main(["finetune", "x", str(tmp_path / "o"), "--config", str(cfg), "--max-steps", "5", "--print-config"]) == 0
    import yaml

    dumped = yaml.safe_load(capsys.readouterr().out)
    assert dumped["finetune"]["max_steps"] == 5 and dumped["finetune"]["learning_rate"] == 0.001
    assert dumped["data"]["max_length"] == 32
    cfg.write_text("finetune:\n  max_steps: 3\n  bogus: 1\ndata:\n  train: x.tsv\n")
    assert main(["finetune", "x", str(tmp_path / "o"), "--config", str(cfg), "--print-config"]) == 2
    assert "bogus" in capsys.readouterr().err


def test_causal_lm_e2e_style_with_group_split_and_samples(tmp_path, capsys):
    model = saved_tiny(tmp_path / "llama", arch="llama", head="lm", fuse=0.5)
    data = write_csv(tmp_path / "e2e.csv", e2e_rows(64))
    out = tmp_path / "out"
    code = main(
        [
            "finetune",
            str(model),
            str(out),
            "--task",
            "causal-lm",
            "--train",
            str(data),
            "--validation-fraction",
            "0.25",
            "--group-column",
            "mr",
            "--prompt-column",
            "mr",
            "--text-column",
            "ref",
            "--max-steps",
            "4",
            "--num-samples",
            "1",
            *COMMON,
        ]
    )
    assert code == 0
    result = json.loads((out / "finetune_result.json").read_text())
    assert result["best_metric_name"] == "perplexity" and len(result["samples"]) == 1
    assert "greedy:" in capsys.readouterr().out


def test_quant_aware_recovery_from_the_cli_folds_into_up_for_a_gated_mlp(tmp_path):
    model = saved_tiny(tmp_path / "llama", arch="llama", head="lm", fuse=0.5)
    data = write_csv(tmp_path / "e2e.csv", e2e_rows(64))
    out = tmp_path / "out"
    args = ["finetune", str(model), str(out), "--task", "causal-lm", "--train", str(data), "--validation-fraction",
            "0.25", "--group-column", "mr", "--prompt-column", "mr", "--text-column", "ref", "--max-steps", "3",
            "--num-samples", "0", "--quant-aware-bits", "4", "--quant-aware-block-size", "16", *COMMON]
    assert main(args) == 0
    result = json.loads((out / "finetune_result.json").read_text())
    assert result["finetune_config"]["quant_aware_bits"] == 4 and result["folded_scales"] == 2
    assert not (out / "model" / SCALES_FILE).exists()


def test_an_inexact_fold_is_refused_before_training(tmp_path, sst, capsys):
    """--fold-into up on a GELU encoder would change the function: a config error, before any step is run."""
    fused = saved_tiny(tmp_path / "fused", fuse=0.5)
    out = tmp_path / "out"
    code = main(["finetune", str(fused), str(out), "--task", "sequence-classification", "--train", str(sst[0]),
                 "--max-steps", "2", "--fold-into", "up", *COMMON])
    err = capsys.readouterr().err
    assert code == 2 and "fold_scales 'up' is exact only" in err and len(err.strip().splitlines()) == 1
    assert not (out / "finetune_result.json").exists()
