"""``edgefuse fuse`` through ``main([...])``: plan, save, and every user error with its exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import tiny_model

from edgefuse.cli import main


@pytest.fixture()
def bert_dir(tmp_path: Path) -> Path:
    path = tmp_path / "bert"
    tiny_model("bert").save_pretrained(path, safe_serialization=True)
    return path


def test_dry_run_prints_plan_and_writes_nothing(bert_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["fuse", str(bert_dir), str(out), "--keep-ratio", "0.5", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "encoder.layer.0" in text and "32 -> 16" in text and "model total" in text
    assert not out.exists()


def test_fuse_saves_and_json(bert_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    assert main(["fuse", str(bert_dir), str(out), "--keep-ratio", "0.5", "--layers", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["applied"] and [s["name"] for s in result["steps"]] == ["encoder.layer.1"]
    assert (out / "model.safetensors").is_file() and (out / "edgefuse_scales.safetensors").is_file()
    assert not list(tmp_path.glob("*.partial"))


def test_fold_leaves_no_scale_file(bert_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    assert main(["fuse", str(bert_dir), str(out), "--width", "8", "--fold"]) == 0
    assert not (out / "edgefuse_scales.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 8


@pytest.mark.parametrize(
    ("extra", "code", "needle"),
    [
        (["--keep-ratio", "1.5"], 2, "keep_ratio"),
        (["--keep-ratio", "0.5", "--layers", "9"], 3, "[9]"),
        (["--keep-ratio", "0.5", "--target", "nope"], 3, "similar names"),
        (["--keep-ratio", "0.5", "--target", "re:("], 2, "not a valid regular expression"),
    ],
)
def test_user_errors_exit_codes(bert_dir: Path, tmp_path: Path, capsys, extra, code, needle) -> None:
    assert main(["fuse", str(bert_dir), str(tmp_path / "o"), *extra]) == code
    err = capsys.readouterr().err
    assert err.startswith("edgefuse: error:") and needle in err and "Traceback" not in err


def test_missing_model_path(tmp_path: Path, capsys) -> None:
    assert main(["fuse", str(tmp_path / "missing"), str(tmp_path / "o"), "--keep-ratio", "0.5"]) == 3
    assert "does not exist" in capsys.readouterr().err


def test_existing_output_needs_overwrite(bert_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    out.mkdir()
    assert main(["fuse", str(bert_dir), str(out), "--keep-ratio", "0.5"]) == 12
    assert "--overwrite" in capsys.readouterr().err
    assert main(["fuse", str(bert_dir), str(out), "--keep-ratio", "0.5", "--overwrite"]) == 0


def test_unsupported_architecture(tmp_path: Path, capsys) -> None:
    from transformers import DistilBertConfig, DistilBertModel

    path = tmp_path / "distil"
    DistilBertModel(DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=64)).save_pretrained(path)
    assert main(["fuse", str(path), str(tmp_path / "o"), "--keep-ratio", "0.5"]) == 4
    assert "supported: bert" in capsys.readouterr().err


def test_out_dir_required_without_dry_run(bert_dir: Path, capsys) -> None:
    assert main(["fuse", str(bert_dir), "--keep-ratio", "0.5"]) == 2
