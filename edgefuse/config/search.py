"""Configuration of the keep_ratio search: the smallest width that still meets a quality budget."""

from __future__ import annotations

from typing import Any

from pydantic import Field, model_validator

from edgefuse.config import StrictModel


class SearchConfig(StrictModel):
    """Bisection over ``fusion.keep_ratio`` in ``[low, high]``, assuming quality grows with the width.

    Exactly one budget is given: ``min_cosine`` (mean cosine similarity of the fused model's output to the
    unfused model's, no labels needed) or ``max_accuracy_drop`` (needs a labelled validation set).

    Example:
        >>> SearchConfig(min_cosine=0.95).metric
        'cosine'
    """

    min_cosine: float | None = Field(
        None, ge=-1, le=1, description="Budget: mean cosine similarity to the unfused model at least this."
    )
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="Budget: accuracy at most this far below the unfused model (0.01 = 1 point)."
    )
    low: float = Field(0.05, gt=0, le=1, description="Smallest keep_ratio considered.")
    high: float = Field(1.0, gt=0, le=1, description="Largest keep_ratio considered (must meet the budget).")
    resolution: float = Field(
        0.02, gt=0, le=1, description="Stop when the bracket [passing, failing] is narrower than this."
    )
    max_points: int = Field(10, ge=2, description="Evaluate at most this many keep_ratios.")
    finetune: bool = Field(
        False,
        description="Run the finetune section at every point before measuring (slow, but measures what ships); "
        "otherwise points are measured right after fusion. (Old name: recover.)",
    )
    max_examples: int = Field(128, ge=1, description="Evaluation examples used to measure each point.")

    @model_validator(mode="before")
    @classmethod
    def _legacy_recover(cls, data: Any) -> Any:
        # edgefuse 0.1 called this key ``recover``; recovery is spelled ``finetune`` everywhere now
        if isinstance(data, dict) and "recover" in data:
            if "finetune" in data:
                raise ValueError("give search.finetune only (search.recover is its old name)")
            data = {("finetune" if k == "recover" else k): v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        if (self.min_cosine is None) == (self.max_accuracy_drop is None):
            raise ValueError(
                f"give exactly one of min_cosine or max_accuracy_drop (got min_cosine={self.min_cosine}, "
                f"max_accuracy_drop={self.max_accuracy_drop})"
            )
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        return self

    @property
    def metric(self) -> str:
        """``cosine`` or ``accuracy``: what each point is measured by."""
        return "cosine" if self.min_cosine is not None else "accuracy"
