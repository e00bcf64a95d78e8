"""The teacher cache: a teacher trained by one run folder is reused by another beside it (a different recipe,
keep ratio or run folder), retrained when what decides its weights changes, and never trusted when broken."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from pipeline_tiny import base_config, save_tiny_bert, write_tsv

from edgefuse.config.pipeline import config_from_dict
from edgefuse.pipeline import teacher_cache
from edgefuse.pipeline.api import run_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path: Path, **extra: object) -> dict:
    model = tmp_path / "bert"
    if not model.exists():
        save_tiny_bert(model)
        write_tsv(tmp_path / "train.tsv", 48, seed=0)
        write_tsv(tmp_path / "val.tsv", 16, seed=1)
    raw = base_config(
        model,
        model={"name_or_path": str(model), "task": "sequence-classification", "num_labels": 2},
        data={"train": str(tmp_path / "train.tsv"), "validation": str(tmp_path / "val.tsv"), "max_length": 16},
        teacher={"max_steps": 3, "batch_size": 8, "learning_rate": 1e-3},
    )
    raw.update(extra)
    return raw


def _weights(run: Path) -> bytes:
    return (run / "teacher" / "model" / "model.safetensors").read_bytes()


def test_a_second_run_folder_reuses_the_teacher_and_a_config_change_retrains(tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    runs = tmp_path / "runs"
    first = run_pipeline(config_from_dict(_config(tmp_path)), runs / "k05", until="fuse")
    assert first.stage("teacher").result["cache"]["hit"] is False
    entries = list((runs / teacher_cache.CACHE_NAME).iterdir())
    assert len(entries) == 1 and (entries[0] / "model" / "config.json").is_file()

    # another recipe (keep ratio 0.25, its own run folder) trains the same teacher: reused, byte for byte
    with caplog.at_level(logging.INFO, logger="edgefuse.pipeline"):
        second = run_pipeline(config_from_dict(_config(tmp_path, fusion={"keep_ratio": 0.25})), runs / "k025",
                              until="fuse")
    assert "reusing the trained teacher in" in caplog.text
    hit = second.stage("teacher").result
    assert hit["cache"]["hit"] is True and hit["finetune"] == first.stage("teacher").result["finetune"]
    assert _weights(runs / "k025") == _weights(runs / "k05")

    # a teacher setting that changes its weights is trained again, beside the first entry
    changed = _config(tmp_path, teacher={"max_steps": 2, "batch_size": 8, "learning_rate": 1e-3})
    third = run_pipeline(config_from_dict(changed), runs / "steps2", until="teacher")
    assert third.stage("teacher").result["cache"]["hit"] is False
    assert len(list((runs / teacher_cache.CACHE_NAME).iterdir())) == 2


def test_cache_off_writes_no_cache(tmp_path: Path) -> None:
    result = run_pipeline(config_from_dict(_config(tmp_path, teacher_cache=False)), tmp_path / "runs" / "a",
                          until="teacher")
    assert result.stage("teacher").result["cache"] == {"hit": False, "entry": None}
    assert not (tmp_path / "runs" / teacher_cache.CACHE_NAME).exists()


def test_a_broken_entry_is_retrained_and_rewritten(tmp_path: Path) -> None:
    cache = tmp_path / "shared-cache"
    raw = _config(tmp_path, teacher_cache=str(cache))
    run_pipeline(config_from_dict(raw), tmp_path / "a", until="teacher")
    (entry,) = cache.iterdir()
    (entry / "result.json").write_text("{not json")
    again = run_pipeline(config_from_dict(raw), tmp_path / "b", until="teacher")
    assert again.stage("teacher").result["cache"]["hit"] is False
    assert json.loads((entry / "result.json").read_text())["steps_run"] == 3


def test_a_symlink_in_the_cache_is_not_followed(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (tmp_path / "elsewhere.txt").write_text("secret")
    (src / "link").symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises(OSError, match="not a plain file"):
        teacher_cache.copy_model(src, tmp_path / "dst")


def test_the_key_covers_training_code_not_the_rest() -> None:
    # the exporter is not training code: editing it must not retrain a teacher
    assert "export" not in teacher_cache.TRAINING_CODE and "finetune" in teacher_cache.TRAINING_CODE
