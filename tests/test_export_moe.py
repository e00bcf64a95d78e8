"""ONNX export of fused Mixture-of-Experts models (Mixtral, Qwen2-MoE with shared expert, Switch Transformers).

The sparse MoE blocks are traced with the gather-compute-scatter forward of ``edgefuse.export.moe`` (Mixtral,
Qwen2-MoE; the dense-routing forward for Switch and as the fallback); the graphs are
validated against transformers' own sparse forward on padded shapes other than the traced one, the decoders
with the KV cache and greedy tokens. Tiny random models, one torch thread.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_config, tiny_inputs, tiny_model
from tolerances import EXPORT_ATOL, FP32_EXACT_ATOL, MIN_CHANGE

from edgefuse.config.export import ExportConfig
from edgefuse.config.fusion import FusionConfig
from edgefuse.export.api import export_onnx
from edgefuse.export.backends import export_graph
from edgefuse.export.moe import dense_moe_routing, moe_routing, sparse_moe_blocks
from edgefuse.export.validate import validate_export
from edgefuse.fusion.api import fuse_mlps_
from edgefuse.fusion.scale import iter_scaled
from edgefuse.manifest import read_manifest
from edgefuse.ort import build_feed, make_session, past_inputs, random_batch

MOE_BLOCKS = {"mixtral": "MixtralSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock",
              "switch_transformers": "SwitchTransformersSparseMLP"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def switch_base(*, expert_capacity: int | None = None, seed: int = 0) -> torch.nn.Module:
    """A tiny ``SwitchTransformersModel`` (what ``edgefuse export`` loads for feature extraction)."""
    from transformers import SwitchTransformersModel

    config = tiny_config("switch_transformers")
    if expert_capacity is not None:
        config.expert_capacity = expert_capacity
    torch.manual_seed(seed)
    return SwitchTransformersModel(config).eval()


def fused(model: torch.nn.Module, layers: list[int] | None = None) -> torch.nn.Module:
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5, layers=layers))
    return model


def moe_model(arch: str, **overrides: object) -> torch.nn.Module:
    """A tiny MoE model: Switch as ``SwitchTransformersModel``, the decoders with their LM head."""
    if arch == "switch_transformers":
        return switch_base(**overrides)  # type: ignore[arg-type]
    if not overrides:
        return tiny_model(arch, head="lm")
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch)
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _outputs(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(**inputs)
    return [out[0], *(t for t in (getattr(out, "encoder_last_hidden_state", None),) if t is not None)]


def _no_instance_forwards(model: torch.nn.Module) -> list[str]:
    return [name for name, module in model.named_modules() if "forward" in module.__dict__]


@pytest.mark.parametrize(("arch", "overrides"), [
    ("mixtral", {}),
    ("qwen2_moe", {}),
    ("qwen2_moe", {"norm_topk_prob": True}),
    ("qwen2_moe", {"mlp_only_layers": [0]}),  # layer 0 a dense MLP: one sparse block only
    ("switch_transformers", {}),
    ("switch_transformers", {"expert_capacity": 2}),  # most tokens dropped by the capacity: zeros, as in torch
])
@pytest.mark.parametrize("routing", ["dense", "sparse"])
def test_export_forward_matches_transformers(arch: str, overrides: dict, routing: str) -> None:
    model = fused(moe_model(arch, **overrides), layers=[1])
    blocks = sparse_moe_blocks(model)
    assert len(blocks) == (1 if "mlp_only_layers" in overrides else 2)
    assert all(type(b).__name__ == MOE_BLOCKS[arch] for _, b, _ in blocks)
    inputs = tiny_inputs(arch, batch=3, seq=11)
    want = _outputs(model, inputs)
    with moe_routing(model, routing) as info:
        assert info.blocks == len(blocks) and not model.training
        assert info.sparse_blocks == (len(blocks) if routing == "sparse" and arch != "switch_transformers" else 0)
        got = _outputs(model, inputs)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, w, atol=FP32_EXACT_ATOL, rtol=0)
    assert _no_instance_forwards(model) == []


def test_dense_routing_restored_on_error() -> None:
    model = tiny_model("mixtral", head="lm")
    with pytest.raises(RuntimeError, match="boom"), dense_moe_routing(model) as info:
        assert info.blocks == 2 and "forward" in model.model.layers[0].block_sparse_moe.__dict__
        raise RuntimeError("boom")
    assert _no_instance_forwards(model) == []


def test_raw_switch_trace_misses_the_tolerance(tmp_path: Path) -> None:
    # Why Switch missed the tolerance before: TorchScript records the `.tolist()` expert loop of the dummy batch.
    # An expert that got no token in the traced batch is missing from the graph, and a token routed to it at run
    # time gets 0. Not capacity, jitter, router dtype or the mask: transformers' own forward is the reference, and
    # the dense forward of the same model validates. (The Mixtral counterpart is in test_export.py.)
    import re

    import onnx

    model, cfg = switch_base(), ExportConfig(validate_shapes=[(1, 13), (3, 21)], seed=1)
    assert "dense MoE routing" not in export_graph(model, cfg, tmp_path)
    nodes = [n.name for n in onnx.load(str(tmp_path / "model.onnx")).graph.node]
    traced = {m.group(1, 2) for n in nodes if (m := re.search(r"/(\w+/block\.\d+/layer\.\d+)/mlp/expert_(\d+)/", n))}
    blocks = {b for b, _ in traced}
    assert len(blocks) == 2 and len(traced) < 2 * model.config.num_experts  # some expert is not in the graph
    cases, _, problems = validate_export(model, tmp_path / "model.onnx", cfg)
    assert not problems and any(not c.passed for c in cases)  # a value miss, not a runtime error
    res = export_onnx(model, cfg, tmp_path / "dense")
    assert res.max_abs_diff <= EXPORT_ATOL
    nodes = [n.name for n in onnx.load(str(res.onnx_path)).graph.node]
    dense = {m.group(1, 2) for n in nodes if (m := re.search(r"/(\w+/block\.\d+/layer\.\d+)/mlp/expert_(\d+)/", n))}
    assert len(dense) == 2 * model.config.num_experts  # every expert of both sparse blocks


@pytest.mark.parametrize(("arch", "layers", "fold", "routing"), [
    ("mixtral", [1], "auto", "sparse"),  # partial fusion: layer 0 keeps its experts' full width
    ("mixtral", None, "keep", "dense"),  # the scale as a Mul in the graph, traced through the dense forward
    ("qwen2_moe", None, "auto", "sparse"),  # shared expert fused too
    ("qwen2_moe", [0], "down", "dense"),
])
def test_moe_causal_lm_with_past(tmp_path: Path, arch: str, layers: list[int] | None, fold: str,
                                 routing: str) -> None:
    model = fused(moe_model(arch), layers=layers)
    n_scaled = sum(1 for _ in iter_scaled(model))
    experts = model.config.num_local_experts if arch == "mixtral" else model.config.num_experts
    per_layer = experts + (1 if arch == "qwen2_moe" else 0)
    assert n_scaled == per_layer * (len(layers) if layers else model.config.num_hidden_layers)
    inputs = tiny_inputs(arch)
    before = _outputs(model, inputs)[0]
    cfg = ExportConfig(task="causal-lm", fold_scales=fold, generate_tokens=6, moe_routing=routing)
    res = export_onnx(model, cfg, tmp_path / arch)
    assert res.greedy is not None and res.greedy.match and res.greedy.tokens_compared == 6
    assert any(c.label.startswith("decode step") for c in res.cases)
    assert any("padded" in c.label for c in res.cases)
    assert res.max_abs_diff <= EXPORT_ATOL
    assert len(past_inputs(make_session(res.onnx_path))) == 2 * model.config.num_hidden_layers
    factor = experts / 2 if routing == "dense" else 1.0  # top-2: dense runs num_experts / 2 times the experts
    phrase = "dense MoE routing in 2 of 2 sparse blocks" if routing == "dense" else "sparse MoE routing in 2 blocks"
    assert phrase in res.exporter and "fallback" not in res.exporter
    assert res.moe_routing is not None and res.moe_routing["expert_compute_factor"] == factor
    manifest = read_manifest(tmp_path / arch)
    assert manifest["moe_routing"]["mode"] == routing and len(manifest["moe_routing"]["blocks"]) == 2
    assert phrase in manifest["exporter"]
    # the caller's model: same forward code (no instance forwards left), same scales, same outputs
    assert _no_instance_forwards(model) == []
    assert sum(1 for _ in iter_scaled(model)) == n_scaled
    assert torch.equal(_outputs(model, inputs)[0], before)


def test_moe_keep_scale_is_in_graph(tmp_path: Path) -> None:
    # the dense forward calls the experts as modules, so the scale's pre-hook is traced: the graph follows the
    # fused model, not the same model without its scale
    from edgefuse.fusion.scale import detach_scale_
    from edgefuse.ort import build_feed, random_batch

    model = fused(moe_model("mixtral"))
    res = export_onnx(model, ExportConfig(task="causal-lm", with_past=False, fold_scales="keep", generate_tokens=3),
                      tmp_path / "keep")
    session = make_session(res.onnx_path)
    ids, mask = random_batch(model.config.vocab_size, 2, 9, seed=5, left_pad=True)
    feed = build_feed(session, ids, mask)
    got = torch.from_numpy(session.run(None, feed)[0])
    with torch.no_grad():
        want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits
        for _, module in list(iter_scaled(model)):
            detach_scale_(module)
        unscaled = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits
    real = torch.from_numpy(mask).bool()
    assert (got[real] - want[real]).abs().max() <= EXPORT_ATOL
    assert (got[real] - unscaled[real]).abs().max() > MIN_CHANGE


@pytest.mark.parametrize("capacity", [None, 3])
def test_switch_feature_extraction_padded(tmp_path: Path, capacity: int | None) -> None:
    # capacity 3: tokens beyond an expert's capacity are dropped (zeros) by the router, in torch and in the graph
    model = fused(switch_base(expert_capacity=capacity), layers=[1])
    shapes = [(1, 13), (3, 21), (4, 9)]
    res = export_onnx(model, ExportConfig(validate_shapes=shapes), tmp_path / "switch")
    assert res.exporter.startswith("torch.onnx") and "dense MoE routing in 2 of 2 sparse blocks" in res.exporter
    assert res.moe_routing["expert_compute_factor"] == model.config.num_experts  # top-1
    assert [c.label for c in res.cases] == ["batch 1 x seq 13", "batch 3 x seq 21, padded", "batch 4 x seq 9, padded"]
    assert res.max_abs_diff <= EXPORT_ATOL and res.fused_mlps == 2 * model.config.num_experts
    assert _no_instance_forwards(model) == []


def test_cli_export_fused_mixtral(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main
    from edgefuse.fusion.persist import save_fused

    src = save_fused(fused(moe_model("mixtral"), layers=[1]), tmp_path / "fused-mixtral")
    assert main(["export", str(src), str(tmp_path / "onnx"), "--task", "causal-lm", "--generate-tokens", "5",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["greedy"]["match"] and data["fold_scales"] == "up"
    assert "sparse MoE routing" in data["exporter"] and data["moe_routing"]["mode"] == "sparse"
    # as a user would run it: optimum's ORTModelForCausalLM on the folder, a left-padded batch, PyTorch's tokens
    from optimum.onnxruntime import ORTModelForCausalLM

    from edgefuse.models import load_model

    ids = torch.tensor([[5, 9, 13, 22, 7, 30], [0, 0, 4, 8, 15, 16]])
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    kwargs = {"attention_mask": mask, "max_new_tokens": 6, "min_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    got = ORTModelForCausalLM.from_pretrained(tmp_path / "onnx").generate(ids, **kwargs)
    with torch.no_grad():
        want = load_model(str(src), "causal-lm").generate(ids, **kwargs)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_moe_sequence_classification_and_features(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModel

    model = fused(tiny_model(arch, head="cls"))
    model.config.pad_token_id = 0  # decoders classify the last non-pad token
    res = export_onnx(model, ExportConfig(task="sequence-classification"), tmp_path / "cls")
    assert res.max_abs_diff <= EXPORT_ATOL and "sparse MoE routing" in res.exporter
    torch.manual_seed(0)
    base = fused(AutoModel.from_config(tiny_config(arch)).eval())
    res = export_onnx(base, ExportConfig(task="feature-extraction"), tmp_path / "features")
    assert res.max_abs_diff <= EXPORT_ATOL and "sparse MoE routing" in res.exporter
    assert _no_instance_forwards(model) == [] and _no_instance_forwards(base) == []


def _routed_experts(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> list[set[int]]:
    """Per sparse block: the experts that at least one real token selected (transformers' router)."""
    hit: list[set[int]] = []
    hooks = [block.gate.register_forward_hook(
        lambda _m, _i, logits: hit.append(set(torch.topk(logits, 2, dim=-1).indices[mask.view(-1).bool()]
                                              .flatten().tolist())))
        for _, block, _ in sparse_moe_blocks(model)]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    return hit


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_sparse_graph_equals_pytorch_on_inputs_that_route_differently(tmp_path: Path, arch: str) -> None:
    import onnx

    model = fused(moe_model(arch), layers=[1])
    res = export_onnx(model, ExportConfig(task="causal-lm", with_past=False, generate_tokens=0), tmp_path / arch)
    assert res.moe_routing["mode"] == "sparse"
    graph = onnx.load(str(res.onnx_path))
    experts = len(sparse_moe_blocks(model)[0][1].experts)
    # one NonZero per expert and block: tokens are gathered per expert at run time, not all experts on all tokens
    assert sum(n.op_type == "NonZero" for n in graph.graph.node) >= 2 * experts
    session = make_session(res.onnx_path, threads=1)
    routings = []
    for batch, seq, seed in ((1, 1, 0), (1, 2, 3), (2, 7, 1), (4, 13, 2), (3, 21, 4)):
        ids, mask = random_batch(model.config.vocab_size, batch, seq, seed=seed, left_pad=True)
        feed = build_feed(session, ids, mask)
        got = torch.from_numpy(session.run(["logits"], feed)[0])
        with torch.no_grad():
            want = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits
        real = torch.from_numpy(mask).bool()
        assert (got[real] - want[real]).abs().max() <= EXPORT_ATOL, (batch, seq)
        routings.append(_routed_experts(model, torch.from_numpy(ids), torch.from_numpy(mask)))
    # the inputs really route differently: a single token leaves experts idle (an empty gather), larger
    # padded batches reach every expert
    assert any(len(block) < experts for block in routings[0])
    assert any(len(block) == experts for r in routings[2:] for block in r)
    assert len({tuple(sorted(b)) for r in routings for b in r}) > 1


def test_sparse_trace_that_misses_validation_falls_back_to_dense(tmp_path: Path, monkeypatch) -> None:
    import edgefuse.export.moe as moe

    right = moe.mixtral_sparse_forward

    def off_by_a_bit(self, hidden_states):  # a sparse forward with the wrong arithmetic
        out, logits = right(self, hidden_states)
        return out * 1.5, logits

    # the archs table names the forward as "module:function", looked up at export time
    monkeypatch.setattr(moe, "mixtral_sparse_forward", off_by_a_bit)
    model = fused(moe_model("mixtral"), layers=[1])
    res = export_onnx(model, ExportConfig(task="causal-lm", generate_tokens=3), tmp_path / "fb")
    assert res.moe_routing["mode"] == "dense" and "fallback: the sparse trace missed validation" in res.exporter
    assert res.max_abs_diff <= EXPORT_ATOL and res.greedy.match
    with pytest.raises(ValueError, match="unknown MoE routing"), moe_routing(model, "lazy"):
        pass


def test_cli_moe_routing_dense(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main
    from edgefuse.fusion.persist import save_fused

    src = save_fused(fused(moe_model("qwen2_moe"), layers=[1]), tmp_path / "fused-qwen")
    assert main(["export", str(src), str(tmp_path / "onnx"), "--task", "causal-lm", "--generate-tokens", "3",
                 "--moe-routing", "dense", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["moe_routing"]["mode"] == "dense" and data["moe_routing"]["sparse_blocks"] == 0
    assert data["greedy"]["match"]
