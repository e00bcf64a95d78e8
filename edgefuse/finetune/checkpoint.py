"""Resumable training checkpoints, written atomically, with no pickle anywhere.

A checkpoint is a folder ``<output_dir>/checkpoints/step-00000120/`` holding

- ``model.safetensors``: the trainable model's state (shared/tied tensors handled by ``safetensors.torch.save_model``);
- ``optimizer.safetensors`` + the optimiser's param groups in ``trainer_state.json``;
- ``rng.safetensors``: the torch RNG state(s), so dropout continues exactly where it stopped;
- ``trainer_state.json``: step, scheduler state, best metric, loss curve, elapsed time.

The folder appears under its final name only once complete (:func:`edgefuse.io_utils.atomic_dir`), so the newest
``step-*`` folder is always a whole checkpoint. The frozen fusion scales are non-persistent buffers: they never
change, so they are not saved here (the model that is resumed carries them).

Example:
    >>> import tempfile, torch
    >>> m = torch.nn.Linear(2, 2); opt = torch.optim.AdamW(m.parameters())
    >>> d = save_checkpoint(tempfile.mkdtemp(), TrainState(step=3), m, opt, None)
    >>> load_checkpoint(d, m, opt, None).step
    3
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from edgefuse.errors import ConfigError, TargetNotFoundError
from edgefuse.io_utils import atomic_dir, write_json_atomic

logger = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
BEST_DIR = "best"
STATE_FILE = "trainer_state.json"
_STEP_RE = re.compile(r"^step-(\d{8})$")


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs to continue exactly."""

    step: int = 0
    elapsed_s: float = 0.0
    best_metric: float | None = None
    best_step: int | None = None
    loss_curve: list[list[float]] = field(default_factory=list)  # [step, loss] pairs
    eval_history: list[dict[str, float]] = field(default_factory=list)
    scheduler: dict[str, Any] = field(default_factory=dict)
    config_fingerprint: str = ""


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    sd = opt.state_dict()
    tensors = {}
    for idx, st in sd["state"].items():
        for name, value in st.items():
            t = value if isinstance(value, torch.Tensor) else torch.tensor(value)
            tensors[f"{idx}.{name}"] = t.detach().cpu().contiguous()
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def _restore_optimizer(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict[str, Any]]
) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(
    output_dir: str | Path,
    state: TrainState,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    *,
    keep_last: int = 2,
) -> Path:
    """Write a complete checkpoint of ``state.step`` atomically and delete all but the ``keep_last`` newest."""
    from safetensors.torch import save_file, save_model

    root = Path(output_dir) / CKPT_DIR
    final = root / f"step-{state.step:08d}"
    if scheduler is not None:
        state.scheduler = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    opt_tensors, groups = _optimizer_tensors(optimizer)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    with atomic_dir(final, overwrite=True, require_marker=False) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        save_file(rng, str(tmp / "rng.safetensors"))
        write_json_atomic(tmp / STATE_FILE, {**asdict(state), "optimizer_param_groups": groups})
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("checkpoint written: %s", final)
    return final


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of ``output_dir``, oldest first."""
    root = Path(output_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and _STEP_RE.match(p.name))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of ``output_dir``, or None."""
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def load_checkpoint(
    folder: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainState:
    """Restore model, optimiser, scheduler and RNG from ``folder`` (written by :func:`save_checkpoint`).

    Raises:
        TargetNotFoundError: the folder is not a checkpoint.
        ConfigError: the checkpoint does not fit the model (e.g. a different fusion width).
    """
    from safetensors.torch import load_file, load_model

    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        raise TargetNotFoundError(f"{str(folder)!r} is not a checkpoint folder (no {STATE_FILE})")
    from edgefuse.models import check_safetensors_file

    damaged = (f"checkpoint {str(folder)!r} is damaged; delete that folder to resume from the previous checkpoint, "
               "or start a new output folder")
    try:
        raw = json.loads((folder / STATE_FILE).read_bytes().decode("utf-8"))
        groups = raw.pop("optimizer_param_groups")
        for name in ("model.safetensors", "optimizer.safetensors", "rng.safetensors"):
            check_safetensors_file(folder / name)
    except (ValueError, KeyError, TypeError, AttributeError, OSError, TargetNotFoundError) as exc:
        raise TargetNotFoundError(f"{damaged} ({one_line_reason(exc)})") from None
    try:
        load_model(model, str(folder / "model.safetensors"), strict=True)
        _restore_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), groups)
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ConfigError(
            f"checkpoint {str(folder)!r} does not fit this model/optimiser ({str(exc).splitlines()[0]}); "
            "resume with the same model and settings, or start a new output folder"
        ) from exc
    try:
        state = TrainState(**raw)
    except TypeError as exc:
        raise TargetNotFoundError(f"{damaged} ({one_line_reason(exc)})") from None
    if scheduler is not None and state.scheduler:
        scheduler.load_state_dict({**state.scheduler, "lr_lambdas": [None] * len(optimizer.param_groups)})
    rng = load_file(str(folder / "rng.safetensors"))
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])
    return state


def one_line_reason(exc: BaseException) -> str:
    """The first line of an exception, with its type (for error messages that must stay one line)."""
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]}"


def save_best(output_dir: str | Path, model: nn.Module, step: int, metric: float) -> Path:
    """Keep the best weights so far in ``<output_dir>/checkpoints/best`` (atomically replaced)."""
    from safetensors.torch import save_model

    final = Path(output_dir) / CKPT_DIR / BEST_DIR
    with atomic_dir(final, overwrite=True, require_marker=False) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        write_json_atomic(tmp / "best.json", {"step": step, "metric": metric})
    return final


def load_best(output_dir: str | Path, model: nn.Module) -> int:
    """Load the weights saved by :func:`save_best` into ``model``; return their step."""
    from safetensors.torch import load_model

    folder = Path(output_dir) / CKPT_DIR / BEST_DIR
    load_model(model, str(folder / "model.safetensors"), strict=True)
    return int(json.loads((folder / "best.json").read_text())["step"])
