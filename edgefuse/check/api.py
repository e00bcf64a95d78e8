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

Example (the skipped lines are not run: runs the whole pipeline, minutes):
    >>> from edgefuse.config.pipeline import load_config
    >>> result = run_check(load_config("export_configs/ci-check.yaml"), "runs/ci-check")  # doctest: +SKIP
    >>> result.passed, [v.budget for v in result.verdicts if not v.passed]  # doctest: +SKIP
    (True, [])
"""

from __future__ import annotations

import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefuse.check.budgets import BudgetVerdict, judge
from edgefuse.config.pipeline import PipelineConfig
from edgefuse.errors import ConfigError
from edgefuse.pipeline.api import EventFn, PipelineResult, run_pipeline
from edgefuse.pipeline.measure import measure


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
