"""Fusion names -> onnxruntime's ``FusionOptions``, and which optimizer class and head count a folder needs.

Every flag of ``FusionOptions`` that edgefuse does not expose by name is set explicitly (off), so that a new
onnxruntime release that turns a default on does not change edgefuse's graphs silently.

Example:
    >>> ort_model_type("roberta"), ort_model_type("llama")
    ('bert', 'gpt2')
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from edgefuse.errors import UnsupportedArchitectureError

# edgefuse fusion name -> FusionOptions attribute
FUSION_FLAGS: dict[str, str] = {
    "layer_norm": "enable_layer_norm",
    "gelu": "enable_gelu",
    "skip_layer_norm": "enable_skip_layer_norm",
    "bias_skip_layer_norm": "enable_bias_skip_layer_norm",
    "attention": "enable_attention",
    "rotary": "enable_rotary_embeddings",
    "embed_layer_norm": "enable_embed_layer_norm",
    "bias_gelu": "enable_bias_gelu",
    "gelu_approximation": "enable_gelu_approximation",
}
# FusionOptions flags edgefuse always turns off: GPU-only int8 kernels and a GEMM fusion for CUDA
ALWAYS_OFF = ("enable_qordered_matmul", "enable_gemm_fast_gelu", "use_multi_head_attention")
# transformers model_type -> onnxruntime optimizer class (MODEL_TYPES key)
ENCODERS = ("bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert")
DECODERS = ("gpt2", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2")


def ort_model_type(model_type: str, choice: str = "auto") -> str:
    """onnxruntime's optimizer ``model_type`` for a transformers ``model_type`` (``choice`` other than auto wins).

    Raises:
        UnsupportedArchitectureError: auto for an architecture onnxruntime's fusions do not cover.
    """
    if choice != "auto":
        return choice
    if model_type in ENCODERS:
        return "bert"
    if model_type in DECODERS:
        return "gpt2"
    raise UnsupportedArchitectureError(
        f"onnxruntime's transformer fusions do not cover model_type {model_type!r} (encoders: {', '.join(ENCODERS)}; "
        f"decoders: {', '.join(DECODERS)}); set model_type bert or gpt2 to try anyway, or skip optimize"
    )


def ort_model_type_or_none(model_type: str) -> str | None:
    """:func:`ort_model_type` with ``auto``, or None for an architecture the fusions do not cover.

    Example:
        >>> ort_model_type_or_none("mixtral") is None
        True
    """
    try:
        return ort_model_type(model_type)
    except UnsupportedArchitectureError:
        return None


# fusions edgefuse runs itself, on the graph onnxruntime's optimizer wrote (edgefuse.optimize.gqa)
OWN_FUSIONS: tuple[str, ...] = ("group_query_attention",)


def fusion_options(model_type: str, enabled: Iterable[str]) -> Any:
    """A ``FusionOptions`` with exactly the onnxruntime fusions in ``enabled`` switched on (edgefuse's own passes,
    :data:`OWN_FUSIONS`, are not onnxruntime's concern)."""
    from onnxruntime.transformers.fusion_options import FusionOptions

    on = set(enabled) - set(OWN_FUSIONS)
    unknown = on - set(FUSION_FLAGS)
    if unknown:
        raise ValueError(f"unknown fusion(s) {sorted(unknown)}; known: {', '.join(FUSION_FLAGS)}")
    opts = FusionOptions(model_type)
    for name, flag in FUSION_FLAGS.items():
        setattr(opts, flag, name in on)
    for flag in ALWAYS_OFF:
        setattr(opts, flag, False)
    return opts


def heads_and_hidden(folder: Path) -> tuple[int, int]:
    """(attention heads, hidden size) from the folder's ``config.json``; (0, 0) lets onnxruntime detect them."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        cfg = {}
    heads = cfg.get("num_attention_heads", cfg.get("n_head", 0)) or 0
    hidden = cfg.get("hidden_size", cfg.get("n_embd", cfg.get("dim", 0))) or 0
    return int(heads), int(hidden)


# Operator types each fusion writes (for the counts in the result)
FUSED_OPS: tuple[str, ...] = (
    "Attention", "MultiHeadAttention", "GroupQueryAttention", "EmbedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "LayerNormalization", "SimplifiedLayerNormalization", "Gelu", "FastGelu",
    "BiasGelu", "RotaryEmbedding",
)
