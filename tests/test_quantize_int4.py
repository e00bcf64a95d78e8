"""int4 (MatMulNBits) algorithms on a tiny decoder: every algorithm round-trips (graph runs, every weight MatMul
becomes MatMulNBits, output close to fp32, accuracy_level written), exclusions hold for each algorithm, the auto
mode's int8 and 8-bit-block fallbacks, the tied lm_head (MatMul of a transposed embedding), and the default writes
what it claims."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from test_export import fused
from tolerances import INT4_ONE_MATMUL_MAX_ERROR, QUANT_TINY_MIN_COSINE

from edgefuse.config.export import ExportConfig
from edgefuse.config.quantize import QuantizeConfig
from edgefuse.errors import QuantizationError
from edgefuse.export.api import export_onnx
from edgefuse.quantize.api import default_output_name, quantize_onnx
from edgefuse.quantize.evaluate import op_counts, weight_matmuls

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

TEXTS = ["name Aromi area centre", "Aromi is a place in the centre .", "name Cotto", "the place is a pub",
         "in the riverside area", "Cotto is in the riverside"]


@pytest.fixture(scope="module")
def tiny_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("int4") / "llama"
    export_onnx(fused("llama", "lm"), ExportConfig(task="causal-lm", generate_tokens=0), out)
    return out


def _attr(node: onnx.NodeProto, name: str) -> int | None:
    return next((a.i for a in node.attribute if a.name == name), None)


@pytest.mark.parametrize("algorithm", ["default", "rtn", "hqq", "gptq"])
def test_int4_algorithms_round_trip(tiny_decoder: Path, algorithm: str) -> None:
    cfg = QuantizeConfig(mode="int4", block_size=16, int4_algorithm=algorithm, int4_8bit_share=0.0, overwrite=True)
    res = quantize_onnx(tiny_decoder, cfg, calibration_texts=TEXTS)
    n_weights = len(weight_matmuls(onnx.load(str(tiny_decoder / "model.onnx"))))
    model = onnx.load(str(res.onnx_path))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert res.onnx_path.name == default_output_name(cfg, "avx2")
    assert len(nbits) == res.quantized_nodes == n_weights
    assert all(_attr(n, "bits") == 4 and _attr(n, "block_size") == 16 for n in nbits)
    assert all(_attr(n, "accuracy_level") == 4 for n in nbits)  # written for every algorithm, HQQ included
    assert res.cosine_mean >= QUANT_TINY_MIN_COSINE
    assert res.settings["algorithm"] == algorithm
    assert res.cosine_mean < 1.0  # the weights really changed


@pytest.mark.parametrize("algorithm", ["default", "rtn", "hqq", "gptq"])
def test_int4_exclusion_holds_for_every_algorithm(tiny_decoder: Path, algorithm: str) -> None:
    names = weight_matmuls(onnx.load(str(tiny_decoder / "model.onnx")))
    keep = [n for n in names if "down_proj" in n]
    assert keep
    res = quantize_onnx(tiny_decoder, QuantizeConfig(mode="int4", block_size=16, int4_algorithm=algorithm,
                                                     exclude=keep, overwrite=True, output_name=f"x_{algorithm}.onnx"),
                        calibration_texts=TEXTS)
    model = onnx.load(str(res.onnx_path))
    plain = {n.name for n in model.graph.node if n.op_type == "MatMul"}
    assert set(keep) <= plain and res.quantized_nodes == len(names) - len(keep)


def test_gptq_needs_calibration_feeds(tmp_path: Path) -> None:
    from edgefuse.quantize.backends import quantize_int4

    with pytest.raises(QuantizationError, match="calibration data"):
        quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx", QuantizeConfig(mode="int4", int4_algorithm="gptq"),
                      [], [])


def test_auto_int4_falls_back_to_int8(tiny_decoder: Path) -> None:
    # the own-error ranking of the 8-bit share: with the output ranking the tiny model's 4-bit gap is already
    # smaller than dynamic int8's own activation error, and half of it cannot be closed by int8 MatMuls
    base = quantize_onnx(tiny_decoder, QuantizeConfig(mode="int4", block_size=16, int4_8bit_rank="error",
                                                      overwrite=True), calibration_texts=TEXTS)
    target = base.cosine_mean + 0.5 * (1.0 - base.cosine_mean)
    cfg = QuantizeConfig(mode="int4", block_size=16, auto_target_cosine=target, int4_fallback="int8", auto_max_kept=8,
                         int4_8bit_rank="error", overwrite=True, min_cosine=None)
    try:
        res = quantize_onnx(tiny_decoder, cfg, calibration_texts=TEXTS)
    except QuantizationError:
        pytest.fail("int8 fallback could not reach half of the int4 gap with 8 MatMuls")
    counts = op_counts(onnx.load(str(res.onnx_path)))
    kept = res.settings["kept_fp32_auto"]
    assert "-int8-fallback" in res.onnx_path.name and kept
    assert res.settings["int8_fallback"] == kept
    assert counts.get("MatMulInteger", 0) == len(kept)  # the fallback MatMuls are int8, not fp32
    assert counts["MatMulNBits"] == base.quantized_nodes - len(kept)
    assert res.cosine_mean >= target


def test_auto_int4_falls_back_to_8bit_blocks(tiny_decoder: Path) -> None:
    # the own-error ranking of the 8-bit share, as in the int8 fallback test above
    base = quantize_onnx(tiny_decoder, QuantizeConfig(mode="int4", block_size=16, int4_8bit_rank="error",
                                                      overwrite=True), calibration_texts=TEXTS)
    target = base.cosine_mean + 0.5 * (1.0 - base.cosine_mean)
    cfg = QuantizeConfig(mode="int4", block_size=16, auto_target_cosine=target, int4_fallback="nbits8",
                         auto_max_kept=8, int4_8bit_rank="error", overwrite=True, min_cosine=None)
    res = quantize_onnx(tiny_decoder, cfg, calibration_texts=TEXTS)
    kept = res.settings["kept_fp32_auto"]
    assert "-nbits8-fallback" in res.onnx_path.name and kept
    assert res.settings["nbits8_fallback"] == kept
    bits = {n.name.rsplit("_Q", 1)[0]: _attr(n, "bits") for n in onnx.load(str(res.onnx_path)).graph.node
            if n.op_type == "MatMulNBits"}
    assert {bits[k] for k in kept} == {8} and sorted(b for b in bits.values() if b == 4)
    assert len(bits) == base.quantized_nodes  # every MatMul quantized: 4 or 8 bits, none left fp32
    assert res.cosine_mean >= target


@pytest.fixture(scope="module")
def tied_decoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama with tied embeddings: its export computes the lm_head as MatMul(x, Transpose(embedding))."""
    import transformers
    from tiny import tiny_config

    config = tiny_config("llama")
    config.tie_word_embeddings = True
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    out = tmp_path_factory.mktemp("int4tied") / "llama"
    export_onnx(model, ExportConfig(task="causal-lm", generate_tokens=0), out)
    return out


def _lm_head(model: onnx.ModelProto) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.name.startswith("/lm_head/MatMul"))


@pytest.mark.parametrize("tied", ["fp32", "int4", "nbits8"])
def test_tied_lm_head(tied_decoder: Path, tied: str) -> None:
    fp32 = onnx.load(str(tied_decoder / "model.onnx"))
    producers = {o: n.op_type for n in fp32.graph.node for o in n.output}
    assert producers[_lm_head(fp32).input[1]] == "Transpose"  # the pattern this option exists for
    res = quantize_onnx(tied_decoder, QuantizeConfig(mode="int4", block_size=16, int4_tied=tied, overwrite=True,
                                                     output_name=f"tied_{tied}.onnx"), calibration_texts=TEXTS)
    model = onnx.load(str(res.onnx_path))
    head = _lm_head(model)
    n_weights = len(weight_matmuls(fp32))
    assert res.settings["tied"] == {"nodes": [] if tied == "fp32" else ["/lm_head/MatMul"], "as": tied}
    if tied == "fp32":
        assert head.op_type == "MatMul" and res.quantized_nodes == n_weights
    else:
        assert head.op_type == "MatMulNBits" and _attr(head, "bits") == (4 if tied == "int4" else 8)
        assert _attr(head, "accuracy_level") == 4 and res.quantized_nodes == n_weights + 1
        assert not any(n.op_type == "Transpose" and n.input[0] == "model.embed_tokens.weight"
                       for n in model.graph.node)  # the dead Transpose is gone; the Gather keeps the table
    assert res.cosine_mean >= QUANT_TINY_MIN_COSINE


def _one_matmul(path: Path, k: int, n: int) -> np.ndarray:
    from onnx import TensorProto, helper, numpy_helper

    w = np.random.default_rng(0).normal(size=(k, n)).astype(np.float32)
    g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
                          [numpy_helper.from_array(w, "w")])
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return w


@pytest.mark.parametrize("algorithm", ["default", "rtn", "k_quant", "hqq"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_algorithm_round_trips_one_matmul(tmp_path: Path, algorithm: str, symmetric: bool) -> None:
    """Every data-free algorithm, both symmetries, on a 128 x 48 weight (4 blocks of 32 per column): the graph runs
    and its product is within 4-bit error of fp32 (measured 0.078-0.099 relative; random output would be ~1.4)."""
    from edgefuse.ort import make_session
    from edgefuse.quantize.backends import quantize_int4

    w = _one_matmul(tmp_path / "m.onnx", 128, 48)
    cfg = QuantizeConfig(mode="int4", block_size=32, int4_algorithm=algorithm, int4_symmetric=symmetric)
    quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx", cfg, [])
    node = next(n for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.op_type == "MatMulNBits")
    assert _attr(node, "bits") == 4 and _attr(node, "block_size") == 32 and _attr(node, "accuracy_level") == 4
    x = np.random.default_rng(1).normal(size=(8, 128)).astype(np.float32)
    y = make_session(tmp_path / "q.onnx", threads=1).run(None, {"x": x})[0]
    err = float(np.linalg.norm(y - x @ w) / np.linalg.norm(x @ w))
    assert 0.0 < err < INT4_ONE_MATMUL_MAX_ERROR


def test_int4_algorithm_failure_is_one_line(tiny_decoder: Path) -> None:
    """onnxruntime's k_quant packing fails on a single block per column (the tiny model's 16-wide weights at block
    16): a QuantizationError naming the algorithm and the fix, not a numpy traceback."""
    with pytest.raises(QuantizationError, match=r"'k_quant' failed.*--int4-algorithm default"):
        quantize_onnx(tiny_decoder, QuantizeConfig(mode="int4", block_size=16, int4_algorithm="k_quant",
                                                   overwrite=True), calibration_texts=TEXTS)


def test_int4_8bit_share_writes_the_most_sensitive_in_8_bits(tiny_decoder: Path) -> None:
    from edgefuse.quantize.modes import _RANKED

    names = weight_matmuls(onnx.load(str(tiny_decoder / "model.onnx")))
    # int4_scaling none: the ranking is then keyed by this graph (with scaling it ranks the scaled copy)
    res = quantize_onnx(tiny_decoder, QuantizeConfig(mode="int4", block_size=16, int4_8bit_share=0.5, overwrite=True,
                                                     int4_scaling="none", output_name="share.onnx"),
                        calibration_texts=TEXTS)
    chosen = res.settings["sensitive_8bit"]
    assert len(chosen) == -(-len(names) // 2)  # ceil(0.5 n)
    ranked = next(r for k, r in _RANKED.items() if k[0] == str((tiny_decoder / "model.onnx").resolve()))
    assert chosen == [n for n, _ in ranked][: len(chosen)]  # the worst by the auto mode's ranking
    assert sorted(n for n, _ in ranked) == sorted(names)
    bits = {n.name.rsplit("_Q", 1)[0]: _attr(n, "bits") for n in onnx.load(str(res.onnx_path)).graph.node
            if n.op_type == "MatMulNBits"}
    assert {bits[n] for n in chosen} == {8} and {b for n, b in bits.items() if n not in chosen} == {4}
    assert res.quantized_nodes == len(names) and res.cosine_mean >= QUANT_TINY_MIN_COSINE


def test_int4_default_writes_what_it_claims(tied_decoder: Path) -> None:
    """``--mode int4`` with nothing else: activation-aware channel scales, then GPTQ onto symmetric blocks of 32
    (no zero points) with accuracy level 4 on every weight MatMul, 4-bit but for the quarter whose 4-bit error
    moves the output most and the tied lm_head, which are 8-bit blocks; named int4-b32."""
    import math

    cfg = QuantizeConfig(mode="int4", overwrite=True)
    assert (cfg.block_size, cfg.int4_symmetric, cfg.int4_accuracy_level, cfg.int4_algorithm, cfg.int4_tied,
            cfg.int4_8bit_share, cfg.int4_scaling, cfg.int4_8bit_rank) == (32, True, 4, "gptq", "nbits8", 0.25,
                                                                           "activation-scale", "output")
    res = quantize_onnx(tied_decoder, cfg, calibration_texts=TEXTS)
    names = weight_matmuls(onnx.load(str(tied_decoder / "model.onnx")))
    sensitive = res.settings["sensitive_8bit"]
    assert res.onnx_path.name == "model_int4-b32.onnx" and len(sensitive) == math.ceil(0.25 * len(names))
    assert res.settings["gptq"]["matmuls"] + len(res.settings["gptq"]["too_few_rows"]) > 0  # GPTQ saw the 4-bit ones
    assert res.settings["scaling"]["groups"] + len(res.settings["scaling"]["unscaled"]) > 0  # the search ran
    model = onnx.load(str(res.onnx_path))
    nodes = {n.name.rsplit("_Q", 1)[0]: n for n in model.graph.node if n.op_type == "MatMulNBits"}
    assert set(nodes) == {*names, "/lm_head/MatMul"} and _lm_head(model).op_type == "MatMulNBits"
    for name, node in nodes.items():
        bits = 8 if name in sensitive or name == "/lm_head/MatMul" else 4
        assert (_attr(node, "bits"), _attr(node, "block_size"), _attr(node, "accuracy_level")) == (bits, 32, 4)
        assert len(node.input) == 3  # symmetric: no zero-point input
