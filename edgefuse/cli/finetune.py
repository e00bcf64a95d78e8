"""``edgefuse finetune``: recover a fused model by a brief fine-tune and/or distillation, then fold and save."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from edgefuse.cli.options import Flag, add_flags, add_task, flag_values
from edgefuse.config.finetune import FINETUNE_TASKS, OBJECTIVES, DataConfig, FinetuneConfig

HELP = """Fine-tune a (fused) model briefly so that it gets back the original's accuracy, then fold the frozen
fusion scale into the weights and save it, ready for `edgefuse export`.

Objectives (alone or combined, each with a weight; config keys task_weight, logits_weight, hidden_weight):
  task    cross-entropy on the labels (classification) or next-token loss (causal-lm)
  logits  logit distillation: KL to the unfused teacher's logits at --temperature (no labels needed)
  hidden  layer-wise hidden-state distillation: MSE to the teacher's hidden states (layer-wise)

The frozen scale (the cluster sizes) is never trained. Data: .tsv/.csv/.jsonl/.txt files or hf:NAME[:CONFIG][@SPLIT].
Output: OUT_DIR/model (the saved model + tokenizer), OUT_DIR/finetune_result.json, OUT_DIR/checkpoints/.
Data-parallel: run the same command under `torchrun --nproc-per-node N -m edgefuse finetune ...`.

examples:
  # deployment order: fine-tuned model -> fuse -> brief recovery with distillation + labels
  edgefuse fuse ./sst2-model out/fused --keep-ratio 0.5 --task sequence-classification
  edgefuse finetune out/fused out/recovered --task sequence-classification \\
      --train data/sst2/train.tsv --validation data/sst2/validation.tsv \\
      --objective task --objective logits --teacher ./sst2-model --max-steps 200
  # causal LM on E2E, split by meaning representation, prompt = mr
  edgefuse finetune out/smol-fused out/smol-rec --task causal-lm --train data/e2e/devset.csv \\
      --validation-fraction 0.1 --group-column mr --prompt-column mr --text-column ref --max-steps 150
  # no labels: distil a fused sentence encoder on plain text
  edgefuse finetune out/minilm-fused out/minilm-rec --task feature-extraction --train corpus.txt \\
      --text-column text --objective hidden --teacher minilm --max-steps 100
"""

# the spellings of edgefuse 0.1's --objective, still accepted
OLD_OBJECTIVES = {"distill-logits": "logits", "distill-hidden": "hidden"}


# the DataConfig and FinetuneConfig keys this command sets (type, choices and help come from the configs)
DATA_FLAGS = (
    Flag("train"),
    Flag("validation"),
    Flag("validation_fraction"),
    Flag("group_column"),
    Flag("text_column"),
    Flag("text_pair_column"),
    Flag("label_column"),
    Flag("prompt_column"),
    Flag("loss_on_prompt"),
    Flag("max_length"),
    Flag("max_train_examples", metavar="N"),
    Flag("max_validation_examples", metavar="N"),
)
WEIGHT_FLAGS = (Flag("task_weight"), Flag("logits_weight"), Flag("hidden_weight"))
OBJECTIVE_FLAGS = (
    Flag("temperature"),
    Flag("hidden_layers", metavar="I"),
    Flag("trainable"),
)
OPTIM_FLAGS = (
    Flag("learning_rate", "--lr", aliases=("--learning-rate",)),
    Flag("weight_decay"),
    Flag("optimizer"),
    Flag("scheduler"),
    Flag("warmup_ratio"),
    Flag("max_grad_norm"),
    Flag("batch_size"),
    Flag("gradient_accumulation_steps", metavar="N"),
    Flag("max_steps"),
    Flag("epochs"),
    Flag("max_time_s"),
    Flag("group_by_length"),
    Flag("seed"),
)
EVAL_FLAGS = (
    Flag("eval_every_steps", "--eval-every", metavar="N"),
    Flag("eval_batch_size"),
    Flag("eval_before"),
    Flag("keep_best", both=True),
    Flag("checkpoint_every_steps", "--checkpoint-every", metavar="N"),
    Flag("num_samples"),
    Flag("log_every_steps", "--log-every", metavar="N"),
    Flag("generation_metric"),
    Flag("generation_prompts", metavar="N"),
    Flag("generation_max_new_tokens", metavar="N"),
)
QUANT_FLAGS = (
    Flag("quant_aware_bits", metavar="{4,8}"),
    Flag("quant_aware_block_size", metavar="N"),
)
FT_FLAGS = OBJECTIVE_FLAGS + OPTIM_FLAGS + EVAL_FLAGS + QUANT_FLAGS


def register(sub: Any) -> None:
    p = sub.add_parser(
        "finetune",
        help="recover a fused model: brief fine-tune / distillation, fold, save",
        description=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model folder (fused or not), Hub id, or built-in alias: minilm, smollm2")
    p.add_argument("out_dir", help="output folder: model/, finetune_result.json, checkpoints/")
    p.add_argument("--config", metavar="YAML", help="YAML with 'finetune:' and 'data:' sections; flags override it")
    p.add_argument("--print-config", action="store_true", help="print the equivalent YAML config and exit")
    g = p.add_argument_group("task and data")
    add_task(g, FINETUNE_TASKS, help="default: sequence-classification;")
    g.add_argument("--num-labels", type=int, default=None, help="classification head size (default: from the data)")
    add_flags(g, DataConfig, DATA_FLAGS)
    g.add_argument("--no-labels", action="store_true", help="unlabeled data: train with distillation objectives only")
    o = p.add_argument_group("objectives")
    o.add_argument(
        "--objective",
        action="append",
        choices=(*OBJECTIVES, *OLD_OBJECTIVES),
        metavar="{" + ",".join(OBJECTIVES) + "}",
        help="objective to use (repeatable); default: task. Each chosen one gets weight 1 unless its weight "
        "below is given; the others get 0",
    )
    add_flags(o, FinetuneConfig, WEIGHT_FLAGS + OBJECTIVE_FLAGS)
    o.add_argument("--teacher", help="the unfused teacher model (needed by the logits and hidden objectives)")
    add_flags(p.add_argument_group("optimisation and budget"), FinetuneConfig, OPTIM_FLAGS)
    add_flags(p.add_argument_group("quantization-aware training (for the int4 / int8-blocks graph)"),
              FinetuneConfig, QUANT_FLAGS)
    e = p.add_argument_group("evaluation, checkpoints, output")
    add_flags(e, FinetuneConfig, EVAL_FLAGS)
    e.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT_DIR")
    e.add_argument(
        "--fold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold the frozen scale into the weights before saving (default: on; --no-fold keeps it "
        "separate, for further training)",
    )
    e.add_argument("--fold-into", choices=("auto", "down", "up"), default="auto",
                   help="where to fold the scale: auto (the up projection where that is exact: gated MLPs, ReLU; "
                   "else the down projection, as the export does and as --quant-aware-bits assumes)")
    e.add_argument("--threads", type=int, help="torch intra-op threads")
    e.add_argument("--overwrite", action="store_true", help="replace OUT_DIR's model and checkpoints")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the folder/Hub")
    e.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


def build_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The (FinetuneConfig, DataConfig) that the YAML file and the flags describe (flags win).

    Raises:
        ConfigError: an invalid value or combination (the message names the key).
    """
    from pydantic import ValidationError

    from edgefuse.config.messages import first_error
    from edgefuse.errors import ConfigError

    ft: dict[str, Any] = {}
    data: dict[str, Any] = {}
    if args.config:
        from edgefuse.io_utils import read_yaml_mapping

        raw = read_yaml_mapping(Path(args.config))
        if set(raw) - {"finetune", "data"}:
            raise ConfigError(f"config {args.config!r} must hold only the sections 'finetune' and 'data'")
        ft, data = dict(raw.get("finetune") or {}), dict(raw.get("data") or {})
    data.update(flag_values(args, DATA_FLAGS))
    if args.no_labels:
        data["label_column"] = None
    ft.update(flag_values(args, FT_FLAGS))
    if args.task is not None:
        ft["task"] = args.task
    weights = flag_values(args, WEIGHT_FLAGS)
    if args.objective:
        chosen = {OLD_OBJECTIVES.get(o, o) for o in args.objective}
        weights = {key: weights.get(key, 1.0) if name in chosen else 0.0 for name, key in OBJECTIVES.items()}
    ft.update(weights)
    if "train" not in data:
        raise ConfigError("no training data: pass --train FILE (or data.train in --config)")
    try:
        return FinetuneConfig(**ft), DataConfig(**data)
    except ValidationError as exc:
        err = first_error(exc, "config")
        raise ConfigError(f"invalid finetune setting {err}") from None


def _check_output(out: Path, args: argparse.Namespace) -> None:
    import shutil

    from edgefuse.errors import ConfigError, OutputExistsError
    from edgefuse.finetune.checkpoint import CKPT_DIR

    ckpts = out / CKPT_DIR
    if args.overwrite:
        from edgefuse.io_utils import check_output_dir, is_marked

        # before any training: the model folder and every checkpoint must be edgefuse's to replace
        check_output_dir(out / "model", overwrite=True, inputs=[args.model])
        foreign = [p.name for p in (ckpts.iterdir() if ckpts.is_dir() else ()) if not is_marked(p)]
        if foreign or ckpts.is_symlink():
            raise OutputExistsError(
                f"refusing to delete {str(ckpts)!r} with --overwrite: edgefuse did not write "
                f"{', '.join(foreign[:3]) or 'it'}; give a new output folder"
            )
        shutil.rmtree(ckpts, ignore_errors=True)
        return
    if args.resume:
        if not ckpts.is_dir():
            raise ConfigError(f"--resume given but {str(ckpts)!r} holds no checkpoint; drop --resume to start anew")
        return
    if (out / "model").exists() or (ckpts.is_dir() and any(ckpts.iterdir())):
        raise OutputExistsError(
            f"output folder {str(out)!r} already holds a model or checkpoints; pass --resume to continue or --overwrite"
        )


def run(args: argparse.Namespace) -> int:
    ft_cfg, data_cfg = build_configs(args)
    if args.print_config:
        import yaml

        print(yaml.safe_dump({"finetune": ft_cfg.model_dump(), "data": data_cfg.model_dump()}, sort_keys=False), end="")
        return 0
    import torch

    from edgefuse.export.api import resolve_fold
    from edgefuse.finetune.api import finetune_
    from edgefuse.finetune.data import load_finetune_data
    from edgefuse.fusion.persist import save_fused
    from edgefuse.fusion.scale import fold_scales_
    from edgefuse.io_utils import write_json_atomic
    from edgefuse.models import load_model, load_tokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out_dir)
    _check_output(out, args)
    tok = load_tokenizer(args.model, trust_remote_code=args.trust_remote_code)
    data = load_finetune_data(data_cfg, tok, ft_cfg.task)
    kwargs: dict[str, Any] = {"trust_remote_code": args.trust_remote_code}
    if ft_cfg.task == "sequence-classification":
        kwargs["num_labels"] = args.num_labels or len(data.label_names or []) or 2
    torch.manual_seed(ft_cfg.seed)  # a freshly initialised head is seeded
    model = load_model(args.model, ft_cfg.task, **kwargs)
    teacher = load_model(args.teacher, ft_cfg.task, **kwargs) if args.teacher else None
    # resolved before training: an impossible fold ('up' on a GELU MLP) must not cost a training run
    into = resolve_fold(model, args.fold_into) if args.fold else "keep"
    result = finetune_(
        model,
        ft_cfg,
        data,
        teacher=teacher,
        tokenizer=tok,
        output_dir=out,
        resume=args.resume,
        progress=not args.no_progress,
    )
    if result.world_size > 1 and _rank() != 0:
        return 0
    folded = fold_scales_(model, into=into) if into in ("down", "up") else 0
    save_fused(model, out / "model", tokenizer=tok, overwrite=True)
    summary = {
        **result.to_dict(),
        "folded_scales": folded,
        "model_dir": str(out / "model"),
        "finetune_config": ft_cfg.model_dump(),
        "data_config": data_cfg.model_dump(),
    }
    write_json_atomic(out / "finetune_result.json", summary)
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        _print_summary(result, out, folded)
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _print_summary(result: Any, out: Path, folded: int) -> None:
    metrics = ", ".join(f"{k} {v:.4f}" for k, v in result.final_metrics.items() if k not in ("examples", "tokens"))
    print(
        f"finetuned {result.steps_run} step(s) in {result.train_seconds:.1f} s "
        f"({result.examples_per_second:.1f} examples/s, stopped by {result.stopped_by})"
    )
    before = ", ".join(f"{k} {v:.4f}" for k, v in result.initial_metrics.items() if k not in ("examples", "tokens"))
    if before:
        print(f"validation before: {before}")
    if metrics:
        print(f"validation: {metrics}")
    for s in result.samples:
        print(f"  prompt: {s['prompt'].strip()}\n  greedy: {s['generated']}")
    note = (
        f"{folded} scale(s) folded"
        if folded
        else "scales kept separate (--no-fold)"
        if result.frozen_scale_entries
        else "unfused model"
    )
    print(f"saved {out / 'model'} ({note}); details in {out / 'finetune_result.json'}", file=sys.stdout)
