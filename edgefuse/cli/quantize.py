"""``edgefuse quantize``: an exported folder -> int8 (dynamic or static QDQ) or int4 graph, checked against fp32."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgefuse.config.quantize import CALIBRATION_METHODS, PRESETS, QUANT_MODES

HELP = """Quantize the fp32 graph of an export folder and check the result against it.

modes: dynamic (int8 weights, activations quantized at run time; per-channel by default), static (int8 QDQ,
activation ranges calibrated on data: minmax, percentile or entropy), int4 (weight-only 4-bit blocks,
MatMulNBits). Presets pick int8 types per CPU (arm64, avx2, avx512, avx512-vnni); auto detects this host's.

The quantized graph is compared with fp32 on task data (mean cosine of the pooled embedding / logits, max
difference, accuracy with --eval-data) and its quantized MatMuls are counted; a graph that quantized nothing
or is below --min-cosine fails with exit code 8 and is not written.

examples:
  edgefuse quantize out/minilm-onnx --mode dynamic
  edgefuse quantize out/minilm-onnx --mode dynamic --preset arm64 --exclude 're:/output/dense/MatMul$'
  edgefuse quantize out/minilm-onnx --mode static --calibration-data ../shared/data/sst2/train.tsv \\
      --calibration-method percentile
  edgefuse quantize out/smol-onnx --mode int4 --block-size 32
  edgefuse quantize out/minilm-onnx --mode dynamic --per-tensor --auto-target-cosine 0.99 --json
  edgefuse quantize out/sst2-onnx --eval-data ../shared/data/sst2/validation.tsv
"""


def load_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (``yaml.safe_load``).

    Raises:
        TargetNotFoundError: the file does not exist.
        ConfigError: it is not valid YAML or not a mapping.
    """
    import yaml

    from edgefuse.errors import ConfigError, TargetNotFoundError

    if not Path(path).is_file():
        raise TargetNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{str(path)!r} must hold a mapping of settings, not {type(data).__name__}")
    return data


def register(sub: Any) -> None:
    p = sub.add_parser("quantize", help="int8 / int4 quantization of an exported graph, checked", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", help="folder written by `edgefuse export` (or a .onnx file)")
    p.add_argument("--config", type=Path, metavar="YAML", help="quantize settings file (keys of QuantizeConfig)")
    p.add_argument("--mode", choices=QUANT_MODES, help="dynamic (default), static or int4")
    p.add_argument("--preset", choices=PRESETS, help="target CPU; auto (default) detects this host")
    p.add_argument("--per-tensor", dest="per_channel", action="store_false", default=None,
                   help="int8: one scale per weight tensor (default: per channel; far less accurate on MiniLM)")
    p.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=None,
                   help="int8: 7-bit weights against int16 saturation (default: the preset's; on for avx2/avx512)")
    p.add_argument("--op-types", nargs="+", metavar="OP",
                   help="int8: operator types to quantize (default MatMul Gather)")
    p.add_argument("--exclude", action="append", metavar="NODE",
                   help="node name kept in fp32; 're:' prefix for a regex (repeatable)")
    p.add_argument("--calibration-data", type=Path, metavar="FILE",
                   help="TSV/CSV with a text column to calibrate and compare on (default: built-in sentences)")
    p.add_argument("--calibration-method", choices=CALIBRATION_METHODS,
                   help="static: minmax (default), percentile, entropy")
    p.add_argument("--calibration-samples", type=int, metavar="N",
                   help="texts read from --calibration-data (default 64)")
    p.add_argument("--max-seq-len", dest="max_sequence_length", type=int, metavar="N",
                   help="tokens per calibration text (default 128)")
    p.add_argument("--block-size", type=int, help="int4: block size 16/32/64/128/256 (default 32)")
    p.add_argument("--int4-asymmetric", dest="int4_symmetric", action="store_false", default=None,
                   help="int4: asymmetric blocks with zero points (default symmetric)")
    p.add_argument("--accuracy-level", dest="int4_accuracy_level", type=int, choices=(0, 1, 2, 3, 4),
                   help="int4: MatMulNBits compute type (default 4: int8 activations)")
    p.add_argument("--int4-algorithm", choices=("default", "rtn", "hqq", "gptq"),
                   help="int4: onnxruntime's MatMulNBits algorithm (default: its block round-to-nearest; gptq "
                   "calibrates on --calibration-data)")
    p.add_argument("--int4-fallback", choices=("fp32", "int8"),
                   help="int4 with --auto-target-cosine: what the MatMuls taken out of int4 become (default fp32)")
    p.add_argument("--auto-target-cosine", type=float, metavar="COS",
                   help="keep the most sensitive MatMuls in fp32 until the cosine against fp32 reaches COS")
    p.add_argument("--auto-max-kept", type=int, metavar="N", help="auto: at most N MatMuls kept in fp32 (default 16)")
    p.add_argument("--min-cosine", type=float, metavar="COS", help="fail below this mean cosine (default 0.9)")
    p.add_argument("--eval-data", type=Path, metavar="TSV", help="labelled TSV (sentence, label) for accuracy")
    p.add_argument("--eval-samples", type=int, metavar="N", help="rows of --eval-data (default all)")
    p.add_argument("--output-name", help="file name of the quantized graph (default: conventional name)")
    p.add_argument("--out-dir", type=Path, help="write into this folder instead of EXPORT_DIR")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing graph of that name")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and preset, write nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


_KEYS = ("mode", "preset", "per_channel", "reduce_range", "op_types", "exclude", "calibration_data",
         "calibration_method", "calibration_samples", "max_sequence_length", "block_size", "int4_symmetric",
         "int4_accuracy_level", "int4_algorithm", "int4_fallback",
         "auto_target_cosine", "auto_max_kept", "min_cosine", "eval_data", "eval_samples", "output_name", "overwrite")


def _config(args: argparse.Namespace) -> Any:
    from pydantic import ValidationError

    from edgefuse.config.messages import first_error
    from edgefuse.config.quantize import QuantizeConfig

    values: dict[str, Any] = load_yaml(args.config) if args.config is not None else {}
    values.update({k: getattr(args, k) for k in _KEYS if getattr(args, k) is not None})
    try:
        return QuantizeConfig(**values)
    except ValidationError as exc:
        raise first_error(exc, "quantize") from None


def format_result(res: Any) -> str:
    """Human summary of a :class:`QuantizeResult`."""
    lines = [f"{res.onnx_path.name}: {res.mode} for {res.preset}, {res.quantized_nodes} MatMuls quantized",
             f"  size {res.size_bytes_fp32 / 1e6:.1f} MB -> {res.size_bytes / 1e6:.1f} MB; ops "
             + ", ".join(f"{k} {v}" for k, v in sorted(res.op_counts.items())
                         if k in ("MatMul", "MatMulInteger", "MatMulNBits", "QuantizeLinear", "DequantizeLinear")),
             f"  vs fp32 on {res.samples} rows: cosine mean {res.cosine_mean:.5f} min {res.cosine_min:.5f}, "
             f"max|diff| {res.max_abs_diff:.3g}"]
    if res.accuracy is not None:
        lines.append(f"  accuracy {res.accuracy:.4f} (fp32 {res.accuracy_fp32:.4f})")
    if res.kept_fp32:
        lines.append(f"  kept in fp32: {', '.join(res.kept_fp32)}")
    lines.append(f"  {res.seconds:.1f} s; manifest updated")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if args.dry_run:
        from edgefuse.quantize.api import default_output_name
        from edgefuse.quantize.presets import resolve_preset

        preset = resolve_preset(cfg.preset)
        print(json.dumps({"config": cfg.model_dump(mode="json"), "preset": preset.to_dict(),
                          "output_name": default_output_name(cfg, preset.name)}, indent=2))
        return 0
    from edgefuse.quantize.api import quantize_onnx

    res = quantize_onnx(Path(args.export_dir), cfg, args.out_dir)
    print(json.dumps(res.to_dict(), indent=2, default=str) if args.json else format_result(res))
    return 0
