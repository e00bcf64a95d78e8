"""``edgefuse fuse``: compress the MLPs of a model and save it (or print the plan with --dry-run)."""

from __future__ import annotations

import argparse
import json
from typing import Any, get_args

from edgefuse.cli.options import Flag, add_flags, add_task, flag_values, format_table
from edgefuse.config.fusion import FusionConfig
from edgefuse.models import Task

HELP = """Compress the MLP (feed-forward) layers of a model by MLP fusion or a baseline, and save it as safetensors.

Every MLP is a sum of width-1 sub-MLPs; `fusion` clusters them with k-means into k centroids and keeps the
cluster sizes as a frozen scale, which preserves the output and the Adam NTK (fine-tuning dynamics).

examples:
  edgefuse fuse minilm out/minilm-fused --keep-ratio 0.5
  edgefuse fuse minilm out/x --keep-ratio 0.25 --layers 2 3 4 5 --dry-run
  edgefuse fuse ./my-llama out/llama-fused --width 2048 --round-to 64 --target 're:layers\\.(1[6-9]|2\\d)\\.mlp$'
  edgefuse fuse smollm2 out/smol --keep-ratio 0.5 --method prune --fold
"""


# the FusionConfig keys this command sets (type, choices and help come from the config)
WIDTH_FLAGS = (Flag("keep_ratio", metavar="R"), Flag("width", metavar="K"))
FUSE_FLAGS = (
    Flag("method"),
    Flag("round_to", metavar="N"),
    Flag("layers", metavar="I"),
    Flag("targets", "--target", append=True, metavar="NAME", extra="(repeatable)"),
    Flag("include_shared_experts", "--no-shared-experts", negate=True, extra="Give this flag to leave it alone."),
    Flag("seed"),
    Flag("n_init"),
    Flag("max_iter"),
    Flag("pool", metavar="R"),
    Flag("importance"),
    Flag("calibration_examples", metavar="N"),
)


def register(sub: Any) -> None:
    p = sub.add_parser("fuse", help="compress MLPs by fusion (or a baseline) and save", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder, Hub id, or built-in alias: minilm, smollm2")
    p.add_argument("out_dir", nargs="?", help="output folder (required unless --dry-run)")
    add_flags(p.add_mutually_exclusive_group(required=True), FusionConfig, WIDTH_FLAGS)
    add_flags(p, FusionConfig, FUSE_FLAGS)
    add_task(p, get_args(Task), default="feature-extraction", help="model head to load (default: feature-extraction);")
    p.add_argument("--fold", action="store_true",
                   help="fold the frozen scale into the weights before saving (for inference/export, not training)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (widths, parameters) and write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the folder/Hub")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


def format_plan(result: Any) -> str:
    """A table of the fusion plan/result: per MLP its name, width and parameters before -> after, and totals."""
    rows = [(s.name, f"{s.width_before} -> {s.width_after}", f"{s.params_before:,} -> {s.params_after:,}")
            for s in result.steps]
    rows.append(("MLPs total", f"{len(result.steps)} fused",
                 f"{result.mlp_params_before:,} -> {result.mlp_params_after:,}"))
    pct = 100.0 * (1 - result.params_total_after / result.params_total_before)
    rows.append(("model total", "", f"{result.params_total_before:,} -> {result.params_total_after:,} (-{pct:.1f}%)"))
    lines = [f"{result.method} on {result.model_type}",
             format_table(rows, header=("MLP", "width", "params"), rules=(len(result.steps) - 1,))]
    scale = sum(s.frozen_scale_entries for s in result.steps)
    if scale:
        lines.append(f"+ {scale:,} frozen scale entries (buffers, not trained; folded before export)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edgefuse.config.messages import first_error
    from edgefuse.errors import ConfigError

    if not args.dry_run and not args.out_dir:
        raise ConfigError("OUT_DIR is required unless --dry-run is given")
    try:
        cfg = FusionConfig(**flag_values(args, WIDTH_FLAGS + FUSE_FLAGS))
    except ValidationError as exc:
        raise first_error(exc, "fusion") from None

    from edgefuse.fusion.api import fuse_mlps_, plan_fusion
    from edgefuse.io_utils import check_output_dir
    from edgefuse.models import has_tokenizer, load_model, load_tokenizer

    if not args.dry_run:  # before the model loads: an existing or forbidden OUT_DIR is reported at once
        check_output_dir(args.out_dir, overwrite=args.overwrite, inputs=[args.model])
    model = load_model(args.model, args.task, trust_remote_code=args.trust_remote_code)
    if args.dry_run:
        result = plan_fusion(model, cfg)
    else:
        import copy

        from edgefuse.fusion.persist import save_fused
        from edgefuse.fusion.scale import fold_scales_

        tokenizer = (
            load_tokenizer(args.model, trust_remote_code=args.trust_remote_code) if has_tokenizer(args.model) else None
        )
        original = copy.deepcopy(model)  # to say how far the fused model is from it (recover before shipping)
        # a bar on a terminal, else a 30 s heartbeat; the tokenizer scores units for importance: activations
        result = fuse_mlps_(model, cfg, progress=not args.quiet, tokenizer=tokenizer)
        if args.fold:
            fold_scales_(model)
        from edgefuse.quantize.agreement import distance_to_original

        distance = distance_to_original(original, model, tokenizer, args.task)
        del original
        save_fused(model, args.out_dir, tokenizer=tokenizer, overwrite=args.overwrite)
    if args.json:
        print(json.dumps({**result.to_dict(), **({} if args.dry_run else {"vs_original": distance})}, indent=2))
    else:
        print(format_plan(result))
        if not args.dry_run:
            print(f"fused in {result.seconds:.1f} s; saved to {args.out_dir}")
            print(next_steps(args, distance))
    return 0


def next_steps(args: argparse.Namespace, distance: dict) -> str:
    """How far the fused model is from the original, and the command that recovers it."""
    from edgefuse.quantize.agreement import describe

    objective = ("--objective hidden" if args.task == "feature-extraction"
                 else "--objective task --objective logits")
    data = "--train TEXTS.txt --text-column text" if args.task == "feature-extraction" else (
        "--train TRAIN.tsv --validation VALIDATION.tsv")
    verdict = ("close to the original" if distance["cosine_mean"] >= 0.99 else
               "not ready to ship: recover it first" if distance["cosine_mean"] == distance["cosine_mean"]
               else "not measurable (nan): check the model")
    return (f"{describe(distance, args.task, 'the original')}; {verdict}\n"
            f"next: edgefuse finetune {args.out_dir} {args.out_dir.rstrip('/')}-recovered --task {args.task} "
            f"{data} {objective} --teacher {args.model} --max-steps 200")
