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
from edgefuse.io_utils import temp_file
from edgefuse.quantize.presets import QuantPreset
from edgefuse.quantize.probe import needs_external_data

logger = logging.getLogger(__name__)

_CALIBRATION = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}


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
        nodes_to_exclude=exclude, use_external_data_format=needs_external_data(src),
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
            nodes_to_exclude=exclude, use_external_data_format=needs_external_data(src),
            calibrate_method=getattr(CalibrationMethod, _CALIBRATION[cfg.calibration_method]),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT,
                           # s8 activations are symmetric around 0 (ORT's S8S8 QDQ recommendation)
                           "ActivationSymmetric": act == "QInt8"},
        )
    logger.debug("onnxruntime calibration: %s", printed.getvalue().strip())
    return settings


def _int4_algo_config(cfg: QuantizeConfig, feeds: Sequence[dict[str, np.ndarray]]) -> Any:
    """onnxruntime's weight-only config object for ``cfg.int4_algorithm`` (None: the built-in default)."""
    from onnxruntime.quantization import matmul_nbits_quantizer as mnb

    algo = cfg.int4_algorithm
    if algo == "default":
        return None
    if algo == "rtn":
        return mnb.RTNWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
    if algo == "k_quant":
        return mnb.KQuantWeightOnlyQuantConfig(op_types_to_quantize=("MatMul",))
    if algo == "hqq":
        return mnb.HQQWeightOnlyQuantConfig(block_size=cfg.block_size, bits=4, op_types_to_quantize=("MatMul",))
    if not feeds:
        raise QuantizationError("int4 algorithm gptq needs calibration data; pass --calibration-data")
    # edgefuse's GPTQ (edgefuse.quantize.gptq) writes weights already on the default quantizer's grid, which then
    # packs them unchanged: onnxruntime's own GPTQ did not finish one SmolLM2 graph in 20 CPU minutes
    return None


def _set_accuracy_level(model: Any, level: int) -> None:
    """Write ``accuracy_level`` on every MatMulNBits node: HQQ's quantizer never sets it and RTN/GPTQ only through
    their own code path, so one pass here makes every algorithm's graph use the same compute type."""
    import onnx

    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        for attr in list(node.attribute):
            if attr.name == "accuracy_level":
                node.attribute.remove(attr)
        if level:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", level))


def untie_transposed_weights(model: Any) -> list[str]:
    """Give every MatMul whose weight is ``Transpose(initializer)`` its own transposed initializer; return their
    names. Exports of models with tied embeddings (SmolLM2, Llama, GPT-2) compute the lm_head as
    ``MatMul(x, Transpose(embed_tokens.weight))``; onnxruntime's weight-only quantizers only take constant
    initializers, so without this the largest MatMul of a small decoder (49152 x 576 in SmolLM2, a fifth of its
    weights and of its decode time) stays fp32 in every int4 graph. The embedding table keeps its own fp32 copy
    for the Gather. A Transpose left without consumers is removed.

    Example:
        >>> import numpy as np, onnx
        >>> from onnx import helper, numpy_helper, TensorProto
        >>> g = helper.make_graph(
        ...     [helper.make_node("Transpose", ["e"], ["et"], perm=[1, 0]), helper.make_node("MatMul", ["x", "et"],
        ...      ["y"], name="lm_head")], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        ...     [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        ...     [numpy_helper.from_array(np.ones((8, 4), np.float32), "e")])
        >>> m = helper.make_model(g)
        >>> untie_transposed_weights(m), [n.op_type for n in m.graph.node], m.graph.initializer[-1].dims
        (['lm_head'], ['MatMul'], [4, 8])
    """
    from collections import Counter

    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    uses = Counter(i for n in model.graph.node for i in n.input)
    uses.update(o.name for o in model.graph.output)
    untied: list[str] = []
    touched: list[Any] = []
    for node in model.graph.node:
        t = producers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), [1, 0])
        w = numpy_helper.to_array(inits[t.input[0]])
        if w.ndim != 2 or perm != [1, 0]:
            continue
        name = f"{t.input[0]}_transposed_for_{node.name or len(untied)}"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w.T), name))
        uses[node.input[1]] -= 1
        node.input[1] = name
        untied.append(node.name)
        touched.append(t)
    for t in {id(t): t for t in touched}.values():
        if uses[t.output[0]] <= 0:
            model.graph.node.remove(t)
    return untied


def _nbits8(model: Any, nodes: Sequence[str], cfg: QuantizeConfig) -> Any:
    """``model`` with the MatMuls ``nodes`` as 8-bit weight-only blocks (MatMulNBits bits 8, the int4 blocks' size,
    symmetry and accuracy level): the ``int4_fallback: nbits8`` form. Measured on SmolLM2-135M's lm_head
    (576 x 49152, 1 thread, this package's benchmarks/results/int4.md): 2.9 ms against 2.3 ms for int4, 8.1 ms for
    fp32 and 2.6 ms for dynamic int8, at a tenth of int4's error; activations are quantized per block of each
    row, not per tensor as dynamic int8 does, so one token's massive activation cannot flatten the others."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    chosen = set(nodes)
    others = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in chosen]
    quantizer = MatMulNBitsQuantizer(
        model, bits=8, block_size=cfg.block_size, is_symmetric=cfg.int4_symmetric,
        accuracy_level=cfg.int4_accuracy_level or None, nodes_to_exclude=others, op_types_to_quantize=("MatMul",),
    )
    quantizer.process()
    return quantizer.model.model


def quantize_int8_blocks(src: Path, dst: Path, cfg: QuantizeConfig, exclude: list[str]) -> dict[str, Any]:
    """Every weight MatMul but ``exclude`` as 8-bit weight-only blocks (:func:`_nbits8`: MatMulNBits bits 8,
    ``cfg.block_size``, ``int4_symmetric`` and ``int4_accuracy_level``), a tied lm_head included (it gets its own
    transposed copy, :func:`untie_transposed_weights`; the embedding Gather keeps the fp32 table).

    Why a mode of its own: dynamic int8 quantizes each activation tensor with one scale, so one token with a
    massive activation (SmolLM2's first token reaches 3,000 where the others stay near 1) rounds every other token
    of that MatMul to zero, on every CPU; and on x86 without VNNI its u8 x s8 kernel saturates. 8-bit blocks
    quantize activations per block of each token (accuracy level 4) and keep 8-bit weights: SmolLM2's next-token
    cosine to fp32 was 0.999 against 0.92-0.93 for dynamic int8 (benchmarks/results/int8_avx2.md).
    """
    import onnx

    model = onnx.load(str(src))
    tied = untie_transposed_weights(model)
    excluded = set(exclude)
    nodes = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in excluded]
    model = _nbits8(model, nodes, cfg)  # MatMuls without a constant weight (attention scores) are left as they are
    _set_accuracy_level(model, cfg.int4_accuracy_level)
    onnx.save_model(model, str(dst), save_as_external_data=needs_external_data(src))
    return {"format": "QOperator", "bits": 8, "block_size": cfg.block_size, "symmetric": cfg.int4_symmetric,
            "accuracy_level": cfg.int4_accuracy_level, "op_types": ["MatMul"], "tied": {"nodes": tied, "as": "nbits8"}}


def _clip_4bit(model: Any, src: Path, cfg: QuantizeConfig, feeds: Sequence[dict[str, np.ndarray]],
               exclude: Sequence[str]) -> dict[str, Any]:
    """Clip the blocks of the MatMuls about to become 4-bit (``int4_scaling: activation``, the second half of
    AWQ: :func:`edgefuse.quantize.scaling.clip_model`). Only on the grid it searches on: onnxruntime's symmetric
    round to nearest; the 8-bit and excluded MatMuls keep their weights."""
    from edgefuse.quantize.scaling import clip_model

    if cfg.int4_algorithm != "default" or not cfg.int4_symmetric:
        return {"skipped": f"the clip search simulates the symmetric default grid, not int4_algorithm "
                           f"{cfg.int4_algorithm!r} with int4_symmetric {cfg.int4_symmetric}"}
    if not feeds:
        raise QuantizationError("int4_scaling activation needs calibration texts; pass --calibration-data or set "
                                "--int4-scaling none")
    return clip_model(model, src, feeds, _weight_matmuls(model, exclude), block_size=cfg.block_size)


def _weight_matmuls(model: Any, exclude: Sequence[str]) -> list[str]:
    """The weight MatMuls of ``model`` not in ``exclude``: the ones about to become 4-bit (the 8-bit ones are
    MatMulNBits already)."""
    from edgefuse.quantize.evaluate import weight_matmuls

    excluded = set(exclude)
    return [n for n in weight_matmuls(model) if n not in excluded]


def quantize_int4(
    src: Path, dst: Path, cfg: QuantizeConfig, exclude: list[str],
    feeds: Sequence[dict[str, np.ndarray]] = (), *, preset: QuantPreset | None = None, int8_nodes: Sequence[str] = (),
    sensitive_8bit: Sequence[str] = (),
) -> dict[str, Any]:
    """4-bit weight-only blocks (MatMulNBits); activations stay float (int8 compute with accuracy_level 4).

    ``cfg.int4_algorithm`` picks onnxruntime's algorithm: ``default`` (its block quantizer, round to nearest,
    symmetric unless ``int4_symmetric`` is off), ``rtn`` (Intel Neural Compressor's round to nearest,
    asymmetric unless symmetric), ``hqq`` (half-quadratic optimisation of scale and zero point, no data) or
    ``gptq`` (edgefuse's GPTQ, :mod:`edgefuse.quantize.gptq`: error-compensating updates from calibration
    ``feeds``, written on the default quantizer's grid, which then packs them unchanged) or ``k_quant`` (Intel Neural
    Compressor's k-quant: scales searched per block). ``exclude`` MatMuls stay fp32; ``int8_nodes`` among them
    are written with 8 bits as ``cfg.int4_fallback`` says: ``int8``, dynamic int8 (MatMulInteger, per-channel, the
    preset's types); ``nbits8``, 8-bit weight-only blocks (:func:`_nbits8`). They are the int4 auto mode's choices.
    ``sensitive_8bit`` (with ``cfg.int4_8bit_share``) are written as 8-bit blocks too.
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgefuse.quantize.gptq import gptq_model

    settings = {"format": "QOperator", "bits": 4, "block_size": cfg.block_size, "symmetric": cfg.int4_symmetric,
                "accuracy_level": cfg.int4_accuracy_level, "op_types": ["MatMul"], "algorithm": cfg.int4_algorithm}
    algo_config = _int4_algo_config(cfg, feeds)  # before loading: a config error costs no graph load
    model = onnx.load(str(src))
    tied = untie_transposed_weights(model) if cfg.int4_tied != "fp32" else []
    settings["tied"] = {"nodes": tied, "as": cfg.int4_tied}
    nbits8 = list(int8_nodes) if cfg.int4_fallback == "nbits8" else []
    if cfg.int4_fallback == "nbits8":
        settings["nbits8_fallback"] = list(nbits8)  # a copy: the tied and sensitive MatMuls are added below
        int8_nodes = ()
    nbits8 += tied if cfg.int4_tied == "nbits8" else []
    if cfg.int4_8bit_share:  # ranked by the caller (edgefuse.quantize.modes.sensitive_matmuls)
        settings["sensitive_8bit"] = list(sensitive_8bit)
        nbits8 += settings["sensitive_8bit"]
    if nbits8:  # first, so the 4-bit pass (which skips them by name) sees them as MatMulNBits already
        model = _nbits8(model, nbits8, cfg)
    if cfg.int4_scaling == "activation":
        settings["clipping"] = _clip_4bit(model, src, cfg, feeds, exclude)
    if cfg.int4_algorithm == "gptq":
        settings["gptq"] = gptq_model(model, src, feeds, _weight_matmuls(model, exclude), block_size=cfg.block_size)
    quantizer = MatMulNBitsQuantizer(
        model, bits=4, block_size=cfg.block_size, is_symmetric=cfg.int4_symmetric,
        accuracy_level=cfg.int4_accuracy_level or None, nodes_to_exclude=list(exclude),
        op_types_to_quantize=("MatMul",),
        algo_config=algo_config,
    )
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):  # GPTQ/RTN print progress bars to stdout
            quantizer.process()
    except (ValueError, IndexError) as exc:
        # Intel Neural Compressor's packing (rtn, k_quant) fails on some shapes, e.g. one block per column
        raise QuantizationError(
            f"onnxruntime's int4 algorithm {cfg.int4_algorithm!r} failed on {src.name} at block size "
            f"{cfg.block_size} ({str(exc)[:120]}); use --int4-algorithm default or another --block-size"
        ) from None
    qmodel = quantizer.model.model if hasattr(quantizer.model, "model") else quantizer.model
    _set_accuracy_level(qmodel, cfg.int4_accuracy_level)
    if not int8_nodes:
        onnx.save_model(qmodel, str(dst), save_as_external_data=needs_external_data(src))
        return settings
    if preset is None:
        raise ValueError("int8 fallback nodes need the int8 preset")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    mid = temp_file(dst.parent, f"{dst.stem}.int4.onnx")  # a new name: concurrent runs never share it
    try:
        onnx.save_model(qmodel, str(mid), save_as_external_data=needs_external_data(src), location=f"{mid.name}.data")
        reduce_range = _reduce_range(cfg, preset)
        quantize_dynamic(
            model_input=str(mid), model_output=str(dst), op_types_to_quantize=["MatMul"],
            nodes_to_quantize=list(int8_nodes), per_channel=cfg.per_channel, reduce_range=reduce_range,
            weight_type=QuantType[preset.weight], use_external_data_format=needs_external_data(src),
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        mid.unlink(missing_ok=True)
        mid.with_name(f"{mid.name}.data").unlink(missing_ok=True)
    settings.update({"int8_fallback": list(int8_nodes), "int8_reduce_range": reduce_range})
    return settings
