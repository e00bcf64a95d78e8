"""Finding the MLPs of a model and reading/writing their weights in the canonical layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from operator import attrgetter

import torch
from torch import nn

from edgefuse.errors import FusionError
from edgefuse.fusion.archs import ArchSpec, MlpKind, get_arch_spec
from edgefuse.fusion.clustering import LowRank, MlpWeights


@dataclass(frozen=True)
class MlpSite:
    """One MLP of a model: its qualified name, its kind, its layer (and expert) index and the module."""

    name: str
    kind: MlpKind
    layer: int
    expert: int | None
    module: nn.Module = field(repr=False, compare=False)

    @property
    def up_module(self) -> nn.Module:
        return attrgetter(self.kind.up)(self.module)

    @property
    def down_module(self) -> nn.Module:
        return attrgetter(self.kind.down)(self.module)

    @property
    def gate_module(self) -> nn.Module | None:
        return None if self.kind.gate is None else attrgetter(self.kind.gate)(self.module)

    @property
    def down_name(self) -> str:
        return f"{self.name}.{self.kind.down}"


def model_arch(model: nn.Module) -> ArchSpec:
    """The adapter of ``model`` (from ``model.config.model_type``)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or type(model).__name__
    return get_arch_spec(model_type)


def find_mlps(model: nn.Module, spec: ArchSpec | None = None) -> list[MlpSite]:
    """Every MLP of ``model`` that its adapter knows, in module order.

    Example:
        >>> from transformers import BertConfig, BertModel
        >>> m = BertModel(BertConfig(hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16))
        >>> [s.name for s in find_mlps(m)]
        ['encoder.layer.0', 'encoder.layer.1']
    """
    spec = spec or model_arch(model)
    sites: list[MlpSite] = []
    for name, module in model.named_modules():
        for kind in spec.kinds:
            m = kind.regex.search(name)
            if m is None:
                continue
            try:
                attrgetter(kind.up)(module)
                attrgetter(kind.down)(module)
            except AttributeError:
                continue  # e.g. a sparse MoE block matched by the dense pattern
            expert = m.groupdict().get("expert")
            sites.append(MlpSite(name, kind, int(m.group("layer")), None if expert is None else int(expert), module))
            break
    return sites


def layout_of(module: nn.Module) -> str:
    """``conv1d`` for HF ``Conv1D`` (weights [in, out]), else ``linear``."""
    return "conv1d" if type(module).__name__ == "Conv1D" else "linear"


def _in_weight(module: nn.Module, layout: str) -> torch.Tensor:
    return module.weight.T if layout == "conv1d" else module.weight  # -> [p, d]


def read_weights(site: MlpSite) -> MlpWeights:
    """The weights of ``site`` in canonical layout (views, not copies)."""
    layout = site.kind.layout
    up, down, gate = site.up_module, site.down_module, site.gate_module
    if isinstance(up, LowRankLinear) or isinstance(down, LowRankLinear):
        raise FusionError(f"{site.name} was already compressed by svd; fuse the original model instead")
    down_w = down.weight.T if layout == "conv1d" else down.weight  # -> [d_out, p]
    return MlpWeights(
        up=_in_weight(up, layout),
        down=down_w,
        up_bias=getattr(up, "bias", None),
        gate=None if gate is None else _in_weight(gate, layout),
        gate_bias=None if gate is None else getattr(gate, "bias", None),
    )


def _set_in(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None, layout: str, name: str) -> None:
    """Replace an up/gate projection by ``weight [k, d]`` (+ bias ``[k]``), keeping dtype and device."""
    old = module.weight
    expected_in = old.shape[0] if layout == "conv1d" else old.shape[1]
    if weight.shape[1] != expected_in:
        raise FusionError(f"{name}: new weight has input width {weight.shape[1]}, module expects {expected_in}")
    k = weight.shape[0]
    new = weight.T if layout == "conv1d" else weight
    module.weight = nn.Parameter(new.to(old.dtype).to(old.device).contiguous(), requires_grad=old.requires_grad)
    if getattr(module, "bias", None) is not None:
        if bias is None or bias.shape != (k,):
            raise FusionError(f"{name}: bias of shape {None if bias is None else tuple(bias.shape)}, expected ({k},)")
        module.bias = nn.Parameter(bias.to(old.dtype).to(old.device).contiguous())
    if layout == "conv1d":
        module.nf = k  # Conv1D shapes its output with nf
    else:
        module.out_features = k


def _set_out(module: nn.Module, weight: torch.Tensor, layout: str, name: str) -> None:
    """Replace a down projection by ``weight [d_out, k]``."""
    old = module.weight
    expected_out = old.shape[1] if layout == "conv1d" else old.shape[0]
    if weight.shape[0] != expected_out:
        raise FusionError(f"{name}: new weight has output width {weight.shape[0]}, module expects {expected_out}")
    new = weight.T if layout == "conv1d" else weight
    module.weight = nn.Parameter(new.to(old.dtype).to(old.device).contiguous(), requires_grad=old.requires_grad)
    if layout == "conv1d":
        if hasattr(module, "nx"):
            module.nx = weight.shape[1]
    else:
        module.in_features = weight.shape[1]


def write_weights(site: MlpSite, w: MlpWeights) -> None:
    """Resize the modules of ``site`` in place to the weights ``w`` (shapes checked on every copy)."""
    layout = site.kind.layout
    _set_in(site.up_module, w.up, w.up_bias, layout, f"{site.name}.{site.kind.up}")
    if site.gate_module is not None:
        if w.gate is None:
            raise FusionError(f"{site.name}: gated MLP but no gate weights were given")
        _set_in(site.gate_module, w.gate, w.gate_bias, layout, f"{site.name}.{site.kind.gate}")
    _set_out(site.down_module, w.down, layout, site.down_name)


class LowRankLinear(nn.Sequential):
    """``x -> B(A x) + bias`` as two plain Linears (the ``svd`` baseline); exports to two ONNX MatMuls.

    ``weight`` is the second factor ``B``: some HF code (Switch/T5) probes ``.weight.dtype`` of its Linears.
    """

    @property
    def weight(self) -> torch.Tensor:
        return self[1].weight


def _low_rank_module(old: nn.Module, low: LowRank, layout: str) -> LowRankLinear:
    """Build a :class:`LowRankLinear` (works for Conv1D too: Conv1D(x) = x W + b = Linear(W^T)(x))."""
    rank, d_in = low.a.shape
    d_out = low.b.shape[0]
    bias = getattr(old, "bias", None)
    first = nn.Linear(d_in, rank, bias=False)
    second = nn.Linear(rank, d_out, bias=bias is not None)
    dtype, device = old.weight.dtype, old.weight.device
    first.weight = nn.Parameter(low.a.to(dtype).to(device))
    second.weight = nn.Parameter(low.b.to(dtype).to(device))
    if bias is not None:
        second.bias = nn.Parameter(bias.detach().clone())
    return LowRankLinear(first, second)


def write_low_rank(site: MlpSite, low: dict[str, LowRank]) -> None:
    """Replace up/gate/down of ``site`` by their rank-t factorisations (the ``svd`` baseline)."""
    for role, path in (("up", site.kind.up), ("down", site.kind.down), ("gate", site.kind.gate)):
        if path is None or role not in low:
            continue
        parent_path, _, attr = path.rpartition(".")
        parent = attrgetter(parent_path)(site.module) if parent_path else site.module
        setattr(parent, attr, _low_rank_module(getattr(parent, attr), low[role], site.kind.layout))


def mlp_param_count(site: MlpSite) -> int:
    """Parameters of the MLP at ``site`` (up, gate and down, with biases; frozen scales are buffers, not counted)."""
    mods = [site.up_module, site.down_module] + ([site.gate_module] if site.gate_module is not None else [])
    return sum(p.numel() for m in mods for p in m.parameters())
