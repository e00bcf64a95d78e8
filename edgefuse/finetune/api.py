"""Recovery: the brief fine-tune (or distillation from the unfused teacher) after fusion.

:func:`finetune_` trains a model in place with the task loss, logit distillation and/or layer-wise hidden-state
distillation, with AdamW, warm-up and decay, gradient clipping, a step and/or wall-clock budget,
periodic evaluation that keeps the best weights, atomic resumable checkpoints, and data parallelism under
``torchrun``. The frozen fusion scale is a buffer: it is never an optimiser parameter and never changes. After
training, fold it with :func:`edgefuse.fusion.scale.fold_scales_` and save with
:func:`edgefuse.fusion.persist.save_fused`.

Example:
    >>> import torch
    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> from edgefuse.config.finetune import FinetuneConfig
    >>> from edgefuse.finetune.data import FinetuneData, TokenizedSplit
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = BertForSequenceClassification(BertConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1,
    ...                                                  num_attention_heads=2, intermediate_size=16))
    >>> split = TokenizedSplit(input_ids=[[1, 2, 3], [4, 5], [6, 7, 8], [9, 3]], labels=[0, 1, 0, 1])
    >>> data = FinetuneData("sequence-classification", split, split, pad_token_id=0)
    >>> result = finetune_(model, FinetuneConfig(max_steps=3, batch_size=2), data, progress=False)
    >>> result.steps_run, "accuracy" in result.final_metrics
    (3, True)
"""

from __future__ import annotations

import logging
import resource
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgefuse.config.finetune import OBJECTIVES, DataConfig, FinetuneConfig
from edgefuse.errors import ConfigError, DataError, UnsupportedArchitectureError
from edgefuse.finetune.data import FinetuneData, load_finetune_data
from edgefuse.finetune.evaluate import greedy_samples, main_metric
from edgefuse.finetune.loop import run_loop
from edgefuse.finetune.setup import init_distributed
from edgefuse.fusion.scale import get_scale, iter_scaled

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneResult:
    """What :func:`finetune_` did. Units are in the field names; no model inside."""

    task: str
    objective_weights: dict[str, float]
    steps_run: int
    total_steps: int
    stopped_by: str  # "max_steps" or "max_time_s"
    resumed_from_step: int | None
    world_size: int
    global_batch_size: int
    examples_seen: int
    train_seconds: float
    seconds_per_step: float
    examples_per_second: float
    trainable_params: int
    frozen_scale_entries: int
    final_train_loss: float | None
    loss_curve: tuple[tuple[int, float], ...]
    eval_history: tuple[dict[str, float], ...]
    best_metric_name: str
    best_metric: float | None
    best_step: int | None
    best_restored: bool
    final_metrics: dict[str, float]
    initial_metrics: dict[str, float]  # before the first step (only with eval_before)
    samples: tuple[dict[str, str], ...]
    peak_rss_mib: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict."""
        return asdict(self)


def _peak_rss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # macOS reports bytes, Linux KiB


def _prepare_model(model: nn.Module, cfg: FinetuneConfig, teacher: nn.Module | None) -> None:
    """Checks and MoE handling before the optimiser is built."""
    if cfg.needs_teacher and teacher is None:
        raise ConfigError(
            "a distillation objective (logits_weight/hidden_weight > 0) needs a teacher model: pass teacher= "
            "(CLI: --teacher MODEL), usually the unfused model"
        )
    head = type(model).__name__
    if cfg.task == "sequence-classification" and not head.endswith("ForSequenceClassification"):
        raise ConfigError(
            f"task sequence-classification needs a model with a classification head, got {head}; load it with "
            "task='sequence-classification'"
        )
    can_generate = getattr(model, "can_generate", None)
    if cfg.task == "causal-lm" and not (callable(can_generate) and can_generate()):
        raise ConfigError(f"task causal-lm needs a model with an LM head, got {head}; load it with task='causal-lm'")
    from edgefuse.fusion.api import freeze_routers_
    from edgefuse.fusion.sites import model_arch

    try:
        is_moe = model_arch(model).is_moe
    except UnsupportedArchitectureError:  # no fusion adapter: still fine-tunable, just never fused
        is_moe = False
    if is_moe:
        # routers stay frozen and their auxiliary losses off
        freeze_routers_(model)
        for obj in (model, model.config):
            for attr in ("router_aux_loss_coef", "router_z_loss_coef"):
                if hasattr(obj, attr):
                    setattr(obj, attr, 0.0)
        if hasattr(model.config, "output_router_logits"):
            model.config.output_router_logits = False


def _check_labels(model: nn.Module, data: FinetuneData) -> None:
    if data.task != "sequence-classification" or data.train.labels is None:
        return
    n_labels = int(getattr(model.config, "num_labels", 0))
    needed = max(data.train.labels) + 1
    if needed > n_labels:
        raise DataError(
            f"the training data has {needed} classes but the model's head has {n_labels} outputs; load the model "
            f"with num_labels={needed} (CLI: --num-labels {needed})"
        )


def finetune_(
    model: nn.Module,
    cfg: FinetuneConfig,
    data: FinetuneData | DataConfig,
    *,
    teacher: nn.Module | None = None,
    tokenizer: Any = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> FinetuneResult:
    """Fine-tune ``model`` in place (recovery after fusion, or plain fine-tuning) and return what happened.

    Args:
        model: a transformers model with a classification head (``task="sequence-classification"``) or an LM
            head (``causal-lm``), fused or not. MoE routers are frozen.
        cfg: objectives, optimiser, schedule, budget, evaluation and checkpoint settings.
        data: tokenized data (:func:`edgefuse.data.load_finetune_data`) or a :class:`DataConfig` to load with
            ``tokenizer``.
        teacher: the frozen unfused model, needed by the distillation objectives; it is never changed.
        tokenizer: needed to load a :class:`DataConfig` and for greedy samples (causal LM).
        output_dir: where checkpoints (``checkpoints/step-*``) and the best weights (``checkpoints/best``) go.
            None keeps the best weights in memory and writes nothing.
        resume: continue from the newest checkpoint in ``output_dir`` (same settings required); with the same
            seed the result equals an uninterrupted run.
        progress: show a progress bar with the loss and examples per second (rank 0 only).

    Returns:
        A :class:`FinetuneResult`. At the end the model holds the best evaluated weights (``keep_best``), in eval
        mode, with its frozen scales untouched.

    Raises:
        ConfigError: missing teacher, no trainable parameter, a checkpoint that does not fit.
        DataError: data that does not fit the task or the model (e.g. more classes than the head has).

    Example (the skipped lines are not run: needs a fine-tuned teacher and minutes of CPU):
        >>> from edgefuse.models import load_model, load_tokenizer  # doctest: +SKIP
        >>> from edgefuse.fusion.api import fuse_mlps_  # doctest: +SKIP
        >>> from edgefuse.config.fusion import FusionConfig  # doctest: +SKIP
        >>> teacher = load_model("./sst2-teacher", "sequence-classification")  # doctest: +SKIP
        >>> student = load_model("./sst2-teacher", "sequence-classification")  # doctest: +SKIP
        >>> _ = fuse_mlps_(student, FusionConfig(keep_ratio=0.5))  # doctest: +SKIP
        >>> cfg = FinetuneConfig(max_steps=200, logits_weight=1.0, hidden_weight=0.1)  # doctest: +SKIP
        >>> data = DataConfig(train="train.tsv", validation="validation.tsv")  # doctest: +SKIP
        >>> finetune_(student, cfg, data, teacher=teacher, tokenizer=load_tokenizer("./sst2-teacher"))  # doctest: +SKIP
    """
    if isinstance(data, DataConfig):
        if tokenizer is None:
            raise ConfigError("data given as a DataConfig needs tokenizer= to tokenize it")
        data = load_finetune_data(data, tokenizer, cfg.task)
    if data.task != cfg.task:
        raise ConfigError(f"the data was prepared for task {data.task!r} but the config says {cfg.task!r}")
    _prepare_model(model, cfg, teacher)
    _check_labels(model, data)
    if cfg.task == "sequence-classification" and cfg.task_weight > 0 and data.train.labels is None:
        raise DataError("the task loss needs labels; set the label column, or use only distillation objectives")
    # checked before training, not at the first evaluation
    if cfg.generation_metric and (
        tokenizer is None or data.validation is None or not all(data.validation.prompts or [""])
    ):
        raise ConfigError(
            f"generation_metric {cfg.generation_metric!r} needs tokenizer=, validation data and a prompt "
            "column to generate from (E2E: data.prompt_column 'mr', data.validation_fraction 0.1)"
        )
    scales = {name: get_scale(m).clone() for name, m in iter_scaled(model)}  # type: ignore[union-attr]
    ctx = init_distributed()
    # trainable="fused-mlps" and the frozen teacher change requires_grad; the caller gets its flags back
    # (frozen MoE routers were frozen above on purpose and stay so)
    flags = [(p, p.requires_grad) for m in (model, teacher) if m is not None for p in m.parameters()]
    if cfg.quant_aware_bits is not None:
        from edgefuse.finetune.quant_aware import attach_fake_quant_

        grid = attach_fake_quant_(model, bits=cfg.quant_aware_bits, block_size=cfg.quant_aware_block_size)
        logger.info("quant-aware: %d weight MatMuls train on the %d-bit block grid (block %d)", len(grid),
                    cfg.quant_aware_bits, cfg.quant_aware_block_size)
    try:
        outcome = run_loop(
            model,
            cfg,
            data,
            teacher=teacher,
            output_dir=None if output_dir is None else str(output_dir),
            resume=resume,
            progress=progress,
            ctx=ctx,
            tokenizer=tokenizer,
        )
        samples: list[dict[str, str]] = []
        if cfg.task == "causal-lm" and ctx.is_main:
            samples = greedy_samples(
                model, data, tokenizer, num_samples=cfg.num_samples, max_new_tokens=cfg.sample_max_new_tokens
            )
    finally:
        if cfg.quant_aware_bits is not None:
            from edgefuse.finetune.quant_aware import detach_fake_quant_

            detach_fake_quant_(model)  # fp32 weights whose quantized graph is the model that was trained
        for p, flag in flags:
            p.requires_grad_(flag)
        if ctx.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()
    # the frozen scale is a buffer and was never in the optimiser; prove it did not move
    for name, m in iter_scaled(model):
        if not torch.equal(get_scale(m).cpu(), scales[name]):  # type: ignore[union-attr]
            raise RuntimeError(f"internal error: the frozen fusion scale of {name} changed during training")
    state = outcome.state
    steps = max(outcome.steps_run, 1)
    return FinetuneResult(
        task=cfg.task,
        objective_weights={name: getattr(cfg, key) for name, key in OBJECTIVES.items()},
        steps_run=outcome.steps_run,
        total_steps=outcome.total_steps,
        stopped_by=outcome.stopped_by,
        resumed_from_step=outcome.resumed_from_step,
        world_size=outcome.world_size,
        global_batch_size=outcome.global_batch_size,
        examples_seen=outcome.examples_seen,
        train_seconds=outcome.train_seconds,
        seconds_per_step=outcome.train_seconds / steps,
        examples_per_second=outcome.examples_seen / max(outcome.train_seconds, 1e-9),
        trainable_params=outcome.trainable_params,
        frozen_scale_entries=sum(s.numel() for s in scales.values()),
        final_train_loss=state.loss_curve[-1][1] if state.loss_curve else None,
        loss_curve=tuple((int(s), float(v)) for s, v in state.loss_curve),
        eval_history=tuple(state.eval_history),
        best_metric_name=main_metric(
            cfg.task, has_labels=data.train.labels is not None, generation_metric=cfg.generation_metric
        ),
        best_metric=state.best_metric,
        best_step=state.best_step,
        best_restored=outcome.best_restored,
        final_metrics=outcome.final_metrics,
        initial_metrics=outcome.initial_metrics,
        samples=tuple(samples),
        peak_rss_mib=_peak_rss_mib(),
    )
