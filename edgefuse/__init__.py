"""edgefuse: ship language models to edge devices.

MLP fusion (k-means over width-1 sub-MLPs with a frozen count scale), recovery fine-tuning, validated ONNX
export and quantization, and profiling on x86 and ARM.

The public API is loaded lazily (PEP 562) so that ``import edgefuse`` and ``edgefuse --help`` stay fast:

    >>> import edgefuse
    >>> edgefuse.__version__
    '0.1.0'
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "FusionConfig": "edgefuse.config.fusion",
    "fuse_mlps_": "edgefuse.fusion",
    "plan_fusion": "edgefuse.fusion",
    "fold_scales_": "edgefuse.scale",
    "save_fused": "edgefuse.persist",
    "load_fused": "edgefuse.persist",
    "measure_ntk": "edgefuse.ntk",
    "NtkConfig": "edgefuse.config.ntk",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgefuse' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
