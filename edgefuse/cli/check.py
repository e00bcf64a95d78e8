"""``edgefuse check CONFIG``: run the pipeline and judge the config's budgets; exit 0 only when all pass."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgefuse.cli.options import format_table
from edgefuse.cli.run import add_config_arguments, stage_printer

HELP = """Run the pipeline of CONFIG (reusing every stage whose inputs did not change) and judge each budget of its
`check` section: size, latency as a ratio against a reference graph timed in the same run (or absolute),
peak memory, agreement with PyTorch and with the teacher, accuracy drop. Prints one line per budget with the
measured value and pass/fail.

exit codes: 0 every budget passed; 11 at least one failed (BudgetExceededError); a stage's own code when the
pipeline failed first (e.g. 7 export validation). --junit writes the verdicts as JUnit XML in every case.

examples:
  edgefuse check export_configs/ci-check.yaml --junit reports/edgefuse.xml
  edgefuse check export_configs/ci-check.yaml --set check.budgets.max_latency_ratio=0.5 --json
"""


def register(sub: Any) -> None:
    p = sub.add_parser("check", help="CI gate: run the pipeline and judge size/latency/memory/accuracy budgets",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--junit", metavar="PATH", help="write the verdicts as JUnit XML to PATH")
    p.set_defaults(run=run)


def verdict_table(verdicts: Any) -> str:
    """One line per budget: name, limit, measured value, PASS/FAIL, and where the value came from."""
    rows = []
    for v in verdicts:
        unit = "" if not v.unit else (v.unit if v.unit == "x" else f" {v.unit}")
        measured = "not measured" if v.measured is None else f"{v.measured:.4g}{unit}"
        rows.append((v.budget, f"{v.op} {v.limit:g}{unit}", measured, "PASS" if v.passed else "FAIL", v.detail))
    return format_table(rows, header=("budget", "limit", "measured", "result", "source"))


def run(args: argparse.Namespace) -> int:
    from edgefuse.check.junit import write_junit

    classname = f"edgefuse.check.{Path(args.config).stem}"
    props = {"config": str(args.config), "overrides": " ".join(args.overrides)}
    try:
        return _run(args, classname, props)
    except BaseException as exc:
        if args.junit and not getattr(exc, "junit_written", False):
            # CI still gets a report that says why nothing could be judged, whatever the failure was
            from edgefuse.cli import error_line

            line = error_line(exc)[1] or f"{type(exc).__name__}: {exc}"
            write_junit(args.junit, [], classname=classname, properties=props,
                        error=f"{type(exc).__name__}: {line.removeprefix('edgefuse: ').removeprefix('error: ')}")
        raise


def _run(args: argparse.Namespace, classname: str, props: dict[str, str]) -> int:
    from edgefuse.check.api import run_check
    from edgefuse.check.budgets import failures_line
    from edgefuse.check.junit import write_junit
    from edgefuse.cli.run import load_from_args, passive_openmp
    from edgefuse.errors import BudgetExceededError
    from edgefuse.pipeline.api import resolve_run_dir

    passive_openmp()
    cfg = load_from_args(args)
    run_dir = resolve_run_dir(cfg, args.config, args.run_dir)
    quiet = args.no_progress or args.quiet
    props["run_dir"] = str(run_dir)
    result = run_check(cfg, run_dir, force=args.force, progress=not quiet,
                       on_event=stage_printer(quiet))
    table = verdict_table(result.verdicts)
    if args.junit:
        props.update({"candidate": result.candidate_graph, "reference": result.reference_graph or ""})
        write_junit(args.junit, result.verdicts, classname=classname, properties=props, seconds=result.seconds,
                    system_out=table)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
    else:
        print(f"edgefuse check: candidate {result.candidate_graph}")
        if result.reference_graph:
            print(f"reference: {result.reference_graph}")
        print(table)
        passed = sum(v.passed for v in result.verdicts)
        print(f"{passed}/{len(result.verdicts)} budgets passed" + ("" if result.passed else " -- FAILED"))
    if args.junit and not quiet:
        print(f"JUnit XML: {args.junit}", file=sys.stderr)
    if not result.passed:
        exc = BudgetExceededError(failures_line(result.verdicts))
        exc.junit_written = True  # type: ignore[attr-defined]  # the verdicts are the report; no <error> case
        raise exc
    return 0
