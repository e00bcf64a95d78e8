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

Cost of the dense trace: every expert MLP runs on every token, so the expert compute of the graph grows by
``num_experts / top_k`` (Mixtral-style 8 experts, top-2: 4x; Switch top-1 with 8 experts: 8x).

**Sparse routing** (:func:`moe_routing` with ``"sparse"``, the export default for Mixtral and Qwen2-MoE) traces a
gather-compute-scatter forward instead: the router is the same; then, for each expert in ascending order (a
loop over the *number* of experts, fixed by the config), the tokens that selected it are found with ``nonzero``
(ONNX ``NonZero``: a run-time length, 0 included), gathered, run through the expert, weighted by their routing
weight and written back with an index update of unique rows (``ScatterND``). Each token's output is summed in
ascending expert order from zero, exactly as transformers' ``index_add_`` loop, so the graph equals PyTorch on
any routing, and the expert compute scales with ``top_k`` instead of ``num_experts``. onnxruntime's fused ``MoE``
contrib operator is not used: it is registered for CUDA only in the CPU builds this project ships on. Switch
Transformers (top-1 with expert capacity) keeps the dense trace. When the sparse graph misses validation, the
export falls back to the dense trace (:func:`edgefuse.export.api.export_onnx`).

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
    weights, selected = _topk_routing(router_logits, top_k, renormalise, dtype)
    # scatter, not one_hot * weights: ONNX ScatterElements, and no 0 * inf if a weight were inf
    return torch.zeros_like(router_logits, dtype=dtype).scatter(1, selected, weights)


def _sum_experts(experts: Any, hidden: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """``sum_e dense[:, e] * expert_e(hidden)`` in ascending expert order (transformers' ``index_add_`` order)."""
    out = torch.zeros_like(hidden)
    for e, expert in enumerate(experts):
        out = out + (expert(hidden) * dense[:, e, None]).to(hidden.dtype)
    return out


def _topk_routing(
    router_logits: torch.Tensor, top_k: int, renormalise: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(``[tokens, top_k]`` weights, ``[tokens, top_k]`` selected experts) in transformers' order of operations."""
    routing = F.softmax(router_logits, dim=1, dtype=torch.float)
    weights, selected = torch.topk(routing, top_k, dim=-1)
    if renormalise:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), selected


def _scatter_experts(experts: Any, hidden: torch.Tensor, weights: torch.Tensor, selected: torch.Tensor) -> torch.Tensor:
    """Gather-compute-scatter: ``out[t] = sum over the experts e that token t selected, ascending, of
    weight[t, e] * expert_e(hidden[t])``; each expert runs only on its own tokens (possibly none)."""
    out = torch.zeros_like(hidden)
    for e, expert in enumerate(experts):
        hit = selected == e  # (tokens, top_k): at most one True per row (top-k indices are distinct)
        rows = hit.any(dim=-1).nonzero().squeeze(1)  # (n_e,) token indices, n_e known only at run time
        w = (weights * hit.to(weights.dtype)).sum(dim=-1)  # the token's weight for expert e (0 if not selected)
        y = (expert(hidden.index_select(0, rows)) * w.index_select(0, rows)[:, None]).to(hidden.dtype)
        # unique rows: a plain index update (ScatterND) is the same as index_add_ here
        out = out.index_put((rows,), out.index_select(0, rows) + y)
    return out


def mixtral_sparse_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``MixtralSparseMoeBlock.forward`` (eval) as gather-compute-scatter: each expert runs on its tokens only."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(flat)
    weights, selected = _topk_routing(router_logits, self.top_k, True, flat.dtype)
    out = _scatter_experts(self.experts, flat, weights, selected)
    return out.reshape(batch_size, sequence_length, hidden_dim), router_logits


def qwen2_moe_sparse_forward(self: Any, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``Qwen2MoeSparseMoeBlock.forward`` as gather-compute-scatter, plus the sigmoid-gated shared expert."""
    batch_size, sequence_length, hidden_dim = hidden_states.shape
    flat = hidden_states.view(-1, hidden_dim)
    router_logits = self.gate(flat)
    weights, selected = _topk_routing(router_logits, self.top_k, bool(self.norm_topk_prob), flat.dtype)
    out = _scatter_experts(self.experts, flat, weights, selected)
    out = out + F.sigmoid(self.shared_expert_gate(flat)) * self.shared_expert(flat)
    return out.reshape(batch_size, sequence_length, hidden_dim), router_logits


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


def _resolve(ref: str) -> Callable[..., Any]:
    """The function named ``"package.module:function"`` (looked up at call time, so a test can patch it)."""
    module, func = ref.split(":")
    return getattr(importlib.import_module(module), func)


ROUTING_MODES: tuple[str, ...] = ("sparse", "dense")


def _forwards(mode: str = "dense") -> dict[type[nn.Module], Callable[..., Any]]:
    """Sparse block class -> its export forward for ``mode`` (the sparse forward where the block has one, else
    the dense one), from the ``sparse_block`` of every architecture in :data:`edgefuse.fusion.archs.MLP_SPECS`
    (a class this transformers does not have is skipped)."""
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
        sparse = mode == "sparse" and block.sparse_forward is not None
        table[cls] = _resolve(block.sparse_forward if sparse else block.dense_forward)  # type: ignore[arg-type]
    return table


def _block_shape(module: Any) -> tuple[int, int]:
    """(num_experts, experts per token) of a sparse block."""
    n = len(module.experts)
    return n, int(getattr(module, "top_k", 1))


def sparse_moe_blocks(model: nn.Module, mode: str = "dense") -> list[tuple[str, nn.Module, Callable[..., Any]]]:
    """``(name, block, export forward for mode)`` for every sparse MoE block whose forward is transformers' own.

    A subclass that overrides ``forward`` is left alone: its arithmetic is unknown here, and validation decides.

    Example:
        >>> sparse_moe_blocks(torch.nn.Linear(2, 2))
        []
    """
    table = _forwards(mode)
    found: list[tuple[str, nn.Module, Callable[..., Any]]] = []
    for name, module in model.named_modules():
        for cls, dense in table.items():
            if isinstance(module, cls) and type(module).forward is cls.forward:
                found.append((name, module, dense))
                break
    return found


@dataclass
class DenseRouting:
    """What :func:`moe_routing` patched: block names, the routing mode, and the expert compute of the graph per
    token relative to transformers' sparse forward (num_experts / top_k for dense blocks, 1 for sparse ones)."""

    names: list[str] = field(default_factory=list)
    expert_compute_factor: float = 1.0
    mode: str = "dense"
    sparse_blocks: int = 0

    @property
    def blocks(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        """One phrase for the exporter string and the manifest ('' when nothing was patched)."""
        if not self.names:
            return ""
        if self.sparse_blocks == self.blocks:
            return (f"sparse MoE routing in {self.blocks} blocks: gather-compute-scatter, each expert on its own "
                    "tokens (expert compute scales with top_k)")
        return (f"dense MoE routing in {self.blocks - self.sparse_blocks} of {self.blocks} sparse blocks: every "
                f"expert runs on every token ({self.expert_compute_factor:g}x the expert MLP compute)")

    def to_manifest(self) -> dict[str, Any] | None:
        if not self.names:
            return None
        note = ("export-time forward; every expert runs on every token, unselected experts weighted 0"
                if self.sparse_blocks < self.blocks else
                "export-time forward; tokens gathered per expert (NonZero/Gather), results written back (ScatterND)")
        return {"mode": self.mode, "blocks": list(self.names), "sparse_blocks": self.sparse_blocks,
                "expert_compute_factor": self.expert_compute_factor, "note": note}


@contextmanager
def moe_routing(model: nn.Module, mode: str = "sparse") -> Iterator[DenseRouting]:
    """Within the block, every sparse MoE block of ``model`` runs a traceable forward: gather-compute-scatter
    (``mode="sparse"``; Switch Transformers, which has none, stays dense) or dense routing (``"dense"``).

    The forward is set on the block instances and removed on exit, error included, so the model's class
    forward is in effect again afterwards (nothing else about the model changes). Training mode keeps the
    original forward: Mixtral's router jitter only applies there and export runs in eval mode.

    Example:
        >>> with moe_routing(torch.nn.Linear(2, 2), "sparse") as info:
        ...     info.blocks
        0
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown MoE routing {mode!r}; choose one of {', '.join(ROUTING_MODES)}")
    blocks = [] if model.training else sparse_moe_blocks(model, mode)
    sparse = set(_forwards("sparse").values()) - set(_forwards("dense").values())
    dense_shapes = [_block_shape(block) for _, block, fwd in blocks if fwd not in sparse]
    info = DenseRouting(names=[name for name, _, _ in blocks],
                        expert_compute_factor=max((n / k for n, k in dense_shapes), default=1.0),
                        mode=mode if blocks else "none", sparse_blocks=sum(fwd in sparse for _, _, fwd in blocks))
    with preserved_forwards(model):  # puts back every instance-level forward, error included
        for _, block, forward in blocks:
            block.forward = types.MethodType(forward, block)
        yield info


def dense_moe_routing(model: nn.Module) -> Any:
    """:func:`moe_routing` with ``"dense"``: every expert on every token (the fallback trace).

    Example:
        >>> with dense_moe_routing(torch.nn.Linear(2, 2)) as info:
        ...     info.blocks
        0
    """
    return moe_routing(model, "dense")
