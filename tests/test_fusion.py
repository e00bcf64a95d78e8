"""Fusion on tiny random models of every supported architecture (no network, seeded)."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny import ARCHS, first_output, tiny_inputs, tiny_model
from tolerances import DUPLICATE_FUSION_RTOL, FP32_EXACT_ATOL, FP32_EXACT_RTOL, MIN_CHANGE

from edgefuse.config.fusion import METHODS, FusionConfig
from edgefuse.errors import TargetNotFoundError, UnsupportedArchitectureError
from edgefuse.fusion.api import fuse_mlps_, plan_fusion
from edgefuse.fusion.persist import load_fused, save_fused
from edgefuse.fusion.scale import SCALE_ATTR, fold_scales_, has_scales
from edgefuse.fusion.sites import find_mlps, read_weights, write_weights


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("arch", ARCHS)
def test_full_width_is_identity(arch: str) -> None:
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    ref = first_output(model, inputs)
    fuse_mlps_(model, FusionConfig(keep_ratio=1.0))
    torch.testing.assert_close(first_output(model, inputs), ref, atol=FP32_EXACT_ATOL, rtol=0)


def _duplicate_units(model: torch.nn.Module) -> None:
    """Make every MLP a bundle of p/2 distinct sub-MLPs, each present twice (unit i+p/2 copies unit i).

    Each copy gets half of the down column, so the function is unchanged in form but duplicated exactly.
    """
    for site in find_mlps(model):
        w = read_weights(site)
        half = w.width // 2
        idx = torch.cat([torch.arange(half), torch.arange(half)])
        dup = w.select(idx)
        write_weights(site, dup)


@pytest.mark.parametrize("arch", ARCHS)
def test_duplicated_sub_mlps_fuse_exactly(arch: str) -> None:
    model = tiny_model(arch)
    _duplicate_units(model)
    inputs = tiny_inputs(arch)
    ref = first_output(model, inputs)
    result = fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    assert all(s.width_after == s.width_before // 2 for s in result.steps)
    assert all(s.max_cluster_size == 2 for s in result.steps)
    assert _rel(first_output(model, inputs), ref) < DUPLICATE_FUSION_RTOL


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_changes_output_and_counts_params(arch: str, method: str) -> None:
    model = tiny_model(arch)
    inputs = tiny_inputs(arch)
    ref = first_output(model, inputs)
    before = sum(p.numel() for p in model.parameters())
    plan = plan_fusion(model, FusionConfig(keep_ratio=0.25, method=method))
    result = fuse_mlps_(model, FusionConfig(keep_ratio=0.25, method=method))
    after = sum(p.numel() for p in model.parameters())
    # the plan's numbers are the real ones, step by step and in total
    assert [s.params_after for s in plan.steps] == [s.params_after for s in result.steps]
    assert before - after == sum(s.params_before - s.params_after for s in result.steps) > 0
    assert result.params_total_after == after
    out = first_output(model, inputs)
    assert torch.isfinite(out).all()
    assert (out - ref).abs().max() > MIN_CHANGE  # a no-op would fail here


def test_bert_param_count_is_exact() -> None:
    model = tiny_model("bert")  # d=16, p=32, 3 layers
    result = fuse_mlps_(model, FusionConfig(keep_ratio=0.25, layers=[0, 2]))
    d, p, k = 16, 32, 8
    per_layer_before = p * (d + 1) + d * p + d
    per_layer_after = k * (d + 1) + d * k + d
    assert [(s.params_before, s.params_after) for s in result.steps] == [(per_layer_before, per_layer_after)] * 2
    assert result.params_total_before - result.params_total_after == 2 * (per_layer_before - per_layer_after)
    assert sum(s.frozen_scale_entries for s in result.steps) == 2 * k


def test_gpt2_conv1d_layout_and_nf() -> None:
    model = tiny_model("gpt2")
    fuse_mlps_(model, FusionConfig(width=12))
    mlp = model.transformer.h[1].mlp
    assert mlp.c_fc.nf == 12 and tuple(mlp.c_fc.weight.shape) == (16, 12)
    assert tuple(mlp.c_proj.weight.shape) == (12, 16)
    assert model.config.n_inner == 12


def test_scale_is_frozen_buffer_and_fold_is_exact() -> None:
    model = tiny_model("bert")
    inputs = tiny_inputs("bert")
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    names = [n for n, _ in model.named_parameters()]
    assert not any(SCALE_ATTR in n for n in names)
    assert not any(SCALE_ATTR in k for k in model.state_dict())  # non-persistent: saved apart
    down = model.encoder.layer[0].output.dense
    scale = getattr(down, SCALE_ATTR)
    assert scale.dtype == torch.float32 and scale.sum().item() == 32 and not scale.requires_grad
    out = first_output(model, inputs)
    assert fold_scales_(model) == 3 and not has_scales(model)
    torch.testing.assert_close(first_output(model, inputs), out, atol=FP32_EXACT_ATOL, rtol=FP32_EXACT_RTOL)


def test_fold_into_up_is_exact_for_relu() -> None:
    model = tiny_model("switch_transformers")  # ReLU experts
    inputs = tiny_inputs("switch_transformers")
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    out = first_output(model, inputs)
    assert fold_scales_(model, into="up") > 0 and not has_scales(model)
    torch.testing.assert_close(first_output(model, inputs), out, atol=FP32_EXACT_ATOL, rtol=FP32_EXACT_RTOL)


def test_deterministic_bit_identical() -> None:
    weights = []
    for _ in range(2):
        model = tiny_model("llama")
        fuse_mlps_(model, FusionConfig(keep_ratio=0.5, seed=3, n_init=2))
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "switch_transformers"])
def test_moe_routers_untouched_and_frozen(arch: str) -> None:
    model = tiny_model(arch)
    routers = {n: p.clone() for n, p in model.named_parameters() if "gate." in n or "router" in n}
    routers = {n: p for n, p in routers.items() if "gate_proj" not in n}
    assert routers
    result = fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    assert any(s.role == "expert" for s in result.steps)
    params = dict(model.named_parameters())
    for name, before in routers.items():
        assert torch.equal(params[name], before) and not params[name].requires_grad, name


def test_qwen2_moe_shared_expert_is_fused_as_dense() -> None:
    model = tiny_model("qwen2_moe")
    result = fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    roles = {s.role for s in result.steps}
    assert roles == {"expert", "shared_expert"}
    assert model.config.moe_intermediate_size == 12 and model.config.shared_expert_intermediate_size == 16
    model2 = tiny_model("qwen2_moe")
    result2 = fuse_mlps_(model2, FusionConfig(keep_ratio=0.5, include_shared_experts=False))
    assert {s.role for s in result2.steps} == {"expert"}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["fusion", "svd"])
def test_save_load_identical_logits(arch: str, method: str, tmp_path) -> None:
    model = tiny_model(arch)
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5, method=method, layers=[1]))  # partial: one layer only
    inputs = tiny_inputs(arch)
    out = first_output(model, inputs)
    folder = save_fused(model, tmp_path / "fused")
    loaded = load_fused(folder)
    assert type(loaded) is type(model)
    torch.testing.assert_close(first_output(loaded, inputs), out, atol=0, rtol=0)


def test_uniform_width_updates_config_for_plain_from_pretrained(tmp_path) -> None:
    from transformers import AutoModelForCausalLM

    model = tiny_model("llama")
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    assert model.config.intermediate_size == 16
    fold_scales_(model)
    inputs = tiny_inputs("llama")
    out = first_output(model, inputs)
    folder = save_fused(model, tmp_path / "m")
    plain = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=True).eval()
    torch.testing.assert_close(first_output(plain, inputs), out, atol=0, rtol=0)


def test_partial_fusion_keeps_config_field(tmp_path) -> None:
    model = tiny_model("bert")
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5, layers=[1]))
    assert model.config.intermediate_size == 32
    assert model.config.edgefuse["widths"] == {"encoder.layer.1": 16}


def test_target_regex_and_exact_selection() -> None:
    model = tiny_model("gpt2")
    plan = plan_fusion(model, FusionConfig(keep_ratio=0.5, targets=["re:h\\.[12]\\.mlp$"]))
    assert [s.name for s in plan.steps] == ["transformer.h.1.mlp", "transformer.h.2.mlp"]
    plan = plan_fusion(model, FusionConfig(keep_ratio=0.5, targets=["transformer.h.0.mlp"]))
    assert [s.name for s in plan.steps] == ["transformer.h.0.mlp"]


def test_round_to_multiple() -> None:
    model = tiny_model("bert")
    result = fuse_mlps_(model, FusionConfig(keep_ratio=0.3, round_to=8))
    assert {s.width_after for s in result.steps} == {16}


# --- user errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {}, {"keep_ratio": 0.5, "width": 4},
                                    {"width": 0}, {"keep_ratio": 0.5, "method": "magic"}])
def test_bad_config_rejected(kwargs: dict) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        FusionConfig(**kwargs)


def test_unknown_key_rejected() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="keep_ration"):
        FusionConfig(keep_ratio=0.5, keep_ration=0.3)


def test_no_layer_matched() -> None:
    with pytest.raises(TargetNotFoundError, match=r"\[7\]"):
        plan_fusion(tiny_model("bert"), FusionConfig(keep_ratio=0.5, layers=[7]))


def test_target_matches_nothing_names_similar() -> None:
    with pytest.raises(TargetNotFoundError, match=r"encoder\.layer"):
        plan_fusion(tiny_model("bert"), FusionConfig(keep_ratio=0.5, targets=["encoder.layers.0"]))


def test_unsupported_architecture_lists_supported() -> None:
    from transformers import DistilBertConfig, DistilBertModel

    model = DistilBertModel(DistilBertConfig(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=64))
    with pytest.raises(UnsupportedArchitectureError, match="bert, gpt2, llama"):
        fuse_mlps_(model, FusionConfig(keep_ratio=0.5))


def test_missing_model_path() -> None:
    from edgefuse.models import load_model

    with pytest.raises(TargetNotFoundError, match="does not exist"):
        load_model("./no/such/model")


def test_load_fused_missing_folder(tmp_path) -> None:
    with pytest.raises(TargetNotFoundError, match=r"config\.json"):
        load_fused(tmp_path / "nothing")


def test_svd_of_svd_refused() -> None:
    from edgefuse.errors import FusionError

    model = tiny_model("bert")
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5, method="svd"))
    with pytest.raises(FusionError, match="already compressed"):
        fuse_mlps_(copy.deepcopy(model), FusionConfig(keep_ratio=0.5))
