"""Activation-aware channel scaling before int4 (``int4_scaling: activation``): the rewrite is exact in fp32 (every
foldable writer: RMSNorm's Mul, LayerNormalization with bias, a per-channel Mul, the gated MLP's up projection with
and without bias, a shared initializer), it lowers the int4 error where activations have outlier channels, it is
never applied where it cannot be folded, and quantize records it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from test_export import fused
from tolerances import SCALING_FP32_ATOL

from edgefuse.config.export import ExportConfig
from edgefuse.config.quantize import QuantizeConfig
from edgefuse.errors import QuantizationError
from edgefuse.export.api import export_onnx
from edgefuse.ort import make_session
from edgefuse.quantize.api import default_output_name, quantize_onnx
from edgefuse.quantize.scaling import apply_scale, find_groups, scale_graph, search_scale

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

TEXTS = ["name Aromi area centre", "Aromi is a place in the centre .", "name Cotto", "the place is a pub",
         "in the riverside area", "Cotto is in the riverside"]
K, N = 32, 8


def _save(nodes: list, inits: dict[str, np.ndarray], path: Path, *, x_shape: tuple[int, ...] = (4, K)) -> Path:
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape))],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _outlier_x(rows: int = 64) -> np.ndarray:
    x = np.random.default_rng(0).normal(size=(rows, K)).astype(np.float32)
    x[:, 5] *= 40  # an outlier channel, as in real decoders' norm outputs
    return x


def _rng(*shape: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _graphs(tmp_path: Path) -> dict[str, tuple[Path, int]]:
    """Small graphs, one per foldable writer: (path, weight MatMuls that read the scaled activation)."""
    w1, w2 = _rng(K, N, seed=1), _rng(K, N, seed=2)
    gamma = np.abs(_rng(K, seed=3)) + 0.5
    mm = [helper.make_node("MatMul", ["h", "w1"], ["a"], name="p1"), helper.make_node("MatMul", ["h", "w2"], ["b"],
                                                                                       name="p2"),
          helper.make_node("Add", ["a", "b"], ["y"])]
    out = {
        "rmsnorm mul": (_save([helper.make_node("Mul", ["x", "g"], ["h"]), *mm], {"g": gamma, "w1": w1, "w2": w2},
                              tmp_path / "mul.onnx"), 2),
        "layernorm with bias": (_save([helper.make_node("LayerNormalization", ["x", "g", "beta"], ["h"], axis=-1),
                                       *mm], {"g": gamma, "beta": _rng(K, seed=4), "w1": w1, "w2": w2},
                                      tmp_path / "ln.onnx"), 2),
    }
    wu, wd, bu = _rng(16, K, seed=5), _rng(K, N, seed=6), _rng(K, seed=7)
    gated = [helper.make_node("MatMul", ["x16", "wg"], ["gt"]), helper.make_node("Sigmoid", ["gt"], ["act"]),
             helper.make_node("MatMul", ["x16", "wu"], ["up"], name="up")]
    x16 = [helper.make_node("Slice", ["x", "s0", "s16", "ax"], ["x16"])]
    common = {"wg": _rng(16, K, seed=8), "wu": wu, "wd": wd, "s0": np.array([0]), "s16": np.array([16]),
              "ax": np.array([1])}
    for name in ("s0", "s16", "ax"):
        common[name] = common[name].astype(np.int64)
    out["gated up"] = (_save_int(x16 + gated + [helper.make_node("Mul", ["act", "up"], ["h"]),
                                                helper.make_node("MatMul", ["h", "wd"], ["y"], name="down")],
                                 common, tmp_path / "gated.onnx"), 1)
    out["gated up with bias"] = (_save_int(
        x16 + gated + [helper.make_node("Add", ["up", "bu"], ["upb"]), helper.make_node("Mul", ["act", "upb"], ["h"]),
                       helper.make_node("MatMul", ["h", "wd"], ["y"], name="down")],
        {**common, "bu": bu}, tmp_path / "gated_bias.onnx"), 1)
    return out


def _save_int(nodes: list, inits: dict[str, np.ndarray], path: Path) -> Path:
    """As :func:`_save`, keeping integer initializers (Slice's starts/ends/axes) as int64."""
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, K])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v if v.dtype == np.int64 else v.astype(np.float32), k)
                           for k, v in inits.items()])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    return make_session(path, optimize=False).run(["y"], {"x": x})[0]


@pytest.mark.parametrize("writer", ["rmsnorm mul", "layernorm with bias", "gated up", "gated up with bias"])
def test_scaling_is_exact_in_fp32_for_every_foldable_writer(tmp_path: Path, writer: str) -> None:
    src, members = _graphs(tmp_path)[writer]
    model = onnx.load(str(src))
    groups = find_groups(model)
    assert len(groups) == 1 and len(groups[0].members) == members
    x = _outlier_x(4)
    s = np.exp(np.random.default_rng(9).normal(size=K)).astype(np.float32)  # far from 1: a real rewrite
    apply_scale(model, groups[0], s)
    dst = tmp_path / "scaled.onnx"
    onnx.save(model, str(dst))
    before, after = _run(src, x), _run(dst, x)
    assert np.abs(after - before).max() <= SCALING_FP32_ATOL * max(1.0, np.abs(before).max())
    w_before = numpy_helper.to_array(next(i for i in onnx.load(str(src)).graph.initializer
                                          if i.name == groups[0].members[0].input[1]))
    w_after = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == groups[0].members[0].input[1]))
    assert not np.allclose(w_before, w_after)  # the weights themselves changed


def test_no_group_where_the_activation_has_another_reader(tmp_path: Path) -> None:
    # the norm output also feeds a residual Add: dividing it by s would change that Add
    src = _save([helper.make_node("Mul", ["x", "g"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["a"]),
                 helper.make_node("Add", ["h", "h"], ["y"])], {"g": np.ones(K), "w": _rng(K, K)}, tmp_path / "r.onnx")
    assert find_groups(onnx.load(str(src))) == []


def test_no_group_where_the_writer_cannot_absorb_a_factor(tmp_path: Path) -> None:
    # GELU's output, and a Mul by a scalar: neither takes a per-channel factor
    gelu = _save([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
                 {"w": _rng(K, N)}, tmp_path / "relu.onnx")
    scalar = _save([helper.make_node("Mul", ["x", "c"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
                   {"c": np.array([2.0]), "w": _rng(K, N)}, tmp_path / "scalar.onnx")
    assert find_groups(onnx.load(str(gelu))) == [] and find_groups(onnx.load(str(scalar))) == []


def test_a_shared_factor_is_copied_before_it_is_scaled(tmp_path: Path) -> None:
    # one gamma read by two Muls: the second Mul's output must not change
    src = _save([helper.make_node("Mul", ["x", "g"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["a"]),
                 helper.make_node("Mul", ["x", "g"], ["h2"]), helper.make_node("MatMul", ["h2", "w2"], ["b"]),
                 helper.make_node("Add", ["a", "b"], ["y"])],
                {"g": np.abs(_rng(K)) + 0.5, "w": _rng(K, N, seed=2), "w2": _rng(K, N, seed=3)}, tmp_path / "s.onnx")
    model = onnx.load(str(src))
    group = next(g for g in find_groups(model) if g.x == "h")
    apply_scale(model, group, np.linspace(0.2, 5.0, K).astype(np.float32))
    onnx.save(model, str(tmp_path / "scaled.onnx"))
    x = _outlier_x(4)
    before, after = _run(src, x), _run(tmp_path / "scaled.onnx", x)
    assert np.abs(after - before).max() <= SCALING_FP32_ATOL * max(1.0, np.abs(before).max())
    assert sum(1 for i in model.graph.initializer if i.name.startswith("g")) == 2


def test_search_picks_no_scaling_when_it_does_not_help() -> None:
    x = np.ones((16, K), np.float32)
    alpha, s, errors = search_scale(x, [_rng(K, N)], block_size=32)
    assert alpha == 0.0 and np.allclose(s, 1.0) and 0.0 in errors


def test_search_lowers_the_error_on_an_outlier_channel() -> None:
    alpha, _, errors = search_scale(_outlier_x(), [_rng(K, N), _rng(K, 4, seed=2)], block_size=32)
    assert alpha > 0 and errors[alpha] < 0.9 * errors[0.0]


def _outlier_decoder(tmp_path: Path) -> Path:
    model = fused("llama", "lm")
    with torch.no_grad():  # outlier channels in every norm's output, as trained decoders have
        for layer in model.model.layers:
            layer.input_layernorm.weight[3] *= 30
            layer.post_attention_layernorm.weight[7] *= 30
    out = tmp_path / "llama"
    export_onnx(model, ExportConfig(task="causal-lm", generate_tokens=0), out)
    return out


@pytest.fixture(scope="module")
def outlier_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _outlier_decoder(tmp_path_factory.mktemp("scaling"))


def test_scale_graph_keeps_the_decoder_and_scales_its_norms(outlier_decoder: Path, tmp_path: Path) -> None:
    from tiny import VOCAB

    from edgefuse.ort import build_feed

    src = outlier_decoder / "model.onnx"
    session = make_session(src)
    rng = np.random.default_rng(0)
    feeds = []
    for _ in range(4):  # the tiny export has no tokenizer: random ids, the last two of each row padded
        ids = rng.integers(3, VOCAB, size=(2, 9)).astype(np.int64)
        mask = np.ones_like(ids)
        mask[:, -2:] = 0
        feeds.append(build_feed(session, ids, mask))
    report = scale_graph(src, tmp_path / "scaled.onnx", feeds, block_size=16)
    assert report["groups"] >= 2 and report["calibration_rows"] > 0
    before = session.run(None, feeds[1])[0]
    after = make_session(tmp_path / "scaled.onnx").run(None, feeds[1])[0]
    assert np.abs(after - before).max() <= SCALING_FP32_ATOL * max(1.0, np.abs(before).max())


def test_quantize_with_activation_scaling_is_closer_to_fp32(outlier_decoder: Path) -> None:
    kw = {"mode": "int4", "block_size": 16, "int4_8bit_share": 0.0, "min_cosine": None, "overwrite": True,
          "int4_algorithm": "default"}  # against round to nearest: the grid the search simulates
    plain = quantize_onnx(outlier_decoder, QuantizeConfig(**kw), calibration_texts=TEXTS)
    cfg = QuantizeConfig(**kw, int4_scaling="activation")
    scaled = quantize_onnx(outlier_decoder, cfg, calibration_texts=TEXTS)
    assert scaled.onnx_path.name == default_output_name(cfg, "avx2") != plain.onnx_path.name
    assert "scaling-activation" in scaled.onnx_path.name
    assert scaled.settings["scaling"]["groups"] >= 2
    assert scaled.cosine_mean > plain.cosine_mean  # measured on the real graphs, against the same fp32 outputs
    assert not any(p.name.endswith(".scaled.onnx") for p in outlier_decoder.rglob("*"))  # no helper file left


def test_activation_scaling_needs_calibration_feeds(tmp_path: Path) -> None:
    from edgefuse.quantize.modes import scaled_source

    with pytest.raises(QuantizationError, match="calibration"):
        scaled_source(_save([], {}, tmp_path / "m.onnx"), QuantizeConfig(mode="int4", int4_scaling="activation"), [])


def test_clip_never_worsens_a_block_and_touches_only_the_named_matmuls(tmp_path: Path) -> None:
    from edgefuse.quantize.scaling import clip_model, search_clip

    x = _outlier_x()
    w = _rng(K, N)
    w[2, 1] = 15.0  # an outlier weight on an ordinary channel: its block's grid is coarse for everyone else
    clipped, errors = search_clip(x, w, block_size=16)
    assert min(errors.values()) <= errors[1.0] and abs(clipped[2, 1]) < 15.0
    src = _save([helper.make_node("MatMul", ["x", "w1"], ["a"], name="p1"),
                 helper.make_node("MatMul", ["x", "w2"], ["b"], name="p2"), helper.make_node("Add", ["a", "b"], ["y"])],
                {"w1": w, "w2": w}, tmp_path / "two.onnx")
    model = onnx.load(str(src))
    report = clip_model(model, src, [{"x": x[:4]}, {"x": x[4:8]}], ["p1"], block_size=16)
    got = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert report["matmuls"] == 1 and report["blocks_clipped"] >= 1
    assert report["error_after"] < report["error_before"]
    assert not np.array_equal(got["w1"], w) and np.array_equal(got["w2"], w)
    assert not any(p.name.endswith(".probe.onnx") for p in tmp_path.iterdir())


def test_clipping_is_skipped_for_grids_it_does_not_simulate(outlier_decoder: Path) -> None:
    cfg = QuantizeConfig(mode="int4", block_size=16, int4_8bit_share=0.0, min_cosine=None, overwrite=True,
                         int4_scaling="activation", int4_symmetric=False, int4_algorithm="default")
    res = quantize_onnx(outlier_decoder, cfg, calibration_texts=TEXTS)
    assert "skipped" in res.settings["clipping"] and res.settings["scaling"]["groups"] >= 1


def test_scale_and_clip_is_closer_to_fp32_than_scale_only(outlier_decoder: Path) -> None:
    kw = {"mode": "int4", "block_size": 16, "int4_8bit_share": 0.25, "min_cosine": None, "overwrite": True,
          "int4_algorithm": "default"}
    scale = quantize_onnx(outlier_decoder, QuantizeConfig(**kw, int4_scaling="activation-scale"),
                          calibration_texts=TEXTS)
    both = quantize_onnx(outlier_decoder, QuantizeConfig(**kw, int4_scaling="activation"), calibration_texts=TEXTS)
    assert "clipping" not in scale.settings and both.settings["clipping"]["matmuls"] > 0
    assert set(both.settings["sensitive_8bit"]).isdisjoint(both.settings["clipping"].get("names", []))
    assert both.cosine_mean > scale.cosine_mean  # measured 0.99559 against 0.99439: clipping is searched on these texts


def test_cli_quantize_with_scaling_and_gptq(outlier_decoder: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from edgefuse.cli import main

    out = tmp_path / "q"
    code = main(["quantize", str(outlier_decoder), "--mode", "int4", "--block-size", "16", "--int4-scaling",
                 "activation-scale", "--int4-algorithm", "gptq", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    entry = json.loads((out / "manifest.json").read_text())
    settings = json.dumps(entry)
    assert '"scaling"' in settings and '"gptq"' in settings and '"clipping"' not in settings
    with pytest.raises(SystemExit) as exc:  # argparse's own exit for a bad choice
        main(["quantize", str(outlier_decoder), "--mode", "int4", "--int4-scaling", "awq"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "awq" in err and "activation" in err and "Traceback" not in err


def test_gptq_is_closer_to_fp32_than_round_to_nearest(outlier_decoder: Path) -> None:
    kw = {"mode": "int4", "block_size": 16, "min_cosine": None, "overwrite": True}
    rtn = quantize_onnx(outlier_decoder, QuantizeConfig(**kw, int4_algorithm="default"), calibration_texts=TEXTS)
    gptq = quantize_onnx(outlier_decoder, QuantizeConfig(**kw, int4_algorithm="gptq"), calibration_texts=TEXTS)
    report = gptq.settings["gptq"]
    assert report["matmuls"] > 0 and not report["too_few_rows"] and report["error_gptq"] < report["error_rtn"]
    assert gptq.cosine_mean > rtn.cosine_mean  # measured 0.9977 against 0.9846


def test_gptq_leaves_a_matmul_with_too_few_tokens_to_round_to_nearest(tmp_path: Path) -> None:
    from edgefuse.quantize.gptq import gptq_model

    w = _rng(K, N)
    src = _save([helper.make_node("MatMul", ["x", "w"], ["y"], name="p")], {"w": w}, tmp_path / "m.onnx",
                x_shape=(None, K))
    model = onnx.load(str(src))
    report = gptq_model(model, src, [{"x": _outlier_x(8)}], ["p"], block_size=16)  # 8 tokens, 32 channels
    assert report["too_few_rows"] == ["p"] and report["matmuls"] == 0
    assert np.array_equal(numpy_helper.to_array(model.graph.initializer[0]), w)  # untouched
    report = gptq_model(model, src, [{"x": _outlier_x(64)}], ["p"], block_size=16)
    assert report["matmuls"] == 1 and not np.array_equal(numpy_helper.to_array(model.graph.initializer[0]), w)


def test_probes_of_one_graph_at_once_use_their_own_files(tmp_path: Path) -> None:
    # two runs probing the same export used to share `.model.probe.onnx`: one deleted the other's file mid-load
    from concurrent.futures import ThreadPoolExecutor

    from edgefuse.quantize.probe import probe_tensors

    w = _rng(K, 4)
    src = _save([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("MatMul", ["h", "w"], ["y"])],
                 {"w": w}, tmp_path / "model.onnx")
    planted = tmp_path / ".model.probe.onnx"
    planted.write_text("not edgefuse's")
    x = _outlier_x(4)

    def probe(_: int) -> np.ndarray:
        return probe_tensors(onnx.load(str(src)), src, [{"x": x}] * 3, ["h"])[2]["h"]

    with ThreadPoolExecutor(4) as pool:
        values = list(pool.map(probe, range(8)))
    for v in values:
        np.testing.assert_array_equal(v, np.maximum(x, 0))
    assert planted.read_text() == "not edgefuse's"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.probe.onnx", "model.onnx"]
