"""The whole pipeline in one typed config, and :func:`load_config` that reads it from YAML.

A config file is the API: everything ``edgefuse run`` does is written in one YAML file under
``export_configs/``, validated here. A section that is absent (or ``null``) switches its stage off.

Example:
    >>> cfg = PipelineConfig.model_validate({"schema_version": 1, "fusion": {"keep_ratio": 0.5}})
    >>> cfg.model.name_or_path, cfg.fusion.keep_ratio
    ('minilm', 0.5)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from edgefuse.config import StrictModel
from edgefuse.config.check import CheckConfig
from edgefuse.config.export import ExportConfig
from edgefuse.config.finetune import FINETUNE_TASKS, DataConfig, FinetuneConfig
from edgefuse.config.fusion import FusionConfig
from edgefuse.config.messages import apply_overrides, parse_override, validation_message
from edgefuse.config.optimize import OptimizeConfig
from edgefuse.config.profile import ProfileConfig
from edgefuse.config.quantize import QuantizeConfig
from edgefuse.config.report import ReportConfig
from edgefuse.config.search import SearchConfig
from edgefuse.config.tune import TuneConfig
from edgefuse.errors import ConfigError
from edgefuse.models import Task

SCHEMA_VERSION = 1
SCHEMA_COMMENT = "# yaml-language-server: $schema=./schema.json"

__all__ = [
    "SCHEMA_COMMENT", "SCHEMA_VERSION", "EvaluateConfig", "ModelConfig", "PipelineConfig", "apply_overrides",
    "config_from_dict", "dump_config", "json_schema", "load_config", "parse_override", "validation_message",
]


class ModelConfig(StrictModel):
    """The model to ship.

    Example:
        >>> ModelConfig(name_or_path="smollm2", task="causal-lm").num_labels
        2
    """

    name_or_path: str = Field(
        "minilm",
        description="A built-in alias (minilm: all-MiniLM-L6-v2; smollm2: SmolLM2-135M), a local folder "
        "(safetensors) or a Hugging Face Hub id.",
    )
    task: Task = Field(
        "feature-extraction",
        description="The head to load: feature-extraction (sentence embeddings), sequence-classification or causal-lm.",
    )
    num_labels: int = Field(2, ge=1, description="sequence-classification: number of classes.")
    trust_remote_code: bool = Field(
        False, description="Allow custom model code from the folder or Hub; off unless you trust the source."
    )


class EvaluateConfig(StrictModel):
    """How the ``evaluate`` stage compares every exported graph with PyTorch (and with the teacher).

    Example:
        >>> EvaluateConfig().max_examples
        256
    """

    max_examples: int = Field(
        256, ge=1, description="Validation examples compared (the training split when there is no validation data; "
        "seeded random tokens when there is no data section)."
    )
    batch_size: int = Field(16, ge=1, description="Examples per batch.")
    threads: int = Field(2, ge=1, description="onnxruntime intra-op threads.")
    generation_prompts: int | None = Field(
        None,
        ge=1,
        description="causal-lm: also judge by generating. Every graph, the recovered PyTorch model and the "
        "teacher greedily decode the first N distinct held-out prompts (data.prompt_column, grouped references); "
        "BLEU/chrF (sacrebleu), ROUGE-L (rouge-score), distinct-n and the degenerate share; plus every graph's "
        "per-token decode latency (batch 1, interleaved). Needs pip install 'edgefuse[generation]'. None: off.",
    )
    generation_max_new_tokens: int = Field(64, ge=1, description="causal-lm: the most tokens decoded per prompt.")
    decode_tokens: int = Field(32, ge=2, description="causal-lm: tokens decoded per latency run (EOS suppressed).")
    decode_rounds: int = Field(3, ge=1, description="causal-lm: interleaved latency rounds per graph.")


class PipelineConfig(StrictModel):
    """Every stage of ``edgefuse run`` / ``edgefuse check``: teacher -> search -> fuse -> finetune -> export ->
    quantize -> evaluate -> profile -> report. Absent sections switch their stage off.

    Example:
        >>> cfg = PipelineConfig(schema_version=1, fusion=FusionConfig(keep_ratio=0.25))
        >>> cfg.finetune is None
        True
    """

    schema_version: Literal[1] = Field(
        description="Version of this config format. edgefuse 0.1 reads version 1; a key that changes meaning "
        "bumps it, and files of another version are rejected instead of misread."
    )
    run_dir: str | None = Field(
        None,
        description="Folder of the run (stage outputs, records, report). None: runs/<config file name>. "
        "Relative paths here and everywhere in the config are relative to the working directory.",
    )
    model: ModelConfig = Field(default_factory=ModelConfig, description="The model to ship.")
    data: DataConfig | None = Field(
        None, description="Training and validation text: used by teacher, finetune, search, evaluation and check."
    )
    teacher: FinetuneConfig | None = Field(
        None,
        description="Fine-tune the unfused model on the task first (deployment order: fine-tuned model -> fuse -> "
        "recover). The result is the teacher of recovery and the reference of the checks. None: the model "
        "as loaded is the teacher.",
    )
    teacher_cache: bool | str = Field(
        True,
        description="Where trained teachers are kept for reuse by any run: true, a '.teacher-cache' folder beside "
        "the run folder (runs/.teacher-cache); a path; false, no cache. A teacher is reused when the source "
        "model, the data files, the model/data/teacher sections, edgefuse's training code and the torch and "
        "transformers versions are all unchanged.",
    )
    search: SearchConfig | None = Field(
        None, description="Find the smallest fusion.keep_ratio that meets a budget (bisection) before fusing."
    )
    fusion: FusionConfig | None = Field(None, description="MLP fusion. None: ship the model unfused.")
    finetune: FinetuneConfig | list[FinetuneConfig] | None = Field(
        None,
        description="Recovery after fusion (distillation from the teacher and/or the task loss). A list runs its "
        "phases in order on the same model, e.g. layer-wise hidden-state distillation of the fused MLPs "
        "(trainable: fused-mlps), then the task loss with logit distillation. None: skip.",
    )
    export: ExportConfig | None = Field(
        None, description="Export the final model to ONNX, validated against PyTorch. None: stop after PyTorch."
    )
    optimize: OptimizeConfig | None = Field(
        None,
        description="Apply onnxruntime's transformer fusions to the exported graph (checked against it); quantize "
        "then works on the optimized graph. None (default): the exporter's graph as is. Whether fusions help depends "
        "on the fusion set, the session options and the CPU (benchmarks/results/tune.md); a tune section measures it.",
    )
    quantize: QuantizeConfig | None = Field(None, description="Quantize the exported graph. None: fp32 only.")
    tune: TuneConfig | None = Field(
        None,
        description="Choose the fastest graph that passes the gate on the target by measurement (fusion subsets x "
        "int8 modes x session options; see docs/optimize.md). Its winner is what profile times and check judges "
        "as the candidate. None: skip.",
    )
    reference: bool = Field(
        True,
        description="Also export the unfused (teacher) model in fp32, as the baseline that profile ratios and "
        "check budgets compare against. Skipped when the final model is the teacher itself.",
    )
    evaluate: EvaluateConfig = Field(
        default_factory=EvaluateConfig,
        description="Compare every graph with PyTorch and with the teacher on text (runs whenever export is on).",
    )
    profile: ProfileConfig | None = Field(
        None, description="Latency, memory and per-operator time of every graph, interleaved. None: skip."
    )
    report: ReportConfig | None = Field(None, description="JSON / Markdown / HTML report of the run. None: skip.")
    check: CheckConfig | None = Field(None, description="Budgets for `edgefuse check`.")

    @model_validator(mode="before")
    @classmethod
    def _default_tasks(cls, data: Any) -> Any:
        """Sections that have their own ``task`` key take ``model.task`` unless they set one (one vocabulary,
        no repetition in every recipe)."""
        if not isinstance(data, dict) or not isinstance(data.get("model", {}), dict):
            return data
        task = (data.get("model") or {}).get("task", "feature-extraction")
        out = dict(data)
        def with_task(section: Any, key: str) -> Any:
            if isinstance(section, dict) and "task" not in section and (key == "export" or task in FINETUNE_TASKS):
                return {**section, "task": task}
            return section

        for key in ("export", "teacher", "finetune"):
            section = out.get(key)
            out[key] = [with_task(s, key) for s in section] if isinstance(section, list) else with_task(section, key)
        return out

    @model_validator(mode="after")
    def _cross_checks(self) -> PipelineConfig:
        problems = []
        task = self.model.task
        if self.export is not None and self.export.task != task:
            problems.append(f"export.task {self.export.task!r} differs from model.task {task!r}; remove export.task")
        phases = [("teacher", self.teacher)] if self.teacher is not None else []
        phases += [(f"finetune[{i}]" if isinstance(self.finetune, list) else "finetune", ft)
                   for i, ft in enumerate(self.finetune_phases)]
        for key, ft in phases:
            if task in FINETUNE_TASKS and ft.task != task:
                problems.append(f"{key}.task {ft.task!r} differs from model.task {task!r}; remove {key}.task")
        if isinstance(self.finetune, list) and not self.finetune:
            problems.append("finetune is an empty list; give at least one phase, or null to skip recovery")
        for key in ("optimize", "quantize", "tune", "profile"):
            if getattr(self, key) is not None and self.export is None:
                problems.append(f"{key} needs an export section (it works on the exported graph)")
        for key, ft in phases:
            problems += self._quant_aware_problems(key, ft)
        if self.check is not None:
            problems += self._check_problems(self.check)
        if self.search is not None and self.fusion is None:
            problems.append("search needs a fusion section (it chooses fusion.keep_ratio)")
        for key in ("teacher", "finetune"):
            if getattr(self, key) is not None and self.data is None:
                problems.append(f"{key} needs a data section (data.train at least)")
        wants_accuracy = (self.search is not None and self.search.max_accuracy_drop is not None) or (
            self.check is not None and self.check.budgets.max_accuracy_drop is not None
        )
        if wants_accuracy:
            if self.model.task != "sequence-classification":
                problems.append(
                    f"an accuracy budget needs model.task 'sequence-classification' (got {self.model.task!r}); "
                    "use a cosine budget instead"
                )
            if self.data is None or (self.data.validation is None and self.data.validation_fraction is None):
                problems.append("an accuracy budget needs labelled validation data (data.validation)")
        if self.evaluate.generation_prompts is not None:
            if self.model.task != "causal-lm":
                problems.append(f"evaluate.generation_prompts needs model.task 'causal-lm' (got {self.model.task!r})")
            if self.data is None or not self.data.prompt_column:
                problems.append("evaluate.generation_prompts needs data.prompt_column (E2E: mr) to generate from")
            elif self.data.validation is None and self.data.validation_fraction is None:
                problems.append("evaluate.generation_prompts needs held-out data (data.validation_fraction: 0.1)")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    @property
    def finetune_phases(self) -> list[FinetuneConfig]:
        """The recovery phases in order ([] when recovery is off).

        Example:
            >>> PipelineConfig(schema_version=1).finetune_phases
            []
        """
        if self.finetune is None:
            return []
        return list(self.finetune) if isinstance(self.finetune, list) else [self.finetune]

    def _quant_aware_problems(self, key: str, ft: FinetuneConfig) -> list[str]:
        """A quant-aware phase trains against one grid: the quantize section must write that grid."""
        bits = ft.quant_aware_bits
        if bits is None:
            return []
        q = self.quantize
        mode = {4: "int4", 8: "int8-blocks"}[bits]
        int8_is_blocks = bits == 8 and q is not None and q.mode == "int8" and self.model.task == "causal-lm"
        if q is None or (q.mode != mode and not int8_is_blocks):
            return [f"{key}.quant_aware_bits {bits} trains for quantize.mode {mode!r}, but the quantize section is "
                    f"{'missing' if q is None else repr(q.mode)}: set quantize.mode: {mode} or remove quant_aware_bits"]
        problems = []
        if q.block_size != ft.quant_aware_block_size:
            problems.append(f"{key}.quant_aware_block_size {ft.quant_aware_block_size} differs from "
                            f"quantize.block_size {q.block_size}: set both to the same value")
        if bits == 4 and (not q.int4_symmetric or q.int4_algorithm != "default"):
            problems.append(f"{key}.quant_aware_bits 4 trains for onnxruntime's symmetric round-to-nearest grid; "
                            f"quantize has int4_symmetric {q.int4_symmetric}, int4_algorithm {q.int4_algorithm!r}: "
                            "set int4_symmetric: true and int4_algorithm: default")
        if bits == 4 and q.int4_scaling != "none":
            problems.append(f"{key}.quant_aware_bits 4 trained the weights as they are on the grid; quantize."
                            f"int4_scaling {q.int4_scaling!r} would "
                            f"{'rescale and clip' if q.int4_scaling == 'activation' else 'rescale'} them first: set "
                            "quantize.int4_scaling: none")
        if self.export is not None and self.export.fold_scales not in ("auto",):
            problems.append(f"{key}.quant_aware_bits assumes export.fold_scales 'auto' (where the grid is applied), "
                            f"got {self.export.fold_scales!r}")
        return problems

    def _check_problems(self, check: CheckConfig) -> list[str]:
        """What the check's budgets need from the other sections."""
        active = check.budgets.active()
        problems = []
        if self.export is None:
            problems.append("check needs an export section (budgets judge an exported graph)")
        if check.candidate == "quantized" and self.quantize is None and self.tune is None:
            problems.append("check.candidate 'quantized' needs a quantize section (or set check.candidate: fp32)")
        timed = [k for k in ("max_latency_ratio", "max_latency_ms", "max_peak_rss_mib") if k in active]
        if timed and self.profile is None:
            problems.append(f"check.budgets {', '.join(timed)} need a profile section")
        if timed and self.profile is not None and "max_peak_rss_mib" in timed and not self.profile.memory:
            problems.append("check.budgets.max_peak_rss_mib needs profile.memory: true")
        generated = [k for k in ("max_bleu_drop", "max_degenerate_fraction", "max_decode_ms", "max_decode_ratio")
                     if k in active]
        if generated and self.evaluate.generation_prompts is None:
            problems.append(f"check.budgets {', '.join(generated)} need evaluate.generation_prompts (generation "
                            "metrics and decode latency are measured by the evaluate stage)")
        if "max_decode_ratio" in active and check.reference == "original-fp32" and not self.reference:
            problems.append("check.budgets max_decode_ratio compares with the original fp32 graph, which reference: "
                            "false switches off; set reference: true or check.reference: fp32")
        ratios = [k for k in ("max_latency_ratio", "max_size_ratio") if k in active]
        if ratios and check.reference == "original-fp32" and not self.reference:
            problems.append(
                f"check.budgets {', '.join(ratios)} compare with the original fp32 graph, which reference: false "
                "switches off; set reference: true or check.reference: fp32"
            )
        return problems


# ---------------------------------------------------------------- loading


def config_from_dict(data: Any, source: str = "config") -> PipelineConfig:
    """Validate a plain mapping (as read from YAML) into a :class:`PipelineConfig`.

    Raises:
        ConfigError: not a mapping, a missing or unsupported ``schema_version``, or any invalid key or value.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of keys (got {type(data).__name__})")
    if "schema_version" not in data:
        raise ConfigError(f"{source}: schema_version is missing; add `schema_version: {SCHEMA_VERSION}` at the top")
    version = data["schema_version"]
    if version != SCHEMA_VERSION:
        raise ConfigError(
            f"{source}: schema_version {version!r} is not supported; this edgefuse reads schema_version "
            f"{SCHEMA_VERSION} (was the file written for another edgefuse version?)"
        )
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_message(exc, source, PipelineConfig)) from None


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read a YAML config (``yaml.safe_load``), apply ``--set`` overrides, validate.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings, values read as YAML.

    Raises:
        TargetNotFoundError: the file does not exist.
        ConfigError: unreadable YAML, or an invalid key or value (the message names the key path).

    Example:
        >>> cfg = load_config("export_configs/default.yaml", ["fusion.keep_ratio=0.25"])  # doctest: +SKIP
    """
    from edgefuse.io_utils import read_yaml

    data = read_yaml(Path(path))  # size cap, UTF-8, alias-bomb limit, safe_load
    if data is None:
        data = {}
    if overrides and isinstance(data, dict):
        data = apply_overrides(data, overrides)
    return config_from_dict(data, str(path))


def dump_config(cfg: PipelineConfig) -> str:
    """The resolved config (every default filled in) as YAML that :func:`load_config` reads back unchanged.

    Example:
        >>> text = dump_config(PipelineConfig(schema_version=1))
        >>> text.splitlines()[1]
        'schema_version: 1'
    """
    import yaml

    body = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, default_flow_style=False, width=100)
    return f"{SCHEMA_COMMENT}\n{body}"


def json_schema() -> dict[str, Any]:
    """The JSON schema of :class:`PipelineConfig` (committed as ``export_configs/schema.json``)."""
    schema = PipelineConfig.model_json_schema()
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "title": "edgefuse pipeline config", **schema}
