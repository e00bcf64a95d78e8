"""Configuration of the report stage (JSON for machines, Markdown for pull requests, one HTML page for people)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from edgefuse.config import StrictModel

ReportFormat = Literal["json", "md", "html"]
REPORT_FORMATS: tuple[str, ...] = ("json", "md", "html")


class ReportConfig(StrictModel):
    """What the report contains and which files it writes.

    Example:
        >>> ReportConfig(formats=["md"]).formats
        ['md']
    """

    formats: list[ReportFormat] = Field(
        ["json", "md", "html"], min_length=1, description="Files to write: report.json, report.md, report.html."
    )
    title: str = Field("edgefuse report", min_length=1, description="Title of the Markdown and HTML reports.")
    top_ops: int = Field(10, ge=1, description="Operator types listed per graph in the per-operator tables.")
    top_nodes: int = Field(8, ge=1, description="Slowest nodes listed per graph.")
    plots: bool = Field(True, description="Embed matplotlib plots (base64 PNG) in the HTML report.")
    plot_dpi: int = Field(96, ge=50, le=300, description="Resolution of the embedded plots.")

    @field_validator("formats")
    @classmethod
    def _unique(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError(f"formats must not repeat, got {value}")
        return value
