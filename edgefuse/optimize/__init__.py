"""Optimize: an exported fp32 graph -> the same function with onnxruntime's transformer fusions, checked.

Takes an export folder (or a ``.onnx`` file in one) and an :class:`~edgefuse.config.optimize.OptimizeConfig`;
gives ``model_opt.onnx`` beside it (or the configured name): the graph after
``onnxruntime.transformers.optimizer.optimize_model`` with exactly the fusions asked for (attention,
skip_layer_norm, bias_gelu, embed_layer_norm, rotary, ...), compared output by output with the fp32 graph on
padded batches (and KV-cache decoding steps for decoders), its operators counted, and recorded in the
folder's ``manifest.json``. A graph that disagrees raises :class:`~edgefuse.errors.ExportValidationError`
(exit 7) and leaves no file. Quantize the result with ``edgefuse quantize FOLDER/model_opt.onnx``.

Modules: ``fusions`` (fusion names -> onnxruntime ``FusionOptions``, model type and head count of a folder),
``api`` (:func:`optimize_onnx`), ``check`` (the optimized graph against the fp32 graph), ``results``.

The public names load lazily (PEP 562), so importing the package imports no heavy library:

    >>> import edgefuse.optimize as stage
    >>> "optimize_onnx" in dir(stage)
    True
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "OptimizeResult": "edgefuse.optimize.results",
    "compare_graphs": "edgefuse.optimize.check",
    "fusion_options": "edgefuse.optimize.fusions",
    "optimize_onnx": "edgefuse.optimize.api",
    "ort_model_type": "edgefuse.optimize.fusions",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
