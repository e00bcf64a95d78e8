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
    # fuse
    "FusionConfig": "edgefuse.config.fusion",
    "fuse_mlps_": "edgefuse.fusion",
    "plan_fusion": "edgefuse.fusion",
    "fold_scales_": "edgefuse.scale",
    "save_fused": "edgefuse.persist",
    "load_fused": "edgefuse.persist",
    "load_model": "edgefuse.models",
    "load_tokenizer": "edgefuse.models",
    # NTK and approximation metrics
    "NtkConfig": "edgefuse.config.ntk",
    "measure_ntk": "edgefuse.ntk",
    # recover
    "FinetuneConfig": "edgefuse.config.finetune",
    "finetune_": "edgefuse.finetune",
    # export and quantize
    "ExportConfig": "edgefuse.config.export",
    "export_onnx": "edgefuse.export",
    "QuantizeConfig": "edgefuse.config.quantize",
    "quantize_onnx": "edgefuse.quantize",
    # profile and report
    "ProfileConfig": "edgefuse.config.profile",
    "profile_onnx": "edgefuse.profile",
    "ReportConfig": "edgefuse.config.report",
    "write_report": "edgefuse.report",
    # pipeline
    "PipelineConfig": "edgefuse.config.pipeline",
    "load_config": "edgefuse.config.pipeline",
    "run_pipeline": "edgefuse.pipeline",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgefuse' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
