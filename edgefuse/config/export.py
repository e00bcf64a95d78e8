"""Configuration of the export stage (``edgefuse export``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from edgefuse.config import StrictModel

ExportTask = Literal["feature-extraction", "sequence-classification", "causal-lm"]
EXPORT_TASKS: tuple[str, ...] = ("feature-extraction", "sequence-classification", "causal-lm")
FoldChoice = Literal["auto", "keep", "down", "up"]
FOLD_CHOICES: tuple[str, ...] = ("auto", "keep", "down", "up")
Exporter = Literal["auto", "optimum", "torch"]
EXPORTERS: tuple[str, ...] = ("auto", "optimum", "torch")


class ExportConfig(StrictModel):
    """How to export a (fused) model to a validated ONNX folder.

    Example:
        >>> ExportConfig(task="causal-lm").with_past
        True
    """

    task: ExportTask = Field(
        "feature-extraction",
        description="What the graph computes: feature-extraction (last_hidden_state), sequence-classification "
        "(logits) or causal-lm (logits; with the KV cache when with_past).",
    )
    with_past: bool = Field(
        True,
        description="causal-lm only: export the graph with past_key_values inputs and present outputs (optimum's "
        "text-generation-with-past), so generation reuses the KV cache.",
    )
    exporter: Exporter = Field(
        "auto",
        description="auto: optimum-onnx's exporter where it supports the architecture and task, else torch.onnx. "
        "optimum: require optimum-onnx. torch: torch.onnx.export directly (no KV cache graph).",
    )
    torch_dynamo: bool = Field(
        False,
        description="torch exporter only: use the dynamo exporter instead of the TorchScript tracer (the one "
        "optimum uses). Dynamo is ~25x slower to export and cannot trace data-dependent MoE routing.",
    )
    opset: int | None = Field(
        None, ge=14, le=23, description="ONNX opset. None: optimum's default for the architecture, 18 for torch."
    )
    fold_scales: FoldChoice = Field(
        "auto",
        description="Where the frozen fusion scale (cluster sizes) goes: keep (a separate elementwise Mul before "
        "the down projection), down (folded into the down projection's input columns), up (folded into the up "
        "projection's rows; exact only for gated MLPs and ReLU-type activations). auto: the choice with the "
        "lowest measured int8 error (see docs/export.md).",
    )
    moe_routing: Literal["sparse", "dense"] = Field(
        "sparse",
        description="Sparse MoE blocks (Mixtral, Qwen2-MoE): sparse traces a gather-compute-scatter forward whose "
        "expert compute scales with top_k, and falls back to dense when that graph misses validation; dense runs "
        "every expert on every token (num_experts / top_k times the expert compute). Switch Transformers is "
        "always dense.",
    )
    atol: float = Field(1e-4, gt=0, description="Absolute tolerance of ONNX Runtime fp32 against PyTorch.")
    rtol: float = Field(1e-3, ge=0, description="Relative tolerance (|ort - torch| <= atol + rtol * |torch|).")
    validate_shapes: list[tuple[int, int]] = Field(
        default_factory=lambda: [(1, 13), (3, 21)],
        description="(batch, sequence) shapes checked against PyTorch; none equals the traced shape (2, 16). "
        "Rows after the first of a batch are padded, so padding is always exercised.",
    )
    generate_tokens: int = Field(
        8, ge=0, description="causal-lm: greedy tokens that ONNX Runtime must produce identically to PyTorch (0: skip)."
    )
    seed: int = Field(0, description="Seed of the random token ids used for validation.")
    labels: list[str] | None = Field(
        None, description="sequence-classification: the class names in label-id order, written to config.json's "
        "id2label/label2id (so optimum's pipeline says 'positive', not 'LABEL_1'). None: keep the model's."
    )
    sentence_embedding: bool = Field(
        False, description="feature-extraction: also output sentence_embedding (mean pooling over the real tokens, "
        "then L2 normalisation: the sentence-transformers head of all-MiniLM-L6-v2), validated like the rest."
    )
    ort: bool = Field(
        False, description="Also write model.ort (onnxruntime Mobile format) and model.required_operators.config "
        "(for a reduced-size build), converted by onnxruntime's tool and verified against model.onnx."
    )
    ort_optimization: Literal["Fixed", "Runtime"] = Field(
        "Fixed", description="ORT-format optimisation style: Fixed (CPU, XNNPACK) or Runtime (NNAPI, CoreML)."
    )

    @field_validator("validate_shapes")
    @classmethod
    def _shapes(cls, value: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if len(value) < 2:
            raise ValueError(f"give at least two validation shapes (got {value}); one shape cannot catch frozen axes")
        for batch, seq in value:
            if batch < 1 or seq < 2:
                raise ValueError(f"validation shape {(batch, seq)} needs batch >= 1 and sequence >= 2")
            if (batch, seq) == (2, 16):
                raise ValueError("validation shape (2, 16) is the traced shape; choose shapes other than the trace")
        return value
