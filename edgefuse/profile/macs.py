"""Multiply-accumulate counts of an ONNX graph at a concrete input shape.

Counts the matrix products (MatMul, Gemm, MatMulInteger, QLinearMatMul, DynamicQuantizeMatMul, MatMulNBits),
which are >95 % of a transformer's arithmetic, by running ONNX shape inference with the symbolic batch and
sequence dimensions fixed. Used for the latency lower bound (benchmarks/bench_limit.py) and reports.

Graphs that onnxruntime's transformer optimizer fused are counted too: ``Attention`` / ``QAttention`` hold the
Q/K/V projections (int8 in ``QAttention``) and the score and context products (fp32 in both);
``MultiHeadAttention`` and ``GroupQueryAttention`` hold the score and context products. In a QDQ graph a
``MatMul`` whose two inputs both come from ``DequantizeLinear`` runs as an int8 product (onnxruntime fuses the
pattern into ``QLinearMatMul`` / ``MatMulIntegerToFloat``) and is counted as int8.

Example:
    >>> import onnx
    >>> from onnx import helper, TensorProto, numpy_helper
    >>> import numpy as np
    >>> w = numpy_helper.from_array(np.zeros((4, 3), np.float32), "w")
    >>> g = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
    ...     [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 4])],
    ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
    >>> count_macs(helper.make_model(g), {"batch": 1, "seq": 5}).total
    60
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgefuse.profile.runner.ort_runner import INT4_MATMULS, INT8_MATMULS

# The operators whose MACs this module can count (their K comes from an input shape or an attribute); which
# precision each one has comes from the one op-type table in the runner.
MATMUL_OPS = ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMulNBits",
              "FusedMatMul")
# onnxruntime's fused attention kernels: their Q/K/V projections and score/context products are counted apart
ATTENTION_OPS = ("Attention", "QAttention", "MultiHeadAttention", "GroupQueryAttention")


@dataclass(frozen=True)
class MacCount:
    """MACs of one graph at one shape, split by arithmetic kind."""

    total: int
    fp32: int
    int8: int
    int4: int
    unresolved_nodes: int  # matrix products whose shapes inference could not resolve (not counted)


def _dims(value_info: Any) -> list[int] | None:
    shape = value_info.type.tensor_type.shape
    dims = []
    for d in shape.dim:
        if not d.HasField("dim_value"):
            return None
        dims.append(int(d.dim_value))
    return dims


def _infer_shapes(model: Any) -> Any:
    """Shapes of every tensor. onnxruntime's symbolic inference first: onnx's own leaves the batch dimension of
    optimum's BERT exports unknown (it cannot fold the Shape -> Gather -> Expand chains of the embeddings), so every
    MatMul of such a graph would be unresolved. onnx's inference is the fallback for graphs the former rejects."""
    import onnx

    try:
        return _symbolic(model)
    except Exception:  # any failure (import, unsupported op) falls back to onnx's inference
        return onnx.shape_inference.infer_shapes(model)


def _symbolic(model: Any) -> Any:
    """onnxruntime's symbolic shape inference, taught the int8 operators its quantizer writes into optimizer-fused
    graphs (``QAttention``, ``QEmbedLayerNormalization``), and without its habit of saving a temporary model into
    the working directory when inference stays incomplete."""
    from onnx import TensorProto, helper
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    class _Inference(SymbolicShapeInference):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(2**31 - 1, True, False, 0)
            self.dispatcher_["QAttention"] = self._q_attention
            self.dispatcher_["QEmbedLayerNormalization"] = self._q_embed_layer_norm

        def _set(self, name: str, elem_type: int, shape: list[Any]) -> None:
            self.known_vi_[name].CopyFrom(helper.make_tensor_value_info(name, elem_type, shape))

        def _q_attention(self, node: Any) -> None:
            x, w = self._get_shape(node, 0), self._get_shape(node, 1)
            sizes = list(_attr(node, "qkv_hidden_sizes", []) or [w[1] // 3] * 3)
            self._set(node.output[0], TensorProto.FLOAT, [x[0], x[1], sizes[2]])

        def _q_embed_layer_norm(self, node: Any) -> None:
            ids, table = self._get_shape(node, 0), self._get_shape(node, 2)
            self._set(node.output[0], TensorProto.FLOAT, [*ids, table[1]])
            if len(node.output) > 1 and node.output[1]:
                self._set(node.output[1], TensorProto.INT32, [ids[0]])

    inference = _Inference()
    inference._preprocess(model)
    complete = False
    while inference.run_:
        complete = inference._infer_impl()
    inference._update_output_from_vi()
    if not complete:
        raise RuntimeError("incomplete symbolic shape inference")
    return inference.out_mp_


def count_macs(model: Any, dims: dict[str, int]) -> MacCount:
    """MACs of the matrix products of ``model`` (an ``onnx.ModelProto`` or a path) with symbolic ``dims`` fixed.

    Args:
        model: the graph, or the path of a ``.onnx`` file.
        dims: values for the symbolic input dimensions, e.g. ``{"batch_size": 1, "sequence_length": 128}``.
            Dimensions named differently are matched by position: the first symbolic dim of every input is
            taken as ``batch`` and the second as ``sequence`` when those keys are given instead.
    """
    import onnx

    if isinstance(model, (str, Path)):
        model = onnx.load(str(model), load_external_data=False)
    model = onnx.ModelProto.FromString(model.SerializeToString())  # a copy: we rewrite the input shapes
    positional = [dims.get("batch"), dims.get("seq"), dims.get("sequence")]
    for inp in model.graph.input:
        sym_index = 0
        for d in inp.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                value = dims.get(d.dim_param)
                if value is None:
                    value = positional[0] if sym_index == 0 else (positional[1] or positional[2])
                if value is not None:
                    d.ClearField("dim_param")
                    d.dim_value = int(value)
                sym_index += 1
    inferred = _infer_shapes(model)
    shapes: dict[str, list[int] | None] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        shapes[vi.name] = _dims(vi)
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    total = fp32 = int8 = int4 = unresolved = 0
    producers = {o: n.op_type for n in inferred.graph.node for o in n.output}
    for node in inferred.graph.node:
        if node.op_type in ATTENTION_OPS:
            got = _attention_macs(node, shapes)
            if got is None:
                unresolved += 1
                continue
            proj, products = got
            total += proj + products
            fp32 += products + (0 if node.op_type == "QAttention" else proj)
            int8 += proj if node.op_type == "QAttention" else 0
            continue
        if node.op_type not in MATMUL_OPS:
            continue
        out = shapes.get(node.output[0])
        if node.op_type == "MatMulNBits":
            k = next((a.i for a in node.attribute if a.name == "K"), None)
        elif node.op_type == "QLinearMatMul":
            a = shapes.get(node.input[0])
            k = a[-1] if a else None
        else:
            a = shapes.get(node.input[0])
            k = a[-1] if a else None
            if node.op_type == "Gemm" and a is not None:
                trans_a = next((at.i for at in node.attribute if at.name == "transA"), 0)
                k = a[0] if trans_a else a[-1]
        if out is None or k is None:
            unresolved += 1
            continue
        macs = int(k)
        for d in out:
            macs *= int(d)
        total += macs
        qdq = node.op_type == "MatMul" and len(node.input) > 1 and all(
            producers.get(i) == "DequantizeLinear" for i in node.input[:2])
        if node.op_type in INT8_MATMULS or qdq:
            int8 += macs
        elif node.op_type in INT4_MATMULS:
            int4 += macs
        else:
            fp32 += macs
    return MacCount(total=total, fp32=fp32, int8=int8, int4=int4, unresolved_nodes=unresolved)


def _attr(node: Any, name: str, default: Any = None) -> Any:
    import onnx

    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def _attention_macs(node: Any, shapes: dict[str, list[int] | None]) -> tuple[int, int] | None:
    """(projection MACs, score + context MACs) of a fused attention node, or None when shapes are unknown.

    ``Attention``/``QAttention``: input ``[B, S, H_in]``, weights ``[H_in, q + k + v]``; the scores take
    ``S * T * q`` and the context ``S * T * v`` per batch row, ``T`` the key length (past + new, from the
    ``present`` output when there is one). ``MultiHeadAttention``/``GroupQueryAttention``: projected query
    ``[B, S, q]`` and keys of length ``T``.
    """
    x = shapes.get(node.input[0])
    if x is None or len(x) != 3:
        return None
    batch, seq = x[0], x[1]
    if node.op_type in ("Attention", "QAttention"):
        w = shapes.get(node.input[1])
        if w is None or len(w) != 2:
            return None
        sizes = list(_attr(node, "qkv_hidden_sizes", []) or [w[1] // 3] * 3)
        present = shapes.get(node.output[1]) if len(node.output) > 1 and node.output[1] else None
        keys = present[3] if present is not None and len(present) == 5 else seq
        return batch * seq * w[0] * w[1], batch * seq * keys * (sizes[0] + sizes[2])
    present = shapes.get(node.output[1]) if len(node.output) > 1 and node.output[1] else None
    key = shapes.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    if present is not None and len(present) == 4:
        keys = present[2]
    elif key is not None and len(key) == 3:
        keys = key[1]
    else:
        keys = seq
    return 0, 2 * batch * seq * keys * x[2]
