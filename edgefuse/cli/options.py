"""What every subcommand shares: flags derived from the typed configs, intermixed positionals, -v/-q after the
subcommand, optimum's task names as aliases, and one table printer.

A command lists the config fields it exposes as :class:`Flag` entries; the option's type, choices (a
``Literal``), ``nargs`` (a list) and help text (the field's ``description`` and default) come from the pydantic
field, so the CLI and the YAML cannot drift apart. :func:`flag_values` reads the given flags back as config
keys. Only pydantic config modules are imported here: ``edgefuse --help`` stays fast.

Example:
    >>> from edgefuse.config.fusion import FusionConfig
    >>> p = CommandParser(prog="demo")
    >>> flags = (Flag("method"), Flag("layers"))
    >>> add_flags(p, FusionConfig, flags)
    >>> args = p.parse_args(["--method", "prune", "--layers", "1", "2"])
    >>> flag_values(args, flags)
    {'method': 'prune', 'layers': [1, 2]}
    >>> print(format_table([("a", "bb"), ("ccc", "d")], header=("x", "y")))
    x    y
    ---  --
    a    bb
    ccc  d
"""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, get_args, get_origin

# optimum's task names -> edgefuse's (text-generation is optimum's causal LM without the KV cache)
TASK_ALIASES: dict[str, str] = {
    "text-classification": "sequence-classification",
    "text-generation": "causal-lm",
    "text-generation-with-past": "causal-lm",
}


@dataclass(frozen=True)
class Flag:
    """One command-line option for the config field ``key``.

    ``option`` defaults to ``--key-with-dashes``; ``negate`` makes a bool field's option store False (e.g.
    ``--per-tensor`` for ``per_channel``); ``both`` gives ``--x/--no-x``; ``append`` makes a list field
    repeatable (one value per option) instead of taking several values at once. ``extra`` is appended to the
    field's description in the help.
    """

    key: str
    option: str | None = None
    negate: bool = False
    both: bool = False
    append: bool = False
    metavar: str | None = None
    aliases: tuple[str, ...] = ()
    extra: str = ""

    @property
    def options(self) -> tuple[str, ...]:
        return (self.option or "--" + self.key.replace("_", "-"), *self.aliases)


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _default_text(field: Any) -> str:
    if field.is_required() or field.default_factory is not None or field.default is None:
        return ""
    default = field.default
    if isinstance(default, bool):
        return ""
    return f" (default: {default})"


def _help(field: Any, flag: Flag) -> str:
    text = (field.description or "").replace("%", "%%")
    return (text + _default_text(field) + (" " + flag.extra if flag.extra else "")).strip()


def add_flags(parser: Any, model: type, flags: Sequence[Flag]) -> None:
    """Add one option per entry of ``flags`` to ``parser`` (a parser or an argument group), typed from ``model``.

    Every option's default is None ("not given"), so that YAML values and config defaults stay in charge.

    Raises:
        KeyError: a flag names a field ``model`` does not have (a programming error, caught by the tests).
    """
    for flag in flags:
        field = model.model_fields[flag.key]  # type: ignore[attr-defined]
        annotation = _strip_optional(field.annotation)
        kwargs: dict[str, Any] = {"dest": flag.key, "default": None, "help": _help(field, flag)}
        if flag.metavar:
            kwargs["metavar"] = flag.metavar
        if annotation is bool:
            if flag.both:
                kwargs["action"] = argparse.BooleanOptionalAction
            else:
                kwargs["action"] = "store_false" if flag.negate else "store_true"
            kwargs.pop("metavar", None)
            parser.add_argument(*flag.options, **kwargs)
            continue
        if get_origin(annotation) is list:
            item = _strip_optional(get_args(annotation)[0])
            kwargs["action" if flag.append else "nargs"] = "append" if flag.append else "+"
            annotation = item
        if get_origin(annotation) is Literal:
            choices = get_args(annotation)
            kwargs["choices"] = choices
            kwargs["type"] = type(choices[0])
        elif annotation in (int, float, Path):
            kwargs["type"] = annotation
        parser.add_argument(*flag.options, **kwargs)


def flag_values(args: argparse.Namespace, flags: Sequence[Flag]) -> dict[str, Any]:
    """The config keys of ``flags`` that were given on the command line, with their values."""
    return {f.key: getattr(args, f.key) for f in flags if getattr(args, f.key, None) is not None}


def config_from_args(args: argparse.Namespace, model: type, flags: Sequence[Flag], *, section: str,
                     extra: dict[str, Any] | None = None) -> Any:
    """``model`` built from the ``--config`` YAML file (if given), then the flags given, then ``extra``.

    ``extra`` holds the keys a command sets from its own options (those no :class:`Flag` can derive); a mapping
    in ``extra`` is merged into the file's mapping of the same key (one option sets one key of a section).

    Raises:
        ConfigError: an unreadable YAML file, or a value the config rejects, as one line naming ``section``, the
            key and what is allowed.

    Example:
        >>> from edgefuse.config.quantize import QuantizeConfig
        >>> args = argparse.Namespace(config=None, mode="int4", block_size=None)
        >>> cfg = config_from_args(args, QuantizeConfig, (Flag("mode"), Flag("block_size")), section="quantize",
        ...                        extra={"min_cosine": 0.9})
        >>> (cfg.mode, cfg.min_cosine)
        ('int4', 0.9)
    """
    from pydantic import ValidationError

    from edgefuse.config.messages import validation_message
    from edgefuse.errors import ConfigError
    from edgefuse.io_utils import read_yaml_mapping

    config = getattr(args, "config", None)
    values: dict[str, Any] = dict(read_yaml_mapping(Path(config))) if config is not None else {}
    values.update(flag_values(args, flags))
    for key, value in (extra or {}).items():
        old = values.get(key)
        values[key] = {**old, **value} if isinstance(old, dict) and isinstance(value, dict) else value
    try:
        return model(**values)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, section, model)) from None


def fields_without_flag(model: type, flags: Sequence[Flag]) -> list[str]:
    """The fields of ``model`` that ``flags`` leaves to the YAML file (the tests keep this list deliberate)."""
    given = {f.key for f in flags}
    return [k for k in model.model_fields if k not in given]  # type: ignore[attr-defined]


class TaskAction(argparse.Action):
    """``--task``: edgefuse's task names, or optimum's (``text-classification``, ``text-generation[-with-past]``).

    The optimum name is kept as ``task_alias`` (``text-generation`` asks for no KV cache where that matters).
    """

    def __call__(self, parser: Any, namespace: argparse.Namespace, values: Any, option_string: Any = None) -> None:
        namespace.task_alias = values if values in TASK_ALIASES else None
        setattr(namespace, self.dest, TASK_ALIASES.get(values, values))


def add_task(parser: Any, tasks: Sequence[str], *, default: str | None = None, help: str = "") -> None:
    """``--task`` with ``tasks`` and optimum's names for them as choices."""
    aliases = [a for a, t in TASK_ALIASES.items() if t in tasks]
    parser.add_argument(
        "--task", action=TaskAction, choices=(*tasks, *aliases), default=default, metavar="TASK",
        help=f"{help} one of {', '.join(tasks)} (optimum's {', '.join(aliases)} accepted too)".strip(),
    )
    parser.set_defaults(task_alias=None)


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: positionals may come anywhere among the options (``fuse MODEL --keep-ratio 0.5
    OUT``), and every argument error is one line that names this command (and its ``--help``), not the top-level
    one."""

    _intermixed = False

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        # one line (edgefuse's error rule), exit 2 like every config error
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help for its usage\n")

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> Any:
        if self._intermixed:  # the inner passes of parse_known_intermixed_args
            return super().parse_known_args(args, namespace)
        self._intermixed = True
        try:
            namespace, extras = self.parse_known_intermixed_args(args, namespace)
        finally:
            self._intermixed = False
        if extras:  # reported here, so that the message comes with this command's usage
            self.error(f"unrecognized arguments: {' '.join(extras)}")
        return namespace, extras


def add_verbosity(parser: argparse.ArgumentParser) -> None:
    """``-v``/``-q`` on a subcommand too (``edgefuse fuse ... -v``); absent ones leave the top-level values."""
    parser.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="more log output (-vv for debug)")
    parser.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="only errors")


def format_table(rows: Sequence[Sequence[str]], *, header: Sequence[str] | None = None,
                 rules: Sequence[int] = (), right: Sequence[int] = (), indent: str = "") -> str:
    """Rows of text cells as aligned columns (two spaces apart, trailing spaces stripped).

    ``header`` is followed by a rule; ``rules`` are row indices after which another rule is drawn; columns
    listed in ``right`` are right-aligned.
    """
    table = [list(map(str, header))] if header is not None else []
    table += [list(map(str, r)) for r in rows]
    if not table:
        return ""
    n = max(len(r) for r in table)
    table = [r + [""] * (n - len(r)) for r in table]
    widths = [max(len(r[i]) for r in table) for i in range(n)]

    def line(cells: Sequence[str]) -> str:
        return indent + "  ".join(c.rjust(w) if i in right else c.ljust(w)
                                  for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    rule = indent + "  ".join("-" * w for w in widths)
    out = []
    if header is not None:
        out += [line(table[0]), rule]
        table = table[1:]
    for i, r in enumerate(table):
        out.append(line(r))
        if i in rules:
            out.append(rule)
    return "\n".join(out)


def print_table(rows: Sequence[Sequence[str]], **kwargs: Any) -> None:
    """:func:`format_table` on stdout."""
    print(format_table(rows, **kwargs), file=sys.stdout)


def print_result(data: dict[str, Any], text: str, vs_teacher: dict[str, Any] | None, task: str,
                 args: argparse.Namespace) -> None:
    """The result as JSON (with ``vs_teacher``) or as text plus one line on the teacher (export, quantize)."""
    if args.json:
        print(json.dumps({**data, **({"vs_teacher": vs_teacher} if vs_teacher else {})}, indent=2, default=str))
        return
    print(text)
    if vs_teacher is not None:
        from edgefuse.quantize.agreement import describe

        print(f"  {describe(vs_teacher, task, f'the teacher {args.teacher}')}")
