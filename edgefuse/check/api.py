"""``edgefuse check``: run the pipeline (reusing every stage whose inputs did not change), measure the candidate
graph, and judge each budget of the config's ``check`` section.

Where each measured value comes from:

=================  ===============================================================================
metric             source
=================  ===============================================================================
size_mib           the candidate graph file plus its external data, on disk
size_ratio         candidate size / reference graph size
latency_ratio      profile stage, same run, interleaved: for p50 the median of the per-round ratios
                   (candidate time / reference time in the same round) when the reference is the
                   profile's first graph; otherwise candidate statistic / reference statistic. The
                   worst (largest) value over all profiled (threads, batch, sequence) points.
latency_ms         profile stage: the largest candidate statistic over all points
peak_rss_mib       profile stage: peak RSS of a fresh process that loads and runs the candidate
cosine, abs_diff   evaluate stage: candidate vs the PyTorch model it was exported from
teacher_cosine     evaluate stage: candidate vs the unfused teacher (PyTorch)
accuracy_drop      evaluate stage: teacher accuracy - candidate accuracy on the validation data
bleu_drop          evaluate stage (generation_prompts): teacher BLEU (PyTorch) - candidate BLEU, greedy
degenerate_...     evaluate stage: share of the candidate's generations that are empty or repetitive
decode_ms          evaluate stage: candidate per-token decode latency (p50, batch 1)
decode_ratio       evaluate stage: candidate / reference per-token decode latency, interleaved
=================  ===============================================================================

Example:
    >>> from edgefuse.config.pipeline import load_config
    >>> result = run_check(load_config("export_configs/ci-check.yaml"), "runs/ci-check")  # doctest: +SKIP
    >>> result.passed, [v.budget for v in result.verdicts if not v.passed]  # doctest: +SKIP
    (True, [])
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefuse.check.budgets import BudgetVerdict, judge
from edgefuse.config.pipeline import PipelineConfig
from edgefuse.errors import ConfigError
from edgefuse.pipeline.api import EventFn, PipelineResult, run_pipeline
from edgefuse.pipeline.store import RunStore, StageRecord


@dataclass(frozen=True)
class CheckResult:
    """Every budget's verdict, the graphs judged, and the pipeline run behind them."""

    passed: bool
    verdicts: tuple[BudgetVerdict, ...]
    candidate: str
    candidate_graph: str
    reference_graph: str | None
    run_dir: Path
    seconds: float
    pipeline: PipelineResult

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "budgets": [v.to_dict() for v in self.verdicts],
            "candidate": self.candidate,
            "candidate_graph": self.candidate_graph,
            "reference_graph": self.reference_graph,
            "run_dir": str(self.run_dir),
            "seconds": round(self.seconds, 3),
            "stages": {s.name: s.status for s in self.pipeline.stages},
        }


def _graph(store: RunStore, records: dict[str, StageRecord], stage: str) -> Path | None:
    record = records.get(stage)
    return None if record is None else store.stage_dir(stage) / record.result["graph"]


def _latency(
    profile: dict[str, Any], cand_label: str, ref_label: str, statistic: str
) -> tuple[float | None, float | None, str]:
    """(worst ratio, worst absolute ms, detail) over the profile's latency points."""
    graphs = {g["label"]: g for g in profile["graphs"]}
    cand, ref = graphs[cand_label], graphs[ref_label]
    paired = ref_label == profile["reference_label"]
    key = f"latency_ms_{statistic}"
    ref_points = {(p["threads"], p["batch_size"], p["sequence_length"]): p for p in ref["latency"]}
    worst_ratio: tuple[float, str] | None = None
    worst_ms: tuple[float, str] | None = None
    for p in cand["latency"]:
        where = f"threads={p['threads']} batch={p['batch_size']} seq={p['sequence_length']}"
        r = ref_points.get((p["threads"], p["batch_size"], p["sequence_length"]))
        if r is not None:
            if paired and statistic in ("p50", "mean"):
                ratio = p[f"ratio_vs_reference_{statistic}"]
            else:
                ratio = p[key] / r[key] if r[key] else None
            if ratio is not None and (worst_ratio is None or ratio > worst_ratio[0]):
                worst_ratio = (ratio, where)
        if worst_ms is None or p[key] > worst_ms[0]:
            worst_ms = (p[key], where)
    emulated = " (EMULATED: not a device timing)" if profile.get("environment", {}).get("emulated") else ""
    detail = f"{statistic}, worst of {len(cand['latency'])} point(s): " + (
        worst_ratio[1] if worst_ratio else (worst_ms[1] if worst_ms else "none")) + emulated
    return (None if worst_ratio is None else float(worst_ratio[0]),
            None if worst_ms is None else float(worst_ms[0]), detail)


def measure(
    cfg: PipelineConfig, run_dir: Path, records: dict[str, StageRecord]
) -> tuple[dict[str, float | None], dict[str, str], str, str | None]:
    """The measured value of every metric a budget can limit, from a finished run's records.

    Returns:
        (metric -> value, metric -> where it came from, candidate graph path, reference graph path).
    """
    from edgefuse.pipeline.graph_stages import graph_size_bytes

    check = cfg.check
    if check is None:
        raise ConfigError("the config has no check section; add check.budgets (see docs/cli.md)")
    store = RunStore(run_dir)
    role = "quantized" if check.candidate == "quantized" else "fp32"
    cand = _graph(store, records, "quantize" if role == "quantized" else "export")
    ref_role = "reference" if check.reference == "original-fp32" and "reference" in records else "fp32"
    ref = _graph(store, records, "reference" if ref_role == "reference" else "export")
    values: dict[str, float | None] = {}
    details: dict[str, str] = {}
    if cand is not None:
        size = graph_size_bytes(cand)
        values["size_mib"] = None if size is None else size / 2**20
        details["size_mib"] = f"{cand.name} + external data"
        if ref is not None and size is not None:
            ref_size = graph_size_bytes(ref)
            values["size_ratio"] = size / ref_size if ref_size else None
            details["size_ratio"] = f"vs {ref_role} graph {ref.name}"
    if "profile" in records:
        prof_roles = records["profile"].result["roles"]
        profile = json.loads((store.stage_dir("profile") / records["profile"].result["profile"]).read_text())
        if role in prof_roles and ref_role in prof_roles:
            stat = check.budgets.latency_statistic
            ratio, ms, where = _latency(profile, prof_roles[role]["label"], prof_roles[ref_role]["label"], stat)
            values["latency_ratio"], values["latency_ms"] = ratio, ms
            details["latency_ratio"] = f"vs {ref_role} graph, {where}"
            details["latency_ms"] = where
        if role in prof_roles:
            values["peak_rss_mib"] = prof_roles[role]["peak_rss_mib"]
            details["peak_rss_mib"] = "fresh process, includes the onnxruntime runtime itself"
    if "evaluate" in records:
        ev = records["evaluate"].result
        graph = ev["graphs"].get(role, {})
        n = f"{ev['examples']} examples ({ev['text']}), {ev['task_vector']}"
        values["cosine"] = (graph.get("vs_pytorch") or {}).get("cosine_mean")
        values["abs_diff"] = (graph.get("vs_pytorch") or {}).get("max_abs_diff")
        values["teacher_cosine"] = (graph.get("vs_teacher") or {}).get("cosine_mean")
        values["accuracy_drop"] = graph.get("accuracy_drop_vs_teacher")
        for key in ("cosine", "abs_diff"):
            details[key] = f"vs PyTorch, {n}"
        details["teacher_cosine"] = f"vs the unfused teacher, {n}"
        teacher_acc = ev["pytorch"]["teacher_accuracy"]
        details["accuracy_drop"] = f"teacher {teacher_acc} vs candidate {graph.get('accuracy')}, {n}"
        gen = ev.get("generation")
        if gen is not None:  # judged by generating (evaluate.generation_prompts)
            values["bleu_drop"] = graph.get("bleu_drop_vs_teacher")
            values["degenerate_fraction"] = graph.get("degenerate_fraction")
            values["decode_ms"] = graph.get("decode_ms_p50")
            ref_ms = ev["graphs"].get(ref_role, {}).get("decode_ms_p50")
            values["decode_ratio"] = (graph["decode_ms_p50"] / ref_ms
                                      if ref_ms and graph.get("decode_ms_p50") is not None else None)
            where = f"greedy, {gen['prompts']} held-out prompts ({gen['references']} references)"
            details["bleu_drop"] = (f"teacher BLEU {gen['teacher']['bleu']:.2f} vs candidate {graph.get('bleu')}, "
                                    f"{where}")
            details["degenerate_fraction"] = where
            details["decode_ms"] = "p50 per token, batch 1, interleaved with the other graphs"
            details["decode_ratio"] = f"vs {ref_role} graph, p50 per token, same interleaved run"
    return values, details, "" if cand is None else str(cand), None if ref is None else str(ref)


def run_check(
    cfg: PipelineConfig,
    run_dir: str | Path,
    *,
    force: Collection[str] = (),
    progress: bool = False,
    on_event: EventFn | None = None,
) -> CheckResult:
    """Run (or resume) the pipeline of ``cfg`` and judge its ``check.budgets``.

    Returns a result whether or not the budgets pass; the CLI turns a failure into exit code 11
    (:class:`~edgefuse.errors.BudgetExceededError`).

    Raises:
        ConfigError: the config has no ``check`` section.
        EdgefuseError: whatever a pipeline stage raises (e.g. ExportValidationError, exit 7).
    """
    if cfg.check is None:
        raise ConfigError("the config has no check section; add check.budgets (see docs/cli.md)")
    start = time.perf_counter()
    run_dir = Path(run_dir)
    pipeline = run_pipeline(cfg, run_dir, force=force, progress=progress, on_event=on_event)
    from edgefuse.pipeline.api import load_run

    records = {k: v for k, v in load_run(run_dir).items() if pipeline.stage(k).status != "off"}
    values, details, cand, ref = measure(cfg, run_dir, records)
    verdicts = judge(cfg.check.budgets, values, details)
    return CheckResult(
        passed=all(v.passed for v in verdicts),
        verdicts=verdicts,
        candidate=cfg.check.candidate,
        candidate_graph=cand,
        reference_graph=ref,
        run_dir=run_dir,
        seconds=time.perf_counter() - start,
        pipeline=pipeline,
    )
