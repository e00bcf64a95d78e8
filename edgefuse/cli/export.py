"""``edgefuse export``: a (fused) model -> one validated ONNX folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgefuse.config.export import EXPORT_TASKS, EXPORTERS, FOLD_CHOICES

HELP = """Export a model to ONNX and validate the graph against PyTorch on shapes other than the traced one,
padding included. A miss fails with exit code 7 and leaves nothing behind (optimum only warns).

The folder holds model.onnx, config.json, the tokenizer and manifest.json (sha256, size, settings,
validation figures, library versions); optimum's ORTModelFor* classes load it as is. Causal LMs are exported
with the KV cache, and greedy generation through the graph must give PyTorch's tokens.

examples:
  edgefuse export minilm out/minilm-onnx
  edgefuse export out/minilm-fused out/minilm-fused-onnx --fold-scales down
  edgefuse export smollm2 out/smol-onnx --task causal-lm --generate-tokens 16
  edgefuse export out/sst2-classifier out/sst2-onnx --task sequence-classification --atol 1e-4 --json
"""


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export to ONNX, validated against PyTorch", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder (fused or not), Hub id, or built-in alias: minilm, smollm2")
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--config", type=Path, metavar="YAML", help="export settings file (keys of ExportConfig)")
    p.add_argument("--task", choices=EXPORT_TASKS, help="graph to export (default: feature-extraction)")
    p.add_argument("--no-past", dest="with_past", action="store_false", default=None,
                   help="causal-lm: export without the KV cache (logits only)")
    p.add_argument("--exporter", choices=EXPORTERS, help="auto (default): optimum-onnx where it can, else torch.onnx")
    p.add_argument("--dynamo", dest="torch_dynamo", action="store_true", default=None,
                   help="torch exporter: use dynamo instead of the TorchScript tracer")
    p.add_argument("--opset", type=int, help="ONNX opset (default: optimum's for the architecture, 18 for torch)")
    p.add_argument("--fold-scales", choices=FOLD_CHOICES,
                   help="fusion scale: keep (separate Mul), down, up (gated/ReLU only); auto (default): measured best")
    p.add_argument("--moe-routing", choices=("sparse", "dense"),
                   help="Mixtral/Qwen2-MoE: sparse (default: gather-compute-scatter, dense fallback) or dense")
    p.add_argument("--atol", type=float, help="absolute tolerance against PyTorch (default 1e-4)")
    p.add_argument("--rtol", type=float, help="relative tolerance against PyTorch (default 1e-3)")
    p.add_argument("--validate-shape", type=int, nargs=2, action="append", metavar=("BATCH", "SEQ"),
                   dest="validate_shapes", help="validation shape (repeatable; default 1 13 and 3 21)")
    p.add_argument("--generate-tokens", type=int, help="causal-lm: greedy tokens compared with PyTorch (default 8)")
    p.add_argument("--seed", type=int, help="seed of the validation token ids (default 0)")
    p.add_argument("--num-labels", type=int, default=2, help="sequence-classification: labels of a fresh head")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the folder/Hub")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from edgefuse.config.export import ExportConfig
    from edgefuse.config.messages import first_error

    values: dict[str, Any] = {}
    if args.config is not None:
        from edgefuse.cli.quantize import load_yaml

        values.update(load_yaml(args.config))
    for key in ("task", "with_past", "exporter", "torch_dynamo", "opset", "fold_scales", "atol", "rtol",
                "validate_shapes", "generate_tokens", "seed", "moe_routing"):
        value = getattr(args, key)
        if value is not None:
            values[key] = value
    try:
        return ExportConfig(**values)
    except ValidationError as exc:
        raise first_error(exc, "export") from None


def format_result(res: Any) -> str:
    """Human summary: the exporter, then one line per validation case and output."""
    lines = [f"exported {res.model_type} ({res.task}) with {res.exporter}",
             f"  fusion scale: {res.fold_scales} ({res.fused_mlps} fused MLPs); opset {res.opset}; "
             f"{res.graph_size_bytes / 1e6:.1f} MB; export {res.export_seconds:.1f} s, validation {res.validate_seconds:.1f} s",
             f"  validation vs PyTorch (atol {res.atol:g}, rtol {res.rtol:g}):"]
    for case in res.cases:
        worst = max(case.outputs, key=lambda o: o.max_abs_diff)
        lines.append(f"    {case.label:<36} {len(case.outputs):>3} outputs  max|diff| {worst.max_abs_diff:.2e} "
                     f"({worst.name})  min cos {min(o.cosine for o in case.outputs):.6f}  ok")
    if res.greedy is not None:
        lines.append(f"    greedy generation: {res.greedy.tokens_compared} tokens identical to PyTorch "
                     f"{list(res.greedy.onnx_tokens)}")
    lines.append(f"  wrote {res.out_dir}/ (model.onnx, config, tokenizer, manifest.json)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from edgefuse.export.api import export_onnx
    from edgefuse.models import has_tokenizer, load_model, load_tokenizer

    model = load_model(args.model, cfg.task, num_labels=args.num_labels, trust_remote_code=args.trust_remote_code)
    tokenizer = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code) if has_tokenizer(args.model) else None
    res = export_onnx(model, cfg, Path(args.out_dir), tokenizer=tokenizer, overwrite=args.overwrite)
    print(json.dumps(res.to_dict(), indent=2, default=str) if args.json else format_result(res))
    return 0
