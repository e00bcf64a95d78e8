"""Quantization-aware recovery: the model trains on onnxruntime's block grid, and the int4 graph that edgefuse
writes from the result computes exactly what training evaluated (fused gated and non-gated MLPs alike)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_finetune import lm_data
from test_finetune_fixtures import word_tokenizer
from tiny import tiny_model
from tolerances import FP32_EXACT_ATOL, FP32_EXACT_RTOL, QUANT_AWARE_GRAPH_ATOL, QUANT_AWARE_MIN_CHANGE

from edgefuse.config.export import ExportConfig
from edgefuse.config.finetune import FinetuneConfig
from edgefuse.config.fusion import FusionConfig
from edgefuse.config.pipeline import PipelineConfig
from edgefuse.config.quantize import QuantizeConfig
from edgefuse.export.api import export_onnx
from edgefuse.finetune.api import finetune_
from edgefuse.finetune.quant_aware import (
    attach_fake_quant_,
    detach_fake_quant_,
    has_fake_quant,
    quantizable_modules,
)
from edgefuse.fusion.api import fuse_mlps_
from edgefuse.fusion.scale import iter_scaled
from edgefuse.quantize.api import quantize_onnx
from edgefuse.quantize.blocks import block_fake_quant

pytestmark = pytest.mark.usefixtures("one_thread")

BLOCK = 16  # the tiny models' hidden width


def _fused(arch: str) -> torch.nn.Module:
    model = tiny_model(arch, head="lm")
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    assert any(True for _ in iter_scaled(model))
    return model


def test_attach_rounds_the_weights_and_detach_restores_the_model() -> None:
    model = _fused("llama")
    x = {"input_ids": torch.tensor([[5, 9, 14, 3, 22]])}
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(**x).logits
    names = attach_fake_quant_(model, bits=4, block_size=BLOCK)
    assert names and has_fake_quant(model) and list(model.state_dict()) == keys  # parameters untouched
    assert "lm_head" in names  # untied: the int4 mode writes it at 4 bits, so it trains on the grid too
    with torch.no_grad():
        rounded = model(**x).logits
        # the same forward with the rounded weights written in: the grid is what the model computes with
        ref = _fused("llama")
        for (_, m), (_, r) in zip(quantizable_modules(model), quantizable_modules(ref), strict=True):
            r.weight.copy_(block_fake_quant(m.weight.T, block_size=BLOCK, bits=4).T)
        want = ref(**x).logits
    torch.testing.assert_close(rounded, want, atol=FP32_EXACT_ATOL, rtol=FP32_EXACT_RTOL)
    assert (rounded - before).abs().max() > QUANT_AWARE_MIN_CHANGE
    assert detach_fake_quant_(model) == len(names) and not has_fake_quant(model)
    with torch.no_grad():
        torch.testing.assert_close(model(**x).logits, before)


def test_gradients_pass_straight_through() -> None:
    lin = torch.nn.Linear(32, 4)
    attach_fake_quant_(torch.nn.Sequential(lin), bits=4, block_size=BLOCK)
    x = torch.randn(3, 32)
    lin(x).sum().backward()
    # d(sum(x W^T))/dW = column sums of x, whatever the rounding did
    torch.testing.assert_close(lin.weight.grad, x.sum(0).expand(4, 32).contiguous())


def test_a_tied_head_is_left_to_int4_tied() -> None:
    model = tiny_model("llama", head="lm")
    model.lm_head.weight = model.model.embed_tokens.weight
    names = attach_fake_quant_(model, bits=4, block_size=BLOCK)
    assert "lm_head" not in names and any(n.endswith("mlp.down_proj") for n in names)


def _graph_output(path: Path, ids: np.ndarray, output: str) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids),
            "position_ids": np.arange(ids.shape[1], dtype=np.int64)[None]}
    return sess.run([output], {k: v for k, v in feed.items() if k in names})[0]


def _int4(folder: Path) -> Path:
    cfg = QuantizeConfig(mode="int4", block_size=BLOCK, int4_tied="fp32", int4_8bit_share=0.0, int4_accuracy_level=0,
                         min_cosine=None, overwrite=True, int4_algorithm="default",  # the grid QAT trained on
                         int4_scaling="none")
    return quantize_onnx(folder, cfg).onnx_path


def _on_grid(model: torch.nn.Module, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model's first output with the grid attached, and without."""
    out = []
    for attach in (True, False):
        if attach:
            attach_fake_quant_(model, bits=4, block_size=BLOCK)
        with torch.no_grad():
            out.append(model(input_ids=torch.from_numpy(ids))[0].numpy())
        detach_fake_quant_(model)
    return out[0], out[1]


IDS = np.array([[5, 9, 14, 3, 22, 7]], dtype=np.int64)


def test_the_int4_graph_computes_what_training_evaluated(tmp_path: Path) -> None:
    """A fused gated decoder (the export folds the sizes into the up projection)."""
    model = _fused("llama")
    cfg = FinetuneConfig(task="causal-lm", max_steps=6, batch_size=8, learning_rate=1e-2, num_samples=0,
                         quant_aware_bits=4, quant_aware_block_size=BLOCK)
    finetune_(model, cfg, lm_data(tmp_path), tokenizer=word_tokenizer("lm"), progress=False)
    assert not has_fake_quant(model) and any(True for _ in iter_scaled(model))  # detached; scales still frozen
    export_onnx(model, ExportConfig(task="causal-lm", generate_tokens=0, with_past=False), tmp_path / "onnx")
    graph = _graph_output(_int4(tmp_path / "onnx"), IDS, "logits")
    trained, fp32 = _on_grid(model, IDS)
    assert np.abs(graph - trained).max() < QUANT_AWARE_GRAPH_ATOL
    assert np.abs(graph - fp32).max() > 10 * QUANT_AWARE_GRAPH_ATOL  # the graph is quantized: not a trivial match


def test_the_grid_follows_a_fold_into_the_down_projection(tmp_path: Path) -> None:
    """A fused GELU encoder: the export folds the sizes into W2's input rows, so blocks of W2 mix sizes; the grid
    is applied to that folded weight."""
    model = tiny_model("bert")
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    scales = [m.edgefuse_scale for _, m in iter_scaled(model)]
    assert any(bool((s != s[0]).any()) for s in scales)  # unequal sizes: folding changes the blocks
    export_onnx(model, ExportConfig(task="feature-extraction"), tmp_path / "onnx")
    graph = _graph_output(_int4(tmp_path / "onnx"), IDS, "last_hidden_state")
    on_grid, fp32 = _on_grid(model, IDS)
    assert np.abs(graph - on_grid).max() < QUANT_AWARE_GRAPH_ATOL
    assert np.abs(graph - fp32).max() > 10 * QUANT_AWARE_GRAPH_ATOL


def _pipeline(finetune: dict, quantize: dict | None, export: dict | None = None) -> dict:
    cfg = {"schema_version": 1, "model": {"name_or_path": "smollm2", "task": "causal-lm"},
           "data": {"train": "x.csv", "validation_fraction": 0.1, "prompt_column": "mr", "text_column": "ref"},
           "export": export or {}, "finetune": {"max_steps": 2, **finetune}}
    if quantize is not None:
        cfg["quantize"] = quantize
    return cfg


@pytest.mark.parametrize(
    ("finetune", "quantize", "export", "match"),
    [
        ({"quant_aware_bits": 4}, None, None, "quantize section is missing"),
        ({"quant_aware_bits": 4}, {"mode": "dynamic"}, None, "set quantize.mode: int4"),
        ({"quant_aware_bits": 4, "quant_aware_block_size": 16}, {"mode": "int4", "block_size": 32}, None,
         "differs from quantize.block_size 32"),
        ({"quant_aware_bits": 4}, {"mode": "int4", "int4_algorithm": "hqq"}, None, "int4_algorithm: default"),
        ({"quant_aware_bits": 4}, {"mode": "int4", "int4_algorithm": "default"}, {"fold_scales": "down"},
         "fold_scales 'auto'"),
        ({"quant_aware_bits": 4}, {"mode": "int4", "int4_algorithm": "default", "int4_scaling": "activation"}, None,
         "int4_scaling: none"),
        ({"quant_aware_bits": 4}, {"mode": "int4"}, None, "int4_algorithm: default"),  # gptq, the default
        ({"quant_aware_bits": 4}, {"mode": "int4", "int4_algorithm": "default"}, None,
         "int4_scaling: none"),  # activation-scale, the default
    ],
)
def test_a_quantize_section_that_does_not_write_the_grid_is_refused(finetune, quantize, export, match) -> None:
    with pytest.raises(ValueError, match=match):
        PipelineConfig.model_validate(_pipeline(finetune, quantize, export))


def test_matching_sections_are_accepted() -> None:
    cfg = PipelineConfig.model_validate(_pipeline({"quant_aware_bits": 4},
                                                  {"mode": "int4", "int4_algorithm": "default",
                                                   "int4_scaling": "none"}))
    assert cfg.finetune_phases[0].quant_aware_bits == 4
    cfg = PipelineConfig.model_validate(_pipeline({"quant_aware_bits": 8}, {"mode": "int8"}))
    assert cfg.quantize.mode == "int8"


def test_bad_bits_are_refused() -> None:
    with pytest.raises(ValueError, match="quant_aware_bits"):
        FinetuneConfig(max_steps=1, quant_aware_bits=3)
    with pytest.raises(ValueError, match="bits 4 or 8"):
        attach_fake_quant_(torch.nn.Linear(4, 4), bits=2, block_size=4)


def test_the_rounded_weight_follows_every_update() -> None:
    """The rounding is cached between forwards (generation calls each layer once a token) and recomputed after the
    weight changes in place, as an optimiser step or a checkpoint restore changes it."""
    lin = torch.nn.Linear(32, 4)
    attach_fake_quant_(torch.nn.Sequential(lin), bits=4, block_size=BLOCK)
    x = torch.randn(3, 32)
    with torch.no_grad():
        first = lin(x)
        torch.testing.assert_close(lin(x), first)
        lin.weight.mul_(2.0)
        want = x @ block_fake_quant(lin.weight.T, block_size=BLOCK, bits=4) + lin.bias
        torch.testing.assert_close(lin(x), want)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x).sum().backward()
    opt.step()
    with torch.no_grad():
        want = x @ block_fake_quant(lin.weight.T, block_size=BLOCK, bits=4) + lin.bias
        torch.testing.assert_close(lin(x), want)
