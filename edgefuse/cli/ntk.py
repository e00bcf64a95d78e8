"""``edgefuse ntk``: how well a compressed model keeps the original's outputs and empirical (Adam) NTK."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, get_args

from edgefuse.cli.options import Flag, add_flags, add_task, flag_values, format_table
from edgefuse.config.fusion import FusionConfig
from edgefuse.config.ntk import NTK_PROTOCOLS, NtkConfig
from edgefuse.models import Task

# the FusionConfig keys of in-memory compression and the NtkConfig keys (type, choices, help from the configs)
WIDTH_FLAGS = (Flag("keep_ratio", metavar="R"), Flag("width", metavar="K"))
FUSION_FLAGS = (Flag("method"), Flag("layers", metavar="I"), Flag("seed"), Flag("n_init"))
NTK_FLAGS = (
    Flag("n_examples", "--n", metavar="N"),
    Flag("max_length"),
    Flag("params"),
    Flag("modules", metavar="NAME"),
    Flag("output"),
    Flag("head_seed"),
    Flag("max_gradient_mib", metavar="MIB"),
)

HELP = """Measure, right after compression, the relative errors of a compressed model against its original:
the Adam/SignGD kernel K = G sign(G)^T and the GD kernel G G^T of the per-example gradients G of a scalar
output, the final hidden states and each fused layer's output.

Compare a saved compressed folder with its original, or compress a copy of the original in memory with
--keep-ratio/--width (and --method). The random head (classification head, or the projection vector of a base
model) is the same for both models.

examples:
  edgefuse ntk minilm --keep-ratio 0.5 --data data/sst2/validation.tsv --n 64
  edgefuse ntk minilm --keep-ratio 0.25 --method merge --params all --data data/sst2/validation.tsv --json
  edgefuse ntk minilm out/minilm-fused --data data/sst2/validation.tsv --out ntk.json
  # the authors' check: upper two thirds fused (n_init 30), class-0 probability, kernel over layer 0's MLP
  edgefuse ntk minilm --protocol paper --keep-ratio 0.25 --data data/sst2/validation.tsv
"""


def register(sub: Any) -> None:
    p = sub.add_parser("ntk", help="kernel (NTK) and output errors of a compressed model vs its original",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("original", help="original model folder, Hub id, or built-in alias: minilm, smollm2")
    p.add_argument("compressed", nargs="?", help="compressed model folder (or compress in memory with --keep-ratio)")
    g = p.add_argument_group("in-memory compression (instead of COMPRESSED)")
    add_flags(g.add_mutually_exclusive_group(), FusionConfig, WIDTH_FLAGS)
    add_flags(g, FusionConfig, FUSION_FLAGS)
    p.add_argument("--data", required=True, help="examples: a .tsv/.csv/.jsonl file (e.g. SST-2 validation)")
    p.add_argument("--text-column", help="column with the text (default: 'sentence' if present, else the first)")
    p.add_argument("--label-column", help="column with integer labels, for --output gold-logit (default: 'label')")
    add_flags(p, NtkConfig, NTK_FLAGS)
    add_task(p, get_args(Task), help="model head to load (default feature-extraction; --protocol paper: "
             "sequence-classification);")
    p.add_argument("--protocol", choices=NTK_PROTOCOLS, default="custom",
                   help="paper: the authors' check (docs/ntk.md): fuse the upper two thirds with n_init 30, "
                   "class0-prob of a random head, kernel over the lowest (unfused) MLP; flags given override it")
    p.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the folder/Hub")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("-o", "--out", help="also write the result as JSON to this file (atomically)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(run=run)


def format_result(result: Any) -> str:
    """A table: per fused layer and in total, the sign/GD kernel errors and the hidden-state error."""
    rows = []
    for k in result.per_layer:
        rows.append((k.group, f"{k.params_original:,} -> {k.params_compressed:,}", f"{k.sign_rel_error:.4g}",
                     f"{k.gd_rel_error:.4g}", f"{result.layer_hidden_rel_error[k.group]:.4g}"))
    totals = [result.fused_mlp] if result.fused_mlp is not None else []
    if result.param_set != "fused-mlp":  # all, modules: the whole set's kernel
        totals.append(result.kernel)
    for k in totals:
        rows.append((k.group, f"{k.params_original:,} -> {k.params_compressed:,}", f"{k.sign_rel_error:.4g}",
                     f"{k.gd_rel_error:.4g}", ""))
    header = ("group", "params orig -> comp", "sign-K rel err", "GD-K rel err", "hidden rel err")
    lines = [f"NTK over {result.n_examples} examples, output {result.output}, parameters {result.param_set}",
             format_table(rows, header=header, rules=(len(rows) - len(totals) - 1,))]
    lines.append(f"scalar output rel err {result.output_rel_error:.4g}; final hidden state rel err "
                 f"{result.final_hidden_rel_error:.4g}  ({result.seconds:.1f} s)")
    return "\n".join(lines)


def _examples(args: argparse.Namespace, n: int) -> tuple[list[str], list[int] | None]:
    from edgefuse.errors import DataError
    from edgefuse.finetune.data import check_columns, read_records

    rows = read_records(args.data)
    columns = list(rows[0].keys())
    text_col = args.text_column or ("sentence" if "sentence" in columns else columns[0])
    check_columns(rows, [text_col], args.data)
    if len(rows) < n:
        raise DataError(f"data file {args.data!r} has {len(rows)} rows but --n is {n}; lower --n")
    rows = rows[:n]
    label_col = args.label_column or ("label" if "label" in columns else None)
    labels = None
    if label_col is not None:
        check_columns(rows, [label_col], args.data)
        raw = [str(r[label_col]).strip() for r in rows]
        if all(v.lstrip("-").isdigit() for v in raw):
            labels = [int(v) for v in raw]
        elif args.output == "gold-logit":
            raise DataError(
                f"label column {label_col!r} holds non-integer labels (e.g. {raw[0]!r}); gold-logit needs 0..C-1"
            )
    return [str(r[text_col]) for r in rows], labels


def _share_missing_head(original: Any, compressed: Any, folder: str) -> list[str]:
    """Copy into ``compressed`` the original's values of the parameters its folder did not hold (a random head
    initialised at load time): both models must share the head."""
    from safetensors import safe_open

    saved: set[str] = set()
    for f in Path(folder).glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            saved.update(fh.keys())
    prefix = getattr(compressed, "base_model_prefix", "") + "."
    orig = dict(original.named_parameters())
    copied = []
    for name, p in compressed.named_parameters():
        if name in saved or name.removeprefix(prefix) in saved:
            continue
        src = orig.get(name)
        if src is not None and src.shape == p.shape:
            p.data.copy_(src.data)
            copied.append(name)
    return copied


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from edgefuse.config.messages import first_error
    from edgefuse.errors import ConfigError, OutputExistsError

    in_memory = args.keep_ratio is not None or args.width is not None
    if args.compressed is not None and (in_memory or args.method is not None or args.layers is not None):
        raise ConfigError("give either a COMPRESSED folder or --keep-ratio/--width (with --method, --layers), not both")
    if args.compressed is None and not in_memory:
        raise ConfigError("give a COMPRESSED folder, or --keep-ratio/--width to compress the original in memory")
    if args.out and Path(args.out).exists() and not args.overwrite:
        raise OutputExistsError(f"output file {args.out!r} already exists; pass --overwrite to replace it")
    paper = args.protocol == "paper"
    args.task = args.task or ("sequence-classification" if paper else "feature-extraction")
    if paper and args.task != "sequence-classification":
        raise ConfigError(f"--protocol paper measures a classification head; drop --task {args.task}")
    given = flag_values(args, NTK_FLAGS)
    if given.get("modules") and given.get("params") not in (None, "modules"):
        raise ConfigError(f"--modules needs --params modules (got --params {given.get('params')})")
    texts, labels = _examples(args, given.get("n_examples", NtkConfig.model_fields["n_examples"].default))

    import copy
    import logging

    import torch

    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.models import load_model, load_tokenizer
    from edgefuse.ntk.api import measure_ntk

    tok = load_tokenizer(args.original, trust_remote_code=args.trust_remote_code)
    # seeded loads: a head that the checkpoint lacks is initialised the same way in both models
    torch.manual_seed(given.get("head_seed", NtkConfig.model_fields["head_seed"].default))
    original = load_model(args.original, args.task, trust_remote_code=args.trust_remote_code)
    defaults: dict[str, Any] = {"n_init": 1, "output": "auto", "layers": None, "modules": None}
    if paper:
        from edgefuse.ntk.protocol import paper_defaults

        defaults = paper_defaults(original)
    params = given.get("params")
    modules = given.get("modules") or (defaults["modules"] if params in (None, "modules") else None)
    try:
        cfg = NtkConfig(**{**given, "params": params or ("modules" if modules else "fused-mlp"), "modules": modules,
                           "output": given.get("output") or defaults["output"]})
        fcfg = FusionConfig(**{"layers": defaults["layers"], "n_init": defaults["n_init"],
                               **flag_values(args, WIDTH_FLAGS + FUSION_FLAGS)}) if in_memory else None
    except ValidationError as exc:
        raise first_error(exc, "ntk") from None
    if getattr(original.config, "is_encoder_decoder", False):
        raise ConfigError("encoder-decoder models need decoder inputs: use edgefuse.ntk.api.measure_ntk from Python")
    if fcfg is not None:
        compressed = copy.deepcopy(original)  # same head, same everything but the MLPs
        fuse_mlps_(compressed, fcfg)
    else:
        torch.manual_seed(cfg.head_seed)
        compressed = load_model(args.compressed, args.task, trust_remote_code=args.trust_remote_code)
        shared = _share_missing_head(original, compressed, args.compressed)
        if shared:
            logging.getLogger(__name__).info("using the original's values for %s (absent from %s)", shared,
                                             args.compressed)
    batch = tok(texts, truncation=True, max_length=cfg.max_length, padding=True, return_tensors="pt")
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
    result = measure_ntk(original, compressed, inputs, cfg, labels=labels)
    payload = {"original": args.original, "compressed": args.compressed, "protocol": args.protocol,
               "fusion": None if fcfg is None else fcfg.model_dump(), "ntk": cfg.model_dump(), "data": args.data,
               "result": result.to_dict()}
    if args.out:
        from edgefuse.io_utils import write_json_atomic

        write_json_atomic(Path(args.out), payload)
    print(json.dumps(payload, indent=2) if args.json else format_result(result))
    return 0
