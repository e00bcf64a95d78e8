"""Configuration of the quantize stage (``edgefuse quantize``)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, model_validator

from edgefuse.config import StrictModel

# the names of edgefuse.quantize.modes.MODES (a test keeps them equal; this module must not import numpy)
QuantMode = Literal["int8", "dynamic", "static", "int8-blocks", "int4"]
QUANT_MODES: tuple[str, ...] = get_args(QuantMode)
Preset = Literal["auto", "arm64", "avx2", "avx512", "avx512-vnni"]
PRESETS: tuple[str, ...] = get_args(Preset)
CalibrationMethod = Literal["minmax", "percentile", "entropy"]
CALIBRATION_METHODS: tuple[str, ...] = get_args(CalibrationMethod)


class QuantizeConfig(StrictModel):
    """How to quantize an exported ONNX graph, and how to check the result against fp32.

    Example:
        >>> QuantizeConfig(mode="int4", block_size=64).block_size
        64
    """

    mode: QuantMode = Field(
        "int8",
        description="int8 (the default): the int8 form that suits the graph, chosen from its task: dynamic for "
        "encoders and classifiers, int8-blocks for causal LMs (decoders), whose massive activations defeat "
        "dynamic int8's per-tensor activation scale on every CPU. dynamic: int8 weights, activations quantized at "
        "run time per tensor (MatMulInteger). static: int8 QDQ with activation ranges calibrated on data. "
        "int8-blocks: weight-only 8-bit blocks (MatMulNBits bits 8, every weight MatMul and a tied lm_head), "
        "activations quantized per block of each token at run time. int4: weight-only 4-bit blocks (MatMulNBits).",
    )
    preset: Preset = Field(
        "auto",
        description="Target CPU: arm64, avx2, avx512, avx512-vnni (int8 types and reduce_range per target, see "
        "edgefuse.quantize.presets). auto: detected from this host's CPU flags. Any preset can be built on any host.",
    )
    per_channel: bool = Field(
        True,
        description="int8: one weight scale per output channel. Per-tensor int8 loses too much on MiniLM "
        "(pooled cosine 0.91 vs 0.993).",
    )
    reduce_range: bool | None = Field(
        None,
        description="int8: 7-bit weights against int16 saturation on non-VNNI x86. None: the preset's choice (on "
        "for avx2 and avx512, off for avx512-vnni and arm64).",
    )
    op_types: list[str] = Field(
        default_factory=lambda: ["MatMul", "Gather"],
        description="int8: operator types to quantize (Gather quantizes the embedding tables). int4 uses MatMul.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="Node names kept in fp32; a 're:' prefix makes an entry a regular expression (re.search). "
        "An entry that matches no node is an error.",
    )
    calibration_method: CalibrationMethod = Field(
        "minmax", description="static: how activation ranges are chosen from the calibration data."
    )
    calibration_data: Path | None = Field(
        None,
        description="A TSV/CSV file (first column of text, or 'sentence'/'ref'/'text') to calibrate on (static, "
        "int4's GPTQ, scaling and 8-bit ranking, auto) and to check the result on (other rows of it when it holds "
        "twice calibration_samples). None: the built-in English corpus (edgefuse/data/corpus.txt).",
    )
    calibration_samples: int = Field(
        64, ge=1,
        description="Texts taken from calibration_data (a pipeline: from its training rows), evenly spaced over "
        "the file rather than its first rows: a sorted file's start is one kind of text.",
    )
    max_sequence_length: int = Field(128, ge=2, description="Tokens per calibration/evaluation text.")
    block_size: int = Field(
        32, description="int4 and int8-blocks: weights per quantization block (16, 32, 64, 128 or 256).")
    int4_symmetric: bool = Field(
        True, description="int4 and int8-blocks: symmetric blocks (no zero point; the fast ARM path).")
    int4_accuracy_level: Literal[0, 1, 2, 3, 4] = Field(
        4, description="int4 and int8-blocks: MatMulNBits compute type (4 = int8 activations, fastest on CPU; "
        "0 = unset; 8-bit blocks need 4: level 0 measured 76x slower)."
    )
    int4_algorithm: Literal["gptq", "default", "rtn", "hqq", "k_quant"] = Field(
        "gptq",
        description="int4: how the 4-bit weights are chosen. gptq (the default): edgefuse's GPTQ, error-"
        "compensating updates from the calibration texts, written on the grid of onnxruntime's block quantizer, so "
        "the same kernel runs it at the same speed; a MatMul whose calibration texts hold fewer tokens than half "
        "its input size stays round to nearest (reported; pass --calibration-data). default: onnxruntime's block "
        "quantizer alone (round to nearest, symmetric per int4_symmetric). rtn: Intel Neural Compressor's round to "
        "nearest. hqq: half-quadratic optimisation of scales and zero points (no data). k_quant: Intel Neural "
        "Compressor's k-quant (scales searched per block). Measured against each other in docs/export.md.",
    )
    int4_scaling: Literal["none", "activation", "activation-scale"] = Field(
        "activation-scale",
        description="int4: activation-aware weight preparation, searched on the calibration texts against "
        "onnxruntime's 4-bit grid (AWQ's two steps). activation-scale (the default): per-channel scales, an exact "
        "rewrite of the fp32 graph folded into the norm or up projection that writes the activation (no extra "
        "operator, the same speed). activation: the scales, then each 4-bit block's clipping range (round to "
        "nearest only). none: quantize the weights as exported (what quant-aware recovery trained for).",
    )
    int4_fallback: Literal["fp32", "int8", "nbits8"] = Field(
        "fp32",
        description="int4 with auto_target_cosine: what the MatMuls the auto mode takes out of int4 become: fp32, "
        "dynamic int8 (int8: MatMulInteger, per-channel, the preset's types) or 8-bit weight-only blocks (nbits8: "
        "MatMulNBits bits 8, activations quantized per block, so safe with massive activations).",
    )
    int4_tied: Literal["fp32", "int4", "nbits8"] = Field(
        "nbits8",
        description="int4: what a MatMul whose weight is a transposed initializer becomes (the lm_head of models "
        "with tied embeddings, e.g. SmolLM2: onnxruntime's quantizers skip it): fp32, int4 like the rest, or 8-bit "
        "weight-only blocks (nbits8, the default: fp32 cost SmolLM2 8 ms of every decode step). The embedding "
        "table itself stays fp32.",
    )
    int4_8bit_share: float = Field(
        0.25,
        ge=0,
        le=1,
        description="int4: the share of weight MatMuls written as 8-bit blocks (MatMulNBits bits 8) instead of 4: "
        "the most sensitive ones on the calibration texts, ranked as int4_8bit_rank says (counted over all weight "
        "MatMuls). 0: none (pure int4; use it after quant-aware recovery). On the "
        "E2E-tuned SmolLM2 (benchmarks/results/int4_plain.md, int4_speed.md) the default 0.25 decodes 1.02x the "
        "CPU time of pure 4-bit and costs 6.0 BLEU against fp32; 0.5 costs 1.3 BLEU at 1.12x; 1.0 (= int8-blocks) "
        "0.5 BLEU at 1.15x.",
    )
    int4_8bit_rank: Literal["error", "output"] = Field(
        "output",
        description="int4 with int4_8bit_share: how the MatMuls written as 8-bit blocks are chosen. output (the "
        "default): by what each MatMul's 4-bit error does to the model's output, measured: the mean KL divergence "
        "of the logits (other graphs: the relative error of the first output) from fp32 with that MatMul alone on "
        "the 4-bit grid, on 8 calibration texts; one forward pass per MatMul (about 1 s each for SmolLM2-135M on 2 "
        "cores). error: by the simulated relative int4 error of each MatMul's own output (one fp32 run), which "
        "favours narrow MatMuls such as v_proj whatever their effect. With auto_target_cosine the auto mode's "
        "int4 fallbacks follow the same ranking.",
    )
    auto_target_cosine: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Keep the most error-sensitive MatMuls in fp32, one at a time, until the mean cosine against "
        "fp32 reaches this target. None: quantize everything selected.",
    )
    auto_max_kept: int = Field(16, ge=1, description="auto: give up after keeping this many MatMuls in fp32.")
    min_cosine: float | None = Field(
        0.9,
        gt=-1,
        le=1,
        description="Fail (exit 8) when the mean cosine of the task output against fp32 is below this.",
    )
    eval_data: Path | None = Field(
        None,
        description="A labelled TSV (sentence<TAB>label) to report fp32 and quantized accuracy on "
        "(sequence-classification exports).",
    )
    eval_samples: int | None = Field(None, ge=1, description="Rows of eval_data to use (None: all).")
    output_name: str | None = Field(
        None, description="File name of the quantized graph. None: model.onnx in its own folder, or beside the fp32 "
        "graph model_<variant>.onnx (variant: int8, qdq-int8-au8/as8, -per-tensor, -reduce-range, int4-b<block>)."
    )
    overwrite: bool = Field(False, description="Replace an existing quantized graph of the same name.")

    @model_validator(mode="after")
    def _check(self) -> QuantizeConfig:
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_size {self.block_size} is not one of 16, 32, 64, 128, 256")
        if self.int4_algorithm == "gptq" and not self.int4_symmetric:
            raise ValueError("int4_algorithm gptq writes onnxruntime's symmetric grid; with int4_symmetric: false "
                             "pick another int4_algorithm (e.g. default, rtn or hqq)")
        if self.output_name is not None and (not self.output_name.endswith(".onnx") or "/" in self.output_name):
            raise ValueError(f"output_name {self.output_name!r} must be a plain file name ending in .onnx")
        if self.output_name == "model.onnx":
            raise ValueError("output_name 'model.onnx' would replace the fp32 graph; choose another name")
        return self
