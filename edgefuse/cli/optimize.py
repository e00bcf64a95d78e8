"""``edgefuse optimize``: an exported folder -> the graph with onnxruntime's transformer fusions, checked."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgefuse.config.optimize import FUSIONS, ORT_MODEL_TYPES

HELP = f"""Apply onnxruntime's transformer fusions to the fp32 graph of an export folder, each fusion switchable,
and check the result output by output against the fp32 graph (padded batches, real text, one KV-cache decode
step for decoders). A graph that disagrees fails with exit code 7 and is not written.

fusions: {', '.join(FUSIONS)}. Default: all but gelu_approximation.
Whether a fusion is faster depends on the CPU and the onnxruntime release (SkipLayerNormalization is slower
than Add + LayerNormalization on some x86 hosts): `edgefuse tune` measures it.

examples:
  edgefuse optimize out/minilm-onnx
  edgefuse optimize out/minilm-onnx --disable skip_layer_norm bias_skip_layer_norm --output-name model_opt_noskip.onnx
  edgefuse optimize out/smol-onnx --fusions rotary skip_layer_norm layer_norm --json
  edgefuse quantize out/minilm-onnx/model_opt.onnx --op-types MatMul Gather Attention
"""


def register(sub: Any) -> None:
    p = sub.add_parser("optimize", help="onnxruntime transformer fusions, each switchable, checked against fp32",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", help="folder written by `edgefuse export` (or a graph file listed in its manifest)")
    p.add_argument("--config", type=Path, metavar="YAML", help="optimize settings file (keys of OptimizeConfig)")
    p.add_argument("--fusions", nargs="+", metavar="NAME",
                   help="fusions to apply (names above), or 'default' or 'none' (default: default)")
    p.add_argument("--disable", nargs="+", metavar="NAME", help="fusions removed from --fusions")
    p.add_argument("--model-type", choices=ORT_MODEL_TYPES, help="optimizer class; auto (default) from the manifest")
    p.add_argument("--opt-level", type=int, choices=(0, 1),
                   help="1: onnxruntime's basic optimisations first (default 0)")
    p.add_argument("--atol", type=float, help="absolute tolerance against the fp32 graph (default 1e-4)")
    p.add_argument("--rtol", type=float, help="relative tolerance against the fp32 graph (default 1e-3)")
    p.add_argument("--min-cosine", type=float, help="fail below this output cosine against fp32 (default 0.9999)")
    p.add_argument("--output-name", help="file name of the optimized graph (default model_opt.onnx)")
    p.add_argument("--out-dir", type=Path, help="write into this folder instead of EXPORT_DIR")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing graph of that name")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


_KEYS = ("disable", "model_type", "opt_level", "atol", "rtol", "min_cosine", "output_name", "overwrite")


def _config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from edgefuse.config.messages import validation_message
    from edgefuse.config.optimize import OptimizeConfig
    from edgefuse.io_utils import read_yaml_mapping

    values: dict[str, Any] = read_yaml_mapping(Path(args.config)) if args.config is not None else {}
    values.update({k: getattr(args, k) for k in _KEYS if getattr(args, k) is not None})
    if args.fusions is not None:
        keyword = args.fusions[0] if len(args.fusions) == 1 and args.fusions[0] in ("default", "none") else None
        values["fusions"] = keyword or args.fusions
    try:
        return OptimizeConfig(**values)
    except ValidationError as exc:
        from edgefuse.errors import ConfigError

        raise ConfigError(validation_message(exc, "optimize", OptimizeConfig)) from None


def format_result(res: Any) -> str:
    """Human summary of an :class:`OptimizeResult`."""
    fused = ", ".join(f"{k} {v}" for k, v in sorted(res.fused_ops.items())) or "none"
    return "\n".join([
        f"{res.onnx_path.name}: {res.ort_model_type} optimizer, fusions {', '.join(res.fusions) or 'none'}",
        f"  fused operators: {fused}",
        f"  nodes {sum(res.op_counts_fp32.values())} -> {sum(res.op_counts.values())}; "
        f"size {res.size_bytes / 1e6:.1f} MB",
        f"  vs {res.src_path.name} on {len(res.cases)} cases: max|diff| {res.max_abs_diff:.3g}, min cosine "
        f"{res.min_cosine:.6f}",
        f"  {res.seconds:.1f} s; manifest updated",
    ])


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    from edgefuse.optimize.api import optimize_onnx

    res = optimize_onnx(Path(args.export_dir), cfg, args.out_dir)
    print(json.dumps(res.to_dict(), indent=2, default=str) if args.json else format_result(res))
    return 0
