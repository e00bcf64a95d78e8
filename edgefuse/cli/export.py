"""``edgefuse export``: a (fused) model -> one validated ONNX folder."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edgefuse.cli.options import Flag, add_flags, add_task, config_from_args, print_result
from edgefuse.config.export import EXPORT_TASKS, ExportConfig

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
  edgefuse export out/minilm-fused out/minilm-mobile --format ort   # + model.ort for onnxruntime Mobile
  edgefuse export out/mixtral-fused out/mixtral-onnx --task causal-lm --moe-routing dense
"""


# the ExportConfig keys this command sets (type, choices and help come from the config); ``task`` takes optimum's
# names too, and ``validate_shapes`` pairs are given one --validate-shape BATCH SEQ at a time
EXPORT_FLAGS = (
    Flag("with_past", "--no-past", negate=True, extra="Give --no-past to export without it."),
    Flag("exporter"),
    Flag("torch_dynamo", "--dynamo"),
    Flag("opset"),
    Flag("fold_scales"),
    Flag("moe_routing"),
    Flag("atol"),
    Flag("rtol"),
    Flag("generate_tokens", metavar="N"),
    Flag("seed"),
    Flag("ort_optimization"),
    Flag("sentence_embedding"),
    Flag("labels", metavar="NAME"),
)


def register(sub: Any) -> None:
    p = sub.add_parser("export", help="export to ONNX, validated against PyTorch", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder (fused or not), Hub id, or built-in alias: minilm, smollm2")
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--config", type=Path, metavar="YAML", help="export settings file (keys of ExportConfig)")
    add_task(p, EXPORT_TASKS, help="graph to export (default: feature-extraction);")
    add_flags(p, ExportConfig, EXPORT_FLAGS)
    p.add_argument("--validate-shape", dest="validate_shapes", type=int, nargs=2, action="append",
                   metavar=("BATCH", "SEQ"), help=ExportConfig.model_fields["validate_shapes"].description
                   + " One pair per --validate-shape (repeatable).")
    p.add_argument("--format", choices=("onnx", "ort"), help="ort: also write model.ort (onnxruntime Mobile) and "
                   "its reduced-operator config, verified against model.onnx (default onnx)")
    p.add_argument("--num-labels", type=int, default=2, help="sequence-classification: labels of a fresh head")
    p.add_argument("--teacher", metavar="MODEL", help="the original (unfused) model: print how far the graph is "
                   "from it on built-in sentences (validation only compares with the model it was exported from)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the folder/Hub")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> Any:
    extra: dict[str, Any] = {k: getattr(args, k) for k in ("task", "validate_shapes") if getattr(args, k) is not None}
    if args.task_alias == "text-generation" and args.with_past is None:
        extra["with_past"] = False  # optimum's text-generation is the graph without the KV cache
    if getattr(args, "format", None) == "ort":
        extra["ort"] = True
    return config_from_args(args, ExportConfig, EXPORT_FLAGS, section="export", extra=extra)


def format_result(res: Any) -> str:
    """Human summary: the exporter, then one line per validation case and output."""
    lines = [f"exported {res.model_type} ({res.task}) with {res.exporter}",
             f"  fusion scale: {res.fold_scales} ({res.fused_mlps} fused MLPs); opset {res.opset}; "
             f"{res.graph_size_bytes / 2**20:.1f} MiB; export {res.export_seconds:.1f} s, "
             f"validation {res.validate_seconds:.1f} s",
             f"  validation vs PyTorch (atol {res.atol:g}, rtol {res.rtol:g}):"]
    for case in res.cases:
        worst = max(case.outputs, key=lambda o: o.max_abs_diff)
        lines.append(f"    {case.label:<36} {len(case.outputs):>3} outputs  max|diff| {worst.max_abs_diff:.2e} "
                     f"({worst.name})  min cos {min(o.cosine for o in case.outputs):.6f}  ok")
    if res.greedy is not None:
        lines.append(f"    greedy generation: {res.greedy.tokens_compared} tokens identical to PyTorch "
                     f"{list(res.greedy.onnx_tokens)}")
    if res.ort:
        o = res.ort
        lines.append(f"  {o['ort']} ({o['optimization_style']}, {o['size_bytes'] / 2**20:.1f} MiB) vs "
                     f"model.onnx: max|diff| {o['max_abs_diff_vs_onnx']:.2e}, min cos "
                     f"{o['min_cosine_vs_onnx']:.6f}; operators for a minimal build: {o['operators_config']}")
    lines.append(f"  wrote {res.out_dir}/ (model.onnx, config, tokenizer, manifest.json)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from edgefuse.export.api import export_onnx
    from edgefuse.io_utils import check_output_dir
    from edgefuse.models import has_tokenizer, load_model, load_tokenizer

    check_output_dir(args.out_dir, overwrite=args.overwrite, inputs=[args.model])  # before 20 s of work
    model = load_model(args.model, cfg.task, num_labels=args.num_labels, trust_remote_code=args.trust_remote_code)
    trust = args.trust_remote_code
    tokenizer = load_tokenizer(args.model, trust_remote_code=trust) if has_tokenizer(args.model) else None
    res = export_onnx(model, cfg, Path(args.out_dir), tokenizer=tokenizer, overwrite=args.overwrite)
    vs_teacher = None
    if getattr(args, "teacher", None):
        from edgefuse.quantize.agreement import graph_vs_teacher

        teacher = load_model(args.teacher, cfg.task, num_labels=args.num_labels,
                             trust_remote_code=args.trust_remote_code)
        vs_teacher = graph_vs_teacher(res.onnx_path, teacher, tokenizer, cfg.task)
    print_result(res.to_dict(), format_result(res), vs_teacher, cfg.task, args)
    return 0

