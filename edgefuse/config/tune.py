"""Configuration of ``edgefuse tune``: the candidate graphs and session options, the gate, and the timing budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from edgefuse.config import StrictModel
from edgefuse.config.optimize import FusionName

# onnxruntime's CPU graph transformers that a session can switch off (disabled_optimizers). onnxruntime ignores a
# name it does not know, so a typo would silently tune nothing: names are checked against this list.
KNOWN_OPTIMIZERS: tuple[str, ...] = (
    "AttentionFusion", "BiasDropoutFusion", "BiasGeluFusion", "BiasSoftmaxFusion", "CommonSubexpressionElimination",
    "ConcatSliceElimination", "ConstantFolding", "ConstantSharing", "ConvActivationFusion", "ConvAddFusion",
    "ConvBNFusion", "ConvMulFusion", "DivMulFusion", "DoubleQDQPairsRemover", "DynamicQuantizeMatMulFusion",
    "EmbedLayerNormFusion", "FastGeluFusion", "GatherSliceToSplitFusion", "GatherToSliceFusion", "GeluFusion",
    "GemmActivationFusion", "GemmTransposeFusion", "LayerNormFusion", "MatMulActivationFusion", "MatMulAddFusion",
    "MatMulIntegerToFloatFusion", "MatMulScaleFusion", "MatmulTransposeFusion", "NchwcTransformer", "NhwcTransformer",
    "NotWhereFusion", "QDQFinalCleanupTransformer", "QDQPropagationTransformer", "QDQS8ToU8Transformer",
    "QDQSelectorActionTransformer", "QuickGeluFusion", "ReshapeFusion", "SimplifiedLayerNormFusion",
    "SkipLayerNormFusion", "TransposeOptimizer",
)
MAX_CANDIDATES = 32
CandidateQuant = Literal["fp32", "dynamic", "static"]


class SessionSpec(StrictModel):
    """onnxruntime session options a candidate runs with (and that the tuned folder records for its users).

    Example:
        >>> SessionSpec(disabled_optimizers=["SkipLayerNormFusion"]).to_options()
        {'disabled_optimizers': ['SkipLayerNormFusion']}
    """

    disabled_optimizers: list[str] = Field(
        default_factory=list, description="onnxruntime graph transformers switched off in the session, e.g. "
        "SkipLayerNormFusion (its kernel is slower than Add + LayerNormalization on some x86 CPUs)."
    )
    allow_spinning: bool = Field(False, description="Let idle intra-op threads spin between kernels.")
    intra_op_threads: int | None = Field(
        None, ge=1, description="Intra-op threads of this candidate. None: tune.threads."
    )
    session_config: dict[str, str] = Field(
        default_factory=dict, description="Extra session config entries (add_session_config_entry)."
    )

    @field_validator("disabled_optimizers")
    @classmethod
    def _known(cls, value: list[str]) -> list[str]:
        import difflib

        for name in value:
            if name not in KNOWN_OPTIMIZERS:
                near = difflib.get_close_matches(name, KNOWN_OPTIMIZERS, n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ValueError(f"unknown onnxruntime optimizer {name!r}{hint}; onnxruntime would silently ignore it")
        return value

    def to_options(self) -> dict[str, Any]:
        """The non-default options only, as recorded in the manifest and passed to the profile runner."""
        return {k: v for k, v in self.model_dump(mode="json").items() if v not in (None, False, [], {})}


class CandidateConfig(StrictModel):
    """One candidate: which fusions, which int8 mode, which session options.

    Example:
        >>> CandidateConfig(name="int8", quantize="dynamic").per_channel
        True
    """

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", description="Unique name (lowercase, digits, _ . -).")
    fusions: list[FusionName] | Literal["default", "none"] = Field(
        "none", description="onnxruntime transformer fusions applied first (as in the optimize section)."
    )
    disable_fusions: list[FusionName] = Field(default_factory=list, description="Fusions removed from 'fusions'.")
    quantize: CandidateQuant = Field(
        "dynamic", description="fp32 (no quantization), dynamic int8 (MatMulInteger / QAttention) or static int8 QDQ."
    )
    per_channel: bool = Field(True, description="int8: one weight scale per output channel (else per tensor).")
    op_types: list[str] | None = Field(
        None, description="int8: operator types to quantize. None: MatMul and Gather, plus Attention and "
        "EmbedLayerNormalization when the attention/embed_layer_norm fusions ran."
    )
    session: SessionSpec = Field(default_factory=SessionSpec, description="onnxruntime session options.")

    def fusion_list(self) -> tuple[str, ...]:
        """The fusions that run, in the optimizer's order (empty: the exported graph as is)."""
        from edgefuse.config.optimize import OptimizeConfig

        return OptimizeConfig(fusions=self.fusions, disable=self.disable_fusions).enabled()


class TuneConfig(StrictModel):
    """What ``edgefuse tune`` builds, how it gates and times the candidates, and where.

    Example:
        >>> TuneConfig(budget_s=20).clock
        'cpu'
    """

    candidates: list[CandidateConfig] | None = Field(
        None, description="The candidates. None: a small default set for the architecture (see docs/optimize.md): "
        "fp32; int8 per-channel with and without SkipLayerNormFusion; the optimizer's fusions + int8 with and "
        "without skip_layer_norm; per-tensor int8; static QDQ int8 (encoders)."
    )
    budget_s: float = Field(
        60.0, gt=0, le=3600, description="Seconds of interleaved timing for all candidates together (at least "
        "min_rounds rounds are always run)."
    )
    min_rounds: int = Field(5, ge=3, description="Fewest interleaved timing rounds, whatever the budget.")
    warmup_runs: int = Field(3, ge=0, description="Untimed runs of every candidate before timing.")
    threads: int = Field(1, ge=1, description="Intra-op threads the candidates are timed with (unless their own "
                         "session sets intra_op_threads).")
    batch_size: int = Field(1, ge=1, description="Batch size timed.")
    sequence_length: int = Field(128, ge=2, description="Tokens per sequence timed.")
    clock: Literal["cpu", "wall"] = Field(
        "cpu", description="Which clock ranks the candidates (both are reported): cpu (thread CPU time at 1 "
        "thread, process CPU time otherwise; robust to a preempted machine) or wall."
    )
    min_cosine: float = Field(
        0.99, gt=-1, le=1, description="Gate: mean cosine of the task output (pooled embedding, logits, next-token "
        "logits) against the fp32 graph on real text, on this machine; on a remote target the device's outputs must "
        "also agree with this machine's run of the same graph to this cosine. A candidate below it is rejected."
    )
    calibration_data: Path | None = Field(
        None, description="TSV/CSV of texts for the gate and static calibration. None: the built-in English corpus."
    )
    calibration_samples: int = Field(
        64, ge=1,
        description="Texts taken from calibration_data (a pipeline: from its training rows), evenly spaced over "
        "the file rather than its first rows: a sorted file's start is one kind of text.",
    )
    max_sequence_length: int = Field(128, ge=2, description="Tokens per gate/calibration text.")
    eval_data: Path | None = Field(
        None, description="Labelled TSV (sentence, label) of a sequence-classification export: accuracy gate."
    )
    eval_samples: int | None = Field(None, ge=1, description="Rows of eval_data (None: all).")
    max_accuracy_drop: float | None = Field(
        None, ge=0, le=1, description="Gate: fp32 accuracy minus candidate accuracy on eval_data (needs eval_data)."
    )
    target: str = Field(
        "local", description="Where candidates are timed: local or ssh://user@host[:port]. arm64-emulated is refused "
        "(qemu's timings say nothing about a device; it checks numerics only)."
    )
    profile_settings: dict[str, Any] = Field(
        default_factory=dict, description="Extra profile keys for the target (ssh_identity_file, "
        "ssh_known_hosts_file, ssh_python, provider, timeout_s)."
    )
    output_name: str = Field("model_tuned.onnx", description="File name of the winning graph in the export folder.")
    overwrite: bool = Field(False, description="Replace an earlier tuned graph and report.")
    seed: int = Field(0, description="Seed of the timing inputs.")

    @field_validator("candidates")
    @classmethod
    def _candidates(cls, value: list[CandidateConfig] | None) -> list[CandidateConfig] | None:
        if value is None:
            return value
        if not value:
            raise ValueError("candidates is an empty list; give at least one, or leave it out for the default set")
        if len(value) > MAX_CANDIDATES:
            raise ValueError(f"{len(value)} candidates; at most {MAX_CANDIDATES} (tuning takes seconds, not hours)")
        names = [c.name for c in value]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"candidate names must be unique; repeated: {', '.join(dupes)}")
        return value

    @model_validator(mode="after")
    def _check(self) -> TuneConfig:
        from edgefuse.config.profile import ProfileConfig

        reserved = {"target", "threads", "batch_sizes", "sequence_lengths", "runs", "time_budget_s", "min_runs",
                    "warmup_runs", "clock", "memory", "op_profile", "check_outputs", "min_cosine", "seed"}
        clash = sorted(reserved & set(self.profile_settings))
        if clash:
            raise ValueError(f"profile_settings may not set {', '.join(clash)}; use the tune keys instead")
        from pydantic import ValidationError

        try:
            ProfileConfig.model_validate({"target": self.target, **self.profile_settings})
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err["loc"]) or "target"
            raise ValueError(f"{where}: {str(err['msg']).removeprefix('Value error, ')}") from None
        if self.target == "arm64-emulated":
            raise ValueError("target arm64-emulated cannot tune: qemu's timings say nothing about a real CPU, it "
                             "checks numerics only (edgefuse profile --target arm64-emulated); tune on the device "
                             "with ssh://user@host")
        if self.max_accuracy_drop is not None and self.eval_data is None:
            raise ValueError("max_accuracy_drop needs eval_data (a labelled TSV)")
        if not self.output_name.endswith(".onnx") or "/" in self.output_name or self.output_name == "model.onnx" \
                or self.output_name.startswith("."):
            raise ValueError(f"output_name {self.output_name!r} must be a plain .onnx file name other than model.onnx")
        return self
