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
