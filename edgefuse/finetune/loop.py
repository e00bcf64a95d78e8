"""The plain-PyTorch training loop behind :func:`edgefuse.finetune.api.finetune_`: single process or data-parallel.

Data-parallel runs (``torchrun --nproc-per-node N`` or ``accelerate launch``) are detected from the environment
(``WORLD_SIZE``/``RANK``/``LOCAL_RANK``); the loop then initialises ``torch.distributed`` (gloo on CPU, NCCL on
GPU) and wraps the model in ``DistributedDataParallel``. Every rank reads the same global batch order and takes
its own slice, and losses are normalised by the *global* number of examples/tokens, so N processes with batch
``b`` follow the same loss curve as one process with batch ``N*b`` (up to floating-point reordering).

Example:
    >>> from edgefuse.finetune.loop import run_loop, DistContext
    >>> DistContext().world_size
    1
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from edgefuse.config.finetune import FinetuneConfig
from edgefuse.errors import ConfigError, DataError, OutputExistsError
from edgefuse.finetune.checkpoint import (
    TrainState,
    latest_checkpoint,
    load_best,
    load_checkpoint,
    save_best,
    save_checkpoint,
)
from edgefuse.finetune.data import IGNORE_INDEX, FinetuneData, collate, epoch_order
from edgefuse.finetune.evaluate import evaluate, generation_metrics, lower_is_better, main_metric
from edgefuse.finetune.objectives import (
    causal_lm_loss,
    classification_loss,
    hidden_state_loss,
    logit_distillation_loss,
)
from edgefuse.finetune.setup import (
    DistContext,
    NullContext,
    all_reduce_sum,
    barrier,
    build_optimizer,
    config_fingerprint,
    lr_lambda,
    trainable_parameters,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------- loop
@dataclass
class LoopOutcome:
    """What the loop returns to :func:`edgefuse.finetune.api.finetune_` (before it becomes a result object)."""

    state: TrainState
    total_steps: int
    steps_run: int
    train_seconds: float
    examples_seen: int
    stopped_by: str
    resumed_from_step: int | None
    final_metrics: dict[str, float] = field(default_factory=dict)
    best_restored: bool = False
    initial_metrics: dict[str, float] = field(default_factory=dict)
    trainable_params: int = 0
    global_batch_size: int = 0
    world_size: int = 1


def _counts(batch: dict[str, torch.Tensor], task: str) -> torch.Tensor:
    """(task/logit-KD count, hidden-state count) of one micro-batch, known before the forward pass."""
    if task != "causal-lm":
        n_task = float(batch["input_ids"].shape[0])
    else:
        n_task = float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return torch.tensor([n_task, float(batch["attention_mask"].sum())], dtype=torch.float64)


def _forward_losses(
    model: nn.Module,
    teacher: nn.Module | None,
    batch: dict[str, torch.Tensor],
    cfg: FinetuneConfig,
    denom: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted loss of one micro-batch, normalised by the global counts ``denom``; and its parts (detached)."""
    labels = batch.pop("labels", None)
    want_hidden = cfg.hidden_weight > 0
    out = model(**batch, output_hidden_states=want_hidden)
    parts = torch.zeros(3, dtype=torch.float64)
    total = torch.zeros((), dtype=torch.float32, device=batch["input_ids"].device)
    t_out: Any = None
    if teacher is not None:  # the config check guarantees a teacher whenever a distillation weight is > 0
        with torch.no_grad():
            t_out = teacher(**batch, output_hidden_states=want_hidden)
    if cfg.task_weight > 0:
        assert labels is not None  # checked by finetune_: the task loss needs labels
        if cfg.task == "sequence-classification":
            s, _ = classification_loss(out.logits, labels)
        else:
            s, _ = causal_lm_loss(out.logits, labels)
        term = s / denom[0]
        total = total + cfg.task_weight * term
        parts[0] = term.item()
    if cfg.logits_weight > 0:
        s, _ = logit_distillation_loss(out.logits, t_out.logits, cfg.temperature, labels=labels)
        term = s / denom[0]
        total = total + cfg.logits_weight * term
        parts[1] = term.item()
    if cfg.hidden_weight > 0:
        s, _ = hidden_state_loss(out.hidden_states, t_out.hidden_states, batch["attention_mask"], cfg.hidden_layers)
        term = s / denom[1]
        total = total + cfg.hidden_weight * term
        parts[2] = term.item()
    return total, parts


def run_loop(
    model: nn.Module,
    cfg: FinetuneConfig,
    data: FinetuneData,
    *,
    teacher: nn.Module | None,
    output_dir: str | None,
    resume: bool,
    progress: bool,
    ctx: DistContext,
    tokenizer: Any = None,
) -> LoopOutcome:
    """Train ``model`` in place as ``cfg`` says; see :func:`edgefuse.finetune.api.finetune_` for the contract."""
    device = torch.device(ctx.device)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    named = trainable_parameters(model, cfg)
    if not named:
        raise ConfigError("the model has no trainable parameter (all frozen); nothing to fine-tune")
    optimizer = build_optimizer(named, cfg)
    micro = cfg.batch_size * ctx.world_size  # examples per micro-step over all ranks
    global_batch = micro * cfg.gradient_accumulation_steps
    n = len(data.train)
    if n < global_batch:
        raise DataError(
            f"the training data has {n} example(s), fewer than one global batch ({global_batch} = batch_size "
            f"{cfg.batch_size} x {ctx.world_size} process(es) x {cfg.gradient_accumulation_steps} accumulation); "
            "lower batch_size"
        )
    steps_per_epoch = n // global_batch  # the last incomplete global batch is dropped: every step is full
    epochs = float(cfg.epochs or 1.0)  # the config guarantees max_steps or epochs
    total_steps = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(epochs * steps_per_epoch))
    warmup = round(cfg.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(cfg.scheduler, total_steps=total_steps, warmup_steps=warmup)
    )
    state = TrainState(config_fingerprint=config_fingerprint(cfg))
    resumed_from = None
    if output_dir and not resume and latest_checkpoint(output_dir) is not None:
        raise OutputExistsError(
            f"{output_dir!r} already holds checkpoints of another run; resume it (resume=True, CLI --resume) or "
            "use a new output folder (CLI --overwrite deletes them)"
        )
    if resume and output_dir:
        ckpt = latest_checkpoint(output_dir)
        if ckpt is None:
            logger.warning("resume requested but %s holds no checkpoint: starting from step 0", output_dir)
        else:
            state = load_checkpoint(ckpt, model, optimizer, scheduler)
            if state.config_fingerprint != config_fingerprint(cfg):
                raise ConfigError(
                    f"checkpoint {str(ckpt)!r} was written with different training settings; resume with the "
                    "same config (only max_time_s/eval/checkpoint/logging settings may change) or use a new folder"
                )
            resumed_from = state.step
            logger.info("resumed from %s (step %d)", ckpt, state.step)
    if resumed_from is None:
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout; a resumed run restored the RNG instead
    wrapped: Any = model  # nn.Module, or DistributedDataParallel (whose no_sync() the loop uses)
    if ctx.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel

        wrapped = DistributedDataParallel(model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)
    metric = main_metric(cfg.task, has_labels=data.train.labels is not None, generation_metric=cfg.generation_metric)
    lengths = [len(x) for x in data.train.input_ids] if cfg.group_by_length else None
    order: list[int] = []
    order_epoch = -1
    bar = None
    if progress and ctx.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc="finetune", unit="step", dynamic_ncols=True)
    model.train()
    start_step = state.step
    t0 = time.perf_counter()
    elapsed0 = state.elapsed_s
    stopped_by = "max_steps"
    last_eval_step = -1
    examples = 0
    best_in_memory: dict[str, torch.Tensor] = {}  # best weights when there is no output folder

    def metrics() -> dict[str, float]:
        m = evaluate(model, data.validation, cfg.task, pad_token_id=data.pad_token_id,
                     batch_size=cfg.eval_batch_size, teacher=teacher, rank=ctx.rank, world_size=ctx.world_size)
        if cfg.generation_metric and data.validation is not None:  # judged by the text it writes, too
            m.update(generation_metrics(model, data.validation, tokenizer, max_prompts=cfg.generation_prompts,
                                        max_new_tokens=cfg.generation_max_new_tokens,
                                        batch_size=cfg.eval_batch_size))
        return m

    def do_eval() -> dict[str, float]:
        nonlocal last_eval_step
        if data.validation is None:
            return {}
        m = metrics()
        last_eval_step = state.step
        if metric not in m:  # nothing measurable (e.g. unlabeled data and no teacher)
            return m
        state.eval_history.append({"step": float(state.step), **m})
        better = state.best_metric is None or (
            m[metric] < state.best_metric if lower_is_better(metric) else m[metric] > state.best_metric
        )
        if cfg.keep_best and better:
            state.best_metric, state.best_step = m[metric], state.step
            if output_dir and ctx.is_main:
                save_best(output_dir, model, state.step, m[metric])
            elif not output_dir:
                best_in_memory.clear()
                best_in_memory.update({k: v.detach().cpu().clone() for k, v in model.state_dict().items()})
        logger.info("step %d: %s", state.step, {k: round(v, 5) for k, v in m.items()})
        return m

    initial: dict[str, float] = {}
    if cfg.eval_before and data.validation is not None and resumed_from is None:
        initial = metrics()
        logger.info("before training: %s", {k: round(v, 5) for k, v in initial.items()})
        model.train()
    try:
        while state.step < total_steps:
            epoch, pos = divmod(state.step, steps_per_epoch)
            if epoch != order_epoch:  # the order is a pure function of (seed, epoch): computed once per epoch
                order = epoch_order(n, seed=cfg.seed, epoch=epoch, lengths=lengths, batch_size=global_batch)
                order_epoch = epoch
            gbatch = order[pos * global_batch : (pos + 1) * global_batch]
            micro_batches = []
            for a in range(cfg.gradient_accumulation_steps):
                chunk = gbatch[a * micro : (a + 1) * micro]
                micro_batches.append(
                    collate(
                        data.train,
                        chunk[ctx.rank * cfg.batch_size : (ctx.rank + 1) * cfg.batch_size],
                        data.pad_token_id,
                    )
                )
            # normalise by the counts of the whole global step, known before any forward pass
            denom = sum((_counts(b, cfg.task) for b in micro_batches), torch.zeros(2, dtype=torch.float64))
            denom = all_reduce_sum(denom.to(device), ctx).cpu().clamp_min(1.0) / ctx.world_size
            parts = torch.zeros(3, dtype=torch.float64)
            for a, batch in enumerate(micro_batches):
                batch = {k: v.to(device) for k, v in batch.items()}
                sync_ctx = wrapped.no_sync() if ctx.world_size > 1 and a < len(micro_batches) - 1 else NullContext()
                with sync_ctx:
                    # DDP averages gradients over ranks; denom is divided by world_size to undo that average
                    loss, micro_parts = _forward_losses(wrapped, teacher, batch, cfg, denom.float().to(device))
                    loss.backward()
                parts += micro_parts
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for _, p in named], cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            examples += global_batch
            parts = all_reduce_sum(parts.to(device), ctx).cpu() / ctx.world_size
            weights = torch.tensor([cfg.task_weight, cfg.logits_weight, cfg.hidden_weight], dtype=torch.float64)
            loss_value = float((parts * weights).sum())
            if state.step % cfg.log_every_steps == 0 or state.step == total_steps:
                state.loss_curve.append([float(state.step), loss_value])
            seconds = time.perf_counter() - t0
            if bar is not None:
                bar.update(1)
                bar.set_postfix(
                    loss=f"{loss_value:.4f}",
                    ex_s=f"{examples / max(seconds, 1e-9):.1f}",
                    lr=f"{scheduler.get_last_lr()[0]:.2e}",
                )
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                do_eval()
                model.train()
            state.elapsed_s = elapsed0 + (time.perf_counter() - t0)
            if output_dir and cfg.checkpoint_every_steps and state.step % cfg.checkpoint_every_steps == 0:
                if ctx.is_main:
                    save_checkpoint(output_dir, state, model, optimizer, scheduler)
                barrier(ctx)
            if cfg.max_time_s is not None and state.step < total_steps:
                over = torch.tensor([1.0 if state.elapsed_s >= cfg.max_time_s else 0.0])
                if all_reduce_sum(over.to(device), ctx).item() > 0:  # every rank stops at the same step
                    stopped_by = "max_time_s"
                    break
    finally:
        if bar is not None:
            bar.close()
    train_seconds = time.perf_counter() - t0
    state.elapsed_s = elapsed0 + train_seconds
    final = do_eval() if last_eval_step != state.step else (state.eval_history[-1] if state.eval_history else {})
    best_restored = False
    if cfg.keep_best and state.best_step is not None and state.best_step != state.step:
        if output_dir:
            barrier(ctx)
            load_best(output_dir, model)
        else:
            model.load_state_dict(best_in_memory, strict=True)
        best_restored = True
        final = next(e for e in state.eval_history if int(e["step"]) == state.best_step)
        logger.info("restored the best weights (step %d, %s %.5f)", state.best_step, metric, state.best_metric)
    best_in_memory.clear()
    model.eval()
    return LoopOutcome(
        state=state,
        total_steps=total_steps,
        steps_run=state.step - start_step,
        train_seconds=train_seconds,
        examples_seen=examples,
        stopped_by=stopped_by,
        resumed_from_step=resumed_from,
        final_metrics={k: v for k, v in final.items() if k != "step"},
        best_restored=best_restored,
        initial_metrics=initial,
        trainable_params=sum(p.numel() for _, p in named),
        global_batch_size=global_batch,
        world_size=ctx.world_size,
    )
