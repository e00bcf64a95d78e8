"""Intermediate tensors of a graph on calibration feeds: what the ranking, the activation-aware search and GPTQ
read (one implementation of the probe, of the row selection and of the external-data rule for rewritten graphs).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# graphs above this are written with external data (protobuf's 2 GB limit, with room for the quantizer's copies)
EXTERNAL_DATA_BYTES = 1_800_000_000


def needs_external_data(src: Path) -> bool:
    """Whether a graph written from ``src`` must keep its weights in an external file (protobuf's 2 GiB limit)."""
    return src.stat().st_size > EXTERNAL_DATA_BYTES


def probe_tensors(model: Any, src: Path, feeds: Sequence[dict[str, np.ndarray]],
                  names: Sequence[str]) -> list[dict[str, np.ndarray]]:
    """The values of the intermediate tensors ``names`` of ``model`` (loaded from ``src``) on each feed: one fp32
    run per feed of the model with them as extra outputs (saved beside ``src`` under a new name and removed; the
    outputs are taken off ``model`` again, so it is unchanged: no copy of a large graph's weights).

    Example:
        >>> import numpy as np, onnx, tempfile
        >>> from pathlib import Path
        >>> from onnx import helper, TensorProto
        >>> g = helper.make_graph([helper.make_node("Relu", ["x"], ["h"]), helper.make_node("Neg", ["h"], ["y"])],
        ...     "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
        >>> m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        >>> src = Path(tempfile.mkdtemp()) / "m.onnx"
        >>> probe_tensors(m, src, [{"x": np.array([-1.0, 2.0], np.float32)}], ["h"])[0]["h"].tolist()
        [0.0, 2.0]
    """
    import onnx

    from edgefuse.io_utils import temp_file
    from edgefuse.ort import make_session

    outputs = model.graph.output
    before = len(outputs)
    known = {o.name for o in outputs}
    for name in names:
        if name not in known:
            outputs.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    # a new name per call (O_EXCL), beside src so that external-data paths resolve: two runs probing the same
    # graph at once must not write, load or delete each other's file
    tmp = temp_file(src.parent, f"{src.stem}.probe.onnx")
    try:
        onnx.save(model, str(tmp))
        session = make_session(tmp, optimize=False)  # unoptimised: the probed tensors must survive fusion passes
        wanted = list(names)
        return [dict(zip(wanted, session.run(wanted, feed), strict=True)) for feed in feeds]
    finally:
        tmp.unlink(missing_ok=True)
        while len(outputs) > before:
            outputs.pop()


def feeds_for_rows(feeds: Sequence[dict[str, np.ndarray]], rows: int) -> int:
    """How many of ``feeds`` (from the first) hold ``rows`` unpadded tokens; all of them when they hold fewer.

    Example:
        >>> import numpy as np
        >>> feeds = [{"attention_mask": np.ones((1, 5))}, {"attention_mask": np.ones((1, 5))}]
        >>> feeds_for_rows(feeds, 4), feeds_for_rows(feeds, 6), feeds_for_rows(feeds, 99)
        (1, 2, 2)
    """
    used, seen = 0, 0
    for feed in feeds:
        used += 1
        mask = feed.get("attention_mask")
        seen += int(mask.sum()) if mask is not None else rows
        if seen >= rows:
            break
    return used


def activation_rows(values: Sequence[dict[str, np.ndarray]], feeds: Sequence[dict[str, np.ndarray]], name: str,
                    rows: int) -> np.ndarray:
    """The rows (tokens) of the probed tensor ``name`` over ``values`` (:func:`probe_tensors` of ``feeds``), padded
    tokens (``attention_mask`` 0) left out, at most ``rows`` of them, as ``[tokens, channels]``.

    Example:
        >>> import numpy as np
        >>> v = [{"h": np.arange(6.0).reshape(1, 3, 2)}]
        >>> activation_rows(v, [{"attention_mask": np.array([[0, 1, 1]])}], "h", 10).tolist()
        [[2.0, 3.0], [4.0, 5.0]]
    """
    out = []
    for v, feed in zip(values, feeds, strict=True):
        a = v[name]
        mask = feed.get("attention_mask")
        flat = a.reshape(-1, a.shape[-1])
        if mask is not None and mask.size * a.shape[-1] == a.size:
            flat = flat[mask.reshape(-1) > 0]
        out.append(flat)
    return np.concatenate(out)[:rows]
