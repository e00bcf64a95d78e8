"""Recovery: the brief fine-tune (task loss, distillation from the unfused teacher) with the scale frozen.

Takes a (fused) model, a :class:`~edgefuse.config.finetune.FinetuneConfig` and data; gives the trained model
(scale still frozen, folded on save), resumable checkpoints and validation metrics.

Modules: ``api`` (:func:`finetune_`), ``loop`` (the training loop), ``setup`` (optimiser, schedule,
data-parallel), ``objectives`` (losses), ``data`` (readers and batching), ``evaluate`` (metrics),
``checkpoint`` (pickle-free checkpoints).

The public names load lazily (PEP 562), so importing the package imports no heavy library:

    >>> import edgefuse.finetune as stage
    >>> "FinetuneResult" in dir(stage)
    True
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "FinetuneResult": "edgefuse.finetune.api",
    "finetune_": "edgefuse.finetune.api",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
