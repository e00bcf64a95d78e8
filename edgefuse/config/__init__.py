"""Typed, validated configs (pydantic v2, ``extra="forbid"``): one module per stage.

YAML keys equal the field names. Every field is documented once, in its ``Field(description=...)``,
which also ends up in ``export_configs/schema.json``.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictModel(BaseModel):
    """Base of every edgefuse config: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)
