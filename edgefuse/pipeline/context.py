"""What a pipeline stage sees: the config, the run folder, the records of the stages before it, and helpers that
load the model at each point of the pipeline.

The model flows through up to three points (each is a stage folder's ``model/``, or the source model when the
stage producing it is off):

- ``base``: the teacher. The ``teacher`` stage's output when that stage is on, else the source model;
- ``fused``: after the ``fuse`` stage (``base`` when fusion is off);
- ``final``: after the ``finetune`` stage (``fused`` when recovery is off); this is what gets exported.

Example:
    >>> from edgefuse.config.pipeline import PipelineConfig
    >>> cfg = PipelineConfig(schema_version=1, fusion={"keep_ratio": 0.5})
    >>> producer(cfg, "base"), producer(cfg, "fused"), producer(cfg, "final")
    ('source', 'fuse', 'fuse')
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgefuse.config.pipeline import PipelineConfig
from edgefuse.errors import ConfigError
from edgefuse.manifest import sha256_file
from edgefuse.pipeline.store import RunStore, StageRecord, hash_path

logger = logging.getLogger(__name__)

Role = Literal["source", "base", "fused", "final"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model")
SOURCE = "source"
MODEL_DIR = "model"


def producer(cfg: PipelineConfig, role: Role) -> str:
    """The stage whose ``model/`` folder holds the model at ``role`` (``source``: the configured model)."""
    if role == "source":
        return SOURCE
    base = "teacher" if cfg.teacher is not None else SOURCE
    if role == "base":
        return base
    fused = "fuse" if cfg.fusion is not None else base
    if role == "fused":
        return fused
    return "finetune" if cfg.finetune is not None else fused


def source_hash(cfg: PipelineConfig) -> str:
    """Content hash of the source model (its folder's files), or of its name when it is a Hub id."""
    from edgefuse.models import resolve_alias

    location = resolve_alias(cfg.model.name_or_path)
    path = Path(location).expanduser()
    if path.exists():
        return hash_path(path)
    return f"name:{location}"


def data_hash(cfg: PipelineConfig) -> str:
    """Hash of the data files the config names (``hf:`` sources by name)."""
    from edgefuse.pipeline.store import hash_json

    if cfg.data is None:
        return "none"
    parts: dict[str, str] = {}
    for key in ("train", "validation"):
        source = getattr(cfg.data, key)
        if source is None:
            continue
        path = Path(source).expanduser()
        parts[key] = sha256_file(path) if path.is_file() else f"name:{source}"
    return hash_json(parts)


@dataclass
class StageContext:
    """The view of one running stage. ``out`` is its temporary output folder (renamed into place on success)."""

    cfg: PipelineConfig
    stage: str
    store: RunStore
    out: Path
    records: dict[str, StageRecord]
    input_hash: str = ""
    progress: bool = False
    inputs: dict[str, str] = field(default_factory=dict)  # what the stage reads -> hash (its record's inputs)

    def stage_dir(self, stage: str) -> Path:
        """The final folder of an earlier stage of this run."""
        if stage not in self.records:
            raise RuntimeError(f"internal error: stage {stage!r} has not completed in this run")
        return self.store.stage_dir(stage)

    def model_location(self, role: Role) -> str:
        """Where the model at ``role`` is: a stage's ``model/`` folder, or the configured name/path."""
        stage = producer(self.cfg, role)
        if stage == SOURCE:
            return self.cfg.model.name_or_path
        return str(self.stage_dir(stage) / MODEL_DIR)

    def load_model(self, role: Role) -> Any:
        """Load the model at ``role`` for ``model.task``, in eval mode.

        The global torch seed is set first, so that a freshly initialised head (a classifier on top of a base
        checkpoint) is the same in every stage that loads it.
        """
        import torch

        from edgefuse.models import load_model

        torch.manual_seed(0)
        m = self.cfg.model
        return load_model(
            self.model_location(role), m.task, num_labels=m.num_labels, trust_remote_code=m.trust_remote_code
        )

    def tokenizer(self, *, required: bool = False) -> Any:
        """The source model's tokenizer (fusion and training do not change it), or None when it has none.

        Raises:
            ConfigError: ``required`` and the model has no tokenizer files.
        """
        from edgefuse.models import load_tokenizer, resolve_alias

        folder = Path(resolve_alias(self.cfg.model.name_or_path)).expanduser()
        if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
            if required:
                raise ConfigError(
                    f"model folder {str(folder)!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); this stage "
                    "needs one to read text: save the tokenizer next to the model"
                )
            return None
        try:
            return load_tokenizer(self.cfg.model.name_or_path, trust_remote_code=self.cfg.model.trust_remote_code)
        except Exception as exc:  # transformers raises OSError, ValueError, AttributeError... for a bad tokenizer
            if required:
                raise ConfigError(
                    f"model {self.cfg.model.name_or_path!r} has no usable tokenizer ({exc.__class__.__name__}); "
                    "this stage needs one to read text"
                ) from None
            logger.debug("no tokenizer for %s: %s", self.cfg.model.name_or_path, exc)
            return None

    def eval_batches(self, max_examples: int, *, vocab_size: int, batch_size: int = 16) -> list[Any]:
        """Evaluation batches: the validation split of ``data`` (the training split when there is none), or
        seeded random tokens when the config has no data or the model no tokenizer."""
        from edgefuse.metrics import random_batches

        tok = self.tokenizer()
        if self.cfg.data is None or tok is None:
            return random_batches(vocab_size, batches=max(1, min(4, max_examples // 4)), batch_size=4)
        from edgefuse.finetune.data import batches_from_split, load_finetune_data

        task = self.cfg.model.task
        dcfg = self.cfg.data
        if task != "sequence-classification":
            # only the first rows are used; a classification label map needs every training row
            limit = min(dcfg.max_train_examples or max_examples, max_examples)
            dcfg = dcfg.model_copy(update={"max_train_examples": limit})
        data = load_finetune_data(dcfg, tok, task)
        split = data.validation if data.validation is not None else data.train
        return batches_from_split(split, data.pad_token_id, batch_size, max_examples)

    def texts(self, n: int) -> list[str] | None:
        """``n`` training texts evenly spaced over the data (:func:`edgefuse.records.spread`; after the held-out
        split, so never a validation row), prompt included; None when the config has no data section. Used to
        calibrate and check quantization on the task's own text: GPTQ and the activation-aware search fit their
        calibration texts, so calibrating on the rows that evaluate scores would flatter the quantized graph."""
        if self.cfg.data is None:
            return None
        from edgefuse.finetune.data import split_rows
        from edgefuse.records import spread

        d = self.cfg.data
        rows = spread(split_rows(d.model_copy(update={"max_train_examples": None}))[0], n)
        out = []
        for row in rows:
            text = str(row.get(d.text_column) or "").strip()
            if text:
                prompt = str(row.get(d.prompt_column) or "") + d.prompt_separator if d.prompt_column else ""
                out.append(prompt + text)
        return out or None

    def save_model(self, model: Any, *, fold: bool = False) -> Path:
        """Save ``model`` (and the tokenizer) to this stage's ``model/`` folder, as safetensors."""
        from edgefuse.fusion.persist import save_fused

        if fold:
            from edgefuse.fusion.scale import fold_scales_

            fold_scales_(model)
        return save_fused(model, self.out / MODEL_DIR, tokenizer=self.tokenizer())
