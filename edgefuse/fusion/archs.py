"""Architecture adapters: where the MLPs of each supported model type live, and how they are laid out.

One small table entry per architecture (optimum-onnx ``model_configs.py`` style). Adding an architecture is
one :class:`ArchSpec` in :data:`MLP_SPECS` plus one test case in ``tests/test_archs.py``.

Example:
    >>> spec = get_arch_spec("bert")
    >>> spec.kinds[0].up, spec.kinds[0].down, spec.kinds[0].layout
    ('intermediate.dense', 'output.dense', 'linear')
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edgefuse.errors import UnsupportedArchitectureError

Layout = Literal["linear", "conv1d"]
Role = Literal["dense", "expert", "shared_expert"]


@dataclass(frozen=True)
class MlpKind:
    """One kind of MLP inside an architecture (e.g. a Qwen2-MoE expert, or its shared expert).

    ``pattern`` is searched (``re.search``) in the fully qualified module name; its ``layer`` group is the
    transformer layer index used by ``FusionConfig.layers``. ``up``/``gate``/``down`` are attribute paths
    relative to the matched module. ``layout`` is ``linear`` for ``nn.Linear`` ([out, in]) and ``conv1d``
    for HF ``Conv1D`` ([in, out], output width in ``nf``). ``config_field`` is the config attribute that
    holds this kind's intermediate width.
    """

    pattern: str
    up: str
    down: str
    config_field: str
    gate: str | None = None
    layout: Layout = "linear"
    role: Role = "dense"

    @property
    def regex(self) -> re.Pattern[str]:
        return re.compile(self.pattern)


@dataclass(frozen=True)
class ArchSpec:
    """Everything fusion needs to know about one ``model_type``."""

    model_type: str
    kinds: tuple[MlpKind, ...]
    act_field: str
    router_patterns: tuple[str, ...] = ()  # parameter-name regexes of routers/gates: frozen, never fused

    @property
    def is_moe(self) -> bool:
        return any(k.role == "expert" for k in self.kinds)


def _bert_like(model_type: str) -> ArchSpec:
    return ArchSpec(
        model_type,
        (MlpKind(r"(?:^|\.)encoder\.layer\.(?P<layer>\d+)$", "intermediate.dense", "output.dense",
                 "intermediate_size"),),
        act_field="hidden_act",
    )


def _llama_like(model_type: str) -> ArchSpec:
    return ArchSpec(
        model_type,
        (MlpKind(r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp$", "up_proj", "down_proj", "intermediate_size", "gate_proj"),),
        act_field="hidden_act",
    )


MLP_SPECS: dict[str, ArchSpec] = {
    "bert": _bert_like("bert"),
    "roberta": _bert_like("roberta"),
    "gpt2": ArchSpec(
        "gpt2",
        # HF Conv1D: weights are [in, out] and the output width lives in `nf`.
        (MlpKind(r"(?:^|\.)h\.(?P<layer>\d+)\.mlp$", "c_fc", "c_proj", "n_inner", layout="conv1d"),),
        act_field="activation_function",
    ),
    "llama": _llama_like("llama"),
    "mistral": _llama_like("mistral"),
    "qwen2": _llama_like("qwen2"),
    "mixtral": ArchSpec(
        "mixtral",
        # w1 = gate, w3 = up, w2 = down (SiLU gated); every expert is fused on its own.
        (
            MlpKind(
                r"(?:^|\.)layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)$",
                "w3", "w2", "intermediate_size", "w1", role="expert",
            ),
        ),
        act_field="hidden_act",
        router_patterns=(r"\.block_sparse_moe\.gate\.",),
    ),
    "qwen2_moe": ArchSpec(
        "qwen2_moe",
        (
            MlpKind(
                r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)$",
                "up_proj", "down_proj", "moe_intermediate_size", "gate_proj", role="expert",
            ),
            MlpKind(
                r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp\.shared_expert$",
                "up_proj", "down_proj", "shared_expert_intermediate_size", "gate_proj", role="shared_expert",
            ),
            # layers listed in `mlp_only_layers` hold a plain dense MLP
            MlpKind(r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp$", "up_proj", "down_proj", "intermediate_size", "gate_proj"),
        ),
        act_field="hidden_act",
        router_patterns=(r"\.mlp\.gate\.", r"\.mlp\.shared_expert_gate\."),
    ),
    "switch_transformers": ArchSpec(
        "switch_transformers",
        (
            # bias-free ReLU experts; sparse blocks are the odd ones in switch-base-*
            MlpKind(
                r"(?:^|\.)(?:encoder|decoder)\.block\.(?P<layer>\d+)\.layer\.\d+\.mlp\.experts\.expert_(?P<expert>\d+)$",
                "wi", "wo", "d_ff", role="expert",
            ),
            MlpKind(r"(?:^|\.)(?:encoder|decoder)\.block\.(?P<layer>\d+)\.layer\.\d+\.mlp$", "wi", "wo", "d_ff"),
        ),
        act_field="dense_act_fn",
        router_patterns=(r"\.router\.",),
    ),
}


def supported_model_types() -> list[str]:
    """The model types that have a fusion adapter, sorted."""
    return sorted(MLP_SPECS)


def get_arch_spec(model_type: str) -> ArchSpec:
    """Look up the adapter of ``model_type``.

    Raises:
        UnsupportedArchitectureError: no adapter; the message lists the supported types.
    """
    try:
        return MLP_SPECS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"model type {model_type!r} has no MLP fusion adapter; supported: {', '.join(supported_model_types())}"
        ) from None
