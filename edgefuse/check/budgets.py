"""Budget verdicts: each limit of :class:`~edgefuse.config.check.BudgetsConfig` against its measured value.

Pure functions on numbers, so the pass/fail logic is tested without running a model. A limit whose value
could not be measured fails (a CI gate must not pass on a missing number).

Example:
    >>> from edgefuse.config.check import BudgetsConfig
    >>> verdicts = judge(BudgetsConfig(max_size_mib=30, min_cosine=0.99), {"size_mib": 22.9, "cosine": 0.985})
    >>> [(v.budget, v.passed) for v in verdicts]
    [('max_size_mib', True), ('min_cosine', False)]
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any, Literal

from edgefuse.config.check import BudgetsConfig


@dataclass(frozen=True)
class BudgetSpec:
    """How one budget key reads: the measurement it limits, the direction, and the unit."""

    metric: str
    op: Literal["<=", ">="]
    unit: str
    what: str


# budget key -> what it compares; the order is the order of the table and the JUnit test cases
BUDGET_SPECS: dict[str, BudgetSpec] = {
    "max_size_mib": BudgetSpec("size_mib", "<=", "MiB", "size of the candidate graph on disk"),
    "max_size_ratio": BudgetSpec("size_ratio", "<=", "x", "candidate size / reference size"),
    "max_latency_ratio": BudgetSpec("latency_ratio", "<=", "x", "candidate latency / reference latency, same run"),
    "max_latency_ms": BudgetSpec("latency_ms", "<=", "ms", "candidate latency"),
    "max_peak_rss_mib": BudgetSpec("peak_rss_mib", "<=", "MiB", "peak memory of a process running the candidate"),
    "min_cosine": BudgetSpec("cosine", ">=", "", "mean cosine vs the PyTorch model it was exported from"),
    "max_abs_diff": BudgetSpec("abs_diff", "<=", "", "max |difference| vs the PyTorch model it was exported from"),
    "min_teacher_cosine": BudgetSpec("teacher_cosine", ">=", "", "mean cosine vs the unfused teacher (PyTorch)"),
    "max_accuracy_drop": BudgetSpec("accuracy_drop", "<=", "", "teacher accuracy - candidate accuracy"),
    "max_bleu_drop": BudgetSpec("bleu_drop", "<=", "BLEU", "teacher BLEU - candidate BLEU, greedy, held-out prompts"),
    "max_degenerate_fraction": BudgetSpec("degenerate_fraction", "<=", "", "share of degenerate candidate outputs"),
    "max_decode_ms": BudgetSpec("decode_ms", "<=", "ms", "candidate per-token decode latency"),
    "max_decode_ratio": BudgetSpec("decode_ratio", "<=", "x", "candidate / reference per-token decode latency"),
}


@dataclass(frozen=True)
class BudgetVerdict:
    """One budget: its limit, the measured value (None: could not be measured), and whether it passed."""

    budget: str
    metric: str
    op: str
    limit: float
    measured: float | None
    unit: str
    passed: bool
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def message(self) -> str:
        """One line: ``max_size_mib: measured 31.2 MiB, limit <= 30 MiB``."""
        unit = f" {self.unit}" if self.unit and self.unit != "x" else ("x" if self.unit == "x" else "")
        got = "not measured" if self.measured is None else f"measured {self.measured:.6g}{unit}"
        return f"{self.budget}: {got}, limit {self.op} {self.limit:g}{unit}"


def judge(
    budgets: BudgetsConfig, measured: Mapping[str, float | None], details: Mapping[str, str] | None = None
) -> tuple[BudgetVerdict, ...]:
    """A verdict for every limit that ``budgets`` sets, in :data:`BUDGET_SPECS` order.

    Args:
        budgets: the limits.
        measured: metric name (``BudgetSpec.metric``) -> value; missing or None or NaN means not measured.
        details: metric name -> where the value came from (shown in the table and the JUnit message).
    """
    import math

    details = details or {}
    limits = budgets.active()
    out = []
    for key, spec in BUDGET_SPECS.items():
        if key not in limits:
            continue
        limit = float(limits[key])
        value = measured.get(spec.metric)
        if value is not None and isinstance(value, float) and math.isnan(value):
            value = None
        if value is None:
            passed = False
        elif spec.op == "<=":
            passed = float(value) <= limit
        else:
            passed = float(value) >= limit
        out.append(
            BudgetVerdict(key, spec.metric, spec.op, limit, None if value is None else float(value), spec.unit,
                          passed, details.get(spec.metric, spec.what))
        )
    return tuple(out)


def failures_line(verdicts: tuple[BudgetVerdict, ...]) -> str:
    """``2 of 5 budgets failed: <message>; <message>`` (empty string when all passed)."""
    failed = [v for v in verdicts if not v.passed]
    if not failed:
        return ""
    return f"{len(failed)} of {len(verdicts)} budgets failed: " + "; ".join(v.message for v in failed)
