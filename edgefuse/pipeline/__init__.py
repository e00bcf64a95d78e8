"""The whole pipeline from one config: teacher -> search -> fuse -> finetune -> export -> quantize -> profile -> report.

Takes a :class:`~edgefuse.config.pipeline.PipelineConfig` and a run folder; gives one folder per stage with a
``record.json`` of its inputs, so unchanged stages are reused on the next run.

Modules: ``api`` (:func:`run_pipeline`), ``stages`` (the stage table), ``model_stages`` and
``graph_stages`` (the stage functions), ``context`` (what a stage sees), ``store`` (the run folder).

The public names load lazily (PEP 562), so importing the package imports no heavy library:

    >>> import edgefuse.pipeline as stage
    >>> "PipelineResult" in dir(stage)
    True
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "PipelineResult": "edgefuse.pipeline.api",
    "StageOutcome": "edgefuse.pipeline.api",
    "dry_run_plan": "edgefuse.pipeline.api",
    "enabled_stages": "edgefuse.pipeline.api",
    "load_run": "edgefuse.pipeline.api",
    "resolve_run_dir": "edgefuse.pipeline.api",
    "run_pipeline": "edgefuse.pipeline.api",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
