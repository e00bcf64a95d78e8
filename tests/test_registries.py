"""The extension-point tables agree with the typed configs and with each other: compression methods, quantization
modes and architectures. Adding an entry to one table without the other fails here."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest
import torch

from edgefuse.config.fusion import FusionConfig, FusionMethod
from edgefuse.config.quantize import QuantizeConfig, QuantMode
from edgefuse.errors import ConfigError
from edgefuse.fusion.clustering import MlpWeights
from edgefuse.fusion.methods import METHODS, compress_mlp
from edgefuse.quantize.modes import MODES, get_mode


def test_every_compression_method_is_a_config_choice_and_documented() -> None:
    assert tuple(METHODS) == get_args(FusionMethod)
    described = FusionConfig.model_fields["method"].description
    for name, entry in METHODS.items():
        assert entry.name == name and (f"{name}:" in described or f"{name} (" in described), name
    # the paper's method, and the named improvement that keeps its construction (centroids + frozen counts)
    assert [m for m in METHODS if METHODS[m].frozen_scale] == ["fusion", "fusion-pruned"]


@pytest.mark.parametrize("method", list(METHODS))
def test_every_compression_method_gives_width_k_or_a_rank(method: str) -> None:
    gen = torch.Generator().manual_seed(0)
    w = MlpWeights(up=torch.randn(12, 6, generator=gen), up_bias=torch.randn(12, generator=gen),
                   down=torch.randn(6, 12, generator=gen), gate=torch.randn(12, 6, generator=gen))
    out = compress_mlp(w, method, 4, seed=0)
    entry = METHODS[method]
    if entry.low_rank:
        assert out.low_rank and out.weights.width == 12
        assert set(out.low_rank) == {"up", "down", "gate"}
    else:
        assert not out.low_rank and out.weights.width == 4 and out.weights.gate is not None
    assert (out.scale is not None) == entry.frozen_scale
    if entry.frozen_scale:
        # the counts cover every original unit (fusion) or every unit of the kept pool (fusion-pruned: 1.25 * 4)
        assert out.scale.sum().item() == (5.0 if entry.pooled else 12.0)


def test_unknown_method_and_bad_width_are_config_errors() -> None:
    w = MlpWeights(up=torch.randn(4, 2), down=torch.randn(2, 4))
    with pytest.raises(ConfigError, match="unknown method 'kmeans'; choose one of fusion, fusion-pruned, merge"):
        compress_mlp(w, "kmeans", 2)
    with pytest.raises(ConfigError, match="target width 5 must be between 1 and the MLP width 4"):
        compress_mlp(w, "fusion", 5)


def test_every_quantization_mode_is_a_config_choice_with_a_distinct_variant_name() -> None:
    from edgefuse.quantize.presets import resolve_preset

    # "int8" is the default that names no graph form until it is resolved for the graph's task
    assert ("int8", *MODES) == get_args(QuantMode)
    with pytest.raises(ValueError, match="must be resolved"):
        get_mode("int8")
    described = QuantizeConfig.model_fields["mode"].description
    names = set()
    for name, entry in MODES.items():
        assert entry.name == name and f"{name}:" in described
        names.add(entry.variant(QuantizeConfig(mode=name), resolve_preset("avx2")))
    assert len(names) == len(MODES)


def test_mode_simulation_quantizes_what_the_mode_quantizes() -> None:
    from edgefuse.quantize.auto import relative_error

    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 8))
    for entry in MODES.values():
        wq = entry.simulate_weight(w, per_channel=True, reduce_range=False, block_size=32)
        assert wq.shape == w.shape and 0 < np.abs(wq - w).max() < np.abs(w).max() / 4
        levels = len(np.unique(np.round(wq[:32, 0] / np.abs(wq[:32, 0]).max(), 6)))
        assert levels <= (16 if entry.name == "int4" else 255)
    # activations: an int8 mode loses a tiny-valued token next to a huge one; weight-only int4 does not
    x = np.ones((2, 64))
    x[0] *= 1000.0
    x[1] *= 1e-3
    kw = {"per_channel": True, "reduce_range": False, "block_size": 32}
    assert relative_error(x, w, mode="dynamic", **kw) > 0.4
    assert relative_error(x, w, mode="int4", **kw) < 0.2


def test_unknown_quantization_mode_is_a_config_error() -> None:
    with pytest.raises(ConfigError,
                       match="unknown quantization mode 'int2'; choose one of dynamic, static, int8-blocks, int4"):
        get_mode("int2")


def test_every_architecture_entry_is_complete() -> None:
    import importlib

    import transformers

    from edgefuse.export.backends import OPTIMUM_CONFIG_ALIASES
    from edgefuse.export.moe import _forwards
    from edgefuse.fusion.archs import MLP_SPECS

    dense, sparse = _forwards("dense"), _forwards("sparse")
    for model_type, spec in MLP_SPECS.items():
        assert spec.model_type == model_type
        assert getattr(transformers, spec.config_class).model_type == model_type
        if spec.optimum_type is not None:  # the borrowed config is a supported dense sibling
            assert spec.optimum_type in MLP_SPECS and not MLP_SPECS[spec.optimum_type].is_moe
        if spec.is_moe:  # every MoE architecture is exported with its dense routing
            block = spec.sparse_block
            assert block is not None, model_type
            cls = getattr(importlib.import_module(block.module), block.cls)
            module, func = block.dense_forward.split(":")
            assert dense[cls] is getattr(importlib.import_module(module), func)
            if block.sparse_forward is not None:  # a gather-compute-scatter forward for moe_routing: sparse
                module, func = block.sparse_forward.split(":")
                assert sparse[cls] is getattr(importlib.import_module(module), func)
            else:
                assert sparse[cls] is dense[cls]
        else:
            assert spec.sparse_block is None
    assert OPTIMUM_CONFIG_ALIASES == {"mixtral": "mistral", "qwen2_moe": "qwen2"}
    assert len(dense) == sum(s.sparse_block is not None for s in MLP_SPECS.values())


def test_tiny_models_cover_every_architecture() -> None:
    from tiny import ARCHS, tiny_model

    from edgefuse.fusion.archs import MLP_SPECS

    assert tuple(MLP_SPECS) == ARCHS
    for arch in ARCHS:
        assert tiny_model(arch).config.model_type == arch
