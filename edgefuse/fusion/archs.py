"""Architecture adapters: everything edgefuse knows about each supported model type, in one table entry.

One :class:`ArchSpec` per architecture (optimum-onnx ``model_configs.py`` style): where its MLPs live and how
they are laid out (fusion), which optimum ONNX config it borrows when optimum has none (export), its sparse
MoE block and that block's dense forward (MoE tracing, :mod:`edgefuse.export.moe`), and its transformers
config class and family (the tiny test models of ``tests/tiny.py``). Adding an architecture is one entry in
:data:`MLP_SPECS` plus its tests (the parametrised tests over ``tests/tiny.ARCHS`` pick it up).

Example:
    >>> spec = get_arch_spec("bert")
    >>> spec.kinds[0].up, spec.kinds[0].down, spec.kinds[0].layout
    ('intermediate.dense', 'output.dense', 'linear')
    >>> get_arch_spec("mixtral").optimum_model_type
    'mistral'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from edgefuse.errors import UnsupportedArchitectureError

Layout = Literal["linear", "conv1d"]
Role = Literal["dense", "expert", "shared_expert"]
Family = Literal["encoder", "decoder", "encoder-decoder"]


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
class SparseBlock:
    """A transformers sparse MoE block class and the edgefuse functions that trace it: ``dense_forward`` computes
    it densely (every expert on every token, weighted by the router), so that tracing sees no data-dependent
    routing; ``sparse_forward`` (None where the block has none) gathers each expert's tokens, runs the expert on
    them only and scatters the results back (``ExportConfig.moe_routing: sparse``). All are named as ``module`` +
    attribute and imported only when an export needs them."""

    module: str
    cls: str
    dense_forward: str  # "package.module:function"
    sparse_forward: str | None = None  # "package.module:function"


@dataclass(frozen=True)
class ArchSpec:
    """Everything edgefuse needs to know about one ``model_type``.

    ``config_class``: the transformers config class (``transformers.<name>``). ``family``: encoder (feature
    extraction, classification), decoder (causal LM) or encoder-decoder. ``optimum_type``: the model type whose
    optimum ONNX config serves this one when optimum has none of its own (a MoE model's dense sibling: the MoE
    block is internal to each layer, inputs and outputs are identical). ``sparse_block``: the MoE block that
    export replaces by its dense forward.
    """

    model_type: str
    kinds: tuple[MlpKind, ...]
    act_field: str
    config_class: str
    family: Family
    router_patterns: tuple[str, ...] = ()  # parameter-name regexes of routers/gates: frozen, never fused
    optimum_type: str | None = None
    sparse_block: SparseBlock | None = None

    @property
    def optimum_model_type(self) -> str:
        """The model type optimum's ONNX config is looked up under."""
        return self.optimum_type or self.model_type

    @property
    def is_moe(self) -> bool:
        return any(k.role == "expert" for k in self.kinds)


def _bert_like(model_type: str, config_class: str) -> ArchSpec:
    return ArchSpec(
        model_type,
        (MlpKind(r"(?:^|\.)encoder\.layer\.(?P<layer>\d+)$", "intermediate.dense", "output.dense",
                 "intermediate_size"),),
        act_field="hidden_act", config_class=config_class, family="encoder",
    )


def _llama_like(model_type: str, config_class: str) -> ArchSpec:
    return ArchSpec(
        model_type,
        (MlpKind(r"(?:^|\.)layers\.(?P<layer>\d+)\.mlp$", "up_proj", "down_proj", "intermediate_size", "gate_proj"),),
        act_field="hidden_act", config_class=config_class, family="decoder",
    )


_MOE = "edgefuse.export.moe"


MLP_SPECS: dict[str, ArchSpec] = {
    "bert": _bert_like("bert", "BertConfig"),
    "roberta": _bert_like("roberta", "RobertaConfig"),
    "gpt2": ArchSpec(
        "gpt2",
        # HF Conv1D: weights are [in, out] and the output width lives in `nf`.
        (MlpKind(r"(?:^|\.)h\.(?P<layer>\d+)\.mlp$", "c_fc", "c_proj", "n_inner", layout="conv1d"),),
        act_field="activation_function", config_class="GPT2Config", family="decoder",
    ),
    "llama": _llama_like("llama", "LlamaConfig"),
    "mistral": _llama_like("mistral", "MistralConfig"),
    "qwen2": _llama_like("qwen2", "Qwen2Config"),
    "mixtral": ArchSpec(
        "mixtral",
        # w1 = gate, w3 = up, w2 = down (SiLU gated); every expert is fused on its own.
        (
            MlpKind(
                r"(?:^|\.)layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)$",
                "w3", "w2", "intermediate_size", "w1", role="expert",
            ),
        ),
        act_field="hidden_act", config_class="MixtralConfig", family="decoder",
        router_patterns=(r"\.block_sparse_moe\.gate\.",),
        optimum_type="mistral",
        sparse_block=SparseBlock("transformers.models.mixtral.modeling_mixtral", "MixtralSparseMoeBlock",
                                 f"{_MOE}:mixtral_dense_forward", f"{_MOE}:mixtral_sparse_forward"),
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
        act_field="hidden_act", config_class="Qwen2MoeConfig", family="decoder",
        router_patterns=(r"\.mlp\.gate\.", r"\.mlp\.shared_expert_gate\."),
        optimum_type="qwen2",
        sparse_block=SparseBlock("transformers.models.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeSparseMoeBlock",
                                 f"{_MOE}:qwen2_moe_dense_forward", f"{_MOE}:qwen2_moe_sparse_forward"),
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
        act_field="dense_act_fn", config_class="SwitchTransformersConfig", family="encoder-decoder",
        router_patterns=(r"\.router\.",),
        sparse_block=SparseBlock("transformers.models.switch_transformers.modeling_switch_transformers",
                                 "SwitchTransformersSparseMLP", f"{_MOE}:switch_dense_forward"),
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
