"""The int8 default: ``int8`` resolves to dynamic int8 for encoders and to 8-bit weight-only blocks (MatMulNBits
bits 8) for causal LMs; the blocks survive a massive activation that flattens dynamic int8; the CLI names the
output after the resolved mode."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_quantize_int4 import TEXTS, _attr, _lm_head, tied_decoder  # noqa: F401 (a fixture)
from tolerances import INT8_BLOCKS_MASSIVE_MAX_ERROR, QUANT_TINY_MIN_COSINE

from edgefuse.config.quantize import QuantizeConfig
from edgefuse.quantize.api import quantize_onnx, source_task
from edgefuse.quantize.evaluate import weight_matmuls

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_the_default_int8_writes_8bit_blocks_for_a_decoder(tied_decoder: Path) -> None:  # noqa: F811
    assert source_task(tied_decoder) == "causal-lm"
    res = quantize_onnx(tied_decoder, QuantizeConfig(block_size=16, overwrite=True), calibration_texts=TEXTS)
    assert res.mode == "int8-blocks" and res.onnx_path.name == "model_int8-blocks-b16.onnx"
    model = onnx.load(str(res.onnx_path))
    fp32 = onnx.load(str(tied_decoder / "model.onnx"))
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    # every weight MatMul and the tied lm_head (its own transposed copy) at 8 bits, accuracy level 4
    assert len(nbits) == len(weight_matmuls(fp32)) + 1 == res.quantized_nodes
    assert {_attr(n, "bits") for n in nbits} == {8} and {_attr(n, "accuracy_level") for n in nbits} == {4}
    assert _lm_head(model).op_type == "MatMulNBits" and res.settings["tied"]["nodes"] == ["/lm_head/MatMul"]
    assert not any(n.op_type == "MatMulInteger" for n in model.graph.node)
    assert QUANT_TINY_MIN_COSINE <= res.cosine_mean < 1.0


def test_an_explicit_mode_is_kept_for_a_decoder(tied_decoder: Path) -> None:  # noqa: F811
    res = quantize_onnx(tied_decoder, QuantizeConfig(mode="dynamic", overwrite=True, output_name="dyn.onnx"),
                        calibration_texts=TEXTS)
    assert res.mode == "dynamic" and res.op_counts.get("MatMulInteger", 0) > 0


def _one_matmul(path: Path, w: np.ndarray) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, w.shape[0]])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, w.shape[1]])
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="/mlp/down_proj/MatMul")], "g",
                              [x], [y], [numpy_helper.from_array(w, "w")])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.save(model, str(path))
    return path


def test_8bit_blocks_survive_a_massive_activation_that_flattens_dynamic_int8(tmp_path: Path) -> None:
    """One token 3,000x larger than the rest (SmolLM2's first token in its down projections): dynamic int8's
    per-tensor activation scale rounds every other token to nothing; 8-bit blocks quantize each token apart."""
    import onnxruntime as ort

    from edgefuse.quantize.backends import quantize_dynamic_int8, quantize_int8_blocks
    from edgefuse.quantize.presets import resolve_preset

    rng = np.random.default_rng(0)
    w = rng.standard_normal((128, 48)).astype(np.float32)
    x = rng.standard_normal((16, 128)).astype(np.float32)
    x[0, 5] = 3000.0  # the massive activation of one token, in one channel
    src = _one_matmul(tmp_path / "f.onnx", w)
    cfg = QuantizeConfig(mode="int8-blocks", block_size=32)
    quantize_int8_blocks(src, tmp_path / "b.onnx", cfg, [])
    quantize_dynamic_int8(src, tmp_path / "d.onnx", QuantizeConfig(mode="dynamic"), resolve_preset("avx512-vnni"), [])

    def error(path: Path) -> float:  # relative error of the product on the ordinary tokens
        y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        ref = x @ w
        return float(np.linalg.norm(y[1:] - ref[1:]) / np.linalg.norm(ref[1:]))

    blocks, dynamic = error(tmp_path / "b.onnx"), error(tmp_path / "d.onnx")
    assert blocks < INT8_BLOCKS_MASSIVE_MAX_ERROR < dynamic


def test_cli_names_the_output_after_the_resolved_mode(tied_decoder: Path,  # noqa: F811
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main

    assert main(["quantize", str(tied_decoder), "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["mode"] == "int8-blocks" and out["out_dir"].endswith("-int8-blocks-b32")
    code = main(["quantize", str(tied_decoder.parent / "missing"), "--dry-run"])
    err = capsys.readouterr().err
    assert code != 0 and "missing" in err and "Traceback" not in err
