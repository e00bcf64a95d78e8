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


@dataclass(frozen=True)
class _Schedule:
    """How the training data is cut into steps: ``micro`` examples per micro-step over all ranks,
    ``global_batch`` per optimizer step, ``total_steps`` in all."""

    n: int
    micro: int
    global_batch: int
    steps_per_epoch: int
    total_steps: int


def _schedule(cfg: FinetuneConfig, n: int, world_size: int) -> _Schedule:
    """The step plan of ``n`` training examples.

    Raises:
        DataError: fewer examples than one global batch.
    """
    micro = cfg.batch_size * world_size
    global_batch = micro * cfg.gradient_accumulation_steps
    if n < global_batch:
        raise DataError(
            f"the training data has {n} example(s), fewer than one global batch ({global_batch} = batch_size "
            f"{cfg.batch_size} x {world_size} process(es) x {cfg.gradient_accumulation_steps} accumulation); "
            "lower batch_size"
        )
    steps_per_epoch = n // global_batch  # the last incomplete global batch is dropped: every step is full
    epochs = float(cfg.epochs or 1.0)  # the config guarantees max_steps or epochs
    total_steps = cfg.max_steps if cfg.max_steps is not None else max(1, math.ceil(epochs * steps_per_epoch))
    return _Schedule(n, micro, global_batch, steps_per_epoch, total_steps)


def _place(model: nn.Module, teacher: nn.Module | None, device: torch.device) -> None:
    """Move both models to ``device``; the teacher is frozen and in eval mode."""
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)


def _data_parallel(model: nn.Module, ctx: DistContext, device: torch.device) -> Any:
    """``model`` wrapped in ``DistributedDataParallel`` when there are several processes, else itself."""
    if ctx.world_size == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[ctx.local_rank] if device.type == "cuda" else None)


def _restore_or_start(
    cfg: FinetuneConfig, output_dir: str | None, resume: bool, model: nn.Module, optimizer: Any, scheduler: Any
) -> tuple[TrainState, int | None]:
    """(state, step resumed from or None): the latest checkpoint of ``output_dir`` when resuming, else a new state.

    Raises:
        OutputExistsError: ``output_dir`` holds checkpoints and ``resume`` is off.
        ConfigError: the checkpoint was written with other training settings.
    """
    state = TrainState(config_fingerprint=config_fingerprint(cfg))
    if output_dir and not resume and latest_checkpoint(output_dir) is not None:
        raise OutputExistsError(
            f"{output_dir!r} already holds checkpoints of another run; resume it (resume=True, CLI --resume) or "
            "use a new output folder (CLI --overwrite deletes them)"
        )
    if not (resume and output_dir):
        return state, None
    ckpt = latest_checkpoint(output_dir)
    if ckpt is None:
        logger.warning("resume requested but %s holds no checkpoint: starting from step 0", output_dir)
        return state, None
    state = load_checkpoint(ckpt, model, optimizer, scheduler)
    if state.config_fingerprint != config_fingerprint(cfg):
        raise ConfigError(
            f"checkpoint {str(ckpt)!r} was written with different training settings; resume with the "
            "same config (only max_time_s/eval/checkpoint/logging settings may change) or use a new folder"
        )
    logger.info("resumed from %s (step %d)", ckpt, state.step)
    return state, state.step


@dataclass
class _Tracker:
    """Evaluation during training: the metric history in ``state``, and the best weights when ``keep_best``
    (saved in ``output_dir``, or kept in memory when there is none)."""

    model: nn.Module
    cfg: FinetuneConfig
    data: FinetuneData
    teacher: nn.Module | None
    ctx: DistContext
    output_dir: str | None
    state: TrainState
    tokenizer: Any  # decodes the generations of ``generation_metric`` (None without one)
    metric: str
    last_eval_step: int = -1
    best_in_memory: dict[str, torch.Tensor] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        cfg, ctx = self.cfg, self.ctx
        m = evaluate(self.model, self.data.validation, cfg.task, pad_token_id=self.data.pad_token_id,
                     batch_size=cfg.eval_batch_size, teacher=self.teacher, rank=ctx.rank, world_size=ctx.world_size)
        if cfg.generation_metric and self.data.validation is not None:  # judged by the text it writes, too
            m.update(generation_metrics(self.model, self.data.validation, self.tokenizer,
                                        max_prompts=cfg.generation_prompts,
                                        max_new_tokens=cfg.generation_max_new_tokens, batch_size=cfg.eval_batch_size))
        return m

    def evaluate(self) -> dict[str, float]:
        """Measure now, record it, and keep the weights when they are the best so far."""
        if self.data.validation is None:
            return {}
        state, metric = self.state, self.metric
        m = self.metrics()
        self.last_eval_step = state.step
        if metric not in m:  # nothing measurable (e.g. unlabeled data and no teacher)
            return m
        state.eval_history.append({"step": float(state.step), **m})
        better = state.best_metric is None or (
            m[metric] < state.best_metric if lower_is_better(metric) else m[metric] > state.best_metric
        )
        if self.cfg.keep_best and better:
            state.best_metric, state.best_step = m[metric], state.step
            if self.output_dir and self.ctx.is_main:
                save_best(self.output_dir, self.model, state.step, m[metric])
            elif not self.output_dir:
                self.best_in_memory.clear()
                self.best_in_memory.update({k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()})
        logger.info("step %d: %s", state.step, {k: round(v, 5) for k, v in m.items()})
        return m

    def final(self) -> tuple[dict[str, float], bool]:
        """(final metrics, whether the best weights were restored): evaluate the last step unless it just was,
        then go back to the best step's weights when ``keep_best`` and it was not the last."""
        state = self.state
        if self.last_eval_step != state.step:
            final = self.evaluate()
        else:
            final = state.eval_history[-1] if state.eval_history else {}
        restored = False
        if self.cfg.keep_best and state.best_step is not None and state.best_step != state.step:
            if self.output_dir:
                barrier(self.ctx)
                load_best(self.output_dir, self.model)
            else:
                self.model.load_state_dict(self.best_in_memory, strict=True)
            restored = True
            final = next(e for e in state.eval_history if int(e["step"]) == state.best_step)
            logger.info("restored the best weights (step %d, %s %.5f)", state.best_step, self.metric,
                        state.best_metric)
        self.best_in_memory.clear()
        return final, restored


@dataclass
class _Stepper:
    """One optimizer step over one global batch: micro-batches for this rank, gradient accumulation, clipping."""

    wrapped: Any  # nn.Module, or DistributedDataParallel (whose no_sync() is used between micro-steps)
    teacher: nn.Module | None
    cfg: FinetuneConfig
    data: FinetuneData
    ctx: DistContext
    device: torch.device
    named: list[tuple[str, nn.Parameter]]
    optimizer: Any
    scheduler: Any
    plan: _Schedule
    lengths: list[int] | None
    order: list[int] = field(default_factory=list)
    order_epoch: int = -1

    def micro_batches(self, step: int) -> list[dict[str, torch.Tensor]]:
        """This rank's micro-batches of global step ``step`` (the order is a pure function of seed and epoch)."""
        cfg, plan, ctx = self.cfg, self.plan, self.ctx
        epoch, pos = divmod(step, plan.steps_per_epoch)
        if epoch != self.order_epoch:  # computed once per epoch
            self.order = epoch_order(plan.n, seed=cfg.seed, epoch=epoch, lengths=self.lengths,
                                     batch_size=plan.global_batch)
            self.order_epoch = epoch
        gbatch = self.order[pos * plan.global_batch : (pos + 1) * plan.global_batch]
        out = []
        for a in range(cfg.gradient_accumulation_steps):
            chunk = gbatch[a * plan.micro : (a + 1) * plan.micro]
            out.append(collate(self.data.train, chunk[ctx.rank * cfg.batch_size : (ctx.rank + 1) * cfg.batch_size],
                               self.data.pad_token_id))
        return out

    def step(self, step: int) -> float:
        """Run global step ``step`` (forward, backward, optimizer and scheduler); return its weighted loss."""
        cfg, ctx, device = self.cfg, self.ctx, self.device
        micro_batches = self.micro_batches(step)
        # normalise by the counts of the whole global step, known before any forward pass
        denom = sum((_counts(b, cfg.task) for b in micro_batches), torch.zeros(2, dtype=torch.float64))
        denom = all_reduce_sum(denom.to(device), ctx).cpu().clamp_min(1.0) / ctx.world_size
        parts = torch.zeros(3, dtype=torch.float64)
        for a, batch in enumerate(micro_batches):
            batch = {k: v.to(device) for k, v in batch.items()}
            last = a == len(micro_batches) - 1
            sync_ctx = self.wrapped.no_sync() if ctx.world_size > 1 and not last else NullContext()
            with sync_ctx:
                # DDP averages gradients over ranks; denom is divided by world_size to undo that average
                loss, micro_parts = _forward_losses(self.wrapped, self.teacher, batch, cfg, denom.float().to(device))
                loss.backward()
            parts += micro_parts
        if cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for _, p in self.named], cfg.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        parts = all_reduce_sum(parts.to(device), ctx).cpu() / ctx.world_size
        weights = torch.tensor([cfg.task_weight, cfg.logits_weight, cfg.hidden_weight], dtype=torch.float64)
        return float((parts * weights).sum())


class _Bar:
    """The progress bar of the main process (nothing elsewhere, or without ``progress``)."""

    def __init__(self, enabled: bool, total: int, initial: int) -> None:
        self._bar = None
        if enabled:
            from edgefuse.progress import progress_bar  # tqdm on a terminal, a 30 s heartbeat line in logs

            self._bar = progress_bar(total, initial=initial, desc="finetune", unit="step")

    def update(self, loss: float, examples_per_s: float, lr: float) -> None:
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(loss=f"{loss:.4f}", ex_s=f"{examples_per_s:.1f}", lr=f"{lr:.2e}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _checkpoint_due(cfg: FinetuneConfig, output_dir: str | None, step: int) -> bool:
    return bool(output_dir and cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0)


def _out_of_time(cfg: FinetuneConfig, state: TrainState, total_steps: int, ctx: DistContext, device: Any) -> bool:
    """``max_time_s`` is spent (decided together, so every rank stops at the same step)."""
    if cfg.max_time_s is None or state.step >= total_steps:
        return False
    over = torch.tensor([1.0 if state.elapsed_s >= cfg.max_time_s else 0.0])
    return all_reduce_sum(over.to(device), ctx).item() > 0


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
    """Train ``model`` in place as ``cfg`` says; see :func:`edgefuse.finetune.api.finetune_` for the contract.

    The phases: place the models; build the optimizer and the step plan; restore a checkpoint or start fresh;
    evaluate before training when asked; step until ``total_steps`` (logging, evaluating, checkpointing and
    watching ``max_time_s`` after each step); evaluate at the end and go back to the best weights.
    """
    device = torch.device(ctx.device)
    _place(model, teacher, device)
    named = trainable_parameters(model, cfg)
    if not named:
        raise ConfigError("the model has no trainable parameter (all frozen); nothing to fine-tune")
    optimizer = build_optimizer(named, cfg)
    plan = _schedule(cfg, len(data.train), ctx.world_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lr_lambda(cfg.scheduler, total_steps=plan.total_steps, warmup_steps=round(cfg.warmup_ratio * plan.total_steps)),
    )
    state, resumed_from = _restore_or_start(cfg, output_dir, resume, model, optimizer, scheduler)
    if resumed_from is None:
        torch.manual_seed(cfg.seed + ctx.rank)  # dropout; a resumed run restored the RNG instead
    stepper = _Stepper(_data_parallel(model, ctx, device), teacher, cfg, data, ctx, device, named, optimizer,
                       scheduler, plan, lengths=[len(x) for x in data.train.input_ids] if cfg.group_by_length else None)
    tracker = _Tracker(model, cfg, data, teacher, ctx, output_dir, state, tokenizer,
                       metric=main_metric(cfg.task, has_labels=data.train.labels is not None,
                                          generation_metric=cfg.generation_metric))
    bar = _Bar(progress and ctx.is_main, plan.total_steps, state.step)
    model.train()
    start_step, elapsed0, t0 = state.step, state.elapsed_s, time.perf_counter()
    stopped_by = "max_steps"
    examples = 0
    initial: dict[str, float] = {}
    if cfg.eval_before and data.validation is not None and resumed_from is None:
        initial = tracker.metrics()
        logger.info("before training: %s", {k: round(v, 5) for k, v in initial.items()})
        model.train()
    try:
        while state.step < plan.total_steps:
            loss_value = stepper.step(state.step)
            state.step += 1
            examples += plan.global_batch
            if state.step % cfg.log_every_steps == 0 or state.step == plan.total_steps:
                state.loss_curve.append([float(state.step), loss_value])
            bar.update(loss_value, examples / max(time.perf_counter() - t0, 1e-9), scheduler.get_last_lr()[0])
            if cfg.eval_every_steps and state.step % cfg.eval_every_steps == 0:
                tracker.evaluate()
                model.train()
            state.elapsed_s = elapsed0 + (time.perf_counter() - t0)
            if _checkpoint_due(cfg, output_dir, state.step):
                if ctx.is_main:
                    save_checkpoint(output_dir, state, model, optimizer, scheduler)
                barrier(ctx)
            if _out_of_time(cfg, state, plan.total_steps, ctx, device):
                stopped_by = "max_time_s"
                break
    finally:
        bar.close()
    train_seconds = time.perf_counter() - t0
    state.elapsed_s = elapsed0 + train_seconds
    final, best_restored = tracker.final()
    model.eval()
    return LoopOutcome(
        state=state,
        total_steps=plan.total_steps,
        steps_run=state.step - start_step,
        train_seconds=train_seconds,
        examples_seen=examples,
        stopped_by=stopped_by,
        resumed_from_step=resumed_from,
        final_metrics={k: v for k, v in final.items() if k != "step"},
        best_restored=best_restored,
        initial_metrics=initial,
        trainable_params=sum(p.numel() for _, p in named),
        global_batch_size=plan.global_batch,
        world_size=ctx.world_size,
    )
