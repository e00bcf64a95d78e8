"""``edgefuse report``: JSON / Markdown / self-contained HTML report from stage result files."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgefuse.config.report import REPORT_FORMATS

HELP = """Build a report from result JSON files: profile.json files (edgefuse profile --out/--json), report.json
files (merged), and any other stage's JSON result (shown as its own section).

Writes report.json (machines), report.md (pull requests) and report.html (people: one self-contained page
with plots of latency distributions, latency against accuracy or cosine, per-op breakdown and memory).

examples:
  edgefuse report reports/x86/profile.json reports/arm/profile.json --out reports/all
  edgefuse report profile.json --variants accuracy.json --formats md --out pr-comment
"""


def register(sub: Any) -> None:
    p = sub.add_parser("report", help="JSON / Markdown / HTML report from result files", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", metavar="RESULT.json", help="result files (profile.json, report.json, ...)")
    p.add_argument("-o", "--out", required=True, help="output folder")
    p.add_argument("--formats", nargs="+", choices=REPORT_FORMATS, help="default: json md html")
    p.add_argument("--title", help="report title")
    p.add_argument("--variants", help="JSON list of rows {variant, latency_ms, accuracy|cosine, ...} to plot")
    p.add_argument("--no-plots", action="store_true", help="HTML without plots")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edgefuse.config.report import ReportConfig
    from edgefuse.errors import ConfigError
    from edgefuse.io_utils import atomic_dir
    from edgefuse.report.api import load_results, write_report

    fields: dict[str, Any] = {"plots": not args.no_plots}
    if args.formats:
        fields["formats"] = args.formats
    if args.title:
        fields["title"] = args.title
    try:
        cfg = ReportConfig(**fields)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise ConfigError(f"report config: {'.'.join(map(str, err['loc']))}: {err['msg']}") from None
    from edgefuse.io_utils import check_output_dir

    inputs = [*args.results, *([args.variants] if args.variants else [])]
    check_output_dir(Path(args.out), overwrite=args.overwrite, inputs=inputs)
    results = load_results(args.results)
    variants: list[dict[str, Any]] = []
    if args.variants:
        variants = _read_variants(Path(args.variants))
    out = Path(args.out)
    with atomic_dir(out, overwrite=args.overwrite, inputs=inputs) as tmp:
        try:
            written = write_report(results, tmp, variants=variants, cfg=cfg)
        except (KeyError, TypeError, AttributeError, IndexError) as exc:  # JSON of another shape than a result
            from edgefuse.errors import DataError

            what = f"missing key {exc}" if isinstance(exc, KeyError) else f"{type(exc).__name__}: {exc}"
            raise DataError(
                f"{', '.join(map(repr, inputs))} do not have the shape of an edgefuse result ({what}); pass the "
                "profile.json / report.json / stage JSON that edgefuse wrote"
            ) from None
    for fmt in written:
        print(f"{fmt}: {out / written[fmt].name}")
    return 0


def _read_variants(path: Path) -> list[dict[str, Any]]:
    import json

    from edgefuse.errors import DataError, TargetNotFoundError

    if not path.is_file():
        raise TargetNotFoundError(f"--variants file {str(path)!r} does not exist")
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"--variants {str(path)!r} is not valid JSON ({exc})") from None
    rows = rows.get("rows") if isinstance(rows, dict) else rows
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise DataError(f"--variants {str(path)!r} must hold a JSON list of rows {{variant, latency_ms, accuracy}}")
    return rows
