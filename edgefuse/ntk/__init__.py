"""Empirical (Adam) NTK and approximation error of a compressed model against its original.

Takes two models and an :class:`~edgefuse.config.ntk.NtkConfig`; gives kernel and output errors.

Modules: ``api`` (:func:`measure_ntk`), ``params`` (which parameters), ``scalar`` (which scalar output).

The public names load lazily (PEP 562), so importing the package imports no heavy library:

    >>> import edgefuse.ntk as stage
    >>> "KernelError" in dir(stage)
    True
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "KernelError": "edgefuse.ntk.api",
    "ModelKernels": "edgefuse.ntk.api",
    "NtkResult": "edgefuse.ntk.api",
    "measure_ntk": "edgefuse.ntk.api",
    "model_kernels": "edgefuse.ntk.api",
    "reference_kernels": "edgefuse.ntk.api",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
