"""``edgefuse quantize``: an exported folder -> int8 (dynamic or static QDQ) or int4 graph, checked against fp32."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from edgefuse.cli.options import Flag, add_flags, config_from_args, print_result
from edgefuse.config.quantize import QuantizeConfig

HELP = """Quantize the fp32 graph of an export folder and check the result against it.

modes: int8 (the default: dynamic for encoders and classifiers, int8-blocks for causal LMs), dynamic (int8
weights, activations quantized at run time per tensor; per-channel by default), static (int8 QDQ, activation
ranges calibrated on data: minmax, percentile or entropy), int8-blocks (weight-only 8-bit blocks, MatMulNBits
bits 8: activations quantized per block of each token, so a decoder's massive activations cost nothing), int4
(weight-only 4-bit blocks, MatMulNBits; the weights chosen by GPTQ on the calibration texts, so give it task text
with --calibration-data, else it fits a built-in English corpus; a MatMul with fewer calibration tokens than half
its inputs stays round to nearest).
Presets pick int8 types per CPU (arm64, avx2, avx512, avx512-vnni); auto detects this host's.

The quantized graph is compared with fp32 on task data (mean cosine of the pooled embedding / logits, max
difference, accuracy with --eval-data) and its quantized MatMuls are counted; a graph that quantized nothing
or is below --min-cosine fails with exit code 8 and is not written.

examples:
  edgefuse quantize out/minilm-onnx --mode dynamic              # -> out/minilm-onnx-int8/model.onnx
  edgefuse quantize out/minilm-onnx --mode dynamic --preset arm64 --exclude 're:/output/dense/MatMul$'
  edgefuse quantize out/minilm-onnx --mode static --calibration-data data/sst2/train.tsv \\
      --calibration-method percentile
  edgefuse quantize out/smol-onnx                               # a decoder: -> out/smol-onnx-int8-blocks-b32/
  edgefuse quantize out/smol-onnx --mode int4 --calibration-data data/e2e/devset.csv
  edgefuse quantize out/smol-onnx --mode int4 --int4-algorithm hqq --auto-target-cosine 0.95 --int4-fallback int8
  edgefuse quantize out/minilm-onnx --mode dynamic --per-tensor --auto-target-cosine 0.99 --json
  edgefuse quantize out/sst2-onnx --eval-data data/sst2/validation.tsv
"""


# the QuantizeConfig keys this command sets (type, choices and help come from the config); every key is a flag
QUANTIZE_FLAGS = (
    Flag("mode"),
    Flag("preset"),
    Flag("per_channel", "--per-tensor", negate=True, extra="Give --per-tensor for one scale per weight tensor."),
    Flag("reduce_range", both=True),
    Flag("op_types", metavar="OP"),
    Flag("exclude", append=True, metavar="NODE", extra="(repeatable)"),
    Flag("calibration_method"),
    Flag("calibration_data", metavar="FILE"),
    Flag("calibration_samples", metavar="N"),
    Flag("max_sequence_length", "--max-seq-len", metavar="N"),
    Flag("block_size"),
    Flag("int4_symmetric", "--int4-asymmetric", negate=True, extra="Give --int4-asymmetric for zero points."),
    Flag("int4_accuracy_level", "--accuracy-level"),
    Flag("int4_algorithm"),
    Flag("int4_scaling"),
    Flag("int4_fallback"),
    Flag("int4_tied"),
    Flag("int4_8bit_share", metavar="SHARE"),
    Flag("int4_8bit_rank"),
    Flag("auto_target_cosine", metavar="COS"),
    Flag("auto_max_kept", metavar="N"),
    Flag("min_cosine", metavar="COS"),
    Flag("eval_data", metavar="TSV"),
    Flag("eval_samples", metavar="N"),
    Flag("output_name"),
    Flag("overwrite"),
)


def register(sub: Any) -> None:
    p = sub.add_parser("quantize", help="int8 / int4 quantization of an exported graph, checked", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("export_dir", help="folder written by `edgefuse export` (or a .onnx file)")
    p.add_argument("--config", type=Path, metavar="YAML", help="quantize settings file (keys of QuantizeConfig)")
    add_flags(p, QuantizeConfig, QUANTIZE_FLAGS)
    p.add_argument("--teacher", metavar="MODEL", help="the original (unfused) model: print how far the quantized "
                   "graph is from it on built-in sentences (the check above compares with the fp32 graph only)")
    p.add_argument("-o", "--out", "--out-dir", dest="out_dir", type=Path,
                   help="folder of the quantized graph (model.onnx + config + tokenizer, "
                   "loadable with optimum's from_pretrained); default EXPORT_DIR-<variant>, e.g. minilm-onnx-int8; "
                   "EXPORT_DIR itself writes model_<variant>.onnx beside the fp32 graph")
    p.add_argument("--dry-run", action="store_true", help="print the resolved settings and preset, write nothing")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> Any:
    return config_from_args(args, QuantizeConfig, QUANTIZE_FLAGS, section="quantize")


def format_result(res: Any) -> str:
    """Human summary of a :class:`QuantizeResult`."""
    lines = [f"{res.onnx_path}: {res.mode} for {res.preset}, {res.quantized_nodes} MatMuls quantized",
             f"  size {res.size_bytes_fp32 / 2**20:.1f} MiB -> {res.size_bytes / 2**20:.1f} MiB; ops "
             + ", ".join(f"{k} {v}" for k, v in sorted(res.op_counts.items())
                         if k in ("MatMul", "MatMulInteger", "MatMulNBits", "QuantizeLinear", "DequantizeLinear")),
             f"  vs fp32 on {res.samples} rows"
             + (" not calibrated on" if res.held_out else " of the calibration texts")
             + f": cosine mean {res.cosine_mean:.5f} min {res.cosine_min:.5f}, "
             f"max|diff| {res.max_abs_diff:.3g}"]
    if res.accuracy is not None:
        lines.append(f"  accuracy {res.accuracy:.4f} (fp32 {res.accuracy_fp32:.4f})")
    if res.kept_fp32:
        lines.append(f"  kept in fp32: {', '.join(res.kept_fp32)}")
    lines.append(f"  {res.seconds:.1f} s; manifest updated")
    if res.onnx_path.name == "model.onnx":
        lines.append(f"  load it: ORTModelFor<Task>.from_pretrained({str(res.onnx_path.parent)!r})")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from edgefuse.quantize.api import resolved_config

    # the default mode "int8" becomes dynamic or int8-blocks from the graph's task: the output name depends on it
    cfg = resolved_config(Path(args.export_dir), _config(args))
    if args.dry_run:
        from edgefuse.quantize.api import default_output_name
        from edgefuse.quantize.presets import resolve_preset

        preset = resolve_preset(cfg.preset)
        out_dir = default_out_dir(Path(args.export_dir), cfg, preset.name) if args.out_dir is None else args.out_dir
        own = out_dir is not None and Path(out_dir).resolve() != Path(args.export_dir).resolve()
        print(json.dumps({"config": cfg.model_dump(mode="json"), "preset": preset.to_dict(), "out_dir": str(out_dir),
                          "output_name": default_output_name(cfg, preset.name, own_folder=own)}, indent=2))
        return 0
    from edgefuse.quantize.api import quantize_onnx
    from edgefuse.quantize.presets import resolve_preset

    out_dir = args.out_dir
    if out_dir is None:
        out_dir = default_out_dir(Path(args.export_dir), cfg, resolve_preset(cfg.preset).name)
    res = quantize_onnx(Path(args.export_dir), cfg, out_dir)
    vs_teacher = _vs_teacher(args, res) if getattr(args, "teacher", None) else None

    print_result(res.to_dict(), format_result(res), vs_teacher, (vs_teacher or {}).get("task", ""), args)
    return 0


def _vs_teacher(args: argparse.Namespace, res: Any) -> dict[str, Any]:
    """The quantized graph against the teacher (PyTorch) on built-in sentences, with the folder's tokenizer."""
    from edgefuse.manifest import read_manifest
    from edgefuse.models import load_model
    from edgefuse.quantize.agreement import graph_vs_teacher
    from edgefuse.quantize.evaluate import folder_tokenizer

    folder = Path(res.onnx_path).parent
    task = read_manifest(folder).get("task") or "feature-extraction"
    num_labels = 2
    if task == "sequence-classification":
        num_labels = len(json.loads((folder / "config.json").read_text()).get("id2label") or {0: 0, 1: 1})
    teacher = load_model(args.teacher, task, num_labels=num_labels)
    return {**graph_vs_teacher(res.onnx_path, teacher, folder_tokenizer(folder), task), "task": task}


def default_out_dir(src: Path, cfg: Any, preset: str) -> Path | None:
    """``EXPORT_DIR-<variant>`` for an export folder (its own folder, graph ``model.onnx``); None for a .onnx
    file (written beside it)."""
    from edgefuse.quantize.api import variant_name

    if not src.is_dir():
        return None
    return src.resolve().parent / f"{src.resolve().name}-{variant_name(cfg, preset)}"
