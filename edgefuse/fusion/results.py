"""Small, frozen, JSON-serialisable result objects. Units are in the field names; no models inside."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class MlpPlanStep:
    """One MLP of a fusion plan (before it is applied) or of its result (after)."""

    name: str
    role: str
    layer: int
    expert: int | None
    width_before: int
    width_after: int
    params_before: int
    params_after: int
    frozen_scale_entries: int = 0
    kmeans_inertia: float | None = None
    max_cluster_size: int | None = None


@dataclass(frozen=True)
class FusionResult:
    """What :func:`edgefuse.fusion.api.fuse_mlps_` (or ``plan_fusion``) did or would do."""

    model_type: str
    method: str
    steps: tuple[MlpPlanStep, ...]
    params_total_before: int
    params_total_after: int
    seconds: float = 0.0
    applied: bool = False
    config_field_updates: dict[str, int] = field(default_factory=dict)

    @property
    def mlp_params_before(self) -> int:
        return sum(s.params_before for s in self.steps)

    @property
    def mlp_params_after(self) -> int:
        return sum(s.params_after for s in self.steps)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["mlp_params_before"] = self.mlp_params_before
        d["mlp_params_after"] = self.mlp_params_after
        return d
