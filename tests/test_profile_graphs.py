"""Tiny ONNX graphs for the profile/report/arm/ssh tests (built in-process with onnx.helper), and the tests of
the host-side graph handling (finding graphs, reading inputs, making the feeds)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edgefuse.errors import ConfigError, DataError, TargetNotFoundError
from edgefuse.profile.graphs import inspect_graph, make_feeds, resolve_graphs, unique_labels

VOCAB, D_MODEL, D_FF = 40, 32, 64


def make_mlp_graph(path: Path, *, seed: int = 0, fixed_shape: tuple[int, int] | None = None,
                   external_data: bool = False) -> Path:
    """An embedding + 2-layer ReLU MLP over token ids (batch, seq): Gather -> MatMul -> Relu -> MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, D_MODEL)).astype(np.float32), "emb"),
        numpy_helper.from_array((rng.standard_normal((D_MODEL, D_FF)) * 0.2).astype(np.float32), "w1"),
        numpy_helper.from_array((rng.standard_normal((D_FF, D_MODEL)) * 0.2).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
        helper.make_node("MatMul", ["h", "w1"], ["u"], name="up"),
        helper.make_node("Relu", ["u"], ["r"], name="act"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="down"),
    ]
    dims = list(fixed_shape) if fixed_shape else ["batch", "seq"]
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [*dims, D_MODEL])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    if external_data:
        onnx.save(model, str(path), save_as_external_data=True, location=path.name + ".data", size_threshold=0)
    else:
        onnx.save(model, str(path))
    return path


def make_int8(src: Path, dst: Path) -> Path:
    """Dynamic int8 (per-channel QInt8 weights): MatMul -> MatMulInteger / DynamicQuantizeMatMul."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=True, op_types_to_quantize=["MatMul"])
    return dst


@pytest.fixture(scope="session")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(fp32 graph, its int8 version) in a session temp folder."""
    d = tmp_path_factory.mktemp("graphs")
    fp32 = make_mlp_graph(d / "mlp.onnx")
    return fp32, make_int8(fp32, d / "mlp_int8.onnx")


def test_inspect_reads_inputs_vocab_and_ops(tmp_path: Path) -> None:
    fp32 = make_mlp_graph(tmp_path / "m.onnx")
    info = inspect_graph(fp32, "m")
    assert [(s.name, s.dims, s.int_high) for s in info.inputs] == [("input_ids", ("batch", "sequence"), VOCAB)]
    assert info.op_counts == {"Gather": 1, "MatMul": 2, "Relu": 1}
    assert (info.matmul_fp32_nodes, info.matmul_quantized_nodes) == (2, 0)
    q = inspect_graph(make_int8(fp32, tmp_path / "q.onnx"), "q")
    assert q.matmul_quantized_nodes == 2 and q.matmul_fp32_nodes == 0
    assert q.file_size_bytes < info.file_size_bytes  # int8 weights: the file shrinks


def test_external_data_files_are_listed_and_missing_ones_fail(tmp_path: Path) -> None:
    g = make_mlp_graph(tmp_path / "ext.onnx", external_data=True)
    info = inspect_graph(g, "ext")
    assert [f.name for f in info.files] == ["ext.onnx", "ext.onnx.data"]
    assert info.file_size_bytes == sum(f.stat().st_size for f in info.files)
    (tmp_path / "ext.onnx.data").unlink()
    with pytest.raises(DataError, match="external data files that are missing"):
        inspect_graph(g, "ext")


def test_resolve_folders_and_errors(tmp_path: Path) -> None:
    make_mlp_graph(tmp_path / "b.onnx")
    make_mlp_graph(tmp_path / "a.onnx")
    assert [p.name for p in resolve_graphs([tmp_path])] == ["a.onnx", "b.onnx"]
    with pytest.raises(TargetNotFoundError, match="does not exist"):
        resolve_graphs([tmp_path / "missing.onnx"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TargetNotFoundError, match=r"holds no \.onnx"):
        resolve_graphs([tmp_path / "empty"])
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(TargetNotFoundError, match="not a valid ONNX graph"):  # one rule for every command (exit 3)
        inspect_graph(bad, "bad")


def test_unique_labels_disambiguate_same_stems() -> None:
    assert unique_labels([Path("x/model.onnx"), Path("y/model.onnx"), Path("z/q.onnx")]) == ["x/model", "y/model", "q"]


def test_feeds_are_shared_across_graphs_and_in_range(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    infos = [inspect_graph(p, p.stem) for p in pair]
    shapes = make_feeds(infos, [(2, 5), (1, 9)], tmp_path / "in.npz", seed=3)
    assert shapes == [(2, 5), (1, 9)]
    with np.load(tmp_path / "in.npz") as npz:
        a, b = npz["0|2x5|input_ids"], npz["1|2x5|input_ids"]
        assert a.shape == (2, 5) and a.dtype == np.int64
        np.testing.assert_array_equal(a, b)  # same tokens reach every graph
        assert a.min() >= 0 and a.max() < VOCAB
        assert npz["0|1x9|input_ids"].shape == (1, 9)


def test_fixed_shape_that_disagrees_is_a_config_error(tmp_path: Path) -> None:
    g = make_mlp_graph(tmp_path / "fixed.onnx", fixed_shape=(1, 8))
    info = inspect_graph(g, "fixed")
    with pytest.raises(ConfigError, match="fixed shape"):
        make_feeds([info], [(1, 16)], tmp_path / "in.npz")
    assert make_feeds([info], [(1, 8)], tmp_path / "in.npz") == [(1, 8)]


def test_real_inputs_npz(tmp_path: Path, pair: tuple[Path, Path]) -> None:
    infos = [inspect_graph(p, p.stem) for p in pair]
    ids = np.arange(12, dtype=np.int64).reshape(3, 4) % VOCAB
    np.savez(tmp_path / "real.npz", input_ids=ids)
    assert make_feeds(infos, [(1, 128)], tmp_path / "in.npz", inputs_npz=tmp_path / "real.npz") == [(3, 4)]
    np.savez(tmp_path / "wrong.npz", tokens=ids)
    with pytest.raises(DataError, match="no array 'input_ids'"):
        make_feeds(infos, [(1, 4)], tmp_path / "in.npz", inputs_npz=tmp_path / "wrong.npz")
    with pytest.raises(TargetNotFoundError, match="does not exist"):
        make_feeds(infos, [(1, 4)], tmp_path / "in.npz", inputs_npz=tmp_path / "nope.npz")
