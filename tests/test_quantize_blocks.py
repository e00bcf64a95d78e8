"""edgefuse's copy of onnxruntime's symmetric block grid equals the weights onnxruntime's quantizer writes, bit for
bit: the ranking of the 8-bit share and quantization-aware recovery both rely on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from edgefuse.config.quantize import QuantizeConfig
from edgefuse.quantize.backends import quantize_int4
from edgefuse.quantize.blocks import block_fake_quant

pytestmark = pytest.mark.usefixtures("one_thread")


def _matmul_graph(w: np.ndarray, path: Path) -> Path:
    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])],
        [numpy_helper.from_array(w, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _onnxruntime_weight(w: np.ndarray, bits: int, block: int, tmp_path: Path) -> np.ndarray:
    """The dequantized weight of the MatMulNBits graph that edgefuse's int4 backend writes: the output for the
    identity matrix (accuracy level 0: float activations)."""
    src = _matmul_graph(w, tmp_path / "fp32.onnx")
    cfg = QuantizeConfig(mode="int4", min_cosine=None, block_size=block, int4_tied="fp32", int4_accuracy_level=0,
                         int4_8bit_share=1.0 if bits == 8 else 0.0, int4_algorithm="default")
    dst = tmp_path / f"q{bits}.onnx"
    quantize_int4(src, dst, cfg, [], sensitive_8bit=["mm"] if bits == 8 else ())
    node = next(n for n in onnx.load(str(dst)).graph.node if n.op_type == "MatMulNBits")
    assert next(a.i for a in node.attribute if a.name == "bits") == bits
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": np.eye(w.shape[0], dtype=np.float32)})[0]


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [16, 32])
def test_the_grid_equals_onnxruntime(bits: int, block: int, tmp_path: Path) -> None:
    rng = np.random.default_rng(bits + block)
    w = rng.standard_normal((80, 6)).astype(np.float32)  # 80: a padded last block for both sizes
    w[3, 2], w[41, 5] = 5.0, -6.0  # a positive and a negative extreme
    w[16:32, 1] = 0.0  # an all-zero block: scale 0
    # exact ties between two steps (scale 1 in the block of the -8 / -128): onnxruntime rounds them half up
    lo = -(2 ** (bits - 1))
    w[64:80, 4] = 0.0
    w[64, 4], w[65, 4], w[66, 4] = lo, 2.5, -2.5
    want = _onnxruntime_weight(w, bits, block, tmp_path)
    got = block_fake_quant(torch.from_numpy(w), block_size=block, bits=bits).numpy()
    np.testing.assert_array_equal(got, want)
    assert np.abs(got - w).max() > 0  # it did quantize


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        block_fake_quant(torch.zeros(4, 4), block_size=4, bits=3)
    with pytest.raises(ValueError, match="2-D weight"):
        block_fake_quant(torch.zeros(4), block_size=4, bits=4)


@pytest.mark.parametrize("block", [16, 32])
def test_gptq_weights_are_packed_unchanged_by_onnxruntime(block: int, tmp_path: Path) -> None:
    """edgefuse's GPTQ writes weights on the grid onnxruntime recomputes, so its default quantizer packs exactly
    them (a padded last block included), and their output error on the calibration activations is below round to
    nearest's."""
    from edgefuse.quantize.gptq import gptq_grid

    g = torch.Generator().manual_seed(block)
    # correlated channels (as real activations are): GPTQ moves one channel's rounding error onto the others
    x = torch.randn(512, 24, generator=g) @ torch.randn(24, 80, generator=g) + 0.1 * torch.randn(512, 80, generator=g)
    w = torch.randn(80, 6, generator=g)
    q = gptq_grid(w, x.double().T @ x.double(), block_size=block)
    got = _onnxruntime_weight(q.numpy(), 4, block, tmp_path)
    np.testing.assert_array_equal(got, q.numpy())
    rtn = block_fake_quant(w, block_size=block, bits=4)
    assert float((x @ (w - q)).norm()) < 0.9 * float((x @ (w - rtn)).norm())


def test_gptq_ignores_dead_channels_and_refuses_bad_shapes() -> None:
    from edgefuse.quantize.gptq import gptq_grid

    x = torch.randn(64, 32)
    x[:, 5] = 0.0  # a channel never active: H has a zero row
    q = gptq_grid(torch.randn(32, 4), x.T @ x, block_size=16)
    assert torch.isfinite(q).all() and torch.equal(q[5], torch.zeros(4))
    with pytest.raises(ValueError, match="gptq_grid needs"):
        gptq_grid(torch.randn(32, 4), torch.eye(16), block_size=16)


def test_gptq_needs_symmetric_blocks() -> None:
    with pytest.raises(ValueError, match="int4_symmetric: false pick another int4_algorithm"):
        QuantizeConfig(mode="int4", int4_algorithm="gptq", int4_symmetric=False)
