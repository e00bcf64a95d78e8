"""Rows of a data file as dicts: the one reader of TSV, CSV, JSON-lines and text files (and ``hf:`` datasets).

Used by fine-tuning, the NTK stage, quantization calibration and evaluation, so a data file that one stage reads
reads the same everywhere (GLUE TSVs are unquoted: a sentence may hold a lone ``"``).

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "a.tsv"
    >>> _ = path.write_text('sentence\\tlabel\\nit is "fine\\t1\\n')
    >>> read_records(str(path))
    [{'sentence': 'it is "fine', 'label': '1'}]
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypeVar

from edgefuse.errors import DataError, MissingDependencyError, TargetNotFoundError

HF_PREFIX = "hf:"
T = TypeVar("T")


def _read_delimited(path: Path, delimiter: str) -> list[dict[str, str]]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    # GLUE TSVs are unquoted (a sentence may contain a lone '"'); CSVs (E2E) quote fields with commas
    quoting: Any = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh, delimiter=delimiter, quoting=quoting)
        if not reader.fieldnames:
            raise DataError(f"data file {str(path)!r} is empty (expected a header row with column names)")
        rows = []
        for line_no, row in enumerate(reader, start=2):
            if None in row:  # more fields than header columns
                raise DataError(
                    f"{path}:{line_no}: {len(row) - 1 + len(row[None])} fields but the header has "
                    f"{len(reader.fieldnames)}; check the delimiter/quoting of this row"
                )
            rows.append(row)
    return rows


def _read_tsv(path: Path) -> list[dict[str, str]]:
    return _read_delimited(path, "\t")


def _read_csv(path: Path) -> list[dict[str, str]]:
    return _read_delimited(path, ",")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"{path}:{line_no}: not valid JSON ({exc.msg}); a .jsonl file has one object per line"
                ) from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_txt(path: Path) -> list[dict[str, Any]]:
    """One text per non-empty line, in a column named ``text`` (unlabeled data for distillation)."""
    with path.open(encoding="utf-8") as fh:
        return [{"text": line.strip()} for line in fh if line.strip()]


def _read_hf(spec: str) -> list[dict[str, Any]]:
    """``hf:NAME[:CONFIG][@SPLIT]`` -> rows, through ``datasets.load_dataset`` (split defaults to train)."""
    body = spec[len(HF_PREFIX) :]
    body, _, split = body.partition("@")
    name, _, config = body.partition(":")
    if not name:
        raise DataError(
            f"data source {spec!r} names no dataset; write hf:NAME[:CONFIG][@SPLIT], e.g. hf:glue:sst2@train"
        )
    try:
        import datasets
    except ImportError:
        raise MissingDependencyError(
            f"data source {spec!r} needs the Hugging Face datasets package: pip install datasets"
        ) from None
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as exc:  # datasets raises many unrelated types for "not found / offline / bad split"
        raise DataError(f"could not load Hugging Face dataset {spec!r}: {exc}".splitlines()[0]) from exc
    return [dict(r) for r in ds]


def read_records(source: str) -> list[dict[str, Any]]:
    """Read all rows of a data source as dicts (column name -> value).

    Args:
        source: a ``.tsv``, ``.csv``, ``.jsonl``/``.json`` (one object per line) or ``.txt`` (one text per line,
            column ``text``) file, or
            ``hf:NAME[:CONFIG][@SPLIT]`` for a Hugging Face dataset.

    Raises:
        TargetNotFoundError: the file does not exist.
        DataError: unknown extension, malformed row, or an empty file.
        MissingDependencyError: an ``hf:`` source without the ``datasets`` package.
    """
    if source.startswith(HF_PREFIX):
        rows = _read_hf(source)
    else:
        path = Path(source).expanduser()
        if not path.is_file():
            raise TargetNotFoundError(f"data file {source!r} does not exist (for a Hugging Face dataset write hf:NAME)")
        suffix = path.suffix.lower()
        readers = {".tsv": _read_tsv, ".csv": _read_csv, ".jsonl": _read_jsonl, ".json": _read_jsonl, ".txt": _read_txt}
        if suffix not in readers:
            raise DataError(
                f"data file {source!r} has extension {suffix!r}; use .tsv, .csv, .jsonl or .txt (or hf:NAME)"
            )
        try:
            rows = readers[suffix](path)
        except UnicodeDecodeError as exc:
            raise DataError(f"data file {source!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None
        except csv.Error as exc:
            raise DataError(f"cannot read data file {source!r}: {exc}") from None
    if not rows:
        raise DataError(f"data source {source!r} has no rows")
    return rows


def check_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str], source: str) -> None:
    """Raise :class:`DataError` naming ``source`` and the column when a needed column is absent."""
    present = list(rows[0].keys())
    for col in columns:
        if col not in present:
            raise DataError(
                f"data source {source!r} has no column {col!r}; its columns are {present} "
                "(set the column with --text-column/--label-column or the data config)"
            )


def builtin_texts(n: int | None = None) -> list[str]:
    """The first ``n`` (all when None) lines of edgefuse's built-in English corpus (``edgefuse/data/corpus.txt``,
    282 everyday sentences): the text every stage falls back to when it is given none (fusion's activation
    statistics, quantization's calibration and checks, the profiler's output check, the teacher agreement line).

    Example:
        >>> texts = builtin_texts(3)
        >>> len(texts), all(isinstance(t, str) and t for t in texts), len(builtin_texts()) >= 256
        (3, True, True)
    """
    from importlib import resources

    text = resources.files("edgefuse").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines if n is None else lines[:n]


def spread(rows: Sequence[T], n: int) -> list[T]:
    """``n`` rows evenly spaced over ``rows`` (every row when ``n`` covers them), first row included.

    Calibration sets are taken this way rather than as the first ``n`` rows: data files are often sorted (E2E
    groups its references by meaning representation, so its first 64 training rows hold 7 of them), and
    GPTQ and the activation search fit whatever text they are given.

    Example:
        >>> spread(list(range(10)), 4)
        [0, 2, 5, 7]
        >>> spread([1, 2], 5)
        [1, 2]
    """
    if n >= len(rows):
        return list(rows)
    return [rows[(i * len(rows)) // n] for i in range(max(n, 0))]
