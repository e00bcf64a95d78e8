"""The report stage: JSON for machines, Markdown for pull requests, one self-contained HTML page for people.

``write_report`` accepts profile results (objects or their JSON dicts), any other stage result with a
``to_dict()`` (fusion summary, export validation, accuracy ...) as generic sections, and variant rows
``{variant, latency_ms, accuracy | cosine, ...}`` for the latency-against-quality plot.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> rows = [{"variant": "fp32", "latency_ms": 33.0, "cosine": 1.0}, {"variant": "int8", "latency_ms": 13.2,
    ...          "cosine": 0.993}]
    >>> sorted(write_report([], out, formats=("json", "md"), variants=rows))
    ['json', 'md']
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgefuse.config.report import REPORT_FORMATS, ReportConfig
from edgefuse.errors import ConfigError, DataError, TargetNotFoundError
from edgefuse.io_utils import write_json_atomic, write_text_atomic
from edgefuse.report.doc import ReportData, build_blocks, normalise_variant, sections_from

logger = logging.getLogger(__name__)

REPORT_SCHEMA = "edgefuse.report.api/1"
FILE_NAMES = {"json": "report.json", "md": "report.md", "html": "report.html"}

__all__ = ["ReportConfig", "load_results", "write_report"]


def write_report(
    results: Sequence[Any],
    out_dir: Path,
    formats: Sequence[str] | None = None,
    *,
    variants: Sequence[Mapping[str, Any]] = (),
    cfg: ReportConfig | None = None,
) -> dict[str, Path]:
    """Write the report files into ``out_dir`` (each atomically) and return ``{format: path}``.

    Args:
        results: :class:`~edgefuse.profile.results.ProfileResult` objects or their dicts (``kind: profile``),
            dicts ``{"kind": "variants", "rows": [...]}``, one ``{"kind": "verdict", ...}`` (the block at the top:
            shipped graph, size, speed, accuracy cost, budgets), and any other stage result (an object with
            ``to_dict()`` or a mapping, optionally with ``title`` and ``data``) shown as a generic section.
        out_dir: folder to write ``report.json`` / ``report.md`` / ``report.html`` into (created if missing).
        formats: subset of ``("json", "md", "html")``; default ``cfg.formats``.
        variants: extra rows ``{variant, latency_ms, accuracy | cosine, ...}`` for the latency-vs-quality plot.
        cfg: title, table sizes and plot settings.

    Raises:
        ConfigError: an unknown format or a variant row without ``variant``.

    Example (the skipped lines are not run: needs a profile result):
        >>> write_report([profile_result], Path("out"))  # doctest: +SKIP
        {'json': PosixPath('out/report.json'), 'md': PosixPath('out/report.md'), 'html': PosixPath('out/report.html')}
    """
    cfg = cfg or ReportConfig()
    formats = tuple(formats) if formats is not None else tuple(cfg.formats)
    bad = [f for f in formats if f not in REPORT_FORMATS]
    if bad or not formats:
        raise ConfigError(f"unknown report format(s) {bad or formats}; choose from {list(REPORT_FORMATS)}")
    data = _normalise(results, variants, cfg.title)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    if "json" in formats:
        written["json"] = out_dir / FILE_NAMES["json"]
        write_json_atomic(written["json"], {"schema": REPORT_SCHEMA, "title": data.title,
                                            "profiles": list(data.profiles), "sections": list(data.sections),
                                            "variants": list(data.variants), "verdict": data.verdict})
    if "md" in formats or "html" in formats:
        kwargs = {"top_ops": cfg.top_ops, "top_nodes": cfg.top_nodes, "dpi": cfg.plot_dpi}
        if "md" in formats:
            from edgefuse.report.markdown import render_markdown

            written["md"] = out_dir / FILE_NAMES["md"]
            write_text_atomic(written["md"], render_markdown(build_blocks(data, plots=cfg.plots, **kwargs)))
        if "html" in formats:
            from edgefuse.report.html import render_html

            written["html"] = out_dir / FILE_NAMES["html"]
            write_text_atomic(written["html"], render_html(build_blocks(data, plots=cfg.plots, **kwargs),
                                                           title=data.title))
    logger.debug("report written: %s", ", ".join(str(p) for p in written.values()))
    return written


def load_results(paths: Sequence[Path | str]) -> list[dict[str, Any]]:
    """Read result JSON files: a ``profile.json`` (``edgefuse profile --json``/``--out``), a ``report.json``
    (its profiles, sections and variants are taken over), or any other stage's JSON (a generic section).

    Raises:
        TargetNotFoundError: a file does not exist.
        DataError: a file is not valid JSON.
    """
    out: list[dict[str, Any]] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise TargetNotFoundError(f"result file {str(p)!r} does not exist")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataError(f"{str(p)!r} is not a readable JSON result ({exc})") from exc
        if not isinstance(d, dict):
            raise DataError(f"{str(p)!r} holds a JSON {type(d).__name__}, expected an object (a stage result)")
        if d.get("schema") == REPORT_SCHEMA:
            out += [dict(x, kind="profile") for x in d.get("profiles", [])]
            out += [{"kind": "section", **s} for s in d.get("sections", [])]
            if d.get("variants"):
                out.append({"kind": "variants", "rows": d["variants"]})
            if d.get("verdict"):
                out.append({**d["verdict"], "kind": "verdict"})
        else:
            out.append(d if "kind" in d or "graphs" in d else {"title": p.stem, "data": d})
    return out


def _normalise(results: Sequence[Any], variants: Sequence[Mapping[str, Any]], title: str) -> ReportData:
    profiles, others, rows = [], [], []
    verdict: dict[str, Any] | None = None
    for r in results:
        d = r.to_dict() if hasattr(r, "to_dict") else r
        if not isinstance(d, Mapping):
            raise ConfigError(f"cannot report a {type(r).__name__}: pass stage results, dicts or ProfileResult objects")
        kind = d.get("kind")
        if kind == "profile" or (kind is None and "graphs" in d and "environment" in d):
            profiles.append(json.loads(json.dumps(dict(d, kind="profile"), default=str)))
        elif kind == "verdict":
            verdict = json.loads(json.dumps({k: v for k, v in d.items() if k != "kind"}, default=str))
        elif kind == "variants":
            rows += list(d.get("rows", []))
        elif kind == "section":
            others.append({k: v for k, v in d.items() if k != "kind"})
        elif isinstance(r, Mapping):
            others.append(dict(d))
        else:  # a stage result object: its class names the section
            others.append({"title": d.get("title") or type(r).__name__, "data": dict(d)})
    try:
        rows = [normalise_variant(v) for v in [*rows, *variants]]
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    sections = sections_from(others)
    return ReportData(title=title, profiles=tuple(profiles), sections=tuple(sections), variants=tuple(rows),
                      verdict=verdict)
