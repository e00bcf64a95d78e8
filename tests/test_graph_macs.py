"""MAC counting on real exported graphs: every matrix product of an optimum export is resolved and counted."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from tiny import tiny_config, tiny_model

from edgefuse.config.export import ExportConfig
from edgefuse.export.api import export_onnx
from edgefuse.profile.macs import count_macs

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def _bert_macs(batch: int, seq: int, *, pooler: bool) -> int:
    """Analytic MACs of tiny BERT: Q/K/V/O projections, scores and context, the two MLP matrices, the pooler."""
    c = tiny_config("bert")
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    per_layer = 4 * batch * seq * h * h + 2 * batch * seq * seq * h + 2 * batch * seq * h * inter
    return layers * per_layer + (batch * h * h if pooler else 0)


@pytest.mark.parametrize(("batch", "seq"), [(1, 8), (3, 5)])
def test_optimum_bert_export_fully_resolved(tmp_path: Path, batch: int, seq: int) -> None:
    res = export_onnx(tiny_model("bert"), ExportConfig(), tmp_path / "out")
    graph = onnx.load(str(res.onnx_path))
    pooler = any(o.name == "pooler_output" for o in graph.graph.output)
    macs = count_macs(graph, {"batch": batch, "seq": seq})  # as bench_limit.py calls it
    # onnx's own shape inference left every MatMul of optimum's BERT unresolved (batch unknown): this is the guard
    assert macs.unresolved_nodes == 0
    assert macs.total == macs.fp32 == _bert_macs(batch, seq, pooler=pooler)


def test_one_op_type_table() -> None:
    """The host's op counts, the MAC counter and the runner's per-operator profile share the runner's table."""
    from edgefuse.profile import graphs, macs
    from edgefuse.profile.runner import ort_runner

    assert graphs.QUANTIZED_MATMULS is ort_runner.QUANTIZED_MATMULS and graphs.FP_MATMULS is ort_runner.FP_MATMULS
    assert set(macs.MATMUL_OPS) <= ort_runner.FP_MATMULS | ort_runner.QUANTIZED_MATMULS
    assert not ort_runner.FP_MATMULS & ort_runner.QUANTIZED_MATMULS
    assert not ort_runner.INT8_MATMULS & ort_runner.INT4_MATMULS
def _weight_macs(batch: int, seq: int) -> int:
    """The products with a weight matrix (Q/K/V/O and the MLP); the rest are the attention scores and context."""
    c = tiny_config("bert")
    h, inter, layers = c.hidden_size, c.intermediate_size, c.num_hidden_layers
    return layers * (4 * batch * seq * h * h + 2 * batch * seq * h * inter)


def test_optimizer_fused_and_int8_graphs_count_the_same_macs(tmp_path: Path) -> None:
    """Attention / QAttention graphs of onnxruntime's optimizer, and QDQ graphs, count what the plain export does."""
    from edgefuse.config.optimize import OptimizeConfig
    from edgefuse.config.quantize import QuantizeConfig
    from edgefuse.optimize.api import optimize_onnx
    from edgefuse.quantize.api import quantize_onnx

    res = export_onnx(tiny_model("bert"), ExportConfig(), tmp_path / "out")
    pooler = any(o.name == "pooler_output" for o in onnx.load(str(res.onnx_path)).graph.output)
    want = _bert_macs(2, 9, pooler=pooler)
    opt = optimize_onnx(tmp_path / "out", OptimizeConfig())
    assert opt.op_counts.get("Attention") == 3
    fused = count_macs(opt.onnx_path, {"batch": 2, "seq": 9})
    assert fused.unresolved_nodes == 0 and fused.total == fused.fp32 == want
    q = quantize_onnx(opt.onnx_path, QuantizeConfig(op_types=["MatMul", "Gather", "Attention",
                                                                "EmbedLayerNormalization"], output_name="qa.onnx"))
    assert q.op_counts.get("QAttention") == 3 and q.op_counts.get("QEmbedLayerNormalization") == 1
    qa = count_macs(q.onnx_path, {"batch": 2, "seq": 9})
    assert qa.unresolved_nodes == 0 and qa.total == want
    # QAttention runs its Q/K/V projections in int8 and the score/context products in fp32
    assert qa.int8 == _weight_macs(2, 9) and qa.fp32 == want - qa.int8
    qdq = quantize_onnx(tmp_path / "out", QuantizeConfig(mode="static", output_name="qdq.onnx"))
    counted = count_macs(qdq.onnx_path, {"batch": 2, "seq": 9})
    assert counted.unresolved_nodes == 0 and counted.total == want
    # static QDQ dequantizes both inputs of every MatMul (the scores and context too); a pooler Gemm stays fp32
    assert counted.int8 == want - (2 * 16 * 16 if pooler else 0) and counted.fp32 == want - counted.int8
    assert not list(Path.cwd().glob("sym_shape_infer_temp*"))
