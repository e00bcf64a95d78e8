"""Configuration of the optimize stage (``edgefuse optimize``): onnxruntime's transformer fusions, one switch each."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from edgefuse.config import StrictModel

# The fusions of onnxruntime.transformers.optimizer that edgefuse exposes, each mapped to one FusionOptions flag
# (edgefuse.optimize.fusions.FUSION_FLAGS).
FusionName = Literal[
    "group_query_attention", "layer_norm", "gelu", "skip_layer_norm", "bias_skip_layer_norm", "attention", "rotary",
    "embed_layer_norm", "bias_gelu", "gelu_approximation",
]
FUSIONS: tuple[str, ...] = (
    "group_query_attention", "layer_norm", "gelu", "skip_layer_norm", "bias_skip_layer_norm", "attention", "rotary",
    "embed_layer_norm", "bias_gelu", "gelu_approximation",
)
# Everything except gelu_approximation, which changes the function (tanh approximation of erf GELU)
DEFAULT_FUSIONS: tuple[str, ...] = tuple(f for f in FUSIONS if f != "gelu_approximation")
OrtModelType = Literal["auto", "bert", "gpt2"]
ORT_MODEL_TYPES: tuple[str, ...] = ("auto", "bert", "gpt2")


class OptimizeConfig(StrictModel):
    """Which of onnxruntime's transformer fusions to apply to an exported fp32 graph, and how to check it.

    Example:
        >>> sorted(OptimizeConfig(disable=["skip_layer_norm"]).enabled())[:3]
        ['attention', 'bias_gelu', 'bias_skip_layer_norm']
    """

    fusions: list[FusionName] | Literal["default", "none"] = Field(
        "default",
        description="The fusions to apply: a list of names, 'default' (all but gelu_approximation) or 'none' (the "
        "graph only goes through the optimizer's clean-up). Names: group_query_attention (edgefuse's own pass, "
        "run after onnxruntime's: the attention of a Llama-type decoder with KV cache -> one GroupQueryAttention "
        "node a layer, with the rotary embedding and the cache inside; cached keys are then rotated at absolute "
        "positions, see docs/optimize.md), layer_norm, gelu, skip_layer_norm (Add + "
        "LayerNormalization -> SkipLayerNormalization, SkipSimplifiedLayerNormalization for RMSNorm), "
        "bias_skip_layer_norm, attention (Attention; QAttention after int8 with op type Attention), rotary "
        "(RotaryEmbedding), embed_layer_norm (EmbedLayerNormalization), bias_gelu (BiasGelu / FastGelu with bias), "
        "gelu_approximation (tanh GELU: changes the function).",
    )
    disable: list[FusionName] = Field(
        default_factory=list, description="Fusions removed from 'fusions' (e.g. [skip_layer_norm])."
    )
    model_type: OrtModelType = Field(
        "auto",
        description="onnxruntime's optimizer class: bert (encoders) or gpt2 (decoders, with or without KV cache). "
        "auto: from the export manifest's model_type (BERT/RoBERTa-type -> bert; GPT-2, Llama-type -> gpt2).",
    )
    opt_level: Literal[0, 1] = Field(
        0,
        description="1: onnxruntime's basic graph optimisations (constant folding, redundant node elimination) run "
        "before the fusions; 0: the fusions only (the graph stays independent of this machine's kernels).",
    )
    atol: float = Field(1e-4, gt=0, description="Absolute tolerance of the optimized graph against the fp32 graph.")
    rtol: float = Field(1e-3, ge=0, description="Relative tolerance (|opt - fp32| <= atol + rtol * |fp32|).")
    min_cosine: float = Field(
        0.9999, gt=-1, le=1, description="Fail below this cosine of any output against the fp32 graph."
    )
    validate_shapes: list[tuple[int, int]] = Field(
        default_factory=lambda: [(1, 13), (3, 21)],
        description="(batch, sequence) shapes compared with the fp32 graph (rows after the first are padded).",
    )
    output_name: str | None = Field(
        None, description="File name of the optimized graph. None: model_opt.onnx, or model_opt-<hash>.onnx for a "
        "non-default fusion set."
    )
    overwrite: bool = Field(False, description="Replace an existing optimized graph of the same name.")
    seed: int = Field(0, description="Seed of the random validation tokens.")

    @model_validator(mode="after")
    def _check(self) -> OptimizeConfig:
        if self.output_name is not None and (not self.output_name.endswith(".onnx") or "/" in self.output_name
                                             or self.output_name.startswith(".")):
            raise ValueError(f"output_name {self.output_name!r} must be a plain file name ending in .onnx")
        if self.output_name == "model.onnx":
            raise ValueError("output_name 'model.onnx' would replace the fp32 graph; choose another name")
        for batch, seq in self.validate_shapes:
            if batch < 1 or seq < 2:
                raise ValueError(f"validation shape {(batch, seq)} needs batch >= 1 and sequence >= 2")
        if not self.validate_shapes:
            raise ValueError("validate_shapes is empty; give at least one (batch, sequence) shape")
        return self

    def enabled(self) -> tuple[str, ...]:
        """The fusions that will run, in :data:`FUSIONS` order.

        Example:
            >>> OptimizeConfig(fusions=["attention", "gelu"], disable=["gelu"]).enabled()
            ('attention',)
        """
        if isinstance(self.fusions, str):
            chosen: tuple[str, ...] | list[str] = DEFAULT_FUSIONS if self.fusions == "default" else ()
        else:
            chosen = self.fusions
        return tuple(f for f in FUSIONS if f in chosen and f not in self.disable)
