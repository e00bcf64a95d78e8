"""Set-up pieces of the recovery training loop: the data-parallel context, the optimiser and its parameter
groups, the learning-rate schedule, and the settings fingerprint that guards resuming.

Example:
    >>> linear_schedule = lr_lambda("linear", total_steps=10, warmup_steps=2)
    >>> [round(linear_schedule(s), 2) for s in (0, 1, 2, 6, 10)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from edgefuse.config.finetune import FinetuneConfig
from edgefuse.errors import ConfigError


# ---------------------------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistContext:
    """Rank, world size and device of this process (world size 1 without ``torchrun``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistContext:
    """Join the process group that ``torchrun``/``accelerate launch`` describe in the environment, if any."""
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = f"cuda:{local_rank}" if cuda else "cpu"
    if world <= 1:
        return DistContext(device=device if cuda else "cpu")
    here = False
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        here = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, device, here)


def all_reduce_sum(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.all_reduce(t)
    return t


# ---------------------------------------------------------------------------------------------- optimiser
_NORM_HINTS = ("layernorm", "layer_norm", "rmsnorm", "norm.weight", "ln_", "_norm")


def trainable_parameters(model: nn.Module, cfg: FinetuneConfig) -> list[tuple[str, nn.Parameter]]:
    """The parameters that ``cfg.trainable`` selects (and that require grad, e.g. not frozen MoE routers)."""
    if cfg.trainable == "fused-mlps":
        from edgefuse.fusion.scale import find_fused_sites

        sites = list(find_fused_sites(model))
        if not sites:
            raise ConfigError(
                "trainable='fused-mlps' but the model has no fused MLP (with a frozen scale); fuse it first"
            )
        keep: set[int] = set()
        for site in sites:
            for mod in (site.up_module, site.down_module, getattr(site, "gate_module", None)):
                if mod is not None:
                    keep.update(id(p) for p in mod.parameters())
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def build_optimizer(named: list[tuple[str, nn.Parameter]], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    """AdamW (or Adam) with biases and norm weights out of weight decay (HF Trainer default)."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for name, p in named:
        lower = name.lower()
        skip = cfg.no_decay_bias_and_norm and (name.endswith("bias") or any(h in lower for h in _NORM_HINTS))
        (no_decay if skip else decay).append(p)
    groups = [
        g
        for g in ({"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0})
        if g["params"]
    ]
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    if cls is torch.optim.Adam:  # Adam's weight_decay is L2 in the gradient; the paper's layer-wise step uses none
        for g in groups:
            g["weight_decay"] = 0.0
    return cls(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)


def lr_lambda(kind: str, *, total_steps: int, warmup_steps: int) -> Callable[[int], float]:
    """Multiplier of the peak learning rate at step ``s``: linear warm-up, then linear/cosine decay or constant."""

    def fn(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, progress)
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return fn


def config_fingerprint(cfg: FinetuneConfig) -> str:
    """A hash of the settings that must not change between a run and its resumption."""
    keep = cfg.model_dump(
        exclude={
            "max_time_s",
            "eval_every_steps",
            "eval_before",
            "checkpoint_every_steps",
            "num_samples",
            "sample_max_new_tokens",
            "log_every_steps",
            "eval_batch_size",
        }
    )
    return hashlib.sha256(repr(sorted(keep.items())).encode()).hexdigest()[:16]


class NullContext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        return None


def barrier(ctx: DistContext) -> None:
    if ctx.world_size > 1:
        import torch.distributed as dist

        dist.barrier()
