"""``edgefuse schema``: the JSON schema of pipeline configs (committed as export_configs/schema.json)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

HELP = """Print the JSON schema of the pipeline config (every key, type, default and description), or write it.

Editors validate config files against it while typing: start a YAML file with
  # yaml-language-server: $schema=./schema.json

examples:
  edgefuse schema                                   # print to stdout
  edgefuse schema --output export_configs/schema.json
  edgefuse schema --check export_configs/schema.json   # exit 2 when the file is stale
  edgefuse schema --markdown -o docs/config-reference.md  # every key as Markdown tables
"""


def register(sub: Any) -> None:
    p = sub.add_parser("schema", help="print or write the JSON schema of pipeline configs", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    group = p.add_mutually_exclusive_group()
    group.add_argument("-o", "--out", "--output", dest="output", metavar="PATH",
                       help="write the schema to PATH instead of printing it")
    group.add_argument("--check", metavar="PATH", help="compare PATH with the current schema; exit 2 when it differs")
    p.add_argument("--markdown", action="store_true",
                   help="the config reference as Markdown tables (every section and key) instead of JSON")
    p.set_defaults(run=run)


def schema_text() -> str:
    """The schema as it is committed: indented JSON with a trailing newline."""
    from edgefuse.config.pipeline import json_schema

    return json.dumps(json_schema(), indent=2) + "\n"


# (section heading, "module:Class") in the order of a config file
REFERENCE_SECTIONS: tuple[tuple[str, str], ...] = (
    ("top level", "edgefuse.config.pipeline:PipelineConfig"),
    ("model", "edgefuse.config.pipeline:ModelConfig"),
    ("data", "edgefuse.config.finetune:DataConfig"),
    ("teacher, finetune", "edgefuse.config.finetune:FinetuneConfig"),
    ("search", "edgefuse.config.search:SearchConfig"),
    ("fusion", "edgefuse.config.fusion:FusionConfig"),
    ("export", "edgefuse.config.export:ExportConfig"),
    ("optimize", "edgefuse.config.optimize:OptimizeConfig"),
    ("quantize", "edgefuse.config.quantize:QuantizeConfig"),
    ("tune", "edgefuse.config.tune:TuneConfig"),
    ("tune.candidates", "edgefuse.config.tune:CandidateConfig"),
    ("tune.candidates[].session", "edgefuse.config.tune:SessionSpec"),
    ("evaluate", "edgefuse.config.pipeline:EvaluateConfig"),
    ("profile", "edgefuse.config.profile:ProfileConfig"),
    ("report", "edgefuse.config.report:ReportConfig"),
    ("check", "edgefuse.config.check:CheckConfig"),
    ("check.budgets", "edgefuse.config.check:BudgetsConfig"),
)


def _default_cell(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if hasattr(value, "model_dump"):
        return "(section)"
    return "`" + json.dumps(value, default=str) + "`"


def reference_markdown() -> str:
    """Every config section and key with its default and description, as Markdown (docs/config-reference.md)."""
    import importlib

    lines = [
        "# Config reference",
        "",
        "Generated from the config models by `edgefuse schema --markdown -o docs/config-reference.md` (a test fails",
        "when this file is stale). The same descriptions are in `export_configs/schema.json`, which editors use to",
        "validate YAML files while typing. A section that is absent or `null` switches its stage off.",
        "",
    ]
    for heading, target in REFERENCE_SECTIONS:
        module, cls_name = target.split(":")
        cls = getattr(importlib.import_module(module), cls_name)
        lines += [f"## `{heading}`", "", "| key | default | meaning |", "|---|---|---|"]
        for key, field in cls.model_fields.items():
            text = (field.description or "").replace("|", "\\|").replace("\n", " ").replace("<", "&lt;")
            lines.append(f"| `{key}` | {_default_cell(field)} | {text} |")
        lines.append("")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgefuse.errors import ConfigError, TargetNotFoundError
    from edgefuse.io_utils import write_text_atomic

    text = reference_markdown() if args.markdown else schema_text()
    if args.check:
        path = Path(args.check)
        if not path.is_file():
            raise TargetNotFoundError(f"schema file {str(path)!r} does not exist; write it with --output {path}")
        if path.read_text(encoding="utf-8") != text:
            flag = " --markdown" if args.markdown else ""
            raise ConfigError(f"{path} is stale; regenerate it with: edgefuse schema{flag} --output {path}")
        print(f"{path} is up to date", file=sys.stderr)
        return 0
    if args.output:
        write_text_atomic(Path(args.output), text)
        print(f"written to {args.output}", file=sys.stderr)
        return 0
    sys.stdout.write(text)
    return 0
