"""The one name matcher: plain names match exactly, ``re:`` + a regular expression matches by ``re.search``.

Used by fusion targets and quantization exclusions alike, so the same mistake gives the same error (an invalid
expression is a :class:`~edgefuse.errors.ConfigError`, exit 2; an entry that matches nothing is a
:class:`~edgefuse.errors.TargetNotFoundError`, exit 3, with similar names).

Example:
    >>> match_names(["re:layer\\\\.1$", "head"], ["layer.0", "layer.1", "head"], what="target")
    ['layer.1', 'head']
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping, Sequence
from typing import TypeVar

from edgefuse.errors import ConfigError, TargetNotFoundError

T = TypeVar("T")


def compile_pattern(pattern: str, *, what: str = "pattern") -> re.Pattern[str] | None:
    """The compiled expression of a ``re:`` entry (None for a plain name).

    Raises:
        ConfigError: the expression does not compile.
    """
    if not pattern.startswith("re:"):
        return None
    try:
        return re.compile(pattern[3:])
    except re.error as exc:
        raise ConfigError(
            f"{what} {pattern!r} is not a valid regular expression ({exc}); fix it or drop the 're:' prefix"
        ) from None


def matches(pattern: str, name: str, *, what: str = "pattern") -> bool:
    """Whether ``name`` is selected by ``pattern``."""
    rx = compile_pattern(pattern, what=what)
    return rx.search(name) is not None if rx is not None else name == pattern


def match_names(patterns: Sequence[str], names: Sequence[str], *, what: str = "entry") -> list[str]:
    """The names selected by any of ``patterns``, in the order first selected; every pattern must select one.

    Raises:
        ConfigError: an invalid ``re:`` expression.
        TargetNotFoundError: an entry that matches no name (the message lists similar names).
    """
    chosen: list[str] = []
    for pattern in patterns:
        rx = compile_pattern(pattern, what=what)
        hits = [n for n in names if (rx.search(n) is not None if rx is not None else n == pattern)]
        if not hits:
            near = difflib.get_close_matches(pattern.removeprefix("re:"), list(names), n=3, cutoff=0.0)
            raise TargetNotFoundError(
                f"{what} {pattern!r} matches nothing; similar names: {', '.join(near) or '(none)'} "
                "(plain strings match exactly; prefix a regular expression with 're:')"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def table_entry(table: Mapping[str, T], name: str, *, what: str) -> T:
    """The entry ``name`` of an extension-point table (compression methods, quantization modes, ...).

    Raises:
        ConfigError: no such entry; the message lists the names there are.

    Example:
        >>> table_entry({"a": 1, "b": 2}, "b", what="letter")
        2
    """
    try:
        return table[name]
    except KeyError:
        raise ConfigError(f"unknown {what} {name!r}; choose one of {', '.join(table)}") from None
