"""The profile stage on this machine: invariants only (never absolute timings), errors, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_profile_graphs import make_int8, make_mlp_graph, pair  # noqa: F401  (pair is a fixture)
from tolerances import FP32_EXACT_ATOL, INT8_TINY_MLP_MIN_COSINE

from edgefuse.cli import main
from edgefuse.config.profile import ProfileConfig
from edgefuse.errors import ConfigError, ProfileError, TargetNotFoundError
from edgefuse.metrics import cosine
from edgefuse.profile.api import profile_onnx
from edgefuse.profile.results import ProfileResult
from edgefuse.profile.stats import compare_outputs, latency_point

FAST = dict(threads=[1], sequence_lengths=[8], warmup_runs=1, runs=3, op_profile_runs=2, memory_runs=1)


@pytest.fixture(scope="module")
def result(pair: tuple[Path, Path]) -> ProfileResult:  # noqa: F811
    cfg = ProfileConfig(**{**FAST, "threads": [1, 2], "batch_sizes": [1, 2]}, min_cosine=INT8_TINY_MLP_MIN_COSINE)
    return profile_onnx(list(pair), cfg)


def test_latency_invariants_and_grid(result: ProfileResult) -> None:
    assert [g.label for g in result.graphs] == ["mlp", "mlp_int8"] and result.interleaved
    for g in result.graphs:
        assert {(p.threads, p.batch_size, p.sequence_length) for p in g.latency} == {
            (t, b, 8) for t in (1, 2) for b in (1, 2)}
        for p in g.latency:
            assert p.timed_runs == 3 and len(p.samples_ms) == 3
            assert 0 < p.latency_ms_min <= p.latency_ms_p50 <= p.latency_ms_p90 <= p.latency_ms_p99 <= p.latency_ms_max
            assert p.latency_ms_std >= 0 and p.throughput_samples_per_s > 0
            assert p.ratio_vs_reference_p10 <= p.ratio_vs_reference_p50 <= p.ratio_vs_reference_p90
    ref = result.graphs[0]
    assert all(p.ratio_vs_reference_p50 == 1.0 and p.ratio_vs_reference_std == 0.0 for p in ref.latency)


def test_environment_is_recorded(result: ProfileResult) -> None:
    env = result.environment
    assert env.target == "local" and env.emulated is False
    assert env.machine and env.cpu_model and env.onnxruntime_version and env.numpy_version
    assert env.cores_logical >= 1 and env.provider == "CPUExecutionProvider"
    assert "CPUExecutionProvider" in env.available_providers
    import onnxruntime

    assert env.onnxruntime_version == onnxruntime.__version__


def test_memory_baseline_apart_from_the_model(result: ProfileResult) -> None:
    for g in result.graphs:
        m = g.memory
        assert m is not None
        assert 0 < m.process_baseline_rss_mib < m.runtime_baseline_rss_mib <= m.peak_rss_mib
        assert m.model_peak_rss_mib == pytest.approx(m.peak_rss_mib - m.runtime_baseline_rss_mib)
        assert m.model_peak_rss_mib > 0 and m.load_time_ms > 0 and g.load_time_ms == m.load_time_ms
        assert [(p.batch_size, p.sequence_length) for p in m.points] == [(1, 8), (2, 8)]  # smallest first
        assert m.points[0].peak_rss_mib <= m.points[1].peak_rss_mib


def test_op_profile_marks_quantized_and_fp32_matmuls(result: ProfileResult) -> None:
    fp32, int8 = (g.op_profile for g in result.graphs)
    assert fp32 is not None and int8 is not None
    assert fp32.matmul_fp32_nodes == 2 and fp32.matmul_quantized_nodes == 0 and fp32.matmul_quantized_us_per_run == 0
    assert int8.matmul_quantized_nodes == 2 and int8.matmul_fp32_nodes == 0 and int8.matmul_quantized_us_per_run > 0
    assert {o.op_type for o in fp32.by_op_type} >= {"MatMul", "Gather", "Relu"}
    for prof in (fp32, int8):
        assert sum(o.share for o in prof.by_op_type) == pytest.approx(1.0)
        assert sum(o.time_us_per_run for o in prof.by_op_type) == pytest.approx(prof.total_kernel_us_per_run)
        assert all(n.matmul_precision in (None, "fp32", "quantized") for n in prof.by_node)
    assert {n.node for n in fp32.by_node if n.op_type == "MatMul"} == {"up", "down"}


def test_parity_against_the_reference(result: ProfileResult) -> None:
    ref, q = (g.parity for g in result.graphs)
    assert ref is not None and q is not None
    assert ref.min_cosine == pytest.approx(1.0) and ref.outputs[0].max_abs_diff <= FP32_EXACT_ATOL
    assert INT8_TINY_MLP_MIN_COSINE <= q.min_cosine < 1.0  # int8 is close, and not a copy of fp32 (non-vacuity)
    assert q.outputs[0].max_abs_diff > 0 and q.passed is True
    assert q.metric == "mean_pooled" and q.min_cosine == q.outputs[0].cosine_mean_pooled  # the default metric
    assert q.outputs[0].cosine_mean_pooled != q.outputs[0].cosine  # y is (batch, seq, hidden): both reported


def test_parity_metric_flat(pair: tuple[Path, Path]) -> None:  # noqa: F811
    cfg = ProfileConfig(**FAST, memory=False, op_profile=False, parity_metric="flat", min_cosine=None)
    q = profile_onnx(list(pair), cfg).graphs[1].parity
    assert q is not None and q.metric == "flat" and q.passed is None  # min_cosine=None: report only
    assert q.min_cosine == q.outputs[0].cosine != q.outputs[0].cosine_mean_pooled


def test_result_round_trips_through_json(result: ProfileResult) -> None:
    d = json.loads(json.dumps(result.to_dict()))
    assert d["kind"] == "profile" and d["schema"] == "edgefuse.profile.api/1"
    assert ProfileResult.from_dict(d) == result


def test_folder_input_and_no_optional_parts(tmp_path: Path) -> None:
    make_mlp_graph(tmp_path / "only.onnx")
    res = profile_onnx([tmp_path], ProfileConfig(**FAST, memory=False, op_profile=False, check_outputs=False))
    g = res.graphs[0]
    assert g.memory is None and g.op_profile is None and g.parity is None and g.load_time_ms is None
    assert not res.interleaved and len(g.latency) == 1


def test_time_budget_stops_early_but_keeps_min_runs(tmp_path: Path) -> None:
    g = make_mlp_graph(tmp_path / "m.onnx")
    cfg = ProfileConfig(**{**FAST, "runs": 100000}, time_budget_s=0.05, min_runs=4, memory=False, op_profile=False)
    n = profile_onnx([g], cfg).graphs[0].latency[0].timed_runs
    assert 4 <= n < 100000


def test_parity_failure_raises_with_the_result_attached(pair: tuple[Path, Path]) -> None:  # noqa: F811
    with pytest.raises(ProfileError, match=r"below min_cosine=1\.0") as info:
        profile_onnx(list(pair), ProfileConfig(**FAST, memory=False, op_profile=False, min_cosine=1.0))
    partial = info.value.result  # type: ignore[attr-defined]
    assert partial.graphs[1].parity.passed is False and partial.graphs[0].parity.passed is True


def test_runner_crash_is_a_profile_error(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    # Valid ONNX that onnxruntime cannot load: an operator of a domain nobody implements.
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    onnx.save(model, str(tmp_path / "bad.onnx"))
    with pytest.raises(ProfileError, match=r"bench runner failed on target 'local'.*Frobnicate"):
        profile_onnx([tmp_path / "bad.onnx"], ProfileConfig(**FAST))


def test_runner_timeout_is_a_profile_error(tmp_path: Path) -> None:
    g = make_mlp_graph(tmp_path / "m.onnx")
    with pytest.raises(ProfileError, match="ran past timeout_s"):
        profile_onnx([g], ProfileConfig(**{**FAST, "runs": 10**8}, timeout_s=0.5))


@pytest.mark.parametrize(("field", "value", "match"), [
    ("target", "ftp://host", "target must be"),
    ("target", "ssh://-oProxyCommand=x@host", "target must be"),
    ("target", "ssh://pi@host:99999", "port must be"),
    ("threads", [0], "positive integers"),
    ("batch_sizes", [], "at least 1 item"),
    ("cpu", "max", "neoverse-n1"),
    ("runs", 0, "greater than or equal to 1"),
])
def test_config_rejects_bad_values(field: str, value: object, match: str) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=match):
        ProfileConfig(**{field: value})


def test_config_ssh_parts_and_unknown_key() -> None:
    from pydantic import ValidationError

    assert ProfileConfig(target="ssh://pi@10.0.0.2").ssh_parts() == ("pi", "10.0.0.2", None)
    assert ProfileConfig(target="arm64-emulated").emulated
    with pytest.raises(ValidationError, match="unknown key 'thread' \\(did you mean 'threads'\\?\\)"):
        ProfileConfig(thread=[1])  # type: ignore[call-arg]


def test_stats_helpers() -> None:
    p = latency_point([4.0, 2.0, 6.0, 8.0], [2.0, 2.0, 2.0, 2.0], threads=1, batch=2, seq=4, warmup=0)
    assert (p.latency_ms_mean, p.latency_ms_p50, p.ratio_vs_reference_mean) == (5.0, 5.0, 2.5)
    assert p.throughput_samples_per_s == pytest.approx(400.0)
    assert cosine(np.ones(3), -np.ones(3)) == pytest.approx(-1.0)
    # fails closed: an all-zero side has no direction, so even two zero outputs never pass a cosine gate
    assert cosine(np.zeros(2), np.zeros(2)) == 0.0 and cosine(np.zeros(2), np.ones(2)) == 0.0
    assert np.isnan(cosine(np.array([np.nan, 1.0]), np.ones(2)))
    assert cosine(np.array([3.0, 4.0]), np.array([3.0, 4.0])) == 1.0
    par = compare_outputs({"y": np.array([1.0, 2.0]), "z": np.ones(3)}, {"y": np.array([1.0, 2.5]), "z": np.ones(2)})
    assert [o.output for o in par] == ["y"] and par[0].max_abs_diff == pytest.approx(0.5)  # z: shapes differ
    assert par[0].cosine_mean_pooled is None  # rank 1: nothing to pool
    a = np.array([[[1.0, 0.0], [-1.0, 0.0]]])  # (batch 1, seq 2, hidden 2): the tokens cancel in the mean
    b = np.array([[[1.0, 0.0], [-1.0, 2.0]]])
    (o,) = compare_outputs({"h": b}, {"h": a})
    assert o.cosine == pytest.approx(2 / np.sqrt(2) / np.sqrt(6)) and o.cosine_mean_pooled == 0.0


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_profile_json_and_out(tmp_path: Path, pair: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    out = tmp_path / "prof"
    code = main(["profile", str(pair[0]), str(pair[1]), "--threads", "1", "--seq-lens", "8", "--runs", "2",
                 "--warmup-runs", "1", "--min-cosine", str(INT8_TINY_MLP_MIN_COSINE), "--json", "--out", str(out)])
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert [g["label"] for g in printed["graphs"]] == ["mlp", "mlp_int8"]
    expected = [".edgefuse", "profile.json", "report.html", "report.json", "report.md"]
    assert sorted(p.name for p in out.iterdir()) == expected
    assert json.loads((out / "profile.json").read_text())["graphs"][1]["latency"][0]["timed_runs"] == 2
    assert main(["profile", str(pair[0]), "--out", str(out), "--runs", "1"]) == 12  # exists, no --overwrite


def test_cli_profile_summary_dry_run_and_errors(tmp_path: Path, pair: tuple[Path, Path],  # noqa: F811
                                                capsys: pytest.CaptureFixture) -> None:
    assert main(["profile", str(pair[0]), "--threads", "1", "--seq-lens", "8", "--runs", "2", "--no-memory",
                 "--no-op-profile"]) == 0
    out = capsys.readouterr().out
    assert "local (" in out and "mlp" in out and "p50 ms" in out
    cfg = tmp_path / "p.yaml"
    cfg.write_text("profile:\n  runs: 7\n  threads: [1]\n")
    assert main(["profile", str(pair[0]), "--config", str(cfg), "--set", "warmup_runs=2", "--dry-run"]) == 0
    dumped = capsys.readouterr().out
    assert "runs: 7" in dumped and "warmup_runs: 2" in dumped
    assert main(["profile", str(tmp_path / "missing.onnx")]) == TargetNotFoundError.exit_code
    assert main(["profile", str(pair[0]), "--set", "runz=3"]) == ConfigError.exit_code
    assert "runz" in capsys.readouterr().err
    assert main(["profile", str(pair[0]), "--min-cosine", "high"]) == ConfigError.exit_code
    assert main(["profile", str(pair[0]), "--config", str(tmp_path / "nope.yaml")]) == TargetNotFoundError.exit_code


def test_cli_parity_failure_exits_9_and_still_writes(tmp_path: Path, pair: tuple[Path, Path]) -> None:  # noqa: F811
    out = tmp_path / "failed"
    code = main(["profile", str(pair[0]), str(pair[1]), "--threads", "1", "--seq-lens", "8", "--runs", "2",
                 "--no-memory", "--min-cosine", "1.0", "--out", str(out)])
    assert code == ProfileError.exit_code
    saved = json.loads((out / "profile.json").read_text())
    assert saved["graphs"][1]["parity"]["passed"] is False
