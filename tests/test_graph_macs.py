"""MAC counting on real exported graphs: every matrix product of an optimum export is resolved and counted."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from tiny import tiny_config, tiny_model

from edgefuse.config.export import ExportConfig
from edgefuse.export.api import export_onnx
from edgefuse.profile.macs import count_macs


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


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
