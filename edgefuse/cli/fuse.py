"""``edgefuse fuse``: compress the MLPs of a model and save it (or print the plan with --dry-run)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from edgefuse.config.fusion import METHODS

HELP = """Compress the MLP (feed-forward) layers of a model by MLP fusion or a baseline, and save it as safetensors.

Every MLP is a sum of width-1 sub-MLPs; `fusion` clusters them with k-means into k centroids and keeps the
cluster sizes as a frozen scale, which preserves the output and the Adam NTK (fine-tuning dynamics).

examples:
  edgefuse fuse minilm out/minilm-fused --keep-ratio 0.5
  edgefuse fuse minilm out/x --keep-ratio 0.25 --layers 2 3 4 5 --dry-run
  edgefuse fuse ./my-llama out/llama-fused --width 2048 --round-to 64 --target 're:layers\\.(1[6-9]|2\\d)\\.mlp$'
  edgefuse fuse smollm2 out/smol --keep-ratio 0.5 --method prune --fold
"""


def register(sub: Any) -> None:
    p = sub.add_parser("fuse", help="compress MLPs by fusion (or a baseline) and save", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model folder, Hub id, or built-in alias: minilm, smollm2")
    p.add_argument("out_dir", nargs="?", help="output folder (required unless --dry-run)")
    width = p.add_mutually_exclusive_group(required=True)
    width.add_argument("--keep-ratio", type=float, help="fraction of the intermediate width to keep, 0 < r <= 1")
    width.add_argument("--width", type=int, help="absolute target intermediate width")
    p.add_argument("--method", choices=METHODS, default="fusion", help="default: fusion (the method)")
    p.add_argument("--round-to", type=int, default=1, metavar="N", help="round the width up to a multiple of N")
    p.add_argument("--layers", type=int, nargs="+", metavar="I", help="layer indices to fuse (default: all)")
    p.add_argument("--target", action="append", metavar="NAME", dest="targets",
                   help="MLP module name to fuse; 're:' prefix for a regex (repeatable)")
    p.add_argument("--no-shared-experts", action="store_true", help="Qwen2-MoE: leave the shared expert alone")
    p.add_argument("--task", default="feature-extraction",
                   choices=("feature-extraction", "sequence-classification", "causal-lm"),
                   help="model head to load (default: feature-extraction)")
    p.add_argument("--seed", type=int, default=0, help="k-means seed (default 0)")
    p.add_argument("--n-init", type=int, default=1, help="k-means restarts (default 1; the paper used 30)")
    p.add_argument("--pool", type=float, default=1.25,
                   help="fusion-pruned: keep round(POOL * width) most important units, fuse them (default 1.25)")
    p.add_argument("--importance", choices=("weights", "activations"), default="weights",
                   help="fusion-pruned: rank units by weight norms or by activations on the built-in corpus")
    p.add_argument("--fold", action="store_true",
                   help="fold the frozen scale into the weights before saving (for inference/export, not training)")
    p.add_argument("--dry-run", action="store_true", help="print the plan (widths, parameters) and write nothing")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the folder/Hub")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


def format_plan(result: Any) -> str:
    """A table of the fusion plan/result: per MLP its name, width and parameters before -> after, and totals."""
    rows = [("MLP", "width", "params")]
    for s in result.steps:
        rows.append((s.name, f"{s.width_before} -> {s.width_after}", f"{s.params_before:,} -> {s.params_after:,}"))
    rows.append(("MLPs total", f"{len(result.steps)} fused", f"{result.mlp_params_before:,} -> {result.mlp_params_after:,}"))
    pct = 100.0 * (1 - result.params_total_after / result.params_total_before)
    rows.append(("model total", "", f"{result.params_total_before:,} -> {result.params_total_after:,} (-{pct:.1f}%)"))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{result.method} on {result.model_type}"]
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if i == 0 or i == len(rows) - 3:
            lines.append("  ".join("-" * w for w in widths))
    scale = sum(s.frozen_scale_entries for s in result.steps)
    if scale:
        lines.append(f"+ {scale:,} frozen scale entries (buffers, not trained; folded before export)")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edgefuse.config.fusion import FusionConfig
    from edgefuse.config.messages import first_error
    from edgefuse.errors import ConfigError

    if not args.dry_run and not args.out_dir:
        raise ConfigError("OUT_DIR is required unless --dry-run is given")
    try:
        cfg = FusionConfig(
            method=args.method, keep_ratio=args.keep_ratio, width=args.width, round_to=args.round_to,
            layers=args.layers, targets=args.targets, include_shared_experts=not args.no_shared_experts,
            seed=args.seed, n_init=args.n_init, pool=args.pool, importance=args.importance,
        )
    except ValidationError as exc:
        raise first_error(exc, "fusion") from None

    from edgefuse.fusion.api import fuse_mlps_, plan_fusion
    from edgefuse.models import has_tokenizer, load_model, load_tokenizer

    model = load_model(args.model, args.task, trust_remote_code=args.trust_remote_code)
    if args.dry_run:
        result = plan_fusion(model, cfg)
    else:
        from edgefuse.fusion.persist import save_fused
        from edgefuse.fusion.scale import fold_scales_

        if not args.overwrite:
            from pathlib import Path

            from edgefuse.errors import OutputExistsError

            if Path(args.out_dir).exists():
                raise OutputExistsError(f"output folder {args.out_dir!r} already exists; pass --overwrite to replace it")
        tokenizer = (
            load_tokenizer(args.model, trust_remote_code=args.trust_remote_code) if has_tokenizer(args.model) else None
        )
        result = fuse_mlps_(model, cfg, progress=sys.stderr.isatty(), tokenizer=tokenizer)
        if args.fold:
            fold_scales_(model)
        save_fused(model, args.out_dir, tokenizer=tokenizer, overwrite=args.overwrite)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_plan(result))
        if not args.dry_run:
            print(f"fused in {result.seconds:.1f} s; saved to {args.out_dir}")
    return 0
