"""Report: JSON for machines, Markdown for pull requests, one self-contained HTML page for people.

Takes stage results (objects or their JSON) and a :class:`~edgefuse.config.report.ReportConfig`; gives
``report.json``, ``report.md`` and ``report.html``.

Modules: ``api`` (:func:`write_report`), ``doc`` (results -> blocks), ``markdown`` and ``html``
(rendering), ``plots`` (matplotlib figures as PNG).

The public names load lazily (PEP 562), so importing the package imports no heavy library:

    >>> import edgefuse.report as stage
    >>> "ReportConfig" in dir(stage)
    True
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "ReportConfig": "edgefuse.report.api",
    "load_results": "edgefuse.report.api",
    "write_report": "edgefuse.report.api",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
