"""measure_ntk on real (tiny) torch models: kernels against direct autograd, the fusion guarantees of
method.md 1.5 on a model with exactly duplicated sub-MLPs, the frozen scale, every error path and the CLI."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tiny import VOCAB, tiny_inputs, tiny_model
from tolerances import (
    DUPLICATE_FUSION_RTOL,
    FP32_EXACT_ATOL,
    FP32_EXACT_RTOL,
    MIN_CHANGE,
    NTK_FUSION_GD_MIN_ERROR,
    NTK_SUBMLP_GRAD_ATOL,
    NTK_SUBMLP_GRAD_RTOL,
)

from edgefuse.cli import main
from edgefuse.config.fusion import FusionConfig
from edgefuse.config.ntk import NtkConfig
from edgefuse.errors import ConfigError, FusionError, TargetNotFoundError
from edgefuse.fusion.api import fuse_mlps_
from edgefuse.fusion.clustering import MlpWeights, subml_features
from edgefuse.fusion.scale import SCALE_ATTR, detach_scale_, get_scale
from edgefuse.fusion.sites import find_mlps, mlp_param_count, read_weights, write_weights
from edgefuse.ntk.api import measure_ntk, reference_kernels
from edgefuse.ntk.params import param_groups
from edgefuse.ntk.scalar import projection_head, split_examples

COUNTS = (1, 2, 3, 4, 6, 7, 9)  # 7 distinct units duplicated to the tiny BERT's width 32
N = 6


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def duplicated_bert(head: str = "base") -> torch.nn.Module:
    """A tiny BERT whose every MLP holds 7 distinct sub-MLPs, duplicated COUNTS times and shuffled."""
    model = tiny_model("bert", head=head)
    gen = torch.Generator().manual_seed(0)
    idx = torch.repeat_interleave(torch.arange(len(COUNTS)), torch.tensor(COUNTS))
    with torch.no_grad():
        for site in find_mlps(model):
            w = read_weights(site)
            pick = idx[torch.randperm(len(idx), generator=gen)]
            write_weights(site, MlpWeights(up=w.up[pick].clone(), up_bias=w.up_bias[pick].clone(),
                                           down=w.down[:, pick].clone()))
    return model


def inputs(n: int = N, seq: int = 7) -> dict[str, torch.Tensor]:
    return tiny_inputs("bert", batch=n, seq=seq)


def compress(model: torch.nn.Module, **kw: object) -> torch.nn.Module:
    out = copy.deepcopy(model)
    fuse_mlps_(out, FusionConfig(**kw))
    return out


def direct_kernels(model: torch.nn.Module, batch: dict, params: list, head: torch.Tensor) -> tuple:
    """G sign(G)^T and G G^T from plain autograd, one example at a time, no chunking, no row selection."""
    rows = []
    for ex in split_examples(batch):
        f = model(**ex).last_hidden_state[0].mean(0) @ head
        grads = torch.autograd.grad(f, params, allow_unused=True)
        flat = [(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads, strict=True)]
        rows.append(torch.cat(flat))
    g = torch.stack(rows).double()
    return (g @ torch.sign(g).T).numpy(), (g @ g.T).numpy()


@pytest.mark.parametrize("params", ["fused-mlp", "all"])
@pytest.mark.parametrize("mib", [1024.0, 0.005], ids=["one-chunk", "many-chunks"])
def test_kernels_equal_direct_autograd(params: str, mib: float) -> None:
    """The chunked kernels (0.005 MiB splits every weight over several chunks) equal plain autograd's."""
    orig = tiny_model("bert")
    comp = compress(orig, keep_ratio=0.5)
    cfg = NtkConfig(n_examples=N, params=params, max_gradient_mib=mib)
    ref = reference_kernels(orig, comp, inputs(), cfg)
    chosen = [p for _, _, p in param_groups(orig, find_mlps(orig), params)]
    if params == "all":
        assert len(chosen) == len(list(orig.parameters()))
    else:
        assert sum(p.numel() for p in chosen) == sum(mlp_param_count(s) for s in find_mlps(orig))
    sign, gd = direct_kernels(orig, inputs(), chosen, projection_head(16, 0))
    np.testing.assert_allclose(sum(ref.sign.values()), sign, rtol=FP32_EXACT_RTOL, atol=FP32_EXACT_ATOL)
    np.testing.assert_allclose(sum(ref.gd.values()), gd, rtol=FP32_EXACT_RTOL, atol=FP32_EXACT_ATOL)
    assert abs(sign).max() > MIN_CHANGE  # non-vacuous


@pytest.mark.parametrize("params", ["fused-mlp", "all"])
def test_fusion_of_duplicates_keeps_output_and_sign_kernel(params: str) -> None:
    """method.md 1.5/1.6 on a real model: fusing exact duplicates to the number of distinct units keeps the output
    and the Adam (sign) kernel to fp32 rounding; merge keeps only the output, plain centroids nothing."""
    orig = duplicated_bert()
    cfg = NtkConfig(n_examples=N, params=params)
    res = {m: measure_ntk(orig, compress(orig, method=m, width=len(COUNTS)), inputs(), cfg)
           for m in ("fusion", "merge", "cluster", "centroid")}
    fusion = res["fusion"]
    assert fusion.kernel.sign_rel_error < DUPLICATE_FUSION_RTOL
    assert fusion.final_hidden_rel_error < DUPLICATE_FUSION_RTOL
    assert fusion.output_rel_error < DUPLICATE_FUSION_RTOL
    assert max(fusion.layer_hidden_rel_error.values()) < DUPLICATE_FUSION_RTOL
    # the GD kernel is not preserved: the centroid gradients are n_j times a sub-MLP's, so G G^T grows by n_j^2
    assert fusion.fused_mlp is not None and fusion.fused_mlp.gd_rel_error > NTK_FUSION_GD_MIN_ERROR
    assert res["merge"].final_hidden_rel_error < DUPLICATE_FUSION_RTOL  # same forward as fusion
    # the toy's order (test_toy_ntk.py) holds on the real model too: fusion < merge < sqrt(D) cluster < centroid
    sign = [res[m].fused_mlp.sign_rel_error for m in ("fusion", "merge", "cluster", "centroid")]  # type: ignore[union-attr]
    assert sign == sorted(sign) and sign[1] > 100 * DUPLICATE_FUSION_RTOL, sign
    assert res["cluster"].final_hidden_rel_error > 100 * DUPLICATE_FUSION_RTOL  # GELU is not homogeneous
    assert res["centroid"].final_hidden_rel_error > 100 * DUPLICATE_FUSION_RTOL
    assert [k.group for k in fusion.per_layer] == ["layer.0", "layer.1", "layer.2"]
    assert fusion.kernel.params_compressed < fusion.kernel.params_original


def test_fused_gradient_is_counts_times_centroid_gradient() -> None:
    """With the frozen scale, the gradient of centroid j is n_j times that of the plain centroid MLP (no scale),
    and b2's is unchanged: exactly the fusion gradients of method.md 1.5 (what Adam's sign sees)."""
    fused = compress(duplicated_bert(), width=len(COUNTS), layers=[1])
    plain = copy.deepcopy(fused)
    site_f, site_p = (next(s for s in find_mlps(m) if s.layer == 1) for m in (fused, plain))
    counts = get_scale(site_f.down_module)
    assert counts is not None and sorted(counts.tolist()) == sorted(float(c) for c in COUNTS)
    detach_scale_(site_p.down_module)
    x, v = torch.randn(5, 16), torch.randn(5, 16)
    grads = []
    for site in (site_f, site_p):
        y = site.down_module(site.module.intermediate(x))  # the MLP alone: W2 D act(W1 x + b1) + b2
        grads.append(torch.autograd.grad((y * v).sum(), [site.up_module.weight, site.up_module.bias,
                                                           site.down_module.weight, site.down_module.bias]))
    (gw1, gb1, gw2, gb2), (pw1, pb1, pw2, pb2) = grads
    torch.testing.assert_close(gw1, counts[:, None] * pw1)
    torch.testing.assert_close(gb1, counts * pb1)
    torch.testing.assert_close(gw2, pw2 * counts[None, :])
    torch.testing.assert_close(gb2, pb2)


def test_fused_gradient_is_sum_of_duplicate_gradients() -> None:
    """In the whole model: d f / d centroid_j of the fused model = the sum of d f / d theta_i over the members i
    of cluster j in the duplicated original (the forward is identical, so the chain rule makes them equal)."""
    orig = duplicated_bert()
    fused = compress(orig, width=len(COUNTS))
    ex = split_examples(inputs(1))[0]
    head = projection_head(16, 0)
    s_o, s_f = find_mlps(orig)[0], find_mlps(fused)[0]
    feats_o, feats_f = subml_features(read_weights(s_o)), subml_features(read_weights(s_f))
    labels = torch.as_tensor(((feats_o[:, None, :] - feats_f[None]) ** 2).sum(-1).argmin(1))
    go, gf = (torch.autograd.grad(m(**ex).last_hidden_state[0].mean(0) @ head,
                                  [s.up_module.weight, s.down_module.weight])
              for m, s in ((orig, s_o), (fused, s_f)))
    summed_up = torch.zeros_like(gf[0]).index_add_(0, labels, go[0])
    summed_down = torch.zeros_like(gf[1]).index_add_(1, labels, go[1])
    torch.testing.assert_close(gf[0], summed_up, rtol=NTK_SUBMLP_GRAD_RTOL, atol=NTK_SUBMLP_GRAD_ATOL)
    torch.testing.assert_close(gf[1], summed_down, rtol=NTK_SUBMLP_GRAD_RTOL, atol=NTK_SUBMLP_GRAD_ATOL)


def test_scale_is_a_buffer_not_a_parameter() -> None:
    comp = compress(tiny_model("bert"), keep_ratio=0.5)
    site = find_mlps(comp)[0]
    assert SCALE_ATTR in dict(site.down_module.named_buffers())
    assert not any(SCALE_ATTR in n for n, _ in comp.named_parameters())
    entries = param_groups(comp, find_mlps(comp), "fused-mlp")
    assert sum(p.numel() for _, _, p in entries) == sum(mlp_param_count(s) for s in find_mlps(comp))
    # a scale turned into a trainable parameter would be trained by Adam: refused
    scale = detach_scale_(site.down_module)
    site.down_module.register_parameter(SCALE_ATTR, torch.nn.Parameter(scale))
    with pytest.raises(FusionError, match="must stay a frozen buffer"):
        measure_ntk(tiny_model("bert"), comp, inputs(), NtkConfig(n_examples=N))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mixtral", "switch_transformers"])
def test_architectures_identity_and_change(arch: str) -> None:
    """keep_ratio 1 is the identity (every error ~0); keep_ratio 0.5 changes kernels and outputs (non-vacuity)."""
    orig = tiny_model(arch)
    batch = tiny_inputs(arch, batch=4)
    cfg = NtkConfig(n_examples=4)
    same = measure_ntk(orig, compress(orig, keep_ratio=1.0), batch, cfg)
    assert same.kernel.sign_rel_error < FP32_EXACT_ATOL and same.final_hidden_rel_error < FP32_EXACT_ATOL
    assert same.output == "last-token-logprob"
    diff = measure_ntk(orig, compress(orig, keep_ratio=0.5), batch, cfg)
    assert diff.kernel.sign_rel_error > MIN_CHANGE and diff.final_hidden_rel_error > MIN_CHANGE
    assert set(diff.layer_hidden_rel_error) == {k.group for k in diff.per_layer}


def test_svd_low_rank_parameters_are_in_the_set() -> None:
    orig = tiny_model("bert")
    comp = compress(orig, method="svd", keep_ratio=0.5)
    res = measure_ntk(orig, comp, inputs(), NtkConfig(n_examples=N))
    assert res.kernel.params_compressed == sum(mlp_param_count(s) for s in find_mlps(comp))
    assert res.kernel.params_compressed < res.kernel.params_original
    assert res.kernel.sign_rel_error > MIN_CHANGE


def test_classifier_outputs_and_reference_reuse() -> None:
    orig = duplicated_bert(head="cls")
    comp = compress(orig, width=len(COUNTS))
    labels = [0, 1, 1, 0, 1, 0]
    for output in ("class0-prob", "gold-logit"):
        cfg = NtkConfig(n_examples=N, output=output)
        ref = reference_kernels(orig, comp, inputs(), cfg, labels=labels)
        res = measure_ntk(orig, comp, inputs(), cfg, labels=labels, reference=ref)
        assert res.output == output
        assert res.kernel.sign_rel_error < DUPLICATE_FUSION_RTOL
    assert measure_ntk(orig, comp, inputs(), NtkConfig(n_examples=N)).output == "class0-prob"  # auto
    with pytest.raises(ConfigError, match="needs a label"):
        measure_ntk(orig, comp, inputs(), NtkConfig(n_examples=N, output="gold-logit"))
    with pytest.raises(ConfigError, match="reference kernels were computed for other settings"):
        measure_ntk(orig, comp, inputs(), NtkConfig(n_examples=N), reference=ref)  # ref is gold-logit's


def test_padding_is_removed_per_example() -> None:
    """An example's kernel row does not depend on how much padding its batch had."""
    orig = tiny_model("bert")
    comp = compress(orig, keep_ratio=0.5)
    batch = inputs(3)
    padded = {k: torch.cat([v, torch.zeros_like(v[:, :4])], 1) for k, v in batch.items()}
    cfg = NtkConfig(n_examples=3)
    a, b = measure_ntk(orig, comp, batch, cfg), measure_ntk(orig, comp, padded, cfg)
    assert a.kernel.sign_rel_error == pytest.approx(b.kernel.sign_rel_error, rel=FP32_EXACT_RTOL)


def test_errors() -> None:
    orig = tiny_model("bert")
    comp = compress(orig, keep_ratio=0.5)
    cfg = NtkConfig(n_examples=N)
    with pytest.raises(ConfigError, match="load both with the same task"):
        measure_ntk(tiny_model("bert", head="cls"), comp, inputs(), cfg)
    with pytest.raises(ConfigError, match="n_examples=6"):
        measure_ntk(orig, comp, inputs(3), cfg)
    with pytest.raises(ConfigError, match="float32"):
        measure_ntk(orig, copy.deepcopy(comp).double(), inputs(), cfg)
    with pytest.raises(TargetNotFoundError, match="no compressed MLP"):
        measure_ntk(orig, copy.deepcopy(orig), inputs(), cfg)
    assert measure_ntk(orig, copy.deepcopy(orig), inputs(), NtkConfig(n_examples=N, params="all")).kernel \
        .sign_rel_error == 0.0
    with pytest.raises(ConfigError, match="needs a sequence-classification model"):
        measure_ntk(orig, comp, inputs(), NtkConfig(n_examples=N, output="class0-prob"))
    with pytest.raises(ConfigError, match="needs a language model"):
        measure_ntk(orig, comp, inputs(), NtkConfig(n_examples=N, output="last-token-logprob"))
    with pytest.raises(ConfigError, match="not supported"):
        measure_ntk(orig, comp, {**inputs(), "pixel_values": torch.zeros(N, 3)}, cfg)
    with pytest.raises(ConfigError, match="labels for"):
        measure_ntk(orig, comp, inputs(), cfg, labels=[0])
    with pytest.raises(TargetNotFoundError, match="not in the original"):
        measure_ntk(_two_layer_bert(), comp, inputs(), cfg)
    frozen = copy.deepcopy(orig).requires_grad_(False)
    with pytest.raises(TargetNotFoundError, match="is empty"):
        measure_ntk(orig, frozen, inputs(), NtkConfig(n_examples=N, params="all"))
    with pytest.raises(ValueError, match=r"unknown key .chunk."):
        NtkConfig(n_examples=N, chunk=3)  # type: ignore[call-arg]


def _two_layer_bert() -> torch.nn.Module:
    import transformers as t

    torch.manual_seed(0)
    cfg = t.BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       vocab_size=VOCAB, max_position_embeddings=64)
    return t.BertModel(cfg).eval()


# ------------------------------------------------------------------------------------------------------- CLI
@pytest.fixture()
def model_dir(tmp_path):  # type: ignore[no-untyped-def]
    """A tiny BERT with a word-level vocabulary, saved as a model folder the CLI can load."""
    from transformers import BertTokenizerFast

    words = ["good", "bad", "film", "very", "not", "a", "plot", "fun", "dull", "story"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    folder = tmp_path / "orig"
    duplicated_bert().save_pretrained(folder, safe_serialization=True)
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(folder)
    data = tmp_path / "data.tsv"
    rows = ["good film", "bad plot", "very fun story", "not a good film", "dull", "a very bad story"]
    data.write_text("sentence\tlabel\n" + "".join(f"{r}\t{i % 2}\n" for i, r in enumerate(rows)))
    return folder, data


def test_cli_in_memory_and_saved(model_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    folder, data = model_dir
    out = tmp_path / "ntk.json"
    rc = main(["-q", "ntk", str(folder), "--width", str(len(COUNTS)), "--data", str(data), "--n", "6", "--json",
               "--out", str(out)])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload == json.loads(out.read_text())
    assert payload["result"]["kernel"]["sign_rel_error"] < DUPLICATE_FUSION_RTOL
    assert payload["fusion"]["method"] == "fusion"
    # the same through a saved compressed folder
    from edgefuse.fusion.persist import save_fused

    fused = compress(duplicated_bert(), width=len(COUNTS))
    save_fused(fused, tmp_path / "fused")
    rc = main(["-q", "ntk", str(folder), str(tmp_path / "fused"), "--data", str(data), "--n", "6",
               "--params", "all"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "layer.2" in text and "fused-mlp" in text and "all" in text
    assert main(["-q", "ntk", str(folder), "--width", "7", "--data", str(data), "--n", "6", "--out", str(out)]) == 12


def test_cli_errors(model_dir, capsys) -> None:  # type: ignore[no-untyped-def]
    folder, data = model_dir
    base = ["-q", "ntk", str(folder)]
    assert main([*base, "--data", str(data), "--n", "6"]) == 2  # neither COMPRESSED nor --keep-ratio
    assert main([*base, str(folder), "--keep-ratio", "0.5", "--data", str(data)]) == 2  # both
    assert "not both" in capsys.readouterr().err
    assert main([*base, "--keep-ratio", "0.5", "--data", str(data) + ".missing"]) == 3
    assert main([*base, "--keep-ratio", "0.5", "--data", str(data), "--text-column", "text"]) == 6
    assert main([*base, "--keep-ratio", "0.5", "--data", str(data), "--n", "64"]) == 6
    assert main([*base, "--keep-ratio", "1.5", "--data", str(data), "--n", "6"]) == 2
    assert "keep_ratio" in capsys.readouterr().err
    words = data.parent / "words.tsv"
    words.write_text("sentence\tlabel\n" + "".join(f"good film\t{w}\n" for w in ("pos", "neg") * 3))
    assert main([*base, "--keep-ratio", "0.5", "--data", str(words), "--n", "6", "--task", "sequence-classification",
                 "--output", "gold-logit"]) == 6
    assert "non-integer labels" in capsys.readouterr().err


def test_cli_refuses_encoder_decoder(model_dir, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    folder, data = model_dir
    switch = tmp_path / "switch"
    tiny_model("switch_transformers").save_pretrained(switch, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(switch)
    assert main(["-q", "ntk", str(switch), "--keep-ratio", "0.5", "--data", str(data), "--n", "6"]) == 2
    assert "encoder-decoder" in capsys.readouterr().err
