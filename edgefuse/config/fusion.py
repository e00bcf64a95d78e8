"""Configuration of the fusion stage."""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import Field, field_validator, model_validator

from edgefuse.config import StrictModel

# the names of edgefuse.fusion.methods.METHODS (a test keeps them equal; this module must not import torch)
FusionMethod = Literal["fusion", "fusion-pruned", "merge", "cluster", "centroid", "svd", "prune", "sketch"]
METHODS: tuple[str, ...] = get_args(FusionMethod)


class FusionConfig(StrictModel):
    """How to compress the MLPs of a model. See docs/fusion.md for the methods.

    Example:
        >>> FusionConfig(keep_ratio=0.5, layers=[4, 5]).method
        'fusion'
    """

    method: FusionMethod = Field(
        "fusion",
        description="fusion: k-means centroids + frozen cluster-size scale (the method). merge: sizes folded into "
        "the down projection. fusion-pruned: keep the pool*k most important units and fuse only those (prune the "
        "tail, fuse the rest; not in the paper). cluster: sqrt(sizes) folded into both sides. centroid: no sizes. "
        "Baselines: svd "
        "(rank matched to the parameter count), prune (structured, aligned units), sketch (random Gaussian).",
    )
    keep_ratio: float | None = Field(
        None, gt=0.0, le=1.0, description="Fraction of the intermediate width to keep (0 < r <= 1)."
    )
    width: int | None = Field(None, ge=1, description="Absolute target width; exclusive with keep_ratio.")
    round_to: int = Field(
        1, ge=1,
        description="Round the target width up to a multiple of this (e.g. 16 or 32 for fast int8/int4 kernels).",
    )
    layers: list[int] | None = Field(
        None, description="Transformer layer indices to fuse (all experts of a MoE layer). None: every layer."
    )
    targets: list[str] | None = Field(
        None,
        description="Explicit MLP module names to fuse; a 're:' prefix makes an entry a regular expression "
        "(matched with re.search). Combined with 'layers' by intersection. An entry that matches nothing is an error.",
    )
    include_shared_experts: bool = Field(True, description="Qwen2-MoE: also fuse the shared expert as a dense MLP.")
    seed: int = Field(0, description="Seed of k-means (and of the sketch's random matrix).")
    n_init: int = Field(
        1,
        ge=1,
        description="k-means restarts. 1 keeps MiniLM under 15 s; the paper used 30 (better clusters, 30x slower).",
    )
    max_iter: int = Field(300, ge=1, description="Maximum Lloyd iterations per k-means run.")
    pool: float = Field(
        1.25,
        ge=1.0,
        description="fusion-pruned: keep the round(pool * k) most important units (R; counts sum to it), prune "
        "the rest, then fuse the kept ones into k. pool >= p/k is plain fusion.",
    )
    importance: Literal["weights", "activations"] = Field(
        "weights",
        description="fusion-pruned: how units are ranked. weights: ||[w1;b1]||*||w2|| (data-free). activations: "
        "||w2||*mean|a| over calibration text (the task's training text in a pipeline, else the built-in corpus).",
    )
    calibration_examples: int = Field(
        64, ge=1, description="fusion-pruned with importance activations: texts run through the model to score units."
    )

    @field_validator("keep_ratio", "width", mode="before")
    @classmethod
    def _no_bool(cls, value: object) -> object:
        # YAML reads `keep_ratio: true` as a bool, which pydantic would take as 1.0: a typo, not a ratio
        if isinstance(value, bool):
            raise ValueError(f"must be a number, not the boolean {str(value).lower()}")
        return value

    @model_validator(mode="after")
    def _one_width(self) -> FusionConfig:
        if (self.keep_ratio is None) == (self.width is None):
            raise ValueError(
                f"give exactly one of keep_ratio or width (got keep_ratio={self.keep_ratio}, width={self.width})"
            )
        return self

    def target_width(self, original: int) -> int:
        """The width that ``original`` intermediate units are reduced to (never above ``original``).

        Example:
            >>> FusionConfig(keep_ratio=0.3, round_to=16).target_width(1536)
            464
        """
        import math

        raw = self.width if self.width is not None else max(1, round(original * float(self.keep_ratio)))
        width = int(math.ceil(raw / self.round_to) * self.round_to)
        return max(1, min(width, original))
