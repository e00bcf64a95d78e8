"""Quantize: an exported fp32 graph -> a checked int8 (dynamic, static QDQ) or int4 graph.

Takes an export folder and a :class:`~edgefuse.config.quantize.QuantizeConfig`; gives the quantized graph
beside it (or in ``out_dir``) with its cosine/accuracy against fp32 recorded in the manifest.

Modules: ``api`` (:func:`quantize_onnx`), ``modes`` (the table of quantization modes), ``backends`` (the
onnxruntime quantizers), ``presets`` (per-CPU
data types), ``evaluate`` (calibration texts and the comparison with fp32), ``auto`` (fp32 fallback).

The public names load lazily (PEP 562), so importing the package imports no heavy library:

    >>> import edgefuse.quantize as stage
    >>> "default_output_name" in dir(stage)
    True
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "MODES": "edgefuse.quantize.modes",
    "default_output_name": "edgefuse.quantize.api",
    "variant_name": "edgefuse.quantize.api",
    "quantize_onnx": "edgefuse.quantize.api",
    "resolve_exclude": "edgefuse.quantize.api",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
