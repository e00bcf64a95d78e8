"""``edgefuse check``: budget verdicts and their boundaries, JUnit XML, exit codes (0 pass, 11 fail, a stage's code
when the pipeline fails first), measured end to end on a tiny BERT (real export, onnxruntime, profiler)."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import yaml
from pipeline_tiny import FAST_PROFILE, base_config, save_tiny_bert
from tolerances import FP32_ONNX_MAX_ABS_DIFF, FP32_ONNX_MIN_COSINE

from edgefuse.check.budgets import BUDGET_SPECS, failures_line, judge
from edgefuse.check.junit import junit_xml
from edgefuse.config.check import BudgetsConfig
from edgefuse.errors import EXIT_CODES
from edgefuse.metrics import Agreement

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


# ------------------------------------------------------------------------------------------------ pure verdicts
@pytest.mark.parametrize(
    ("budget", "limit", "metric", "value", "passed"),
    [
        ("max_size_mib", 30, "size_mib", 30.0, True),       # the limit itself passes
        ("max_size_mib", 30, "size_mib", 30.0001, False),
        ("min_cosine", 0.99, "cosine", 0.99, True),
        ("min_cosine", 0.99, "cosine", 0.9899, False),
        ("max_latency_ratio", 0.6, "latency_ratio", 0.41, True),
        ("max_latency_ratio", 0.6, "latency_ratio", 0.61, False),
        ("max_accuracy_drop", 0.01, "accuracy_drop", -0.002, True),  # better than the teacher
        ("max_peak_rss_mib", 100, "peak_rss_mib", None, False),     # not measured: fail closed
        ("max_abs_diff", 0.5, "abs_diff", math.nan, False),
    ],
    ids=lambda v: str(v),
)
def test_verdict_boundaries(budget: str, limit: float, metric: str, value: float | None, passed: bool) -> None:
    (verdict,) = judge(BudgetsConfig(**{budget: limit}), {metric: value})
    assert verdict.passed is passed
    assert verdict.budget == budget and verdict.limit == limit
    if value is None or (isinstance(value, float) and math.isnan(value)):
        assert verdict.measured is None and "not measured" in verdict.message


def test_verdicts_cover_every_set_budget_in_table_order() -> None:
    budgets = BudgetsConfig(min_cosine=0.9, max_size_mib=10, max_latency_ms=5.0)
    verdicts = judge(budgets, {"size_mib": 12.0, "cosine": 0.95, "latency_ms": 4.0})
    assert [v.budget for v in verdicts] == ["max_size_mib", "max_latency_ms", "min_cosine"]
    assert [v.passed for v in verdicts] == [False, True, True]
    assert failures_line(verdicts) == "1 of 3 budgets failed: max_size_mib: measured 12 MiB, limit <= 10 MiB"
    assert set(BUDGET_SPECS) == set(BudgetsConfig.model_fields) - {"latency_statistic"}


def test_zero_outputs_fail_the_cosine_budgets() -> None:
    """A candidate whose outputs went to zeros, or a reference and candidate that both did, has no direction: the
    one cosine rule gives 0.0 and the cosine budgets fail (the old inline rule gave 1.0 and passed)."""
    reference = np.array([[0.3, -1.2, 0.5], [1.0, 0.0, 2.0]])
    for ref, cand in ((reference, np.zeros_like(reference)), (np.zeros((2, 3)), np.zeros((2, 3)))):
        acc = Agreement()
        acc.update(ref, cand)
        result = acc.result()
        assert result["cosine_mean"] == 0.0 and result["cosine_min"] == 0.0 and result["rows"] == 2
        verdicts = judge(BudgetsConfig(min_cosine=0.5, min_teacher_cosine=0.5),
                         {"cosine": result["cosine_mean"], "teacher_cosine": result["cosine_mean"]})
        assert [v.passed for v in verdicts] == [False, False]


def test_a_nan_output_fails_the_cosine_and_difference_budgets() -> None:
    """One nan row among good ones keeps the running minimum and maximum nan, so every budget on them fails."""
    acc = Agreement()
    acc.update(np.array([[1.0, np.nan]]), np.array([[1.0, 2.0]]))
    acc.update(np.ones((2, 2)), np.ones((2, 2)))
    result = acc.result()
    assert np.isnan(result["cosine_min"]) and np.isnan(result["max_abs_diff"]) and result["rows"] == 3
    verdicts = judge(BudgetsConfig(min_cosine=0.5, max_abs_diff=1.0),
                     {"cosine": result["cosine_min"], "abs_diff": result["max_abs_diff"]})
    assert [v.passed for v in verdicts] == [False, False]


def test_exit_code_of_a_failed_budget_is_documented() -> None:
    assert EXIT_CODES["BudgetExceededError"] == 11


# ------------------------------------------------------------------------------------------------ JUnit XML
def _parse(xml: str) -> ET.Element:
    root = ET.fromstring(xml.encode())
    assert root.tag == "testsuites"
    return root


def test_junit_counts_failures_and_escapes() -> None:
    verdicts = judge(BudgetsConfig(max_size_mib=1, min_cosine=0.5), {"size_mib": 2.0, "cosine": 0.9},
                     {"size_mib": "a <b> & 'c'"})
    root = _parse(junit_xml(verdicts, classname="edgefuse.check.ci", properties={"config": "x&y.yaml"},
                            system_out="table <here>"))
    suite = root.find("testsuite")
    assert suite is not None
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("2", "1", "0")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == {"max_size_mib", "min_cosine"}
    failure = cases["max_size_mib"].find("failure")
    assert failure is not None and failure.get("type") == "BudgetExceeded"
    assert "a <b> & 'c'" in (failure.text or "")
    assert cases["min_cosine"].find("failure") is None
    assert suite.find("properties/property").get("value") == "x&y.yaml"
    assert suite.findtext("system-out") == "table <here>"


def test_junit_error_case_when_nothing_was_judged() -> None:
    root = _parse(junit_xml([], error="ExportValidationError: graph disagrees"))
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("errors"), suite.get("failures")) == ("1", "1", "0")
    assert suite.find("testcase/error").get("message") == "ExportValidationError: graph disagrees"


# ------------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("tiny") / "bert")


def _config(tmp_path: Path, model_dir: Path, budgets: dict, **extra: object) -> Path:
    raw = base_config(
        model_dir,
        run_dir=str(tmp_path / "run"),
        export={"validate_shapes": [[1, 5], [2, 7]]},
        profile=FAST_PROFILE,
        check={"candidate": "fp32", "reference": "original-fp32", "budgets": budgets},
        **extra,
    )
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


SANE = {"max_size_mib": 5, "max_size_ratio": 1.5, "max_latency_ratio": 50.0, "max_peak_rss_mib": 4096,
        "min_cosine": 0.999, "max_abs_diff": 1e-3, "min_teacher_cosine": 0.5}


@pytest.fixture(scope="module")
def sane_config(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One run folder shared by the end-to-end tests: the first check runs the stages, later ones reuse them."""
    return _config(tmp_path_factory.mktemp("check"), model_dir, SANE)


def test_check_passes_on_sane_budgets_and_fails_on_a_tight_one(sane_config: Path, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main

    path = sane_config
    junit = tmp_path / "out" / "check.xml"
    assert main(["check", str(path), "--junit", str(junit)]) == 0
    out = capsys.readouterr().out
    assert "7/7 budgets passed" in out and "FAIL" not in out
    suite = _parse(junit.read_text()).find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("7", "0")
    assert {c.get("classname") for c in suite.findall("testcase")} == {"edgefuse.check.check"}

    # a deliberately tight budget: the fused graph cannot be under a thousandth of the unfused size;
    # every stage is reused from the first run (only the judging changes)
    tight = tmp_path / "out" / "tight.xml"
    code = main(["check", str(path), "--junit", str(tight), "--set", "check.budgets.max_size_ratio=0.001"])
    captured = capsys.readouterr()
    assert code == 11
    assert "[export] inputs unchanged, reused" in captured.err and "running" not in captured.err
    assert "edgefuse: error: 1 of 7 budgets failed: max_size_ratio: measured" in captured.err
    assert re.search(r"max_size_ratio\s+<= 0.001x\s+0\.\d+x\s+FAIL", captured.out)
    suite = _parse(tight.read_text()).find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("7", "1")
    failed = [c.get("name") for c in suite.findall("testcase") if c.find("failure") is not None]
    assert failed == ["max_size_ratio"]


def test_check_json_output_has_every_measurement(sane_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main

    path = sane_config
    assert main(["check", str(path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["passed"] is True
    measured = {b["budget"]: b["measured"] for b in data["budgets"]}
    assert 0 < measured["max_size_mib"] < 1  # a tiny graph
    assert 0 < measured["max_size_ratio"] < 1  # fused graph smaller than the unfused one
    assert measured["max_latency_ratio"] > 0 and measured["max_peak_rss_mib"] > 10
    assert measured["min_cosine"] > FP32_ONNX_MIN_COSINE and measured["max_abs_diff"] < FP32_ONNX_MAX_ABS_DIFF
    assert data["candidate_graph"].endswith("export/fp32/model.onnx")
    assert data["reference_graph"].endswith("reference/reference-fp32/model.onnx")


def test_check_without_a_check_section_is_a_config_error(model_dir: Path, tmp_path: Path) -> None:
    from edgefuse.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config(model_dir)), encoding="utf-8")
    assert main(["check", str(path)]) == 2


def test_a_pipeline_failure_exits_with_its_code_and_writes_a_junit_error(model_dir: Path, tmp_path: Path) -> None:
    from edgefuse.cli import main

    path = _config(tmp_path, model_dir, {"max_size_mib": 5})
    junit = tmp_path / "fail.xml"
    code = main(["check", str(path), "--junit", str(junit), "--set", "export.atol=1e-30", "--set", "export.rtol=0"])
    assert code == EXIT_CODES["ExportValidationError"] == 7
    suite = _parse(junit.read_text()).find("testsuite")
    assert suite.get("errors") == "1"
    assert suite.find("testcase/error").get("message").startswith("ExportValidationError: ONNX graph disagrees")
