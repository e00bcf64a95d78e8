"""One self-contained HTML page: inline CSS, tables, and plots embedded as base64 PNG (no external resource).

Example:
    >>> from edgefuse.report.doc import Heading
    >>> "<h1>T &amp; U</h1>" in render_html([Heading(1, "T & U")], title="T & U")
    True
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Sequence

from edgefuse.report.doc import Block, Heading, Links, Para, Plot, Summary, Table

logger = logging.getLogger(__name__)

# Tables may be as wide as the page and no wider: cells wrap at spaces, and cells with a long unbroken token
# (node names, paths, hashes: class "long") wrap anywhere, so the page reads at 800 px without sideways
# scrolling; plots shrink to the column.
CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;color:#222;
padding:0 1em}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:13px;max-width:100%}
th,td{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}
td.long{overflow-wrap:anywhere}
th{background:#f0f3f7}
tr:nth-child(even) td{background:#fafafa}
figure{margin:1em 0 2em;max-width:100%}
figcaption,caption{font-size:12px;color:#555;caption-side:bottom;text-align:left}
img{max-width:100%;height:auto;border:1px solid #eee;box-sizing:border-box}
h1,h2,h3{overflow-wrap:anywhere}
h2{border-bottom:2px solid #dde;padding-bottom:4px;margin-top:2em}
.verdict{border:2px solid #99a;border-radius:6px;padding:0.6em 1em;margin:1em 0;background:#f7f8fb}
.verdict.pass{border-color:#3a8f4b;background:#f1f8f2}
.verdict.fail{border-color:#c0392b;background:#fcf1f0}
.verdict dl{display:grid;grid-template-columns:max-content 1fr;gap:4px 1em;margin:0}
.verdict dt{font-weight:600}
.verdict dd{margin:0;overflow-wrap:anywhere}
"""


def _td(text: str) -> str:
    long = any(len(word) > LONG_WORD for word in text.split())
    return f'<td class="long">{html.escape(text)}</td>' if long else f"<td>{html.escape(text)}</td>"


LONG_WORD = 18  # characters: a token longer than this may be broken anywhere (a path, a node name, a hash)


def render_html(blocks: Sequence[Block], *, title: str) -> str:
    """The HTML page of ``blocks``; each :class:`Plot` is rendered now and inlined as a data URI."""
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{e(title)}</title><style>{CSS}</style></head><body>"]
    n_plot = 0
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Summary):
            rows = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in b.items)
            parts.append(f'<div class="verdict {e(b.status)}" id="verdict"><dl>{rows}</dl></div>')
        elif isinstance(b, Links):
            items = "".join(f'<li><a href="{e(href, quote=True)}">{e(text)}</a></li>' for text, href in b.items)
            parts.append(f'<ul class="edgefuse-links">{items}</ul>')
        elif isinstance(b, Para):
            parts.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.headers)
            body = "".join("<tr>" + "".join(_td(c) for c in row) + "</tr>" for row in b.rows)
            cap = f"<caption>{e(b.caption)}</caption>" if b.caption else ""
            parts.append(f'<table class="edgefuse-table">{cap}<thead><tr>{head}</tr></thead>'
                         f"<tbody>{body}</tbody></table>")
        elif isinstance(b, Plot):
            n_plot += 1
            data = base64.b64encode(b.render()).decode("ascii")
            parts.append(f'<figure class="edgefuse-plot" id="plot-{n_plot}"><img alt="{e(b.title)}" '
                         f'src="data:image/png;base64,{data}"><figcaption>{e(b.title)}</figcaption></figure>')
    parts.append("</body></html>")
    logger.debug("HTML report with %d plot(s)", n_plot)
    return "\n".join(parts)
