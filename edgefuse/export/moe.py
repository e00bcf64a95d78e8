"""Export-time dense routing for the sparse MoE blocks of Mixtral, Qwen2-MoE and Switch Transformers.

transformers 4.57 runs only the experts a token was routed to: ``torch.where(expert_mask)`` /
``nonzero().tolist()`` pick the tokens, and a Python loop visits the experts that got any. A TorchScript trace
records that loop for the traced input only: an expert with no token in the dummy batch is missing from the
graph (its tokens get zeros on other inputs), and an expert that got tokens in the trace but none at run time
makes a ``Reshape`` of the empty selection fail in ONNX Runtime. Both are silent in the trace and show up as an
exit-7 validation failure on other shapes.

:func:`dense_moe_routing` swaps in, for the duration of the export only, a forward with the same arithmetic and
no data-dependent control flow: the router (softmax in float32, top-k, Mixtral's renormalisation, Qwen2-MoE's
``norm_topk_prob``, Switch's top-1 with expert capacity) is computed exactly as transformers does; the top-k
weights are scattered into a dense ``[tokens, num_experts]`` matrix with zeros for the unselected experts;
every expert runs on every token and the weighted outputs are summed in ascending expert order, as transformers'
``index_add_`` loop does (adding an exact zero changes nothing). Qwen2-MoE's shared expert and its sigmoid gate
are added as in transformers. The experts are called as modules, so the fusion scale's forward pre-hook on their
down projection (or a fold of it) is in the graph as in PyTorch.

Cost: every expert MLP runs on every token, so the expert compute of the graph grows by ``num_experts / top_k``
(Mixtral-style 8 experts, top-2: 4x; Switch top-1 with 8 experts: 8x). Fine for small edge MoEs; a limitation
for large ones (documented in docs/export.md).

Example:
    >>> import torch
    >>> from transformers import MixtralConfig, MixtralForCausalLM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <torch._C.Generator object at ...>
    >>> m = MixtralForCausalLM(MixtralConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
    ...     num_attention_heads=2, num_key_value_heads=2, vocab_size=32, num_local_experts=4)).eval()
    >>> ids = torch.tensor([[1, 5, 7, 9]])
    >>> want = m(ids).logits
    >>> with dense_moe_routing(m) as info:
    ...     got = m(ids).logits
    >>> info.blocks, torch.allclose(got, want, atol=1e-6), "forward" in m.model.layers[0].block_sparse_moe.__dict__
    (1, True, False)
"""

from __future__ import annotations

import importlib
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from edgefuse.export.backends import preserved_forwards


def _dense_topk_weights(router_logits: torch.Tensor, top_k: int, renormalise: bool, dtype: torch.dtype) -> torch.Tensor:
    """``[tokens, num_experts]`` routing weights: transformers' top-k weights at the selected experts, 0 elsewhere.

    Same order of operations as ``MixtralSparseMoeBlock`` / ``Qwen2MoeSparseMoeBlock``: softmax in float32,
    top-k, optional division by the top-k sum, cast back to the hidden dtype.
    """
    routing = F.softmax(router_logits, dim=1, dtype=torch.float)
    weights, selected = torch.topk(routing, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(dtype)
    # scatter, not one_hot * weights: ONNX ScatterElements, and no 0 * inf if a weight were inf
    return torch.zeros_like(routing, dtype=dtype).scatter(1, selected, weights)


def _sum_experts(experts: Any, hidden: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``sum_e dense[:, e] * expert_e(hidden)`` in ascending expert order (transformers' ``index_add_`` order)."""
    out = torch.zeros_like(hidden)
    for e, expert in enumerate(experts):
        out = out + (expert(hidden) * dense[:, e, None]).to(hidden.dtype)
    return out


def mixtral_dense_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``MixtralSparseMoeBlock.forward`` (eval) with every expert on every token; returns (hidden, router logits)."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(flat)
    dense = _dense_topk_weights(router_logits, self.top_k, True, flat.dtype)
    out = _sum_experts(self.experts, flat, dense)
    return out.reshape(batch_size, sequence_length, hidden_dim), router_logits


def qwen2_moe_dense_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Qwen2MoeSparseMoeBlock.forward`` with every expert on every token, plus the sigmoid-gated shared expert."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(flat)
    dense = _dense_topk_weights(router_logits, self.top_k, bool(self.norm_topk_prob), flat.dtype)
    out = _sum_experts(self.experts, flat, dense)
    shared = F.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
    out = out + shared
    return out.reshape(batch_size, sequence_length, hidden_dim), router_logits


def switch_dense_forward(
    self: Any, hidden_states: torch.Tensor
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``SwitchTransformersSparseMLP.forward`` with every expert on every token.

    The router is transformers' own module (float32 softmax, argmax, one-hot, expert capacity by a cumulative sum
    over the sequence): all of it traces as tensor ops. Only the dispatch loop changes: a token takes the output of
    the one expert its mask selects (``where``, i.e. the same assignment as ``next_states[mask] = ...``); a token
    dropped by the capacity keeps 0, as in transformers.
    """
    router_mask, router_probs, router_logits = self.router(hidden_states)
    expert_index = torch.argmax(router_mask, dim=-1)
    next_states = torch.zeros_like(hidden_states)
    selected = router_mask.bool()
    for idx in range(selected.shape[-1]):
        expert = getattr(self.experts, f"expert_{idx}")
        next_states = torch.where(selected[:, :, idx, None], expert(hidden_states).to(next_states.dtype), next_states)
    return router_probs * next_states, (router_logits, expert_index)


def _dense_forwards() -> dict[type[nn.Module], Callable[..., Any]]:
    """Sparse block class -> its dense forward, from the ``sparse_block`` of every architecture in
    :data:`edgefuse.fusion.archs.MLP_SPECS` (a class this transformers does not have is skipped)."""
    from edgefuse.fusion.archs import MLP_SPECS

    table: dict[type[nn.Module], Callable[..., Any]] = {}
    for spec in MLP_SPECS.values():
        block = spec.sparse_block
        if block is None:
            continue
        try:
            cls = getattr(importlib.import_module(block.module), block.cls)
        except (ImportError, AttributeError):
            continue
        module, func = block.dense_forward.split(":")
        table[cls] = getattr(importlib.import_module(module), func)
    return table


def _block_shape(module: Any) -> tuple[int, int]:
    """(num_experts, experts per token) of a sparse block."""
    n = len(module.experts)
    return n, int(getattr(module, "top_k", 1))


def sparse_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module, Callable[..., Any]]]:
    """``(name, block, dense forward)`` for every sparse MoE block whose forward is transformers' own.

    A subclass that overrides ``forward`` is left alone: its arithmetic is unknown here, and validation decides.

    Example:
        >>> sparse_moe_blocks(torch.nn.Linear(2, 2))
        []
    """
    table = _dense_forwards()
    found: list[tuple[str, nn.Module, Callable[..., Any]]] = []
    for name, module in model.named_modules():
        for cls, dense in table.items():
            if isinstance(module, cls) and type(module).forward is cls.forward:
                found.append((name, module, dense))
                break
    return found


@dataclass
class DenseRouting:
    """What :func:`dense_moe_routing` patched: block names and the expert-compute factor (num_experts / top_k)."""

    names: list[str] = field(default_factory=list)
    expert_compute_factor: float = 1.0

    @property
    def blocks(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        """One phrase for the exporter string and the manifest ('' when nothing was patched)."""
        if not self.names:
            return ""
        return (f"dense MoE routing in {self.blocks} sparse blocks: every expert runs on every token "
                f"({self.expert_compute_factor:g}x the expert MLP compute)")

    def to_manifest(self) -> dict[str, Any] | None:
        if not self.names:
            return None
        return {"mode": "dense", "blocks": list(self.names), "expert_compute_factor": self.expert_compute_factor,
                "note": "export-time forward; every expert runs on every token, unselected experts weighted 0"}


@contextmanager
def dense_moe_routing(model: nn.Module) -> Iterator[DenseRouting]:
    """Within the block, every sparse MoE block of ``model`` runs the dense, traceable forward.

    The forward is set on the block instances and removed on exit, error included, so the model's class
    forward is in effect again afterwards (nothing else about the model changes). Training mode keeps the
    original forward: Mixtral's router jitter only applies there and export runs in eval mode.

    Example:
        >>> with dense_moe_routing(torch.nn.Linear(2, 2)) as info:
        ...     info.blocks
        0
    """
    blocks = [] if model.training else sparse_moe_blocks(model)
    shapes = [_block_shape(block) for _, block, _ in blocks]
    info = DenseRouting(names=[name for name, _, _ in blocks],
                        expert_compute_factor=max((n / k for n, k in shapes), default=1.0))
    with preserved_forwards(model):  # puts back every instance-level forward, error included
        for _, block, dense in blocks:
            block.forward = types.MethodType(dense, block)
        yield info
