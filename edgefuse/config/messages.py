"""``--set`` overrides and one-line messages for config validation errors.

pydantic reports every problem with a location tuple; :func:`validation_message` turns them into one line that
names the key path (``fusion.keep_ratio``, ``finetune[1].max_steps``), the bad value and what is allowed (the
keys of the section, the values of a ``Literal``), with a spelling suggestion for unknown keys.

Example:
    >>> parse_override("fusion.keep_ratio=0.25")
    (['fusion', 'keep_ratio'], 0.25)
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from edgefuse.errors import ConfigError

_TYPE_ERRORS = ("model_type", "model_attributes_type", "dict_type", "list_type")


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``dotted.key=value``; the value is read as YAML (``0.5`` is a float, ``[1, 2]`` a list, ``null``).

    Raises:
        ConfigError: no ``=``, an empty key part, or a value that is not valid YAML.

    Example:
        >>> parse_override("fusion.layers=[4, 5]")
        (['fusion', 'layers'], [4, 5])
    """
    import yaml

    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"--set {item!r} is not of the form dotted.key=value (e.g. --set fusion.keep_ratio=0.25)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML ({exc.__class__.__name__})") from None
    return [p.strip() for p in parts], value


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """A copy of ``data`` with each ``dotted.key=value`` set; missing sections are created.

    Raises:
        ConfigError: a malformed override, or one that descends into a value that is not a section.

    Example:
        >>> apply_overrides({"fusion": {"keep_ratio": 0.5}}, ["fusion.keep_ratio=0.25", "finetune=null"])
        {'fusion': {'keep_ratio': 0.25}, 'finetune': None}
    """
    import copy

    out = copy.deepcopy(data)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                where = ".".join(parts[: i + 1])
                raise ConfigError(f"--set {item!r}: {where!r} is {child!r}, not a section with keys")
            node = child
        node[parts[-1]] = value
    return out


def _section_model(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The config class that holds the key at ``loc`` (for listing the allowed keys)."""
    import typing

    cls: type[BaseModel] = root
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of sections
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        candidates = [field.annotation, *typing.get_args(field.annotation)]
        candidates += [a for c in candidates for a in typing.get_args(c)]  # list[Model] inside a union
        sub = [c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)]
        if not sub:
            return None
        cls = sub[0]
    return cls


def _where(loc: tuple[Any, ...]) -> str:
    """``('finetune', 1, 'max_steps')`` -> ``finetune[1].max_steps``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _is_union_tag(part: Any) -> bool:
    """pydantic names the member of a union in the location: ``FinetuneConfig`` or ``list[...]``."""
    return isinstance(part, str) and ("[" in part or part[:1].isupper())


def _merge_union_errors(errors: list[Any]) -> list[Any]:
    """Keep the errors of the union member that matches the input's shape (a section, or a list of sections),
    drop the member tags from the locations; report a value that is neither as one error."""
    plain, groups = [], {}
    for err in errors:
        loc = tuple(err["loc"])
        i = next((k for k, p in enumerate(loc) if _is_union_tag(p)), None)
        if i is None:
            plain.append(err)
            continue
        groups.setdefault(loc[:i], []).append({**err, "loc": loc[:i] + loc[i + 1 :], "_tagged": len(loc) > i + 1})
    for prefix, errs in groups.items():
        deep = [e for e in errs if e["_tagged"] or e["type"] not in _TYPE_ERRORS]
        if deep:
            plain += [{k: v for k, v in e.items() if k != "_tagged"} for e in deep]
        else:
            plain.append({"loc": prefix, "type": "section_or_list", "input": errs[0].get("input"), "msg": ""})
    return plain


def _describe(err: Any, root: type[BaseModel]) -> str:
    import difflib

    loc = tuple(err["loc"])
    where = _where(loc) or "config"
    kind = err["type"]
    value = err.get("input")
    if kind == "extra_forbidden":
        section = _section_model(root, loc)
        allowed = list(section.model_fields) if section else []
        near = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        parent = _where(loc[:-1]) or "the top level"
        return f"unknown key {where!r}{hint}; allowed keys in {parent}: {', '.join(allowed)}"
    if kind == "missing":
        return f"{where}: required key is missing"
    if kind == "literal_error":
        return f"{where}: {value!r} is not allowed; allowed values: {err['ctx']['expected']}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"{where}: expected a section (a mapping of keys), got {value!r}"
    if kind == "section_or_list":
        return f"{where}: expected a section (a mapping of keys) or a list of sections, got {value!r}"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if kind in ("value_error", "assertion_error") and not isinstance(value, (int, float, str, bool)):
        return msg if not loc else f"{where}: {msg}"
    return f"{where}: {value!r} is not allowed: {msg}"


def validation_message(exc: ValidationError, source: str, root: type[BaseModel]) -> str:
    """One line naming every bad key path, its value and what is allowed.

    Example:
        >>> from edgefuse.config.pipeline import PipelineConfig
        >>> try:
        ...     PipelineConfig.model_validate({"schema_version": 1, "fusion": {"keep_ratoi": 0.5}})
        ... except ValidationError as e:
        ...     print(validation_message(e, "config", PipelineConfig).split(";")[0])
        config: unknown key 'fusion.keep_ratoi' (did you mean 'keep_ratio'?)
    """
    errors = _merge_union_errors(exc.errors())
    shown = [_describe(e, root) for e in errors[:5]]
    more = f"; and {len(errors) - 5} more" if len(errors) > 5 else ""
    return f"{source}: " + "; ".join(shown) + more


def first_error(exc: ValidationError, where: str) -> ConfigError:
    """The first error of a flag-built config as a :class:`ConfigError` (``where`` names a location-less error).

    The CLI subcommands build their configs from flags, so one bad flag is one error; the message names the
    key (the flag's snake_case name), what pydantic said, and the value.

    Example:
        >>> from edgefuse.config.fusion import FusionConfig
        >>> try:
        ...     FusionConfig(keep_ratio=2)
        ... except ValidationError as e:
        ...     print(first_error(e, "fusion"))
        keep_ratio: Input should be less than or equal to 1 (got 2)
    """
    err = exc.errors()[0]
    loc = ".".join(str(x) for x in err["loc"]) or where
    msg = str(err["msg"]).removeprefix("Value error, ")
    return ConfigError(f"{loc}: {msg} (got {err.get('input')!r})")
