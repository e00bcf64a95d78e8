"""``run_pipeline``: every stage of a :class:`~edgefuse.config.pipeline.PipelineConfig`, in order, resumable.

Each stage writes its outputs to ``<run_dir>/<stage>/`` with a ``record.json``
(:mod:`edgefuse.pipeline.store`). Its *input hash* covers the stage's resolved config, the output hashes of the
stages it reads and, where it reads them, the source model's files and the data files. A re-run skips every
stage whose input hash is unchanged (and whose files are intact); a run that was interrupted resumes at the
first stage without a complete folder, because stage folders appear atomically.

Example (the skipped lines are not run: the last line runs the pipeline on a model folder):
    >>> from edgefuse.config.pipeline import PipelineConfig
    >>> cfg = PipelineConfig(schema_version=1, model={"name_or_path": "./tiny"}, fusion={"keep_ratio": 0.5})
    >>> [s.name for s in enabled_stages(cfg)]
    ['fuse']
    >>> result = run_pipeline(cfg, "runs/tiny")  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from edgefuse.config.pipeline import PipelineConfig, dump_config
from edgefuse.errors import ConfigError
from edgefuse.io_utils import write_json_atomic, write_text_atomic
from edgefuse.pipeline.stages import STAGES, Stage, StageContext, input_hashes
from edgefuse.pipeline.store import RunStore, StageRecord, ensure_run_dir_usable, hash_json

logger = logging.getLogger(__name__)

STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
EventFn = Callable[[str, str, dict[str, Any]], None]


@dataclass(frozen=True)
class StageOutcome:
    """One stage of one run: ``ran`` (executed now), ``cached`` (unchanged inputs, skipped) or ``off``."""

    name: str
    status: Literal["ran", "cached", "off"]
    seconds: float
    folder: str | None
    input_hash: str | None
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineResult:
    """What :func:`run_pipeline` did, stage by stage. ``summary`` holds the headline numbers."""

    run_dir: Path
    stages: tuple[StageOutcome, ...]
    seconds: float
    summary: dict[str, Any] = field(default_factory=dict)

    def stage(self, name: str) -> StageOutcome:
        """The outcome of stage ``name``.

        Raises:
            KeyError: no such stage in this run.
        """
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(name)

    @property
    def ran(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages if s.status == "ran")

    @property
    def cached(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.stages if s.status == "cached")

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "seconds": round(self.seconds, 3),
            "stages": [
                {"name": s.name, "status": s.status, "seconds": round(s.seconds, 3), "folder": s.folder,
                 "input_hash": s.input_hash, "result": s.result}
                for s in self.stages
            ],
            "summary": self.summary,
        }


def enabled_stages(cfg: PipelineConfig) -> list[Stage]:
    """The stages that ``cfg`` switches on, in run order."""
    return [s for s in STAGES if s.enabled(cfg)]


def resolve_run_dir(
    cfg: PipelineConfig, config_path: str | Path | None = None, run_dir: str | Path | None = None
) -> Path:
    """The run folder: ``run_dir`` if given, else ``cfg.run_dir``, else ``runs/<config file stem>``.

    Example:
        >>> resolve_run_dir(PipelineConfig(schema_version=1), "export_configs/default.yaml").as_posix()
        'runs/default'
    """
    if run_dir is not None:
        return Path(run_dir)
    if cfg.run_dir is not None:
        return Path(cfg.run_dir)
    stem = Path(config_path).stem if config_path is not None else "pipeline"
    return Path("runs") / stem


def _check_names(names: Collection[str], what: str) -> None:
    unknown = sorted(set(names) - set(STAGE_NAMES) - {"all"})
    if unknown:
        raise ConfigError(f"{what} names unknown stage(s) {unknown}; the stages are: {', '.join(STAGE_NAMES)}, all")


def run_pipeline(
    cfg: PipelineConfig,
    run_dir: str | Path,
    *,
    force: Collection[str] = (),
    until: str | None = None,
    progress: bool = False,
    on_event: EventFn | None = None,
) -> PipelineResult:
    """Run (or resume) every enabled stage of ``cfg`` in ``run_dir``.

    Args:
        cfg: the validated pipeline config.
        run_dir: the run folder; created when missing. Earlier results in it are reused when still valid.
        force: stage names to run again even when their inputs are unchanged (``all`` for every stage).
        until: stop after this stage (later stages are reported ``off``).
        progress: let stages show progress bars (on stderr).
        on_event: called as ``on_event(kind, stage, info)`` with kind ``start``, ``ran``, ``cached`` or ``off``
            (the CLI prints these; library code never prints).

    Returns:
        A :class:`PipelineResult`; also written to ``run_dir/pipeline.json``.

    Raises:
        ConfigError: unknown stage names in ``force``/``until``, or an unusable ``run_dir``.
        OutputExistsError: another process is running in ``run_dir``.
        EdgefuseError: whatever a stage raises (its completed predecessors stay valid for the next run).

    Example (the skipped lines are not run: runs the whole pipeline, minutes):
        >>> result = run_pipeline(load_config("export_configs/default.yaml"), "runs/default")  # doctest: +SKIP
        >>> result.ran  # doctest: +SKIP
        ('fuse', 'finetune', 'export', 'quantize', 'reference', 'evaluate', 'profile', 'report')
    """
    _check_names(force, "--force")
    if until is not None:
        _check_names([until], "--until")
        if until not in [s.name for s in enabled_stages(cfg)]:
            raise ConfigError(f"--until {until!r}: that stage is off in this config")
    emit = on_event or (lambda kind, stage, info: None)
    check_input_files(cfg)
    run_dir = Path(run_dir)
    ensure_run_dir_usable(run_dir)
    store = RunStore(run_dir)
    start = time.perf_counter()
    outcomes: list[StageOutcome] = []
    records: dict[str, StageRecord] = {}
    with store.lock():
        store.clean_partials()
        _note_renamed_stages(store)
        write_text_atomic(run_dir / "config.yaml", dump_config(cfg))
        ctx_hashes: dict[str, str] = {}  # memo of source/data hashes for this run
        stopped = False
        for stage in STAGES:
            if stopped or not stage.enabled(cfg):
                outcomes.append(StageOutcome(stage.name, "off", 0.0, None, None))
                emit("off", stage.name, {})
                continue
            inputs = input_hashes(stage, cfg, records, ctx_hashes)
            payload = stage.payload(cfg)
            input_hash = hash_json({"stage": stage.name, "version": stage.version, "config": payload, "inputs": inputs})
            forced = stage.name in force or "all" in force
            record = None if forced else store.fresh_record(stage.name, input_hash)
            folder = str(store.stage_dir(stage.name))
            if record is not None:
                logger.info("%s: inputs unchanged, reusing %s", stage.name, folder)
                outcomes.append(StageOutcome(stage.name, "cached", record.seconds, folder, input_hash, record.result))
                emit("cached", stage.name, {"seconds": record.seconds, "folder": folder})
            else:
                emit("start", stage.name, {"folder": folder})
                t0 = time.perf_counter()
                with store.build(stage.name) as tmp:
                    ctx = StageContext(cfg=cfg, stage=stage.name, store=store, out=tmp, records=dict(records),
                                       input_hash=input_hash, progress=progress, inputs=inputs)
                    result = stage.run(ctx)
                    seconds = time.perf_counter() - t0
                    record = store.commit_record(
                        stage.name, tmp, input_hash=input_hash, inputs=inputs, config=payload, result=result,
                        seconds=seconds,
                    )
                outcomes.append(StageOutcome(stage.name, "ran", seconds, folder, input_hash, record.result))
                emit("ran", stage.name, {"seconds": seconds, "folder": folder})
            records[stage.name] = record
            if until == stage.name:
                stopped = True
        from edgefuse.pipeline.graph_stages import run_summary

        summary = run_summary(records, store)
        result = PipelineResult(run_dir, tuple(outcomes), time.perf_counter() - start, summary)
        write_json_atomic(run_dir / "pipeline.json", result.to_dict())
    return result


# stage folders of older edgefuse versions: old name -> current name
RENAMED_STAGES: dict[str, str] = {"recover": "finetune"}


def _note_renamed_stages(store: RunStore) -> None:
    """Say so when the run folder holds a stage under its old name: it is not reused, the stage runs again."""
    for old, new in RENAMED_STAGES.items():
        if (store.stage_dir(old) / "record.json").is_file() and not store.stage_dir(new).exists():
            logger.warning(
                "%s: this run folder has a %r stage from an older edgefuse; that stage is now called %r and runs "
                "again (delete %s to reclaim its space)", store.run_dir, old, new, store.stage_dir(old),
            )


def load_run(run_dir: str | Path) -> dict[str, StageRecord]:
    """The records of every completed stage in ``run_dir`` (by stage name), e.g. to inspect a finished run.

    Example (the skipped lines are not run: needs a finished run):
        >>> sorted(load_run("runs/default"))  # doctest: +SKIP
        ['evaluate', 'export', 'finetune', 'fuse', 'profile', 'quantize', 'reference', 'report']
    """
    store = RunStore(Path(run_dir))
    records = {}
    for name in STAGE_NAMES:
        record = store.read_record(name)
        if record is not None:
            records[name] = record
    return records


def check_input_files(cfg: PipelineConfig) -> None:
    """Fail fast, before any model loads: every data file the config names must exist (``hf:`` sources are
    fetched later and not checked here).

    Raises:
        TargetNotFoundError: the first missing file, with the config key that names it.

    Example:
        >>> check_input_files(PipelineConfig(schema_version=1))  # no data section: nothing to check
    """
    from edgefuse.errors import TargetNotFoundError

    files: list[tuple[str, Any]] = []
    if cfg.data is not None:
        files += [("data.train", cfg.data.train), ("data.validation", cfg.data.validation)]
    if cfg.quantize is not None:
        files += [("quantize.calibration_data", cfg.quantize.calibration_data),
                  ("quantize.eval_data", cfg.quantize.eval_data)]
    for key, value in files:
        if value is None or str(value).startswith("hf:"):
            continue
        if not Path(value).expanduser().is_file():
            raise TargetNotFoundError(f"{key}: data file {str(value)!r} does not exist (paths are relative to "
                                      f"the folder you run edgefuse in: {Path.cwd()})")


def dry_run_plan(cfg: PipelineConfig) -> dict[str, Any]:
    """What a run of ``cfg`` would do, without touching a model weight: each stage on or off, and the fusion plan.

    The fusion plan is computed on a model built on PyTorch's ``meta`` device from the source's config (shapes
    only; no weight is read). A source folder that is itself a fused edgefuse model is loaded (its widths
    live in its metadata).

    Example (the skipped lines are not run: reads a model's config from the repository's export_configs):
        >>> plan = dry_run_plan(load_config("export_configs/default.yaml"))  # doctest: +SKIP
        >>> plan["fusion"].steps[0].width_after  # doctest: +SKIP
        768
    """
    check_input_files(cfg)
    stages = [(s.name, "on" if s.enabled(cfg) else "off") for s in STAGES]
    fusion = None
    if cfg.fusion is not None:
        from edgefuse.fusion.api import plan_fusion

        fusion = plan_fusion(_shape_only_model(cfg), cfg.fusion)
    return {"stages": stages, "fusion": fusion}


def _shape_only_model(cfg: PipelineConfig) -> Any:
    """The source model with its parameters on the ``meta`` device (shapes, no data)."""
    import torch
    import transformers

    from edgefuse.models import CACHE_DIR, load_model, resolve_alias

    m = cfg.model
    if m.name_or_path == "smollm2" and not (CACHE_DIR / "smollm2-135m" / "config.json").is_file():
        # reading the config from the GGUF header avoids the one-time conversion (which writes a cache)
        from edgefuse.models import _smollm2_gguf

        gguf = _smollm2_gguf()
        config = transformers.AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    else:
        path = resolve_alias(m.name_or_path)
        from edgefuse.fusion.persist import read_fusion_metadata

        if Path(path).is_dir() and (Path(path) / "config.json").is_file() and read_fusion_metadata(path):
            return load_model(path, m.task, num_labels=m.num_labels, trust_remote_code=m.trust_remote_code)
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=m.trust_remote_code)
    if m.task == "sequence-classification":
        config.num_labels = m.num_labels
    auto = {"feature-extraction": transformers.AutoModel,
            "sequence-classification": transformers.AutoModelForSequenceClassification,
            "causal-lm": transformers.AutoModelForCausalLM}[m.task]
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=m.trust_remote_code)
