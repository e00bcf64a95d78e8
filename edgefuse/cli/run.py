"""``edgefuse run CONFIG``: the whole pipeline from one YAML file, resumable (stages with unchanged inputs are
reused from the run folder)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from edgefuse.cli.options import format_table

# The stage table lives in edgefuse.pipeline.stages; it is repeated here so that `edgefuse --help` does not import
# the config models (tests/test_cli_help.py checks that both lists agree).
STAGE_NAMES: tuple[str, ...] = (
    "teacher", "search", "fuse", "finetune", "export", "optimize", "quantize", "tune", "reference", "evaluate",
    "profile", "report",
)

HELP = """Run every stage a config file switches on, in order:

  teacher -> search -> fuse -> finetune -> export -> optimize -> quantize -> tune -> reference -> evaluate
  -> profile -> report

Each stage writes to RUN_DIR/<stage>/ with a record of its inputs. Running again skips every stage whose config
and input files did not change; an interrupted run resumes at the first unfinished stage.

examples:
  edgefuse run export_configs/default.yaml
  edgefuse run export_configs/minilm-sst2-x86_64-int8.yaml --set fusion.keep_ratio=0.25 --run-dir runs/k025
  edgefuse run export_configs/default.yaml --dry-run          # resolved config + fusion plan, writes nothing
  edgefuse run my.yaml --save-config resolved.yaml --force export
"""


def add_config_arguments(p: argparse.ArgumentParser) -> None:
    """The arguments ``run`` and ``check`` share: the config, overrides, run folder, re-runs, JSON output."""
    p.add_argument("config", metavar="CONFIG.yaml", help="pipeline config (see export_configs/ and `edgefuse schema`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set fusion.keep_ratio=0.25 (value read as YAML; repeatable)")
    p.add_argument("--run-dir", help="run folder (default: the config's run_dir, else runs/<config name>)")
    p.add_argument("--force", action="append", default=[], choices=(*STAGE_NAMES, "all"), metavar="STAGE",
                   help=f"run this stage again even if its inputs are unchanged (repeatable; one of "
                        f"{', '.join(STAGE_NAMES)}, all)")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bars or stage lines on stderr")


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run the whole pipeline from a config file (resumable)", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p)
    p.add_argument("--until", choices=STAGE_NAMES, metavar="STAGE", help="stop after this stage")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config, the stages and the fusion plan; write nothing")
    p.add_argument("--save-config", metavar="PATH", help="write the resolved config (every default filled in) to PATH")
    p.set_defaults(run=run)


def stage_printer(quiet: bool) -> Any:
    """An ``on_event`` callback that prints one line per stage on stderr."""

    def emit(kind: str, stage: str, info: dict[str, Any]) -> None:
        if quiet:
            return
        if kind == "start":
            print(f"[{stage}] running ...", file=sys.stderr, flush=True)
        elif kind == "ran":
            print(f"[{stage}] done in {info['seconds']:.1f} s -> {info['folder']}", file=sys.stderr, flush=True)
        elif kind == "cached":
            print(f"[{stage}] inputs unchanged, reused {info['folder']}", file=sys.stderr, flush=True)

    return emit


def _cell(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The short table printed at the end of a run: one line per graph."""
    header: tuple[str, ...] = ("graph", "size MiB", "p50 ms", "x ref", "peak MiB", "cos teacher", "cos torch",
                               "accuracy")
    # a decoder judged by generating (evaluate.generation_prompts) also shows what it writes and how fast
    generation = any(r.get("bleu") is not None for r in rows)
    if generation:
        header += ("BLEU", "degenerate", "decode ms")
    lines = []
    for r in rows:
        line = (
            r["variant"], _cell(r.get("size_mib"), ".1f"), _cell(r.get("latency_ms"), ".2f"),
            _cell(r.get("latency_ratio"), ".2f"), _cell(r.get("peak_rss_mib"), ".0f"), _cell(r.get("cosine"), ".4f"),
            _cell(r.get("cosine_vs_pytorch"), ".4f"), _cell(r.get("accuracy"), ".4f"),
        )
        if generation:
            line += (_cell(r.get("bleu"), ".2f"), _cell(r.get("degenerate_fraction"), ".3f"),
                     _cell(r.get("decode_ms"), ".2f"))
        lines.append(line)
    return format_table(lines, header=header, right=range(1, len(header)))


def passive_openmp() -> None:
    """Let idle OpenMP threads sleep instead of spin, unless the user chose otherwise.

    Must run before torch is imported. On a shared or busy machine, spinning threads of PyTorch's OpenMP pool
    fight over the cores: a training step of a tiny BERT with 2 threads took 22 s for 20 steps with the default
    (spinning) policy and 0.7 s with OMP_WAIT_POLICY=PASSIVE, measured side by side on this project's shared
    2-core machine. onnxruntime sessions are already created with spinning off for the same reason.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def search_table(search: dict[str, Any]) -> str:
    """Every keep_ratio the search tried, in order, and the one it chose."""
    lines = [f"search: smallest keep_ratio with {search['metric']} budget {search['budget']:g} -> "
             f"{search['keep_ratio']:.4f} ({len(search['points'])} points, stopped by {search['stopped_by']})"]
    for p in search["points"]:
        lines.append(f"  keep_ratio {p['keep_ratio']:.4f}  {search['metric']} {p['value']:.4f}  "
                     f"{'pass' if p['passed'] else 'fail'}  {p['seconds']:.1f} s")
    return "\n".join(lines)


def load_from_args(args: argparse.Namespace) -> Any:
    from edgefuse.config.pipeline import load_config

    return load_config(args.config, args.overrides)


def _dry_run(cfg: Any, run_dir: Any) -> str:
    from edgefuse.config.pipeline import dump_config
    from edgefuse.pipeline.api import dry_run_plan

    plan = dry_run_plan(cfg)
    lines = [dump_config(cfg).rstrip(), "", f"run folder: {run_dir}", "stages:"]
    for name, state in plan["stages"]:
        lines.append(f"  {name:<10} {state}")
    if plan["fusion"] is not None:
        from edgefuse.cli.fuse import format_plan

        lines += ["", format_plan(plan["fusion"])]
        if cfg.search is not None:
            lines.append("(search will choose fusion.keep_ratio; the plan shows the configured value)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from edgefuse.config.pipeline import dump_config
    from edgefuse.io_utils import write_text_atomic
    from edgefuse.pipeline.api import resolve_run_dir

    passive_openmp()
    cfg = load_from_args(args)
    run_dir = resolve_run_dir(cfg, args.config, args.run_dir)
    if args.save_config:
        write_text_atomic(Path(args.save_config), dump_config(cfg))
        print(f"resolved config written to {args.save_config}", file=sys.stderr)
    if args.dry_run:
        print(_dry_run(cfg, run_dir))
        return 0
    from edgefuse.pipeline.api import run_pipeline

    quiet = args.no_progress or args.quiet
    result = run_pipeline(cfg, run_dir, force=args.force, until=args.until, progress=not quiet,
                          on_event=stage_printer(quiet))
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, default=str))
        return 0
    ran, cached = len(result.ran), len(result.cached)
    print(f"edgefuse run: {ran} stage(s) ran, {cached} reused, in {result.seconds:.1f} s; run folder {run_dir}")
    if result.stage("search").status != "off":
        print(search_table(result.stage("search").result))
    rows = result.summary.get("graphs") or []
    if rows:
        print(summary_table(rows))
    html = (result.summary.get("report_files") or {}).get("html")
    if html is not None:
        print(f"report: {html}")
    return 0
