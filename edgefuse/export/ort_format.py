"""onnxruntime Mobile: convert an ONNX graph to the ``.ort`` format and check the result against the graph.

The conversion is onnxruntime's own tool (``python -m onnxruntime.tools.convert_onnx_models_to_ort``), run in a
fresh process with an argument list. It writes ``<name>.ort`` and ``<name>.required_operators.config`` (the
operator list for a reduced-size onnxruntime build: ``build.sh --minimal_build --include_ops_by_config``).
The ``.ort`` model is then verified: both files are loaded in real onnxruntime sessions, run on the same
random token ids at two shapes (padding included), and every output must agree (cosine and max difference).

Example:
    >>> ort_paths(Path("out/minilm-onnx/model.onnx"))
    (PosixPath('out/minilm-onnx/model.ort'), PosixPath('out/minilm-onnx/model.required_operators.config'))
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from edgefuse.errors import ExportValidationError, MissingDependencyError, TargetNotFoundError

logger = logging.getLogger(__name__)

OptimizationStyle = Literal["Fixed", "Runtime"]
# fp32 kernels of the same graph after the .ort serialisation: identical maths, so only rounding differs
ORT_ATOL = 1e-4
ORT_MIN_COSINE = 0.9999


@dataclass(frozen=True)
class OrtConversion:
    """What :func:`convert_to_ort` wrote and how the ``.ort`` model compared with the ONNX graph."""

    onnx_path: str
    ort_path: str
    operators_config: str
    optimization_style: str
    target_platform: str | None
    size_bytes: int
    max_abs_diff: float
    min_cosine: float
    shapes: tuple[tuple[int, int], ...]
    outputs: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def ort_paths(onnx_path: Path) -> tuple[Path, Path]:
    """The ``.ort`` model and the reduced-operator config written for ``onnx_path``."""
    onnx_path = Path(onnx_path)
    return (onnx_path.with_suffix(".ort"), onnx_path.with_name(onnx_path.stem + ".required_operators.config"))


def convert_to_ort(
    onnx_path: Path | str,
    *,
    optimization_style: OptimizationStyle = "Fixed",
    target_platform: Literal["arm", "amd64"] | None = None,
    shapes: tuple[tuple[int, int], ...] = ((1, 13), (3, 21)),
    seed: int = 0,
) -> OrtConversion:
    """Convert ``onnx_path`` to ``.ort`` beside it and verify the result against the ONNX graph.

    Args:
        onnx_path: an ONNX graph (with its external data, if any, beside it).
        optimization_style: ``Fixed`` bakes the optimisations for the CPU provider in (onnxruntime's advice
            for CPU/XNNPACK); ``Runtime`` leaves some for load time (its advice for NNAPI and CoreML).
        target_platform: ``arm`` or ``amd64`` for platform-specific Fixed optimisations (default: none).
        shapes: (batch, sequence) shapes compared; the second row of every batch is padded.
        seed: seed of the random token ids.

    Raises:
        TargetNotFoundError: ``onnx_path`` does not exist.
        MissingDependencyError: onnxruntime's conversion tool is not available.
        ExportValidationError: the conversion failed, or the ``.ort`` model's outputs differ from the graph's.
    """
    import numpy as np

    from edgefuse.metrics import rowwise_cosine
    from edgefuse.ort import make_session

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise TargetNotFoundError(f"ONNX graph {str(onnx_path)!r} does not exist")
    try:
        import onnxruntime.tools.convert_onnx_models_to_ort  # noqa: F401
    except ImportError as exc:
        raise MissingDependencyError(f"onnxruntime's .ort converter is not importable ({exc}); install "
                                     "onnxruntime (pip install onnxruntime)") from None
    ort_path, config_path = ort_paths(onnx_path)
    with tempfile.TemporaryDirectory(prefix="edgefuse-ort-", dir=onnx_path.parent) as tmp:
        cmd = [sys.executable, "-m", "onnxruntime.tools.convert_onnx_models_to_ort", str(onnx_path),
               "--output_dir", tmp, "--optimization_style", optimization_style]
        if target_platform:
            cmd += ["--target_platform", target_platform]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        made = Path(tmp) / ort_path.name
        made_cfg = Path(tmp) / config_path.name
        if proc.returncode != 0 or not made.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise ExportValidationError(f"converting {str(onnx_path)!r} to .ort failed: {tail[0]}")
        graph = make_session(onnx_path)
        mobile = make_session(made)
        rng = np.random.default_rng(seed)
        vocab = _vocab_size(onnx_path.parent)
        worst_cos, worst_diff, names = 1.0, 0.0, [o.name for o in graph.get_outputs()]
        for batch, seq in shapes:
            feed = _feed(graph, rng, batch, seq, vocab)
            for name, a, b in zip(names, graph.run(None, feed), mobile.run(None, feed), strict=True):
                a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
                if a.shape != b.shape:
                    raise ExportValidationError(f".ort output {name!r} has shape {b.shape}, the graph {a.shape}")
                cos = float(np.min(rowwise_cosine(a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1))))
                diff = float(np.max(np.abs(a - b))) if a.size else float("nan")
                if cos != cos or cos < worst_cos:  # a nan is kept (and fails below), never skipped
                    worst_cos = cos
                if diff != diff or diff > worst_diff:
                    worst_diff = diff
        if not (worst_cos >= ORT_MIN_COSINE and worst_diff <= ORT_ATOL):
            raise ExportValidationError(
                f"the .ort model of {str(onnx_path)!r} disagrees with the ONNX graph: min cosine {worst_cos:.6f} "
                f"(needs >= {ORT_MIN_COSINE}), max |diff| {worst_diff:.3g} (needs <= {ORT_ATOL}); try "
                "--ort-optimization Runtime")
        shutil.move(str(made), ort_path)
        if made_cfg.is_file():
            shutil.move(str(made_cfg), config_path)
    logger.info("%s: .ort verified (min cosine %.6f, max diff %.3g)", ort_path, worst_cos, worst_diff)
    return OrtConversion(onnx_path=str(onnx_path), ort_path=str(ort_path), operators_config=str(config_path),
                         optimization_style=optimization_style, target_platform=target_platform,
                         size_bytes=ort_path.stat().st_size, max_abs_diff=worst_diff, min_cosine=worst_cos,
                         shapes=tuple(shapes), outputs=tuple(names))


def _vocab_size(folder: Path) -> int:
    """``vocab_size`` of the folder's ``config.json`` (token ids must be valid), else 100."""
    import json

    try:
        return int(json.loads((folder / "config.json").read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return 100


def _feed(session: Any, rng: Any, batch: int, seq: int, vocab: int) -> dict[str, Any]:
    """Random token ids for every (batch, sequence) input; the last row of a batch > 1 is half padding."""
    import numpy as np

    feed: dict[str, Any] = {}
    mask = np.ones((batch, seq), dtype=np.int64)
    if batch > 1:
        mask[-1, seq // 2:] = 0
    for inp in session.get_inputs():
        if inp.name == "attention_mask":
            feed[inp.name] = mask
        elif inp.name == "token_type_ids":
            feed[inp.name] = np.zeros((batch, seq), dtype=np.int64)
        elif inp.name == "position_ids":
            feed[inp.name] = np.broadcast_to(np.arange(seq, dtype=np.int64), (batch, seq)).copy()
        elif inp.name == "input_ids":
            feed[inp.name] = rng.integers(min(3, vocab - 1), vocab, (batch, seq), dtype=np.int64)
        else:
            raise ExportValidationError(f"cannot verify the .ort model: input {inp.name!r} is not a token input "
                                        "(KV-cache graphs: convert with onnxruntime's tool and check on the device)")
    return feed
