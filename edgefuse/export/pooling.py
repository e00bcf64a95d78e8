"""The sentence-transformers head in the graph: a ``sentence_embedding`` output (mean pooling over the real
tokens, then L2 normalisation), beside ``last_hidden_state``, as optimum-cli emits for sentence-transformers
models. An app then gets the embedding it wants from the graph alone.

The nodes are appended to the exported graph (standard ONNX operators, opset 13 or later); ``export_onnx``
then validates the new output against the same pooling computed on PyTorch's hidden states.

Example:
    >>> import numpy as np
    >>> h = np.array([[[1.0, 0.0], [3.0, 4.0], [9.0, 9.0]]]); m = np.array([[1, 1, 0]])
    >>> np.round(reference_embedding(h, m), 4).tolist()  # mean of the 2 real tokens (2, 2), normalised
    [[0.7071, 0.7071]]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgefuse.errors import ConfigError

OUTPUT = "sentence_embedding"
HIDDEN = "last_hidden_state"
EPS_COUNT = 1e-9  # sentence-transformers' clamp of the token count
EPS_NORM = 1e-12  # torch.nn.functional.normalize's eps


def reference_embedding(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean pooling over ``mask`` and L2 normalisation, in float64 (what the graph's output must match)."""
    m = mask.astype(np.float64)[..., None]
    mean = (hidden.astype(np.float64) * m).sum(axis=1) / np.maximum(m.sum(axis=1), EPS_COUNT)
    return mean / np.maximum(np.linalg.norm(mean, axis=-1, keepdims=True), EPS_NORM)


def add_sentence_embedding(path: Path) -> None:
    """Append the pooling and normalisation nodes and the ``sentence_embedding`` output to the graph at ``path``.

    Raises:
        ConfigError: the graph has no ``last_hidden_state`` output or ``attention_mask`` input, or an opset < 13.
    """
    import onnx
    from onnx import TensorProto, helper

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    outputs = {o.name for o in graph.output}
    inputs = {i.name for i in graph.input}
    if HIDDEN not in outputs or "attention_mask" not in inputs:
        raise ConfigError("sentence_embedding needs a feature-extraction graph with last_hidden_state and "
                          f"attention_mask (outputs {sorted(outputs)}, inputs {sorted(inputs)})")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        raise ConfigError(f"sentence_embedding needs opset 13 or later, the graph has {opset}; export with --opset 13+")

    def const(name: str, value: Any, dtype: Any) -> Any:
        arr = np.asarray(value, dtype=dtype)
        return helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(arr, name))

    p = "edgefuse_pool/"
    nodes = [
        const(p + "axis_last", [-1], np.int64), const(p + "axis_tokens", [1], np.int64),
        const(p + "eps_count", EPS_COUNT, np.float32), const(p + "eps_norm", EPS_NORM, np.float32),
        helper.make_node("Cast", ["attention_mask"], [p + "mask"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", [p + "mask", p + "axis_last"], [p + "mask3"]),
        helper.make_node("Mul", [HIDDEN, p + "mask3"], [p + "masked"]),
        helper.make_node("ReduceSum", [p + "masked", p + "axis_tokens"], [p + "sum"], keepdims=0),
        helper.make_node("ReduceSum", [p + "mask3", p + "axis_tokens"], [p + "count"], keepdims=0),
        helper.make_node("Max", [p + "count", p + "eps_count"], [p + "count_safe"]),
        helper.make_node("Div", [p + "sum", p + "count_safe"], [p + "mean"]),
        helper.make_node("Mul", [p + "mean", p + "mean"], [p + "squares"]),
        helper.make_node("ReduceSum", [p + "squares", p + "axis_last"], [p + "sq_norm"], keepdims=1),
        helper.make_node("Sqrt", [p + "sq_norm"], [p + "norm"]),
        helper.make_node("Max", [p + "norm", p + "eps_norm"], [p + "norm_safe"]),
        helper.make_node("Div", [p + "mean", p + "norm_safe"], [OUTPUT]),
    ]
    graph.node.extend(nodes)
    hidden = next(o for o in graph.output if o.name == HIDDEN)
    dims = [d for d in hidden.type.tensor_type.shape.dim]
    shape = [dims[0].dim_param or dims[0].dim_value or "batch_size", dims[-1].dim_value or "hidden_size"] \
        if len(dims) == 3 else None
    graph.output.append(helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, shape))
    onnx.save(model, str(path))
