"""The three onnxruntime quantizers behind ``edgefuse quantize``, each file in -> file out.

All data types and options are passed explicitly (ORT's defaults changed across releases).
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefuse.config.quantize import QuantizeConfig
from edgefuse.errors import QuantizationError
from edgefuse.quantize.presets import QuantPreset

logger = logging.getLogger(__name__)

_CALIBRATION = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
# graphs above this are written with external data (protobuf's 2 GB limit, with room for the quantizer's copies)
EXTERNAL_DATA_BYTES = 1_800_000_000


def _external(src: Path) -> bool:
    return src.stat().st_size > EXTERNAL_DATA_BYTES


class _FeedReader:
    """onnxruntime ``CalibrationDataReader`` over precomputed feeds."""

    def __init__(self, feeds: Sequence[dict[str, np.ndarray]]) -> None:
        self._feeds = list(feeds)
        self._it: Iterator[dict[str, np.ndarray]] = iter(self._feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = iter(self._feeds)


def _reduce_range(cfg: QuantizeConfig, preset: QuantPreset) -> bool:
    return preset.reduce_range if cfg.reduce_range is None else cfg.reduce_range


def quantize_dynamic_int8(
    src: Path, dst: Path, cfg: QuantizeConfig, preset: QuantPreset, exclude: list[str]
) -> dict[str, Any]:
    """int8 weights, uint8 activations quantized per tensor at run time (QOperator: MatMulInteger)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    reduce_range = _reduce_range(cfg, preset)
    settings = {"format": "QOperator", "weight_type": preset.weight, "activation_type": preset.activation_dynamic,
                "per_channel": cfg.per_channel, "reduce_range": reduce_range, "op_types": list(cfg.op_types)}
    quantize_dynamic(
        model_input=str(src), model_output=str(dst), op_types_to_quantize=list(cfg.op_types),
        per_channel=cfg.per_channel, reduce_range=reduce_range, weight_type=QuantType[preset.weight],
        nodes_to_exclude=exclude, use_external_data_format=_external(src),
        # graphs of optimum/torch lack some value_info: without a default type ORT stops with
        # "Unable to find data type for weight_name"
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return settings


def quantize_static_qdq(
    src: Path, dst: Path, cfg: QuantizeConfig, preset: QuantPreset, exclude: list[str],
    feeds: Sequence[dict[str, np.ndarray]],
) -> dict[str, Any]:
    """int8 QDQ with activation ranges calibrated on ``feeds`` (MinMax, Percentile or Entropy)."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    if not feeds:
        raise QuantizationError("static quantization needs calibration data; pass --calibration-data")
    act = preset.activation_static
    reduce_range = _reduce_range(cfg, preset)
    settings = {"format": "QDQ", "weight_type": preset.weight, "activation_type": act, "per_channel": cfg.per_channel,
                "reduce_range": reduce_range, "op_types": list(cfg.op_types),
                "calibration_method": cfg.calibration_method, "calibration_batches": len(feeds)}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # onnxruntime's calibrators print progress to stdout
        quantize_static(
            model_input=str(src), model_output=str(dst), calibration_data_reader=_FeedReader(feeds),
            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(cfg.op_types), per_channel=cfg.per_channel,
            reduce_range=reduce_range, activation_type=QuantType[act], weight_type=QuantType[preset.weight],
            nodes_to_exclude=exclude, use_external_data_format=_external(src),
            calibrate_method=getattr(CalibrationMethod, _CALIBRATION[cfg.calibration_method]),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,
                           # s8 activations are symmetric around 0 (ORT's S8S8 QDQ recommendation)
                           "ActivationSymmetric": act == "QInt8"},
        )
    logger.debug("onnxruntime calibration: %s", printed.getvalue().strip())
    return settings


def quantize_int4(src: Path, dst: Path, cfg: QuantizeConfig, exclude: list[str]) -> dict[str, Any]:
    """4-bit weight-only blocks (MatMulNBits); activations stay float (int8 compute with accuracy_level 4)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    settings = {"format": "QOperator", "bits": 4, "block_size": cfg.block_size, "symmetric": cfg.int4_symmetric,
                "accuracy_level": cfg.int4_accuracy_level, "op_types": ["MatMul"]}
    model = onnx.load(str(src))
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=cfg.block_size, is_symmetric=cfg.int4_symmetric,
        accuracy_level=cfg.int4_accuracy_level or None, nodes_to_exclude=list(exclude),
        op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=_external(src))
    return settings
