"""MLP fusion: compress the MLP layers of a transformers model in place.

Takes a transformers model and a :class:`~edgefuse.config.fusion.FusionConfig`; gives the same model with
k-wide MLPs (k-means centroids of the width-1 sub-MLPs) and the frozen cluster-size scale, a
:class:`~edgefuse.fusion.results.FusionResult`, and safetensors folders that reload with their widths.

Modules: ``archs`` (one :class:`ArchSpec` per architecture), ``sites`` (finding MLPs), ``clustering`` (the
math, pure tensors), ``methods`` (the table of compression methods), ``scale`` (the frozen count scale and its
fold), ``api`` (plan and apply), ``persist`` (save/load), ``search`` (smallest keep ratio meeting a budget),
``results``.

The public names load lazily (PEP 562), so importing the package imports no heavy library:

    >>> import edgefuse.fusion as stage
    >>> "freeze_routers_" in dir(stage)
    True
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "FusionResult": "edgefuse.fusion.results",
    "MlpPlanStep": "edgefuse.fusion.results",
    "METHODS": "edgefuse.fusion.methods",
    "compress_mlp": "edgefuse.fusion.methods",
    "freeze_routers_": "edgefuse.fusion.api",
    "fuse_mlps_": "edgefuse.fusion.api",
    "plan_fusion": "edgefuse.fusion.api",
    "relative_name": "edgefuse.fusion.api",
    "select_sites": "edgefuse.fusion.api",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
