"""fusion-pruned ("prune the tail, fuse the rest"): the pure maths and the model surgery on every MLP kind."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pipeline_tiny import tiny_tokenizer
from tiny import first_output, tiny_inputs, tiny_model
from tolerances import DUPLICATE_FUSION_RTOL, MIN_CHANGE

from edgefuse.config.fusion import FusionConfig
from edgefuse.errors import ConfigError, FusionError
from edgefuse.fusion.api import fuse_mlps_
from edgefuse.fusion.clustering import MlpWeights, activation_importance, fuse_pruned, pool_size
from edgefuse.fusion.methods import compress_mlp
from edgefuse.fusion.scale import get_scale
from edgefuse.fusion.sites import find_mlps


def _mlp(p: int = 24, d: int = 6, seed: int = 0, gated: bool = False) -> MlpWeights:
    g = torch.Generator().manual_seed(seed)
    return MlpWeights(
        up=torch.randn(p, d, generator=g),
        up_bias=None if gated else torch.randn(p, generator=g),
        down=torch.randn(d, p, generator=g),
        gate=torch.randn(p, d, generator=g) if gated else None,
    )


def _forward(w: MlpWeights, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    h = x @ w.up.T + (0 if w.up_bias is None else w.up_bias)
    a = torch.nn.functional.gelu(h) if w.gate is None else torch.nn.functional.silu(x @ w.gate.T) * h
    if scale is not None:
        a = a * scale
    return a @ w.down.T


@pytest.mark.parametrize("gated", [False, True])
def test_full_pool_is_fusion_bit_for_bit(gated: bool) -> None:
    w = _mlp(gated=gated)
    ref = compress_mlp(w, "fusion", 8, seed=3, n_init=2)
    out = compress_mlp(w, "fusion-pruned", 8, seed=3, n_init=2, pool=3.0)  # m = 24 = p
    for name in ("up", "up_bias", "gate", "down"):
        a, b = getattr(ref.weights, name), getattr(out.weights, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert torch.equal(ref.scale, out.scale)
    assert np.array_equal(ref.labels, out.labels)
    assert ref.inertia == out.inertia


def test_full_pool_on_a_model_equals_fusion() -> None:
    a, b = tiny_model("bert", seed=1), tiny_model("bert", seed=1)
    fuse_mlps_(a, FusionConfig(keep_ratio=0.5, seed=2))
    fuse_mlps_(b, FusionConfig(method="fusion-pruned", keep_ratio=0.5, pool=2.0, seed=2))  # m = 32 = p
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for x, y in zip(find_mlps(a), find_mlps(b), strict=True):
        assert torch.equal(get_scale(x.down_module), get_scale(y.down_module))


@pytest.mark.parametrize("importance", ["weights", "activations"])
def test_exact_on_duplicates_with_zero_tail(importance: str) -> None:
    # 3 distinct sub-MLPs duplicated 1, 2 and 3 times (6 units) plus 4 all-zero units: the pool of 6 drops the
    # zero tail, k-means finds the 3 exact clusters and the frozen counts reproduce the output.
    base = _mlp(p=3, d=5, seed=7)
    reps = torch.tensor([0, 1, 1, 2, 2, 2])
    zeros_p = 4
    w = MlpWeights(
        up=torch.cat([base.up[reps], torch.zeros(zeros_p, 5)]),
        up_bias=torch.cat([base.up_bias[reps], torch.zeros(zeros_p)]),
        down=torch.cat([base.down[:, reps], torch.zeros(5, zeros_p)], dim=1),
    )
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))  # tail units interleaved
    w = w.select(perm)
    score = None
    if importance == "activations":
        score = activation_importance(w, torch.rand(10, generator=torch.Generator().manual_seed(1)) + 0.1)
    out = fuse_pruned(w, 3, pool=2.0, importance=score, seed=0)
    x = torch.randn(11, 5, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_forward(out.weights, x, out.scale), _forward(w, x), rtol=DUPLICATE_FUSION_RTOL,
                               atol=DUPLICATE_FUSION_RTOL)
    assert sorted(out.counts.tolist()) == [1.0, 2.0, 3.0]
    pruned = (out.labels < 0).nonzero()[0]
    assert sorted(perm[pruned].tolist()) == [6, 7, 8, 9]  # exactly the zero units


@pytest.mark.parametrize(("k", "pool"), [(4, 1.0), (4, 1.25), (5, 2.0), (8, 1.6), (12, 10.0)])
def test_counts_sum_to_pool(k: int, pool: float) -> None:
    w = _mlp(p=24)
    out = fuse_pruned(w, k, pool=pool, seed=1)
    m = pool_size(24, k, pool)
    assert out.weights.width == k and out.scale.shape == (k,)
    assert out.counts.sum().item() == m and (out.counts > 0).all()
    assert (out.labels >= 0).sum() == m and out.labels.max() == k - 1


def test_deterministic_per_seed() -> None:
    w = _mlp(p=40, seed=4)
    a, b = fuse_pruned(w, 10, pool=1.5, seed=5), fuse_pruned(w, 10, pool=1.5, seed=5)
    assert torch.equal(a.weights.up, b.weights.up) and torch.equal(a.scale, b.scale)
    assert np.array_equal(a.labels, b.labels)


def test_pool_keeps_the_most_important_units() -> None:
    w = _mlp(p=20, seed=2)
    score = torch.arange(20, dtype=torch.float32)  # the last 12 units are the most important
    out = fuse_pruned(w, 8, pool=1.5, importance=score, seed=0)
    assert (out.labels[:8] == -1).all() and (out.labels[8:] >= 0).all()


def test_errors() -> None:
    w = _mlp(p=12)
    with pytest.raises(FusionError, match="importance has shape"):
        fuse_pruned(w, 4, importance=torch.ones(5))
    with pytest.raises(ConfigError, match="pool"):
        fuse_pruned(w, 4, pool=0.5)
    with pytest.raises(FusionError, match="12"):
        activation_importance(w, torch.ones(3))
    with pytest.raises(FusionError, match="nan"):
        activation_importance(w, torch.full((12,), float("nan")))
    with pytest.raises(ValueError, match="pool"):
        FusionConfig(method="fusion-pruned", keep_ratio=0.5, pool=0.9)
    with pytest.raises(ConfigError, match="tokenizer"):
        fuse_mlps_(tiny_model("bert"), FusionConfig(method="fusion-pruned", keep_ratio=0.5, importance="activations"))


def _texts() -> list[str]:
    return [" ".join(f"w{(i * 7 + j) % 60}" for j in range(9)) for i in range(6)]


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "mixtral", "qwen2_moe", "switch_transformers"])
@pytest.mark.parametrize("importance", ["weights", "activations"])
def test_every_mlp_kind(arch: str, importance: str) -> None:
    model = tiny_model(arch, seed=0)
    inputs = tiny_inputs(arch)
    before = first_output(model, inputs)
    cfg = FusionConfig(method="fusion-pruned", keep_ratio=0.5, pool=1.5, importance=importance, seed=0)
    result = fuse_mlps_(model, cfg, tokenizer=tiny_tokenizer(), texts=_texts())
    after = first_output(model, inputs)
    assert torch.isfinite(after).all()
    assert (after - before).abs().max().item() > MIN_CHANGE
    assert result.steps and all(s.frozen_scale_entries == s.width_after for s in result.steps)
    for site in find_mlps(model):
        scale = get_scale(site.down_module)
        if scale is None:
            continue
        step = next(s for s in result.steps if s.name == site.name)
        assert scale.sum().item() == pool_size(step.width_before, step.width_after, 1.5)
    assert model.config.edgefuse["importance"] == importance


def test_pipeline_fuse_stage_calibrates_on_the_task_data(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import json

    from pipeline_tiny import base_config, save_tiny_bert, write_tsv

    from edgefuse.config.pipeline import config_from_dict
    from edgefuse.fusion import calibrate
    from edgefuse.pipeline.api import run_pipeline

    model_dir = save_tiny_bert(tmp_path / "bert")
    train = write_tsv(tmp_path / "train.tsv", 12)
    raw = base_config(model_dir, data={"train": str(train), "validation": str(train)},
                      fusion={"keep_ratio": 0.5, "method": "fusion-pruned", "importance": "activations",
                              "pool": 1.5, "calibration_examples": 8})
    seen: list[str] = []
    real = calibrate.down_input_stats

    def spy(model, sites, texts, tokenizer, **kw):  # type: ignore[no-untyped-def]
        seen.extend(texts)
        return real(model, sites, texts, tokenizer, **kw)

    monkeypatch.setattr(calibrate, "down_input_stats", spy)
    run = run_pipeline(config_from_dict(raw), tmp_path / "run")
    assert run.ran == ("fuse",)
    rows = train.read_text().splitlines()[1:9]
    assert seen == [r.split("\t")[0] for r in rows]  # the first 8 training sentences, not the built-in corpus
    config = json.loads((tmp_path / "run" / "fuse" / "model" / "config.json").read_text())
    assert config["edgefuse"]["method"] == "fusion-pruned" and config["edgefuse"]["importance"] == "activations"
    assert config["intermediate_size"] == 16
