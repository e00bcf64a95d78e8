"""The output-error ranking of the int4 8-bit share (``int4_8bit_rank: output``,
:mod:`edgefuse.quantize.sensitivity`): it ranks by the effect on the output where the own-output ranking does not,
fails closed on a graph it cannot measure, and the quantize stage writes what it ranked worst as 8-bit blocks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_quantize_int4 import TEXTS, _attr, tiny_decoder  # noqa: F401  (the fixture is used by name)
from tolerances import OUTPUT_KL_RTOL, QUANT_TINY_MIN_COSINE

from edgefuse.config.quantize import QuantizeConfig
from edgefuse.errors import QuantizationError
from edgefuse.quantize.api import quantize_onnx
from edgefuse.quantize.evaluate import weight_matmuls
from edgefuse.quantize.modes import rank_matmuls
from edgefuse.quantize.sensitivity import rank_by_output

pytestmark = pytest.mark.usefixtures("one_thread")


def _two_branch_graph(tmp_path: Path, *, damp: float = 1e-3, log: bool = False) -> tuple[Path, list[dict]]:
    """``logits = damp * (x @ Wa) + x @ Wb``: ``Wa`` has one outlier per 32-block (a large 4-bit error of its
    own output) but reaches the output damped; ``Wb`` is smooth (a small own error) and reaches it in full."""
    rng = np.random.default_rng(0)
    wa = rng.normal(size=(64, 16)).astype(np.float32)
    wa[::32] *= 40.0  # the block's extreme sets a coarse step for the other 31 weights
    wb = rng.normal(size=(64, 16)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "wa"], ["a"], name="branch_a"),
             helper.make_node("Mul", ["a", "damp"], ["ad"]),
             helper.make_node("MatMul", ["x", "wb"], ["b"], name="branch_b"),
             helper.make_node("Add", ["ad", "b"], ["s"])]
    nodes.append(helper.make_node("Log", ["s"], ["logits"]) if log else helper.make_node("Identity", ["s"], ["logits"]))
    inits = [numpy_helper.from_array(wa, "wa"), numpy_helper.from_array(wb, "wb"),
             numpy_helper.from_array(np.array(damp, np.float32), "damp")]
    g = helper.make_graph(nodes, "two", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 64])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 6, 16])], inits)
    src = tmp_path / "two.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(src))
    feeds = [{"x": rng.normal(size=(1, 6, 64)).astype(np.float32)} for _ in range(3)]
    return src, feeds


def test_output_ranking_sees_what_the_own_error_ranking_misses(tmp_path: Path) -> None:
    src, feeds = _two_branch_graph(tmp_path)
    own = rank_matmuls(src, feeds[0], ["branch_a", "branch_b"], mode="int4", per_channel=True, reduce_range=False,
                       block_size=32)
    assert [n for n, _ in own] == ["branch_a", "branch_b"]  # the outlier branch has the larger own error ...
    out = rank_by_output(src, feeds, ["branch_a", "branch_b"], block_size=32)
    assert [n for n, _ in out] == ["branch_b", "branch_a"]  # ... but the undamped one moves the output more
    assert all(np.isfinite(v) and v > 0 for _, v in out)


def test_output_ranking_score_is_the_mean_kl_of_the_next_token_distribution(tmp_path: Path) -> None:
    """The score of one MatMul equals KL(fp32 || with that weight on the 4-bit grid), averaged over every position
    of every feed, computed here from the weights in float64 numpy: the cached-entropy form the ranking uses is
    the same quantity, not an approximation of it."""
    import torch

    from edgefuse.quantize.blocks import block_fake_quant

    src, feeds = _two_branch_graph(tmp_path)
    weights = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in onnx.load(str(src)).graph.initializer}

    def log_probs(wb: np.ndarray, x: np.ndarray) -> np.ndarray:
        z = (weights["damp"] * (x @ weights["wa"]) + x @ wb).reshape(-1, 16)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    wb_q = block_fake_quant(torch.from_numpy(weights["wb"].astype(np.float32)), block_size=32, bits=4).double().numpy()
    kls = []
    for feed in feeds:
        x = feed["x"].astype(np.float64)
        ref, got = log_probs(weights["wb"], x), log_probs(wb_q, x)
        kls.append(float((np.exp(ref) * (ref - got)).sum(-1).mean()))
    score = dict(rank_by_output(src, feeds, ["branch_a", "branch_b"], block_size=32))["branch_b"]
    assert score > 0
    assert score == pytest.approx(float(np.mean(kls)), rel=OUTPUT_KL_RTOL)


def test_output_ranking_reports_progress_in_a_log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ranking runs the graph once per MatMul (minutes on a decoder): a log that is not a terminal gets
    heartbeat lines with the count and the time left (here every update, instead of every 30 s)."""
    import io

    import edgefuse.progress as progress

    log = io.StringIO()
    monkeypatch.setattr(progress, "progress_bar", lambda total, *, desc, unit="step", initial=0: progress.Heartbeat(
        total, desc=desc, unit=unit, initial=initial, stream=log, every_s=0.0))
    src, feeds = _two_branch_graph(tmp_path)
    rank_by_output(src, feeds, ["branch_a", "branch_b"], block_size=32)
    lines = log.getvalue().splitlines()
    assert [line.split(", elapsed")[0] for line in lines] == [
        "int4 8-bit share: ranking by output error: MatMul 1/2 (50%)",
        "int4 8-bit share: ranking by output error: MatMul 2/2 (100%)"]
    assert "ETA" in lines[0]


def test_output_ranking_refuses_a_graph_it_cannot_measure(tmp_path: Path) -> None:
    src, feeds = _two_branch_graph(tmp_path, log=True)  # log of negative values: nan before any quantization
    with pytest.raises(QuantizationError, match="not finite"):
        rank_by_output(src, feeds, ["branch_a", "branch_b"], block_size=32)
    with pytest.raises(QuantizationError, match="--calibration-data"):
        rank_by_output(src, [], ["branch_a"], block_size=32)


def test_int4_8bit_rank_output_writes_the_worst_by_output_in_8_bits(tiny_decoder: Path) -> None:  # noqa: F811
    from edgefuse.quantize.modes import _RANKED

    names = weight_matmuls(onnx.load(str(tiny_decoder / "model.onnx")))
    res = quantize_onnx(tiny_decoder, QuantizeConfig(mode="int4", block_size=16, int4_8bit_share=0.25, overwrite=True,
                                                     int4_scaling="none", int4_8bit_rank="output",
                                                     output_name="rank_output.onnx"),
                        calibration_texts=TEXTS)
    chosen = res.settings["sensitive_8bit"]
    ranked = next(r for k, r in _RANKED.items()
                  if k[0] == str((tiny_decoder / "model.onnx").resolve()) and k[3] == "output")
    assert sorted(n for n, _ in ranked) == sorted(names) and len(chosen) == -(-len(names) // 4)
    assert chosen == [n for n, _ in ranked][: len(chosen)]
    bits = {n.name.rsplit("_Q", 1)[0]: _attr(n, "bits") for n in onnx.load(str(res.onnx_path)).graph.node
            if n.op_type == "MatMulNBits"}
    assert {bits[n] for n in chosen} == {8} and {b for n, b in bits.items() if n not in chosen} == {4}
    assert res.cosine_mean >= QUANT_TINY_MIN_COSINE


def test_auto_mode_keeps_fallbacks_in_the_output_ranking_order(tiny_decoder: Path) -> None:  # noqa: F811
    # with int4_8bit_rank output, the auto mode's fp32 fallbacks continue the 8-bit share's ranking
    from edgefuse.quantize.modes import _RANKED

    kw = {"mode": "int4", "block_size": 16, "int4_8bit_share": 0.25, "int4_scaling": "none",
          "int4_8bit_rank": "output", "overwrite": True, "min_cosine": None}
    base = quantize_onnx(tiny_decoder, QuantizeConfig(**kw, output_name="auto_base.onnx"), calibration_texts=TEXTS)
    target = base.cosine_mean + 0.5 * (1.0 - base.cosine_mean)
    res = quantize_onnx(tiny_decoder, QuantizeConfig(**kw, auto_target_cosine=target, auto_max_kept=12,
                                                     output_name="auto_out.onnx"), calibration_texts=TEXTS)
    ranked = next(r for k, r in _RANKED.items()
                  if k[0] == str((tiny_decoder / "model.onnx").resolve()) and k[3] == "output")
    eight = res.settings["sensitive_8bit"]
    kept = list(res.kept_fp32)
    assert kept and res.cosine_mean >= target > base.cosine_mean
    assert kept == [n for n, _ in ranked if n not in eight][: len(kept)]
    assert [s["estimated_error"] for s in res.auto_steps[1:]] == [dict(ranked)[n] for n in kept]
