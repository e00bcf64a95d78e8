"""The pipeline's stage table: for each stage, when it is on, what it reads, which config it depends on, and
the function that runs it. :func:`edgefuse.pipeline.api.run_pipeline` walks this table in order.

Adding a stage is one :class:`Stage` entry here plus its run function.

Example:
    >>> [s.name for s in STAGES][:4]
    ['teacher', 'search', 'fuse', 'finetune']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from edgefuse.config.pipeline import PipelineConfig
from edgefuse.pipeline.context import SOURCE, StageContext, data_hash, producer, source_hash
from edgefuse.pipeline.store import StageRecord, host_hash, tool_hash

TOOL = "edgefuse"
"""Input of every stage: edgefuse's version and code (:func:`edgefuse.pipeline.store.tool_hash`)."""
HOST = "host"
"""Input of the stages whose output depends on this machine's CPU (profile; quantize through its preset)."""
PRESET = "preset"
"""Input of quantize: the preset ``auto`` resolves to on this host (avx512-vnni, arm64, ...)."""

DATA = "data"


@dataclass(frozen=True)
class Stage:
    """One pipeline stage.

    ``needs(cfg)`` names what the stage reads: earlier stages (their output hashes become inputs), ``source``
    (the configured model's files) and ``data`` (the data files). ``payload(cfg)`` is the part of the config
    that changes the stage's output; together they make the input hash. Bump ``version`` when the stage's
    code changes what it writes, so that old run folders are rebuilt.
    """

    name: str
    section: str
    enabled: Callable[[PipelineConfig], bool]
    needs: Callable[[PipelineConfig], tuple[str, ...]]
    payload: Callable[[PipelineConfig], dict[str, Any]]
    run: Callable[[StageContext], dict[str, Any]]
    version: int = 1


def _dump(obj: Any) -> Any:
    if isinstance(obj, list):
        return [_dump(o) for o in obj]
    return None if obj is None else obj.model_dump(mode="json")


def _model_stage(cfg: PipelineConfig, *roles: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(producer(cfg, r) for r in roles))  # type: ignore[arg-type]


def _run(module: str, func: str) -> Callable[[StageContext], dict[str, Any]]:
    """Import the stage function only when the stage runs (the stage modules import torch)."""

    def call(ctx: StageContext) -> dict[str, Any]:
        import importlib

        return getattr(importlib.import_module(module), func)(ctx)

    call.__name__ = func
    return call


_M = "edgefuse.pipeline.model_stages"
_G = "edgefuse.pipeline.graph_stages"


def _reference_enabled(cfg: PipelineConfig) -> bool:
    return cfg.export is not None and cfg.reference and producer(cfg, "final") != producer(cfg, "base")


def _graph_stages(cfg: PipelineConfig) -> tuple[str, ...]:
    names = ["export"] if cfg.export is not None else []
    if cfg.export is not None and cfg.optimize is not None:
        names.append("optimize")
    if cfg.export is not None and cfg.quantize is not None:
        names.append("quantize")
    if cfg.export is not None and cfg.tune is not None:
        names.append("tune")
    if _reference_enabled(cfg):
        names.append("reference")
    return tuple(names)

STAGES: tuple[Stage, ...] = (
    Stage(
        "teacher", "teacher",
        enabled=lambda c: c.teacher is not None,
        needs=lambda c: (SOURCE, DATA),
        payload=lambda c: {"model": _dump(c.model), "teacher": _dump(c.teacher), "data": _dump(c.data)},
        run=_run(_M, "run_teacher"),
    ),
    Stage(
        "search", "search",
        enabled=lambda c: c.search is not None,
        needs=lambda c: (*_model_stage(c, "base"), DATA),
        payload=lambda c: {
            "model": _dump(c.model), "search": _dump(c.search), "fusion": _dump(c.fusion), "data": _dump(c.data),
            "finetune": _dump(c.finetune) if c.search and c.search.finetune else None,
        },
        run=_run(_M, "run_search"),
    ),
    Stage(
        "fuse", "fusion",
        enabled=lambda c: c.fusion is not None,
        needs=lambda c: _model_stage(c, "base") + (("search",) if c.search is not None else ()),
        payload=lambda c: {"model": _dump(c.model), "fusion": _dump(c.fusion)},
        run=_run(_M, "run_fuse"),
    ),
    Stage(
        "finetune", "finetune",
        enabled=lambda c: c.finetune is not None,
        needs=lambda c: (*_model_stage(c, "fused", "base"), DATA),
        payload=lambda c: {"model": _dump(c.model), "finetune": _dump(c.finetune), "data": _dump(c.data)},
        run=_run(_M, "run_finetune"),
    ),
    Stage(
        "export", "export",
        enabled=lambda c: c.export is not None,
        needs=lambda c: _model_stage(c, "final"),
        payload=lambda c: {"model": _dump(c.model), "export": _dump(c.export)},
        run=_run(_G, "run_export"),
    ),
    Stage(
        "optimize", "optimize",
        enabled=lambda c: c.export is not None and c.optimize is not None,
        needs=lambda c: ("export",),
        payload=lambda c: {"optimize": _dump(c.optimize)},
        run=_run(_G, "run_optimize"),
    ),
    Stage(
        "quantize", "quantize",
        enabled=lambda c: c.export is not None and c.quantize is not None,
        needs=lambda c: ("optimize" if c.optimize is not None else "export", DATA, PRESET),
        payload=lambda c: {"quantize": _dump(c.quantize), "data": _dump(c.data)},
        run=_run(_G, "run_quantize"),
    ),
    Stage(
        "tune", "tune",
        enabled=lambda c: c.export is not None and c.tune is not None,
        needs=lambda c: ("export", DATA),
        payload=lambda c: {"tune": _dump(c.tune), "data": _dump(c.data)},
        run=_run(_G, "run_tune"),
    ),
    Stage(
        "reference", "reference",
        enabled=lambda c: _reference_enabled(c),
        needs=lambda c: _model_stage(c, "base"),
        payload=lambda c: {"model": _dump(c.model), "export": _dump(c.export)},
        run=_run(_G, "run_reference"),
    ),
    Stage(
        "evaluate", "evaluate",
        enabled=lambda c: c.export is not None,
        needs=lambda c: (*_model_stage(c, "final", "base"), *_graph_stages(c), DATA),
        payload=lambda c: {"model": _dump(c.model), "evaluate": _dump(c.evaluate), "data": _dump(c.data)},
        run=_run(_G, "run_evaluate"),
    ),
    Stage(
        "profile", "profile",
        enabled=lambda c: c.export is not None and c.profile is not None,
        needs=lambda c: (*_graph_stages(c), HOST),
        payload=lambda c: {"profile": _dump(c.profile)},
        run=_run(_G, "run_profile"),
    ),
    Stage(
        "report", "report",
        enabled=lambda c: c.report is not None,
        needs=lambda c: tuple(s.name for s in STAGES if s.name != "report" and s.enabled(c)),
        payload=lambda c: {"report": _dump(c.report)},
        run=_run(_G, "run_report"),
    ),
)


def input_hashes(
    stage: Stage, cfg: PipelineConfig, records: dict[str, StageRecord], memo: dict[str, str]
) -> dict[str, str]:
    """What the stage reads, as ``name -> hash``: earlier stages' output hashes, the source model, the data,
    edgefuse's own version and code (every stage), the host (profile) and the resolved quantize preset.

    ``memo`` caches the source and data hashes for the duration of one run.
    """
    out: dict[str, str] = {TOOL: tool_hash()}
    for name in stage.needs(cfg):
        if name == HOST:
            out[HOST] = host_hash()
            continue
        if name == PRESET:
            from edgefuse.quantize.presets import resolve_preset

            out[PRESET] = resolve_preset(cfg.quantize.preset).name if cfg.quantize is not None else "none"
            continue
        if name == SOURCE:
            if SOURCE not in memo:
                memo[SOURCE] = source_hash(cfg)
            out[SOURCE] = memo[SOURCE]
        elif name == DATA:
            if DATA not in memo:
                memo[DATA] = data_hash(cfg)
            out[DATA] = memo[DATA]
        elif name in records:
            out[name] = records[name].output_hash
        else:
            raise RuntimeError(f"internal error: stage {stage.name!r} needs {name!r}, which has not run")
    return out
