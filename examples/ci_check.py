"""A CI gate in Python: run the pipeline of a config, judge its budgets, write JUnit XML, exit 0 / 11.

The same as `edgefuse check CONFIG --junit PATH`, through the library API (for CI scripts that want the numbers):

    python examples/ci_check.py export_configs/ci-check.yaml reports/edgefuse.xml
"""

from __future__ import annotations

import sys

from edgefuse.check import run_check
from edgefuse.check.junit import write_junit
from edgefuse.config.pipeline import load_config
from edgefuse.errors import BudgetExceededError, EdgefuseError
from edgefuse.pipeline import resolve_run_dir

CONFIG = "export_configs/ci-check.yaml"
JUNIT = "reports/edgefuse-check.xml"
OVERRIDES: list[str] = []          # e.g. ["check.budgets.max_latency_ratio=0.5"]


def main() -> int:
    config = sys.argv[1] if len(sys.argv) > 1 else CONFIG
    junit = sys.argv[2] if len(sys.argv) > 2 else JUNIT
    try:
        cfg = load_config(config, OVERRIDES)
        result = run_check(cfg, resolve_run_dir(cfg, config))
    except EdgefuseError as exc:          # the pipeline failed before any budget could be judged
        write_junit(junit, [], error=f"{type(exc).__name__}: {exc}")
        print(f"edgefuse: error: {exc}", file=sys.stderr)
        return exc.exit_code
    write_junit(junit, result.verdicts, classname="edgefuse.check", properties={"config": config},
                seconds=result.seconds)
    for v in result.verdicts:
        print(("PASS " if v.passed else "FAIL ") + v.message)
    print(f"JUnit XML: {junit}")
    return 0 if result.passed else BudgetExceededError.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
