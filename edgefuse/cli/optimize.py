"""``edgefuse optimize``: an exported folder -> the graph with onnxruntime's transformer fusions, checked."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgefuse.cli.options import Flag, add_flags, config_from_args
from edgefuse.config.optimize import FUSIONS, OptimizeConfig

HELP = f"""Apply onnxruntime's transformer fusions to the fp32 graph of an export folder, each fusion switchable,
and check the result output by output against the fp32 graph (padded batches, real text, KV-cache decoding steps
for decoders). A graph that disagrees fails with exit code 7 and is not written.

fusions: {', '.join(FUSIONS)}. Default: all but gelu_approximation.
Whether a fusion is faster depends on the CPU and the onnxruntime release (SkipLayerNormalization is slower
than Add + LayerNormalization on some x86 hosts): `edgefuse tune` measures it.

examples:
  edgefuse optimize out/minilm-onnx
  edgefuse optimize out/minilm-onnx --disable skip_layer_norm bias_skip_layer_norm --output-name model_opt_noskip.onnx
  edgefuse optimize out/smol-onnx --fusions rotary skip_layer_norm layer_norm --json
  edgefuse quantize out/minilm-onnx/model_opt.onnx --op-types MatMul Gather Attention
"""


# the OptimizeConfig keys this command sets (type, choices and help come from the config); --fusions is its own
# option (see register), validate_shapes (pairs) and seed are left to the YAML file
OPTIMIZE_FLAGS = (
    Flag("disable", metavar="NAME"),
    Flag("model_type"),
    Flag("opt_level"),
    Flag("atol"),
    Flag("rtol"),
    Flag("min_cosine", metavar="COS"),
    Flag("output_name"),
    Flag("overwrite"),
)


def register(sub: Any) -> None:
    p = sub.add_parser("optimize", help="onnxruntime transformer fusions, each switchable, checked against fp32",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", help="folder written by `edgefuse export` (or a graph file listed in its manifest)")
    p.add_argument("--config", type=Path, metavar="YAML", help="optimize settings file (keys of OptimizeConfig)")
    # hand-written: ``fusions`` is a list of names or one keyword ('default', 'none'), a union no Flag can derive
    p.add_argument("--fusions", nargs="+", metavar="NAME",
                   help="fusions to apply (names above), or 'default' or 'none' (default: default)")
    add_flags(p, OptimizeConfig, OPTIMIZE_FLAGS)
    p.add_argument("--out-dir", type=Path, help="write into this folder instead of EXPORT_DIR")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> Any:
    extra: dict[str, Any] = {}
    if args.fusions is not None:
        keyword = args.fusions[0] if len(args.fusions) == 1 and args.fusions[0] in ("default", "none") else None
        extra["fusions"] = keyword or args.fusions
    return config_from_args(args, OptimizeConfig, OPTIMIZE_FLAGS, section="optimize", extra=extra)


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
