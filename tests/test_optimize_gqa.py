"""edgefuse's GroupQueryAttention pass: a Llama-type decoder with KV cache (fused MLPs, grouped heads, Qwen2's
q/k/v biases) becomes one GroupQueryAttention node a layer and computes the same logits on padded batches and
over decoding steps with its own cache; greedy text is unchanged; int4 still applies; where the pass cannot apply,
the graph is left alone with the reason recorded."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from tiny import tiny_config

from edgefuse.config.export import ExportConfig
from edgefuse.config.fusion import FusionConfig
from edgefuse.config.optimize import OptimizeConfig
from edgefuse.config.quantize import QuantizeConfig
from edgefuse.export.api import export_onnx
from edgefuse.fusion.api import fuse_mlps_
from edgefuse.optimize.api import optimize_onnx
from edgefuse.optimize.gqa import fuse_group_query_attention
from edgefuse.ort import greedy_generate, make_session, random_batch
from edgefuse.quantize.api import quantize_onnx

pytestmark = pytest.mark.usefixtures("one_thread")


def _decoder(arch: str, head_dim: int, path: Path) -> Path:
    """A tiny fused decoder with grouped KV heads (2 query heads share 1), exported with its KV cache."""
    config = tiny_config(arch)
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads = 2 * head_dim, 2, 1
    config.head_dim, config.intermediate_size = head_dim, 64
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    export_onnx(model, ExportConfig(task="causal-lm", generate_tokens=0), path)
    return path


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _decoder("llama", 16, tmp_path_factory.mktemp("gqa") / "llama")


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_attention_becomes_one_node_per_layer_and_agrees(arch: str, llama: Path, tmp_path: Path) -> None:
    folder = llama if arch == "llama" else _decoder(arch, 16, tmp_path / arch)
    res = optimize_onnx(folder, OptimizeConfig(output_name="gqa.onnx", overwrite=True))
    layers = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    assert res.op_counts.get("GroupQueryAttention") == layers == res.fused_ops["GroupQueryAttention"]
    assert "Softmax" not in res.op_counts  # the decomposed attention is gone
    assert sum(res.op_counts.values()) < sum(res.op_counts_fp32.values()) / 2
    labels = [c.label for c in res.cases]
    assert all(c.passed for c in res.cases), [c for c in res.cases if not c.passed]
    # padded prefill, three decoding steps on each graph's own cache, keys compared where nothing is padded
    assert any("padded" in label for label in labels)
    assert sum("own cache" in label for label in labels if "cached keys" not in label) == 3
    assert any("cached keys of the unpadded rows" in label for label in labels)
    entry = json.loads((folder / "manifest.json").read_text())["graphs"]["gqa.onnx"]
    assert entry["settings"]["group_query_attention"] == {"layers": layers, "packed_qkv": layers, "not_applied": None}
    # per layer one packed q/k/v projection, o, gate, up, down; plus the lm_head (attention's two MatMuls and the
    # rotary frequencies' are inside the fused node)
    assert res.op_counts["MatMul"] == 5 * layers + 1 < res.op_counts_fp32["MatMul"]


def test_greedy_text_is_unchanged_on_a_padded_batch(llama: Path) -> None:
    optimize_onnx(llama, OptimizeConfig(output_name="gqa.onnx", overwrite=True))
    ids, mask = random_batch(64, 3, 9, 5, left_pad=True)
    plain = greedy_generate(make_session(llama / "model.onnx"), ids, mask, 12)
    fused = greedy_generate(make_session(llama / "gqa.onnx"), ids, mask, 12)
    np.testing.assert_array_equal(plain, fused)


def test_int4_applies_after_the_pass(llama: Path) -> None:
    optimize_onnx(llama, OptimizeConfig(output_name="gqa.onnx", overwrite=True))
    res = quantize_onnx(llama / "gqa.onnx", QuantizeConfig(mode="int4", block_size=16, overwrite=True,
                                                            min_cosine=None))
    graph = onnx.load(str(res.onnx_path))
    ops = {n.op_type for n in graph.graph.node}
    assert {"GroupQueryAttention", "MatMulNBits"} <= ops and res.quantized_nodes > 0


def test_the_pass_leaves_what_it_cannot_fuse_alone(tmp_path: Path) -> None:
    small = _decoder("llama", 8, tmp_path / "h8")  # onnxruntime's kernel needs a head size multiple of 16
    res = optimize_onnx(small, OptimizeConfig(output_name="o.onnx", overwrite=True))
    assert "GroupQueryAttention" not in res.op_counts and all(c.passed for c in res.cases)
    entry = json.loads((small / "manifest.json").read_text())["graphs"]["o.onnx"]["settings"]
    assert "multiple of 16" in entry["group_query_attention"]["not_applied"]
    model = onnx.load(str(small / "model.onnx"))
    config = json.loads((small / "config.json").read_text())
    for change, reason in [({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
                           ({"model_type": "gpt2"}, "not a Llama-type"),
                           ({"head_dim": 16, "num_hidden_layers": 5}, "layer 2")]:
        res = fuse_group_query_attention(model, {**config, **change})
        assert res.layers == 0 and reason in res.reason
    # a graph exported without the cache
    nocache = _decoder_nocache(tmp_path / "nocache")
    config = json.loads((nocache / "config.json").read_text())
    res = fuse_group_query_attention(onnx.load(str(nocache / "model.onnx")), config)
    assert res.layers == 0 and "KV cache" in res.reason


def _decoder_nocache(path: Path) -> Path:
    config = tiny_config("llama")
    config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim = 32, 2, 1, 16
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    export_onnx(model, ExportConfig(task="causal-lm", generate_tokens=0, with_past=False), path)
    return path
