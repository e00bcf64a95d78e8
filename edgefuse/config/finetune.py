"""Configuration of the recovery stage: data (:class:`DataConfig`) and training (:class:`FinetuneConfig`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgefuse.config import StrictModel

FinetuneTask = Literal["sequence-classification", "causal-lm", "feature-extraction"]
# the objectives of recovery, each spelled one way everywhere (CLI --objective, results, docs): name -> weight key
OBJECTIVES: dict[str, str] = {"task": "task_weight", "logits": "logits_weight", "hidden": "hidden_weight"}
FINETUNE_TASKS: tuple[str, ...] = ("sequence-classification", "causal-lm", "feature-extraction")


def first_available(sources: list[str]) -> str:
    """The first source that can be read here (see :class:`DataConfig`); the last one when none can."""
    import importlib.util
    import os
    from pathlib import Path

    for source in sources:
        if source.startswith("hf:"):
            offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get(
                "HF_DATASETS_OFFLINE", "0") not in ("", "0")
            if importlib.util.find_spec("datasets") is not None and not offline:
                return source
        elif Path(source).expanduser().is_file():
            return source
    return sources[-1]


class DataConfig(StrictModel):
    """Where the training and validation examples come from and which columns hold what.

    Example:
        >>> DataConfig(train="edgefuse/data/sst2-sample/train.tsv", text_column="sentence").label_column
        'label'

    A list of sources means "the first one available": a local file that exists, or an ``hf:`` dataset when
    the ``datasets`` package is installed and the Hub is not switched off (``HF_HUB_OFFLINE``); the last entry
    is used when none is (its error then says what is missing). The SST-2 recipes end with the small sample
    bundled in ``edgefuse/data/sst2-sample/``:

        >>> DataConfig(train=["no/such/file.tsv", "edgefuse/data/sst2-sample/train.tsv"]).train
        'edgefuse/data/sst2-sample/train.tsv'
    """

    train: str = Field(
        description="Training data: a local .tsv/.csv/.jsonl file (or .txt: one text per line, column 'text'), "
        "or a Hugging Face dataset written "
        "'hf:NAME[:CONFIG][@SPLIT]' (e.g. 'hf:glue:sst2@train'; needs `pip install datasets` and network "
        "access unless NAME is a local folder). A list: the first source available (see DataConfig)."
    )
    validation: str | None = Field(
        None, description="Validation data in the same forms as 'train'. None: see validation_fraction."
    )

    @field_validator("train", "validation", mode="before")
    @classmethod
    def _first_available(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(v, str) for v in value):
                raise ValueError(f"a list of data sources must hold file paths or hf: names, got {value!r}")
            return first_available(list(value))
        return value
    validation_fraction: float | None = Field(
        None,
        gt=0.0,
        lt=1.0,
        description="When no validation file is given, hold out this fraction of the training rows (grouped "
        "by group_column when set, so that no group is in both parts).",
    )
    group_column: str | None = Field(
        None,
        description="Column whose values must not cross the train/validation split (E2E: 'mr', the meaning "
        "representation).",
    )
    text_column: str = Field("sentence", description="Column with the input text (the target text for causal-lm).")
    text_pair_column: str | None = Field(
        None, description="sequence-classification: optional second text column (sentence pairs, e.g. NLI)."
    )
    label_column: str | None = Field(
        "label",
        description="sequence-classification: column with the class label. None: unlabeled text (only the "
        "distillation objectives can train on it; validation then reports agreement with the teacher).",
    )
    prompt_column: str | None = Field(
        None,
        description="causal-lm: optional column put before the text (E2E: 'mr'); the sequence is "
        "prompt + prompt_separator + text. The prompt is also what greedy samples are generated from.",
    )
    prompt_separator: str = Field("\n", description="causal-lm: text placed between the prompt and the target text.")
    loss_on_prompt: bool = Field(
        False, description="causal-lm: also train on (and score perplexity over) the prompt tokens."
    )
    max_length: int = Field(128, ge=2, description="Truncate every sequence to this many tokens.")
    max_train_examples: int | None = Field(None, ge=1, description="Use only the first N training rows.")
    max_validation_examples: int | None = Field(None, ge=1, description="Use only the first N validation rows.")
    seed: int = Field(0, description="Seed of the train/validation split (validation_fraction).")


class FinetuneConfig(StrictModel):
    """How to recover (or fine-tune) a model: objectives, optimiser, schedule, budget, evaluation, checkpoints.

    The frozen fusion scale is a buffer and is never trained. Objectives are combined as
    ``task_weight * task + logits_weight * KD(T) + hidden_weight * layer-wise MSE``.

    Example:
        >>> cfg = FinetuneConfig(task="causal-lm", max_steps=10, task_weight=0.0, hidden_weight=1.0)
        >>> cfg.needs_teacher
        True
    """

    task: FinetuneTask = Field(
        "sequence-classification",
        description="sequence-classification (cross-entropy on a head), causal-lm (next-token loss), or "
        "feature-extraction (a model without head, e.g. a sentence encoder: hidden-state distillation only).",
    )
    task_weight: float = Field(1.0, ge=0.0, description="Weight of the task loss (needs labels for classification).")
    logits_weight: float = Field(
        0.0, ge=0.0, description="Weight of logit distillation from the teacher: KL(teacher || student) at temperature."
    )
    hidden_weight: float = Field(
        0.0,
        ge=0.0,
        description="Weight of layer-wise hidden-state distillation: the mean over layers of "
        "the per-token squared L2 distance to the teacher's hidden states (padding excluded).",
    )
    temperature: float = Field(
        2.0, gt=0.0, description="Softmax temperature of logit distillation (loss scaled by T^2)."
    )
    hidden_layers: list[int] | None = Field(
        None,
        description="Hidden-state indices to match (1..L are the layer outputs, 0 the embeddings). None: 1..L.",
    )
    trainable: Literal["all", "fused-mlps"] = Field(
        "all",
        description="all: every parameter is trained (the frozen scale never is). fused-mlps: only "
        "the linear layers of fused MLPs (the method's layer-wise tuning step).",
    )
    optimizer: Literal["adamw", "adam"] = Field(
        "adamw", description="Adam-type only: fusion preserves the Adam (sign) NTK, not the SGD one."
    )
    learning_rate: float = Field(5e-5, gt=0.0, description="Peak learning rate.")
    weight_decay: float = Field(0.01, ge=0.0, description="Decoupled weight decay (AdamW).")
    no_decay_bias_and_norm: bool = Field(
        True, description="Exclude biases and LayerNorm/RMSNorm weights from weight decay (the HF Trainer default)."
    )
    adam_beta1: float = Field(0.9, gt=0.0, lt=1.0, description="Adam beta1.")
    adam_beta2: float = Field(0.999, gt=0.0, lt=1.0, description="Adam beta2.")
    adam_epsilon: float = Field(1e-8, gt=0.0, description="Adam epsilon.")
    scheduler: Literal["linear", "cosine", "constant"] = Field(
        "linear", description="Learning-rate decay after warm-up (to 0 at the last step for linear/cosine)."
    )
    warmup_ratio: float = Field(0.06, ge=0.0, lt=1.0, description="Fraction of the steps spent warming up linearly.")
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="Clip the global gradient norm (None: no clipping).")
    batch_size: int = Field(16, ge=1, description="Examples per optimiser step per process (DDP: per rank).")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimiser step.")
    group_by_length: bool = Field(
        False,
        description="Put examples of similar length in the same batch (less padding, faster steps; every batch "
        "is still a random draw, as the HF Trainer's option of the same name).",
    )
    eval_batch_size: int = Field(64, ge=1, description="Examples per evaluation batch.")
    max_steps: int | None = Field(None, ge=1, description="Optimiser steps to run (sets the schedule length).")
    epochs: float | None = Field(
        None, gt=0.0, description="Passes over the training data, when max_steps is not given."
    )
    max_time_s: float | None = Field(
        None, gt=0.0, description="Wall-clock budget: stop (and evaluate) after this many seconds of training."
    )
    eval_every_steps: int | None = Field(
        None, ge=1, description="Evaluate every N steps (and at the end). None: only at the end."
    )
    eval_before: bool = Field(
        False, description="Also evaluate before the first step (the fused model's starting point), in the result."
    )
    keep_best: bool = Field(
        True,
        description="Keep the weights with the best validation metric and restore them at the end (accuracy for "
        "classification, teacher agreement without labels, perplexity for causal-lm, embedding cosine to the "
        "teacher for feature-extraction).",
    )
    checkpoint_every_steps: int | None = Field(
        None, ge=1, description="Write a resumable checkpoint every N steps (needs an output folder)."
    )
    generation_metric: Literal["bleu", "chrf", "rouge_l"] | None = Field(
        None,
        description="causal-lm: at every evaluation also decode the validation prompts greedily, score them "
        "against their references (BLEU/chrF by sacrebleu, ROUGE-L by rouge-score; pip install "
        "'edgefuse[generation]') and keep the weights with the best value of this metric instead of the lowest "
        "perplexity. Needs a prompt column and a tokenizer.",
    )
    generation_prompts: int = Field(
        100, ge=1, description="causal-lm: distinct validation prompts decoded per evaluation (generation_metric)."
    )
    generation_max_new_tokens: int = Field(
        64, ge=1, description="causal-lm: the most tokens decoded per prompt (generation_metric)."
    )
    quant_aware_bits: Literal[4, 8] | None = Field(
        None,
        description="Quantization-aware training: every weight MatMul but the lm_head computes with its weight "
        "rounded to onnxruntime's symmetric block grid of this many bits (gradients pass straight through), so "
        "the int4 (4) or int8-blocks (8) graph of the result holds exactly the weights training used. Evaluation "
        "and checkpoint selection see the rounded model. None: off.",
    )
    quant_aware_block_size: int = Field(
        32, ge=1, description="Block size of the quant-aware grid; must equal quantize.block_size."
    )
    num_samples: int = Field(3, ge=0, description="causal-lm: greedy samples generated from validation prompts.")
    sample_max_new_tokens: int = Field(40, ge=1, description="causal-lm: new tokens per greedy sample.")
    log_every_steps: int = Field(10, ge=1, description="Record the loss curve every N steps.")
    seed: int = Field(0, description="Seed of the data order and of dropout.")

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.task_weight + self.logits_weight + self.hidden_weight <= 0:
            raise ValueError("every objective weight is 0; set task_weight, logits_weight or hidden_weight above 0")
        if self.task == "feature-extraction" and (
            self.task_weight > 0 or self.logits_weight > 0 or self.hidden_weight <= 0
        ):
            raise ValueError(
                "task feature-extraction has no labels and no logits: set task_weight=0, logits_weight=0 and "
                f"hidden_weight>0 (got {self.task_weight}, {self.logits_weight}, {self.hidden_weight})"
            )
        if self.generation_metric is not None and self.task != "causal-lm":
            raise ValueError(
                f"generation_metric {self.generation_metric!r} needs task 'causal-lm' (got {self.task!r})"
            )
        if self.max_steps is None and self.epochs is None:
            raise ValueError("give max_steps or epochs (the schedule needs a length); max_time_s may cap either")
        return self

    @property
    def needs_teacher(self) -> bool:
        """True when a distillation objective is on (a frozen teacher model is required)."""
        return self.logits_weight > 0 or self.hidden_weight > 0
