"""Export: a (fused) transformers model -> one ONNX folder validated against PyTorch.

Takes a model and an :class:`~edgefuse.config.export.ExportConfig`; gives ``model.onnx`` with config,
tokenizer and ``manifest.json``, or raises :class:`~edgefuse.errors.ExportValidationError` and leaves nothing.

Modules: ``api`` (:func:`export_onnx`), ``backends`` (optimum-onnx and torch.onnx), ``moe`` (dense MoE
routing for the trace), ``validate`` (graph vs PyTorch), ``results``.

The public names load lazily (PEP 562), so importing the package imports no heavy library:

    >>> import edgefuse.export as stage
    >>> "export_onnx" in dir(stage)
    True
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "ExportResult": "edgefuse.export.results",
    "GreedyCheck": "edgefuse.export.results",
    "OutputCheck": "edgefuse.export.results",
    "QuantizeResult": "edgefuse.export.results",
    "ValidationCase": "edgefuse.export.results",
    "export_onnx": "edgefuse.export.api",
    "resolve_fold": "edgefuse.export.api",
    "up_fold_is_exact": "edgefuse.export.api",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
