"""The building blocks of a report: block types (headings, paragraphs, tables, plots, ...) and the number
formatting every renderer and section shares. Pure data, no rendering; :mod:`edgefuse.report.doc` assembles
them, :mod:`edgefuse.report.sections` turns stage results into them.

Example:
    >>> fmt_ms(12.345), fmt_ratio(0.5), header("peak_rss_mib")
    ('12.35', '0.500x', 'peak RSS (MiB)')
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Summary:
    """The verdict block at the top of a report: (label, text) lines and an overall status."""

    items: tuple[tuple[str, str], ...]
    status: str = "none"  # "pass" | "fail" | "none" (no budgets were set)


@dataclass(frozen=True)
class Links:
    """Links to files next to the report (relative paths): (text, href)."""

    items: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Plot:
    """A figure made only when a renderer needs it (Markdown does not)."""

    title: str
    render: Callable[[], bytes] = field(compare=False)


Block = Heading | Para | Table | Plot | Summary | Links


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows, normalised to plain dicts (as in the JSON report)."""

    title: str
    profiles: tuple[dict[str, Any], ...]
    sections: tuple[dict[str, Any], ...]
    variants: tuple[dict[str, Any], ...]
    verdict: dict[str, Any] | None = None


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v >= 0.1 else f"{v:.4f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}x"


def fmt_mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        text = json.dumps(v, default=str)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(v)


def target_label(env: Mapping[str, Any]) -> str:
    """'local (x86_64, AMD EPYC ...)' or 'arm64-emulated (neoverse-n1) [EMULATED under qemu: not device latency]'."""
    text = f"{env['target']} ({env['machine']}, {env['cpu_model']})"
    if env.get("emulated"):
        text += " [EMULATED under qemu: timings are not device latency]"
    return text


# variant-row key -> column header (anything else: the key with spaces)
VARIANT_HEADERS = {
    "variant": "graph", "target": "target", "size_mib": "size (MiB)", "latency_ms": "p50 latency (ms)",
    "latency_ratio": "latency vs reference", "peak_rss_mib": "peak RSS (MiB)", "accuracy": "accuracy",
    "cosine": "cosine vs teacher / reference", "cosine_vs_pytorch": "cosine vs its PyTorch model",
    "keep_ratio": "keep ratio",
}


def header(key: str) -> str:
    """A human column header for a result key: ``peak_rss_mib`` -> ``peak RSS (MiB)``."""
    if key in VARIANT_HEADERS:
        return VARIANT_HEADERS[key]
    text = key.replace("_", " ")
    for unit, shown in ((" mib", " (MiB)"), (" ms", " (ms)"), (" bytes", " (bytes)"), (" seconds", " (s)")):
        if text.endswith(unit):
            text = text[: -len(unit)] + shown
    return text.replace("rss", "RSS")
