"""The pipeline machinery on a tiny BERT: stage records, skipping unchanged stages, resuming after a failure or a
kill, atomic stage folders, the run lock, --dry-run / --save-config, and the keep_ratio search stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pipeline_tiny import base_config, save_tiny_bert
from tolerances import FP32_ONNX_MIN_COSINE

from edgefuse.config.pipeline import config_from_dict, load_config
from edgefuse.errors import ConfigError, ExportValidationError, OutputExistsError
from edgefuse.pipeline.api import STAGE_NAMES, load_run, resolve_run_dir, run_pipeline
from edgefuse.pipeline.store import RECORD, RunStore, hash_tree

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def test_fuse_stage_writes_a_record_and_is_skipped_when_unchanged(model_dir: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(base_config(model_dir))
    first = run_pipeline(cfg, tmp_path / "run")
    assert first.ran == ("fuse",)
    assert [s.status for s in first.stages if s.name != "fuse"] == ["off"] * (len(STAGE_NAMES) - 1)
    record = json.loads((tmp_path / "run" / "fuse" / RECORD).read_text())
    assert record["output_hash"] == hash_tree(tmp_path / "run" / "fuse")
    # edgefuse: its version and code (a code change reruns the stage)
    assert set(record["inputs"]) == {"source", "edgefuse"}
    assert record["result"]["fusion"]["params_total_after"] < record["result"]["fusion"]["params_total_before"]
    assert (tmp_path / "run" / "fuse" / "model" / "model.safetensors").is_file()
    assert (tmp_path / "run" / "config.yaml").is_file() and (tmp_path / "run" / "pipeline.json").is_file()

    second = run_pipeline(cfg, tmp_path / "run")
    assert second.ran == () and second.cached == ("fuse",)
    assert second.stage("fuse").result == first.stage("fuse").result

    forced = run_pipeline(cfg, tmp_path / "run", force=["fuse"])
    assert forced.ran == ("fuse",)
    # k-means is seeded: the same inputs give byte-identical outputs
    assert json.loads((tmp_path / "run" / "fuse" / RECORD).read_text())["output_hash"] == record["output_hash"]


def test_a_config_change_reruns_only_the_stages_it_reaches(model_dir: Path, tmp_path: Path) -> None:
    raw = base_config(model_dir, export={"validate_shapes": [[1, 5], [2, 7]]})
    run_pipeline(config_from_dict(raw), tmp_path / "run")
    # an export setting changes the export and everything after it, not the fusion
    raw2 = dict(raw, export={"validate_shapes": [[1, 5], [2, 7]], "atol": 2e-4})
    again = run_pipeline(config_from_dict(raw2), tmp_path / "run")
    assert again.cached[0] == "fuse"
    assert {"export", "reference"} <= set(again.ran)
    # a fusion setting reaches the fuse stage and the graphs built from it, but not the reference export
    raw3 = dict(raw2, fusion={"keep_ratio": 0.25})
    third = run_pipeline(config_from_dict(raw3), tmp_path / "run")
    assert set(third.ran) == {"fuse", "export", "evaluate"}
    assert third.cached == ("reference",)
    assert third.stage("evaluate").result["graphs"]["fp32"]["vs_pytorch"]["cosine_mean"] > FP32_ONNX_MIN_COSINE


def test_changed_source_model_reruns_fusion(tmp_path: Path) -> None:
    src = save_tiny_bert(tmp_path / "m", seed=0)
    cfg = config_from_dict(base_config(src))
    run_pipeline(cfg, tmp_path / "run")
    from tiny import tiny_model

    from edgefuse.fusion.persist import save_fused

    save_fused(tiny_model("bert", seed=1), src, overwrite=True)  # same path, other weights
    assert run_pipeline(cfg, tmp_path / "run").ran == ("fuse",)


def test_a_tampered_artifact_is_rebuilt(model_dir: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(base_config(model_dir))
    run_pipeline(cfg, tmp_path / "run")
    (tmp_path / "run" / "fuse" / "model" / "config.json").write_text("{}")
    assert run_pipeline(cfg, tmp_path / "run").ran == ("fuse",)


def test_failed_stage_leaves_no_folder_and_the_next_run_resumes(model_dir: Path, tmp_path: Path) -> None:
    # an impossible tolerance makes the real export validation fail (exit code 7)
    raw = base_config(model_dir, export={"atol": 1e-30, "rtol": 0.0, "validate_shapes": [[1, 5], [2, 7]]})
    with pytest.raises(ExportValidationError):
        run_pipeline(config_from_dict(raw), tmp_path / "run")
    assert (tmp_path / "run" / "fuse" / RECORD).is_file()
    assert not (tmp_path / "run" / "export").exists()
    assert not list((tmp_path / "run").glob(".*.partial"))
    assert not (tmp_path / "run" / ".lock").exists()

    fixed = dict(raw, export={"validate_shapes": [[1, 5], [2, 7]]})
    resumed = run_pipeline(config_from_dict(fixed), tmp_path / "run")
    assert resumed.cached == ("fuse",)
    assert "export" in resumed.ran and (tmp_path / "run" / "export" / "fp32" / "model.onnx").is_file()


def test_a_killed_run_resumes_and_its_leftovers_are_removed(model_dir: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(base_config(model_dir))
    run_pipeline(cfg, tmp_path / "run")
    # what `kill -9` in the middle of a stage leaves: a temporary folder and a lock of a dead process
    partial = tmp_path / "run" / ".export.abc123.partial"
    (partial / "fp32").mkdir(parents=True)
    (partial / "fp32" / "model.onnx").write_bytes(b"half a graph")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / "run" / ".lock").write_text(dead.stdout.strip())
    result = run_pipeline(cfg, tmp_path / "run")
    assert result.cached == ("fuse",)
    assert not partial.exists()


def test_a_live_lock_refuses_a_second_run(model_dir: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(base_config(model_dir))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("")
    (run_dir / ".lock").write_text(str(os.getppid()))  # a process that is alive
    with pytest.raises(OutputExistsError, match="is in use by process"):
        run_pipeline(cfg, run_dir)


def test_a_foreign_folder_is_not_used_as_run_dir(model_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds no edgefuse run"):
        run_pipeline(config_from_dict(base_config(model_dir)), tmp_path / "home")
    with pytest.raises(ConfigError, match="is a file"):
        run_pipeline(config_from_dict(base_config(model_dir)), tmp_path / "home" / "notes.txt")


def test_force_and_until_names_are_checked(model_dir: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(base_config(model_dir))
    with pytest.raises(ConfigError, match=r"names unknown stage\(s\) \['fusion'\]; the stages are: teacher"):
        run_pipeline(cfg, tmp_path / "run", force=["fusion"])
    with pytest.raises(ConfigError, match="that stage is off"):
        run_pipeline(cfg, tmp_path / "run", until="export")


def test_until_stops_early(model_dir: Path, tmp_path: Path) -> None:
    cfg = config_from_dict(base_config(model_dir, export={"validate_shapes": [[1, 5], [2, 7]]}))
    result = run_pipeline(cfg, tmp_path / "run", until="fuse")
    assert result.ran == ("fuse",) and result.stage("export").status == "off"
    assert set(load_run(tmp_path / "run")) == {"fuse"}


def test_run_dir_resolution() -> None:
    cfg = config_from_dict({"schema_version": 1})
    assert resolve_run_dir(cfg, "export_configs/default.yaml") == Path("runs/default")
    assert resolve_run_dir(cfg, "x.yaml", "elsewhere") == Path("elsewhere")
    assert resolve_run_dir(config_from_dict({"schema_version": 1, "run_dir": "r"}), "x.yaml") == Path("r")


def test_search_stage_records_every_point_and_fuse_uses_its_choice(model_dir: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    # pooled cosine of a tiny random BERT barely moves; the logits-free budget is set just under 1 so the
    # bisection has to work: every point is recorded and the fusion uses the chosen ratio
    raw = base_config(model_dir, search={"min_cosine": 0.99999, "low": 0.0625, "max_points": 5},
                      run_dir=str(tmp_path / "run"))
    result = run_pipeline(config_from_dict(raw), tmp_path / "run")
    search = result.stage("search").result
    assert search["points"][0]["keep_ratio"] == 1.0 and search["points"][0]["passed"]
    assert 2 <= len(search["points"]) <= 5
    chosen = search["keep_ratio"]
    assert chosen is not None and all(p["keep_ratio"] >= chosen for p in search["points"] if p["passed"])
    fused_widths = {s["width_after"] for s in result.stage("fuse").result["fusion"]["steps"]}
    assert fused_widths == {round(32 * chosen)}
    assert result.stage("fuse").result["keep_ratio"] == chosen

    from edgefuse.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    assert main(["run", str(path)]) == 0  # every stage reused; the CLI prints every point tried
    out = capsys.readouterr().out
    assert f"-> {chosen:.4f} ({len(search['points'])} points" in out
    assert out.count("  keep_ratio ") == len(search["points"])


def test_search_budget_that_nothing_meets_fails_with_exit_11(model_dir: Path, tmp_path: Path) -> None:
    from edgefuse.errors import BudgetExceededError

    raw = base_config(model_dir, search={"min_cosine": 1.0, "high": 0.5, "low": 0.1})
    with pytest.raises(BudgetExceededError,
                       match=r"no keep_ratio in \[0.1, 0.5\] meets min_cosine 1.0 \(tried 0.500->"):
        run_pipeline(config_from_dict(raw), tmp_path / "run")


def test_cli_dry_run_prints_plan_and_writes_nothing(model_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(f"schema_version: 1\nrun_dir: {tmp_path / 'run'}\nmodel: {{name_or_path: {model_dir}}}\n"
                    "fusion: {keep_ratio: 0.5}\nexport: {}\n")
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", str(path), "--dry-run", "--set", "fusion.keep_ratio=0.25"]) == 0
    out = capsys.readouterr().out
    assert "keep_ratio: 0.25" in out
    assert "encoder.layer.0  32 -> 8" in out and "fuse       on" in out and "quantize   off" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    saved = tmp_path / "resolved.yaml"
    assert main(["run", str(path), "--dry-run", "--save-config", str(saved)]) == 0
    assert load_config(saved) == load_config(path)


def test_cli_run_prints_stage_lines_and_a_summary(model_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(f"schema_version: 1\nmodel: {{name_or_path: {model_dir}}}\nfusion: {{keep_ratio: 0.5}}\n")
    assert main(["run", str(path), "--run-dir", str(tmp_path / "r")]) == 0
    captured = capsys.readouterr()
    assert "[fuse] done in" in captured.err
    assert "1 stage(s) ran, 0 reused" in captured.out
    assert main(["run", str(path), "--run-dir", str(tmp_path / "r"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert {s["name"]: s["status"] for s in data["stages"]}["fuse"] == "cached"


def test_store_partial_cleanup_only_touches_its_own_leftovers(tmp_path: Path) -> None:
    store = RunStore(tmp_path)
    (tmp_path / ".fuse.x.partial").mkdir()
    (tmp_path / "keep.partial").mkdir()
    assert [p.name for p in store.clean_partials()] == [".fuse.x.partial"]
    assert (tmp_path / "keep.partial").is_dir()


def test_recovery_is_one_stage_named_finetune_and_an_old_recover_folder_is_not_reused(
    model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from pipeline_tiny import write_tsv

    from edgefuse.pipeline.context import producer

    data = {"train": str(write_tsv(tmp_path / "train.tsv", 8))}
    cfg = config_from_dict(base_config(model_dir, data=data, finetune={"max_steps": 1, "task_weight": 0.0,
                                                                       "hidden_weight": 1.0}))
    assert "finetune" in STAGE_NAMES and "recover" not in STAGE_NAMES
    assert producer(cfg, "final") == "finetune"
    # a run folder written before the rename: its ``recover/`` stage is left alone and never read
    old = tmp_path / "run" / "recover"
    old.mkdir(parents=True)
    (old / RECORD).write_text("{}", encoding="utf-8")
    (tmp_path / "run" / "config.yaml").write_text("schema_version: 1\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="edgefuse.pipeline.api"):
        result = run_pipeline(cfg, tmp_path / "run", until="fuse")
    assert result.ran == ("fuse",)
    assert "'recover' stage from an older edgefuse" in caplog.text and "now called 'finetune'" in caplog.text
    assert (old / RECORD).is_file() and "recover" not in load_run(tmp_path / "run")


def test_search_finetune_key_and_its_old_name() -> None:
    from edgefuse.config.search import SearchConfig

    assert SearchConfig(min_cosine=0.9, finetune=True).finetune
    assert SearchConfig.model_validate({"min_cosine": 0.9, "recover": True}).finetune  # the 0.1 spelling
    with pytest.raises(ValueError, match=r"give search\.finetune only"):
        SearchConfig.model_validate({"min_cosine": 0.9, "recover": True, "finetune": False})


def test_calibration_texts_never_include_a_held_out_row(tmp_path: Path) -> None:
    """The quantize and tune stages calibrate on ``StageContext.texts``: with a grouped held-out split those must
    be training rows only (GPTQ and the activation-aware search fit their calibration texts)."""
    from edgefuse.finetune.data import split_rows
    from edgefuse.pipeline.context import StageContext

    data = tmp_path / "e2e.csv"
    data.write_text("mr,ref\n" + "".join(f"m{i // 3},text {i}\n" for i in range(60)), encoding="utf-8")
    cfg = config_from_dict({"schema_version": 1, "run_dir": str(tmp_path / "run"),
                            "model": {"name_or_path": "unused", "task": "causal-lm"},
                            "data": {"train": str(data), "validation_fraction": 0.25, "group_column": "mr",
                                     "prompt_column": "mr", "text_column": "ref", "prompt_separator": " "}})
    ctx = StageContext(cfg=cfg, stage="quantize", store=None, out=tmp_path, records={})  # type: ignore[arg-type]
    texts = ctx.texts(60)
    _, val, _ = split_rows(cfg.data)
    held_out = {f"{r['mr']} {r['ref']}" for r in val}
    assert texts and len(texts) == 60 - len(val) and not held_out & set(texts)
