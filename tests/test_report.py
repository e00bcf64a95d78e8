"""The report stage: JSON / Markdown / self-contained HTML, checked in a real headless chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from test_profile_graphs import pair  # noqa: F401  (fixture)
from tolerances import INT8_TINY_MLP_MIN_COSINE, REPORT_NONBLANK_MIN_STD

from edgefuse.cli import main
from edgefuse.config.profile import ProfileConfig
from edgefuse.config.report import ReportConfig
from edgefuse.errors import ConfigError, DataError, OutputExistsError, TargetNotFoundError
from edgefuse.fusion.results import FusionResult, MlpPlanStep
from edgefuse.profile.api import profile_onnx
from edgefuse.profile.results import ProfileResult
from edgefuse.report.api import load_results, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VARIANTS = [{"variant": "fp32", "latency_ms": 33.0, "accuracy": 0.91},
            {"variant": "fused-int8", "latency": 9.1, "accuracy": 0.89, "keep_ratio": 0.5}]


@pytest.fixture(scope="module")
def profile(pair: tuple[Path, Path]) -> ProfileResult:  # noqa: F811
    cfg = ProfileConfig(threads=[1, 2], sequence_lengths=[8], warmup_runs=1, runs=4, op_profile_runs=2,
                        memory_runs=1, min_cosine=INT8_TINY_MLP_MIN_COSINE)
    return profile_onnx(list(pair), cfg)


def fusion_result() -> FusionResult:
    step = MlpPlanStep(name="encoder.layer.0.mlp", role="mlp", layer=0, expert=None, width_before=64,
                       width_after=32, params_before=4192, params_after=2112)
    return FusionResult(model_type="bert", method="fusion", steps=(step,), params_total_before=10000,
                        params_total_after=7920, applied=True)


@pytest.fixture(scope="module")
def report(profile: ProfileResult, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("report")
    return write_report([profile, fusion_result()], out, variants=VARIANTS)


def test_all_three_files(report: dict[str, Path]) -> None:
    assert sorted(report) == ["html", "json", "md"]
    assert [p.name for p in report.values()] == ["report.json", "report.md", "report.html"]
    assert all(p.stat().st_size > 0 for p in report.values())


def test_json_is_complete_and_reloadable(report: dict[str, Path], profile: ProfileResult) -> None:
    d = json.loads(report["json"].read_text())
    assert d["schema"] == "edgefuse.report.api/1"
    assert ProfileResult.from_dict(d["profiles"][0]) == profile  # nothing lost on the way
    assert d["sections"][0]["title"] == "FusionResult" and d["sections"][0]["data"]["method"] == "fusion"
    assert [v["variant"] for v in d["variants"]] == ["fp32", "fused-int8"]
    assert d["variants"][1]["latency_ms"] == 9.1  # 'latency' accepted as an alias
    again = write_report(load_results([report["json"]]), report["json"].parent / "again", formats=("json",))
    assert json.loads(again["json"].read_text())["profiles"] == d["profiles"]


def test_markdown_tables(report: dict[str, Path], profile: ProfileResult) -> None:
    md = report["md"].read_text()
    for heading in ("## Profile 1: local", "### Latency", "### Size, load time and memory", "### Per-operator time",
                    "### Output parity", "## Variants: size, latency and quality", "## FusionResult"):
        assert heading in md, heading
    assert "| graph | threads | batch x seq | runs | p50 latency (ms)" in md
    assert md.index("## Variants") < md.index("## FusionResult") < md.index("## Profile 1")
    assert "| mlp_int8 | MatMulInteger" in md or "| mlp_int8 | DynamicQuantizeMatMul" in md
    assert "quantized" in md and "fp32" in md and "EMULATED" not in md
    p50 = profile.graphs[1].latency[0].latency_ms_p50
    assert f"{p50:.2f}" in md or f"{p50:.4f}" in md  # the numbers come from the result, formatted once
    assert "plot in report.html" in md and "data:image" not in md


def test_html_is_self_contained(report: dict[str, Path]) -> None:
    html = report["html"].read_text()
    imgs = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    titles = [t for t, _ in imgs]
    assert titles == ["Latency against accuracy / cosine, measured", "Latency distributions",
                      "Latency against threads", "Peak memory",
                      "Per-operator breakdown, threads=2, batch 1 x seq 8, 2 runs"]
    import base64

    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for _, data in imgs)
    assert not re.search(r'(src|href)="(https?:|//|file:)', html)  # nothing fetched from outside


def test_emulated_profiles_are_labelled(profile: ProfileResult, tmp_path: Path) -> None:
    d = profile.to_dict()
    d["environment"] = {**d["environment"], "emulated": True, "target": "arm64-emulated (neoverse-n1)",
                        "machine": "aarch64", "emulated_cpu": "neoverse-n1"}
    md = write_report([d], tmp_path, formats=("md",))["md"].read_text()
    assert "[EMULATED under qemu: timings are not device latency]" in md
    assert "### Latency (EMULATED)" in md and "p50 emulated latency (ms)" in md
    assert "Per-operator time (EMULATED), threads=2" in md  # per-op tables say at which thread count they ran
    assert "| mlp | arm64-emulated (neoverse-n1) (EMULATED) |" in md  # variant rows keep the label too


def test_report_errors(tmp_path: Path, profile: ProfileResult) -> None:
    with pytest.raises(ConfigError, match="unknown report format"):
        write_report([profile], tmp_path, formats=("pdf",))
    with pytest.raises(ConfigError, match="needs a 'variant' key"):
        write_report([], tmp_path, formats=("json",), variants=[{"latency_ms": 3.0}])
    with pytest.raises(ConfigError, match="cannot report a int"):
        write_report([42], tmp_path, formats=("json",))
    with pytest.raises(TargetNotFoundError, match="does not exist"):
        load_results([tmp_path / "nope.json"])
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="not a readable JSON"):
        load_results([tmp_path / "bad.json"])
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="expected an object"):
        load_results([tmp_path / "list.json"])
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must not repeat"):
        ReportConfig(formats=["md", "md"])
    assert not any(tmp_path.glob("report.*"))  # nothing written by the failed calls


def test_cli_report(tmp_path: Path, profile: ProfileResult, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "profile.json").write_text(json.dumps(profile.to_dict()))
    (tmp_path / "accuracy.json").write_text(json.dumps({"kind": "accuracy", "sst2_accuracy": 0.9}))
    (tmp_path / "variants.json").write_text(json.dumps(VARIANTS))
    out = tmp_path / "rep"
    args = ["report", str(tmp_path / "profile.json"), str(tmp_path / "accuracy.json"), "--out", str(out),
            "--variants", str(tmp_path / "variants.json"), "--formats", "md", "json", "--title", "PR 42"]
    assert main(args) == 0
    assert "md: " in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [".edgefuse", "report.json", "report.md"]
    md = (out / "report.md").read_text()
    assert md.startswith("# PR 42") and "sst2_accuracy" in md and "fused-int8" in md
    assert main(args) == OutputExistsError.exit_code
    (tmp_path / "v2.json").write_text('{"rows": 3}')
    assert main([*args[:5], "--overwrite", "--variants", str(tmp_path / "v2.json")]) == DataError.exit_code
    assert main(["report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x")]) == 3


# ------------------------------------------------------------------------------------- real browser


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'chrome-profile'}"]
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=120, check=True)


def _colourful_pixels(png: Path) -> int:
    from matplotlib.image import imread

    img = imread(str(png))[..., :3]  # (h, w, 3) floats in 0..1
    assert img.shape[0] > 100 and img.std() > REPORT_NONBLANK_MIN_STD  # rendered something, not a blank page
    # Plot lines, bars and boxes are saturated colours; tables and text are grey.
    return int(((img.max(axis=2) - img.min(axis=2)) > 0.25).sum())


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs chromium (.ci/system-deps.sh installs it)")
def test_html_renders_in_headless_chromium(report: dict[str, Path], profile: ProfileResult, tmp_path: Path) -> None:
    url = report["html"].resolve().as_uri()
    dom = _chromium(tmp_path, "--dump-dom", url).stdout
    assert dom.count('<table class="edgefuse-table">') >= 8
    assert dom.count('<figure class="edgefuse-plot"') == 5 and dom.count("data:image/png;base64,") == 5
    assert "mlp_int8" in dom and "Output parity" in dom
    shot = tmp_path / "with-plots.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1280,6000", url)
    plain = write_report([profile], tmp_path / "plain", formats=("html",), cfg=ReportConfig(plots=False))["html"]
    shot_plain = tmp_path / "no-plots.png"
    _chromium(tmp_path, f"--screenshot={shot_plain}", "--window-size=1280,6000", plain.resolve().as_uri())
    with_plots, without = _colourful_pixels(shot), _colourful_pixels(shot_plain)
    assert with_plots > 10 * max(without, 100)  # the plots are really drawn on the page, not just referenced


def test_keep_trace_is_kept_and_linked(pair: tuple[Path, Path], tmp_path: Path,  # noqa: F811
                                       capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "prof"
    args = ["profile", *map(str, pair), "--threads", "1", "2", "--seq-lens", "8", "--runs", "3", "--warmup-runs", "1",
            "--no-memory", "--min-cosine", "none"]
    assert main([*args, "--keep-trace"]) == ConfigError.exit_code  # the traces need a folder
    assert main([*args, "--keep-trace", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # one row per measured point (graph x threads), not only the headline
    assert len([ln for ln in printed.splitlines() if ln.startswith(("mlp ", "mlp_int8 "))]) == 4
    traces = sorted((out / "traces").iterdir())
    assert [t.name for t in traces] == ["mlp.json", "mlp_int8.json"]
    events = json.loads(traces[1].read_text())
    assert any(e.get("cat") == "Node" and e["name"].endswith("_kernel_time") for e in events)  # a real ORT trace
    html = (out / "report.html").read_text()
    assert 'href="traces/mlp.json"' in html and 'href="traces/mlp_int8.json"' in html
    profile = ProfileResult.from_dict(json.loads((out / "profile.json").read_text()))
    assert profile.graphs[0].op_profile is not None and profile.graphs[0].op_profile.trace == "traces/mlp.json"


def test_a_latency_axis_spanning_more_than_20x_goes_log() -> None:
    """The log branch of the latency axis (values more than 20x apart, e.g. fp32 beside int4 on a loaded host)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgefuse.report.plots import _ms_axis

    fig, ax = plt.subplots()
    ax.barh(["a", "b"], [1.0, 50.0])
    _ms_axis(ax.xaxis, [1.0, 50.0])
    _ms_axis(ax.yaxis, [2.0, 3.0])
    assert ax.get_xscale() == "log" and ax.get_yscale() == "linear"
    plt.close(fig)
