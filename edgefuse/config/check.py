"""Configuration of ``edgefuse check``: the budgets a shipped graph must meet.

Latency is compared as a *ratio* against a reference graph measured in the same run, interleaved with the
candidate, because absolute times on a shared machine drift by tens of percent between runs;
absolute limits are allowed for dedicated hardware.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgefuse.config import StrictModel

Candidate = Literal["quantized", "fp32"]
Reference = Literal["original-fp32", "fp32"]
LatencyStatistic = Literal["p50", "p90", "p99", "mean"]


class BudgetsConfig(StrictModel):
    """Every limit is optional; a limit that is not set is not checked. A set limit that could not be measured
    fails (fail closed: a CI gate must never pass on a missing number).

    Example:
        >>> BudgetsConfig(max_size_mib=30, max_latency_ratio=0.6).max_size_mib
        30.0
    """

    max_size_mib: float | None = Field(
        None, gt=0, description="On-disk size of the candidate graph (with its external data), in MiB."
    )
    max_size_ratio: float | None = Field(
        None, gt=0, description="Candidate size divided by the reference graph's size."
    )
    max_latency_ratio: float | None = Field(
        None,
        gt=0,
        description="Candidate latency divided by the reference graph's latency, both measured in the same run, "
        "interleaved (the statistic is latency_statistic).",
    )
    max_latency_ms: float | None = Field(
        None,
        gt=0,
        description="Absolute latency limit in milliseconds (latency_statistic). Unstable on shared machines; "
        "prefer max_latency_ratio.",
    )
    latency_statistic: LatencyStatistic = Field(
        "p50", description="Which latency statistic the latency budgets compare."
    )
    max_peak_rss_mib: float | None = Field(
        None, gt=0, description="Peak resident memory of a fresh process that loads and runs the candidate, in MiB."
    )
    min_cosine: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Smallest allowed mean cosine similarity between the candidate graph's outputs and the "
        "PyTorch model it was exported from, on the evaluation texts (pooled embedding or logits).",
    )
    max_abs_diff: float | None = Field(
        None, gt=0, description="Largest allowed absolute difference against that PyTorch model, over all outputs."
    )
    min_teacher_cosine: float | None = Field(
        None,
        ge=-1,
        le=1,
        description="Smallest allowed mean cosine similarity against the unfused teacher (PyTorch): how much "
        "fusion, recovery and quantization moved the output together.",
    )
    max_accuracy_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Largest allowed teacher accuracy minus candidate accuracy on the validation data, as a "
        "fraction (0.01 = one percentage point). Needs a labelled validation set.",
    )

    max_bleu_drop: float | None = Field(
        None,
        ge=0,
        description="causal-lm: largest allowed teacher BLEU minus candidate BLEU (sacrebleu points, 0-100) on the "
        "held-out prompts, greedy decoding (evaluate.generation_prompts).",
    )
    max_degenerate_fraction: float | None = Field(
        None,
        ge=0,
        le=1,
        description="causal-lm: largest allowed share of the candidate's generations that are empty or mostly "
        "repeat themselves (evaluate.generation_prompts).",
    )
    max_decode_ms: float | None = Field(
        None,
        gt=0,
        description="causal-lm: per-token greedy decode latency of the candidate (p50, batch 1, ms; "
        "evaluate.generation_prompts). Unstable on shared machines; prefer max_decode_ratio.",
    )
    max_decode_ratio: float | None = Field(
        None,
        gt=0,
        description="causal-lm: candidate per-token decode latency (p50) divided by the reference graph's, "
        "measured interleaved in the same run.",
    )

    def active(self) -> dict[str, float]:
        """The limits that are set, by name (``latency_statistic`` excluded).

        Example:
            >>> BudgetsConfig(min_cosine=0.99).active()
            {'min_cosine': 0.99}
        """
        return {
            k: v for k, v in self.model_dump().items() if k != "latency_statistic" and v is not None
        }


class CheckConfig(StrictModel):
    """Which graph ``edgefuse check`` judges, against which reference, with which budgets.

    Example:
        >>> CheckConfig(budgets={"max_size_mib": 30}).candidate
        'quantized'
    """

    candidate: Candidate = Field(
        "quantized", description="The graph under test: the quantized graph (the tuned graph when the run has a "
        "tune section), or the fp32 export."
    )
    reference: Reference = Field(
        "original-fp32",
        description="Reference of the ratio budgets: original-fp32 is the unfused (teacher) model exported in "
        "fp32 in the same run; fp32 is the candidate model's own fp32 graph.",
    )
    budgets: BudgetsConfig = Field(description="The limits; at least one must be set.")

    @model_validator(mode="after")
    def _not_empty(self) -> CheckConfig:
        if not self.budgets.active():
            allowed = ", ".join(k for k in BudgetsConfig.model_fields if k != "latency_statistic")
            raise ValueError(f"budgets sets no limit; set at least one of: {allowed}")
        return self
