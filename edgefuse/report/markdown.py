"""Markdown rendering of the report blocks (GitHub-flavoured tables, for pull requests; no images).

Example:
    >>> from edgefuse.report.doc import Heading, Table
    >>> print(render_markdown([Heading(2, "T"), Table(("a", "b"), (("1", "x|y"),))]))
    ## T
    <BLANKLINE>
    | a | b |
    | --- | --- |
    | 1 | x\\|y |
    <BLANKLINE>
"""

from __future__ import annotations

from collections.abc import Sequence

from edgefuse.report.doc import Block, Heading, Links, Para, Plot, Summary, Table


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block]) -> str:
    """Markdown text of ``blocks``; plots become a pointer to the HTML report."""
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += ["#" * b.level + " " + b.text, ""]
        elif isinstance(b, Summary):
            out += [f"- **{k}**: {v}" for k, v in b.items] + [""]
        elif isinstance(b, Links):
            out += [f"- [{text}]({href})" for text, href in b.items] + [""]
        elif isinstance(b, Para):
            out += [b.text, ""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(map(_cell, b.headers)) + " |")
            out.append("| " + " | ".join("---" for _ in b.headers) + " |")
            out += ["| " + " | ".join(map(_cell, row)) + " |" for row in b.rows]
            out += (["", f"_{b.caption}_"] if b.caption else []) + [""]
        elif isinstance(b, Plot):
            out += [f"_(plot in report.html: {b.title})_", ""]
    return "\n".join(out)
