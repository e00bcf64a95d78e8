"""edgefuse tune on tiny models: the gate (a candidate that misses it is never chosen), the winner and its session
options round-trip through the manifest, edgefuse.ort.session, the profiler's per-graph options and CPU clock, and
every config error is one line with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_export import fused, tiny_tokenizer
from tolerances import INT8_UNREACHABLE_MIN_COSINE, QUANT_TINY_MIN_COSINE, TUNE_TINY_DECODER_MIN_COSINE

from edgefuse.config.export import ExportConfig
from edgefuse.config.tune import CandidateConfig, SessionSpec, TuneConfig
from edgefuse.errors import OutputExistsError, QuantizationError, TargetNotFoundError
from edgefuse.export.api import export_onnx
from edgefuse.manifest import read_manifest, sha256_file, tuned_session_options
from edgefuse.tune.api import tune_folder

FAST = {"budget_s": 0.5, "min_rounds": 3, "warmup_runs": 1, "sequence_length": 16}


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("tune")
    export_onnx(fused("bert", "base"), ExportConfig(), tmp / "bert", tokenizer=tiny_tokenizer(tmp / "tok"))
    return tmp / "bert"


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_a_candidate_below_the_gate_is_never_chosen(bert: Path, tmp_path: Path) -> None:
    folder = _copy(bert, tmp_path / "f")
    # int8 cannot reach INT8_UNREACHABLE_MIN_COSINE against fp32; the fp32 graphs (plain, or with exact fusions) can
    cands = [CandidateConfig(name="int8"), CandidateConfig(name="int8-pt", per_channel=False),
             CandidateConfig(name="fp32-noskip", quantize="fp32", session=SessionSpec(
                 disabled_optimizers=["SkipLayerNormFusion"]))]
    res = tune_folder(folder, TuneConfig(candidates=cands, min_cosine=INT8_UNREACHABLE_MIN_COSINE, **FAST))
    rows = {r.name: r for r in res.candidates}
    assert res.winner == "fp32-noskip" and rows["fp32-noskip"].status == "winner"
    for name in ("int8", "int8-pt"):
        assert rows[name].status == "rejected" and "cosine" in rows[name].reason
        assert rows[name].latency_ms_p50 is None  # a rejected candidate is not even timed
    assert res.graph == "model.onnx"  # the fp32 graph itself, only its session options differ
    assert not (folder / "model_tuned.onnx").exists() and not list(folder.glob(".tune-*"))


def test_default_set_winner_and_session_options_round_trip(bert: Path, tmp_path: Path) -> None:
    folder = _copy(bert, tmp_path / "f")
    res = tune_folder(folder, TuneConfig(**FAST))
    names = [r.name for r in res.candidates]
    assert names[:3] == ["fp32", "int8", "int8-noskipfusion"] and "qdq-int8" in names
    winner = next(r for r in res.candidates if r.status == "winner")
    assert winner.passed and winner.cosine_mean >= QUANT_TINY_MIN_COSINE and winner.ratio_p50 is not None
    assert all(r.latency_ms_p50 is not None for r in res.candidates if r.passed)
    manifest = read_manifest(folder)
    tuned = manifest["tuned"]
    assert tuned["candidate"] == res.winner and tuned["session_options"] == res.session_options
    assert tuned["clock"] == "cpu" and tuned["report"] == "tune_report.json"
    if res.graph != "model.onnx":
        assert manifest["graphs"][res.graph]["sha256"] == sha256_file(folder / res.graph)
    report = json.loads((folder / "tune_report.json").read_text())
    assert report["winner"] == res.winner and len(report["candidates"]) == len(names)
    table = (folder / "tune_report.md").read_text()
    assert all(f"| {n} |" in table for n in names) and "Winner" in table
    with pytest.raises(OutputExistsError):
        tune_folder(folder, TuneConfig(**FAST))


def test_chosen_session_options_reach_the_manifest_profile_and_session(bert: Path, tmp_path: Path) -> None:
    import onnxruntime as ort

    from edgefuse.ort import session

    folder = _copy(bert, tmp_path / "f")
    spec = SessionSpec(disabled_optimizers=["SkipLayerNormFusion"], intra_op_threads=1,
                       session_config={"session.set_denormal_as_zero": "1"})
    res = tune_folder(folder, TuneConfig(candidates=[CandidateConfig(name="only", session=spec)], **FAST))
    assert res.winner == "only" and res.graph == "model_tuned.onnx"
    assert read_manifest(folder)["tuned"]["session_options"] == spec.to_options()
    assert tuned_session_options(folder / "model_tuned.onnx") == spec.to_options()
    assert tuned_session_options(folder / "model.onnx") is None
    opened = session(folder)
    assert isinstance(opened, ort.InferenceSession)
    opts = opened.get_session_options()
    assert opts.get_session_config_entry("session.set_denormal_as_zero") == "1"
    assert opts.intra_op_num_threads == 1
    (folder / "model_tuned.onnx").write_bytes(b"tampered")
    # a graph that changed since it was validated is exit 3 everywhere (TargetNotFoundError), as for corrupt graphs
    with pytest.raises(TargetNotFoundError, match="changed since"):
        session(folder)


def test_nothing_passes_fails_and_writes_nothing(bert: Path, tmp_path: Path) -> None:
    folder = _copy(bert, tmp_path / "f")
    before = read_manifest(folder)
    with pytest.raises(QuantizationError, match="no candidate passed"):
        tune_folder(folder, TuneConfig(candidates=[CandidateConfig(name="int8")],
                                       min_cosine=INT8_UNREACHABLE_MIN_COSINE, **FAST))
    assert read_manifest(folder) == before
    assert not (folder / "model_tuned.onnx").exists() and not list(folder.glob(".tune-*"))


def test_decoder_with_kv_cache(tmp_path: Path) -> None:
    export_onnx(fused("llama", "lm"), ExportConfig(task="causal-lm", generate_tokens=0), tmp_path / "llama")
    cands = [CandidateConfig(name="int8"), CandidateConfig(name="opt-int8", fusions="default")]
    res = tune_folder(tmp_path / "llama", TuneConfig(candidates=cands, min_cosine=TUNE_TINY_DECODER_MIN_COSINE, **FAST))
    rows = {r.name: r for r in res.candidates}
    assert "RotaryEmbedding" in rows["opt-int8"].settings.get("fused_ops", {})
    assert all(r.latency_ms_p50 is not None for r in res.candidates if r.passed)


def test_profile_records_both_clocks_and_per_graph_options(bert: Path) -> None:
    from edgefuse.config.profile import ProfileConfig
    from edgefuse.profile.api import profile_onnx

    cfg = ProfileConfig(threads=[1], sequence_lengths=[16], runs=4, warmup_runs=1, memory=False, op_profile=False,
                        clock="cpu")
    one = profile_onnx([bert / "model.onnx"], cfg)
    p = one.graphs[0].latency[0]
    assert p.clock == "cpu" and p.cpu_clock == "thread" and p.latency_ms_p50 == p.cpu_ms_p50
    assert p.wall_ms_p50 is not None and p.wall_ms_p50 > 0
    two = profile_onnx([bert / "model.onnx", bert / "model.onnx"], cfg.model_copy(update={"clock": "wall"}),
                       session_options=[None, {"intra_op_threads": 2}])
    q = two.graphs[1].latency[0]
    assert q.cpu_clock == "process" and q.latency_ms_p50 == q.wall_ms_p50  # a 2-thread graph: process CPU time


@pytest.mark.parametrize(("argv", "needle"), [
    (["--budget-s", "0"], "budget_s"),
    (["--budget-s", "-5"], "budget_s"),
    (["--candidates", "int8", "nope"], "not a candidate"),
    (["--target", "arm64-emulated"], "numerics only"),
    (["--target", "ftp://x"], "target"),
], ids=["budget-zero", "budget-negative", "unknown-candidate", "emulated", "bad-target"])
def test_cli_config_errors_are_one_line(bert: Path, argv: list[str], needle: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main

    assert main(["tune", str(bert), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


@pytest.mark.parametrize(("candidates", "needle"), [
    ([], "empty list"),
    ([{"name": "a"}, {"name": "a"}], "unique"),
    ([{"name": "a", "session": {"disabled_optimizers": ["SkipLayerNormFuson"]}}], "SkipLayerNormFusion"),
    ([{"name": f"c{i}"} for i in range(40)], "at most"),
    ([{"name": "Bad Name"}], "name"),
    ([{"name": "a", "quantize": "int4"}], "quantize"),
], ids=["empty", "duplicate", "optimizer-typo", "too-many", "bad-name", "bad-mode"])
def test_bad_candidate_lists_from_yaml(bert: Path, tmp_path: Path, candidates: list, needle: str,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    import yaml

    from edgefuse.cli import main

    cfg = tmp_path / "tune.yaml"
    cfg.write_text(yaml.safe_dump({"candidates": candidates}))
    assert main(["tune", str(bert), "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err


def test_cli_dry_run_and_run(bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main

    assert main(["tune", str(bert), "--dry-run", "--candidates", "int8", "fp32"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [c["name"] for c in data["candidates"]] == ["int8", "fp32"]
    folder = _copy(bert, tmp_path / "f")
    assert main(["tune", str(folder), "--candidates", "fp32", "int8", "--budget-s", "0.5", "--seq-len", "16"]) == 0
    out = capsys.readouterr().out
    assert "| int8 |" in out and "Winner" in out


def test_pipeline_tune_stage_is_what_profile_and_check_time(tmp_path: Path) -> None:
    from pipeline_tiny import base_config, save_tiny_bert

    from edgefuse.check.api import run_check
    from edgefuse.config.pipeline import config_from_dict

    model_dir = save_tiny_bert(tmp_path / "bert")
    spec = {"disabled_optimizers": ["SkipLayerNormFusion"]}
    cfg = config_from_dict(base_config(
        model_dir, export={}, reference=False,
        tune={**FAST, "candidates": [{"name": "int8-noskip", "session": spec}]},
        profile={"threads": [1], "sequence_lengths": [16], "runs": 3, "warmup_runs": 1, "memory": False,
                 "op_profile": False, "clock": "cpu"},
        check={"reference": "fp32", "budgets": {"max_latency_ratio": 100.0}}))
    res = run_check(cfg, tmp_path / "run")
    assert res.passed and res.candidate_graph.endswith("tuned/model_tuned.onnx")
    profile = json.loads((tmp_path / "run" / "profile" / "profile.json").read_text())
    tuned_graph = next(g for g in profile["graphs"] if "model_tuned" in g["label"])
    assert tuned_graph["session_options"] == spec  # profiled with the options it was tuned with
    assert profile["graphs"][0]["latency"][0]["cpu_clock"] == "thread"
    tuned = read_manifest(tmp_path / "run" / "tune" / "tuned")["tuned"]
    assert tuned["session_options"] == spec
