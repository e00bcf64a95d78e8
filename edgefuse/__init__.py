"""edgefuse: ship language models to edge devices.

MLP fusion (k-means over width-1 sub-MLPs with a frozen count scale), recovery fine-tuning, validated ONNX
export and quantization, and profiling on x86 and ARM.

The public API is loaded lazily (PEP 562) so that ``import edgefuse`` and ``edgefuse --help`` stay fast:

    >>> import edgefuse
    >>> edgefuse.__version__
    '0.1.0'
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    # fuse
    "FusionConfig": "edgefuse.config.fusion",
    "fuse_mlps_": "edgefuse.fusion.api",
    "plan_fusion": "edgefuse.fusion.api",
    "fold_scales_": "edgefuse.fusion.scale",
    "save_fused": "edgefuse.fusion.persist",
    "load_fused": "edgefuse.fusion.persist",
    "load_model": "edgefuse.models",
    "load_tokenizer": "edgefuse.models",
    # NTK and approximation metrics
    "NtkConfig": "edgefuse.config.ntk",
    "measure_ntk": "edgefuse.ntk.api",
    # finetune (recovery after fusion)
    "FinetuneConfig": "edgefuse.config.finetune",
    "finetune_": "edgefuse.finetune.api",
    # export and quantize
    "ExportConfig": "edgefuse.config.export",
    "export_onnx": "edgefuse.export.api",
    "QuantizeConfig": "edgefuse.config.quantize",
    "quantize_onnx": "edgefuse.quantize.api",
    "convert_to_ort": "edgefuse.export.ort_format",
    # profile and report
    "ProfileConfig": "edgefuse.config.profile",
    "profile_onnx": "edgefuse.profile.api",
    "ReportConfig": "edgefuse.config.report",
    "write_report": "edgefuse.report.api",
    # pipeline
    "PipelineConfig": "edgefuse.config.pipeline",
    "load_config": "edgefuse.config.pipeline",
    "run_pipeline": "edgefuse.pipeline.api",
    # errors a caller may catch (each has the CLI's exit code as ``exit_code``)
    "EdgefuseError": "edgefuse.errors",
    "ConfigError": "edgefuse.errors",
}

__all__ = ["__version__", *_LAZY]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
