"""``edgefuse finetune``: recover a fused model by a brief fine-tune and/or distillation, then fold and save."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HELP = """Fine-tune a (fused) model briefly so that it gets back the original's accuracy, then fold the frozen
fusion scale into the weights and save it, ready for `edgefuse export`.

Objectives (alone or combined, each with a weight):
  task            cross-entropy on the labels (classification) or next-token loss (causal-lm)
  distill-logits  KL to the unfused teacher's logits at --temperature (no labels needed)
  distill-hidden  layer-wise MSE to the teacher's hidden states (no labels needed)

The frozen scale (the cluster sizes) is never trained. Data: .tsv/.csv/.jsonl/.txt files or hf:NAME[:CONFIG][@SPLIT].
Output: OUT_DIR/model (the saved model + tokenizer), OUT_DIR/finetune_result.json, OUT_DIR/checkpoints/.
Data-parallel: run the same command under `torchrun --nproc-per-node N -m edgefuse finetune ...`.

examples:
  # deployment order: fine-tuned model -> fuse -> brief recovery with distillation + labels
  edgefuse fuse ./sst2-model out/fused --keep-ratio 0.5 --task sequence-classification
  edgefuse finetune out/fused out/recovered --task sequence-classification \\
      --train data/sst2/train.tsv --validation data/sst2/validation.tsv \\
      --objective task --objective distill-logits --teacher ./sst2-model --max-steps 200
  # causal LM on E2E, split by meaning representation, prompt = mr
  edgefuse finetune out/smol-fused out/smol-rec --task causal-lm --train data/e2e/devset.csv \\
      --validation-fraction 0.1 --group-column mr --prompt-column mr --text-column ref --max-steps 150
  # no labels: distil a fused sentence encoder on plain text
  edgefuse finetune out/minilm-fused out/minilm-rec --task feature-extraction --train corpus.txt \\
      --text-column text --objective distill-hidden --teacher minilm --max-steps 100
"""

OBJECTIVES = ("task", "distill-logits", "distill-hidden")


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
    g.add_argument(
        "--task",
        choices=("sequence-classification", "causal-lm", "feature-extraction"),
        help="default: sequence-classification",
    )
    g.add_argument("--num-labels", type=int, default=None, help="classification head size (default: from the data)")
    g.add_argument("--train", help="training data: .tsv/.csv/.jsonl/.txt file or hf:NAME[:CONFIG][@SPLIT]")
    g.add_argument("--validation", help="validation data (same forms)")
    g.add_argument("--validation-fraction", type=float, help="hold out this fraction of --train for validation")
    g.add_argument("--group-column", help="keep rows with the same value of this column on one side of the split")
    g.add_argument("--text-column", help="input text column (default: sentence)")
    g.add_argument("--text-pair-column", help="second text column for sentence-pair classification")
    g.add_argument("--label-column", help="label column (default: label)")
    g.add_argument("--no-labels", action="store_true", help="unlabeled data: train with distillation objectives only")
    g.add_argument("--prompt-column", help="causal-lm: column placed before the text (e.g. mr for E2E)")
    g.add_argument("--max-length", type=int, help="truncate sequences to this many tokens (default 128)")
    g.add_argument("--max-train-examples", type=int, help="use only the first N training rows")
    g.add_argument("--max-validation-examples", type=int, help="use only the first N validation rows")
    o = p.add_argument_group("objectives")
    o.add_argument(
        "--objective",
        action="append",
        choices=OBJECTIVES,
        help="objective to use (repeatable); default: task. Weights below (default 1 each)",
    )
    o.add_argument("--task-weight", type=float)
    o.add_argument("--logits-weight", type=float)
    o.add_argument("--hidden-weight", type=float)
    o.add_argument("--temperature", type=float, help="logit distillation temperature (default 2)")
    o.add_argument("--hidden-layers", type=int, nargs="+", metavar="I", help="hidden-state indices to match")
    o.add_argument("--teacher", help="the unfused teacher model (needed by the distill-* objectives)")
    o.add_argument("--trainable", choices=("all", "fused-mlps"), help="what is trained (default: all)")
    t = p.add_argument_group("optimisation and budget")
    t.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, help="peak learning rate (5e-5)")
    t.add_argument("--weight-decay", type=float)
    t.add_argument("--optimizer", choices=("adamw", "adam"))
    t.add_argument("--scheduler", choices=("linear", "cosine", "constant"))
    t.add_argument("--warmup-ratio", type=float)
    t.add_argument("--max-grad-norm", type=float)
    t.add_argument("--batch-size", type=int, help="examples per step per process (default 16)")
    t.add_argument("--gradient-accumulation-steps", type=int)
    t.add_argument("--max-steps", type=int, help="optimiser steps")
    t.add_argument("--epochs", type=float, help="passes over the data, when --max-steps is not given")
    t.add_argument("--max-time-s", type=float, help="wall-clock budget in seconds")
    t.add_argument("--group-by-length", action="store_true", default=None, help="batch similar lengths together")
    t.add_argument("--seed", type=int)
    e = p.add_argument_group("evaluation, checkpoints, output")
    e.add_argument("--eval-every", dest="eval_every_steps", type=int, help="evaluate every N steps (and at the end)")
    e.add_argument("--eval-batch-size", type=int)
    e.add_argument("--eval-before", action="store_true", default=None, help="also evaluate before training")
    e.add_argument(
        "--keep-best",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="restore the best evaluated weights at the end (default: on)",
    )
    e.add_argument(
        "--checkpoint-every", dest="checkpoint_every_steps", type=int, help="write a resumable checkpoint every N steps"
    )
    e.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in OUT_DIR")
    e.add_argument("--num-samples", type=int, help="causal-lm: greedy samples to print (default 3)")
    e.add_argument("--log-every", dest="log_every_steps", type=int, help="record the loss every N steps (default 10)")
    e.add_argument(
        "--fold",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="fold the frozen scale into the weights before saving (default: on; --no-fold keeps it "
        "separate, for further training)",
    )
    e.add_argument("--fold-into", choices=("down", "up"), default="down", help="where to fold the scale")
    e.add_argument("--threads", type=int, help="torch intra-op threads")
    e.add_argument("--overwrite", action="store_true", help="replace OUT_DIR's model and checkpoints")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.add_argument("--trust-remote-code", action="store_true", help="allow custom model code from the folder/Hub")
    e.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.set_defaults(run=run)


_DATA_FLAGS = (
    "train",
    "validation",
    "validation_fraction",
    "group_column",
    "text_column",
    "text_pair_column",
    "label_column",
    "prompt_column",
    "max_length",
    "max_train_examples",
    "max_validation_examples",
)
_FT_FLAGS = (
    "task",
    "temperature",
    "hidden_layers",
    "trainable",
    "learning_rate",
    "weight_decay",
    "optimizer",
    "scheduler",
    "warmup_ratio",
    "max_grad_norm",
    "batch_size",
    "gradient_accumulation_steps",
    "max_steps",
    "epochs",
    "max_time_s",
    "group_by_length",
    "seed",
    "eval_every_steps",
    "eval_batch_size",
    "eval_before",
    "keep_best",
    "checkpoint_every_steps",
    "num_samples",
    "log_every_steps",
)


def build_configs(args: argparse.Namespace) -> tuple[Any, Any]:
    """The (FinetuneConfig, DataConfig) that the YAML file and the flags describe (flags win).

    Raises:
        ConfigError: an invalid value or combination (the message names the key).
    """
    import yaml
    from pydantic import ValidationError

    from edgefuse.config.finetune import DataConfig, FinetuneConfig
    from edgefuse.config.messages import first_error
    from edgefuse.errors import ConfigError, TargetNotFoundError

    ft: dict[str, Any] = {}
    data: dict[str, Any] = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise TargetNotFoundError(f"config file {args.config!r} does not exist")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict) or set(raw) - {"finetune", "data"}:
            raise ConfigError(f"config {args.config!r} must hold only the sections 'finetune' and 'data'")
        ft, data = dict(raw.get("finetune") or {}), dict(raw.get("data") or {})
    data.update({k: getattr(args, k) for k in _DATA_FLAGS if getattr(args, k) is not None})
    if args.no_labels:
        data["label_column"] = None
    ft.update({k: getattr(args, k) for k in _FT_FLAGS if getattr(args, k) is not None})
    if args.objective:
        chosen = set(args.objective)
        ft["task_weight"] = (args.task_weight if args.task_weight is not None else 1.0) if "task" in chosen else 0.0
        ft["logits_weight"] = (
            (args.logits_weight if args.logits_weight is not None else 1.0) if "distill-logits" in chosen else 0.0
        )
        ft["hidden_weight"] = (
            (args.hidden_weight if args.hidden_weight is not None else 1.0) if "distill-hidden" in chosen else 0.0
        )
    else:
        for key in ("task_weight", "logits_weight", "hidden_weight"):
            if getattr(args, key) is not None:
                ft[key] = getattr(args, key)
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
    folded = fold_scales_(model, into=args.fold_into) if args.fold else 0
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
