"""The PyTorch stages of the pipeline: ``teacher``, ``search``, ``fuse`` and ``finetune``.

Each takes a :class:`~edgefuse.pipeline.context.StageContext`, writes its model to ``ctx.out / "model"`` and
returns a JSON-ready result (stored in the stage record). They call the library stage functions
(:func:`edgefuse.fusion.api.fuse_mlps_`, :func:`edgefuse.finetune.api.finetune_`) and add nothing to their maths.
"""

from __future__ import annotations

import copy
import logging
import shutil
from typing import Any

from edgefuse.errors import BudgetExceededError
from edgefuse.pipeline.context import StageContext

logger = logging.getLogger(__name__)


def _finetune(ctx: StageContext, model: Any, cfg: Any, teacher: Any, *, phase: int = 0) -> dict[str, Any]:
    """Run :func:`finetune_`; with ``checkpoint_every_steps`` its checkpoints live in a folder of the run that
    survives an interruption (keyed by the stage's input hash and the phase), so the next run resumes mid-way."""
    from edgefuse.finetune.api import finetune_

    ckpt = None
    if cfg.checkpoint_every_steps:
        ckpt = ctx.store.run_dir / f".{ctx.stage}-checkpoints-{ctx.input_hash[:12]}-{phase}"
    resume = ckpt is not None and (ckpt / "checkpoints").is_dir() and any((ckpt / "checkpoints").iterdir())
    if resume:
        logger.info("resuming training from the checkpoints in %s", ckpt)
    result = finetune_(
        model, cfg, ctx.cfg.data, teacher=teacher, tokenizer=ctx.tokenizer(required=True), output_dir=ckpt,
        resume=resume, progress=ctx.progress,
    )
    if ckpt is not None:
        shutil.rmtree(ckpt, ignore_errors=True)  # the stage's model is saved next; the checkpoints are spent
    return result.to_dict()


def run_teacher(ctx: StageContext) -> dict[str, Any]:
    """Fine-tune the unfused source model on the task (the teacher of recovery and reference of the checks),
    or reuse the same teacher from the teacher cache (:mod:`edgefuse.pipeline.teacher_cache`)."""
    from edgefuse.pipeline import teacher_cache
    from edgefuse.pipeline.context import MODEL_DIR, SOURCE

    root = teacher_cache.cache_root(ctx.cfg.teacher_cache, ctx.store.run_dir)
    # the source and data hashes the run already computed for this stage's inputs (no second read of the files)
    key = teacher_cache.teacher_key(ctx.cfg, source=ctx.inputs[SOURCE], data=ctx.inputs["data"])
    hit = teacher_cache.lookup(root, key)
    if hit is not None:
        folder, result = hit
        logger.info("teacher: reusing the trained teacher in %s (same source, data, config and training code)",
                    folder.parent)
        teacher_cache.copy_model(folder, ctx.out / MODEL_DIR)
        return {"finetune": result, "cache": {"hit": True, "entry": str(folder.parent)}}
    model = ctx.load_model("source")
    result = _finetune(ctx, model, ctx.cfg.teacher, None)
    ctx.save_model(model)
    entry = teacher_cache.store(root, key, ctx.out / MODEL_DIR, result)
    return {"finetune": result, "cache": {"hit": False, "entry": None if entry is None else str(entry)}}


def fusion_config(ctx: StageContext) -> Any:
    """``fusion`` with the keep_ratio chosen by the ``search`` stage, when it ran."""
    fusion = ctx.cfg.fusion
    if "search" in ctx.records:
        ratio = ctx.records["search"].result["keep_ratio"]
        fusion = fusion.model_copy(update={"keep_ratio": ratio, "width": None})
    return fusion


def _calibration(ctx: StageContext, fusion: Any) -> tuple[list[str] | None, Any]:
    """Calibration text for ``fusion-pruned`` with ``importance: activations``: the first training texts of the
    task data (None without a data section: the built-in corpus), and the tokenizer to read them."""
    if fusion.method != "fusion-pruned" or fusion.importance != "activations":
        return None, None
    texts = None
    if ctx.cfg.data is not None:
        from edgefuse.finetune.data import read_records

        rows = read_records(ctx.cfg.data.train)[: fusion.calibration_examples]
        texts = [str(r[ctx.cfg.data.text_column]) for r in rows if r.get(ctx.cfg.data.text_column)]
    return texts, ctx.tokenizer(required=True)


def run_fuse(ctx: StageContext) -> dict[str, Any]:
    """Fuse the MLPs of the base model and save it (scales kept unfolded: recovery trains around them)."""
    from edgefuse.fusion.api import fuse_mlps_

    model = ctx.load_model("base")
    fusion = fusion_config(ctx)
    texts, tokenizer = _calibration(ctx, fusion)
    result = fuse_mlps_(model, fusion, progress=ctx.progress, texts=texts, tokenizer=tokenizer)
    ctx.save_model(model)
    return {"fusion": result.to_dict(), "keep_ratio": fusion.keep_ratio, "width": fusion.width}


def run_finetune(ctx: StageContext) -> dict[str, Any]:
    """Recover the fused model by fine-tuning/distillation from the teacher (the base model)."""
    phases = ctx.cfg.finetune_phases
    model = ctx.load_model("fused")
    teacher = ctx.load_model("base") if any(p.needs_teacher for p in phases) else None
    results = []
    for i, cfg in enumerate(phases):
        if len(phases) > 1:
            logger.info("recovery phase %d of %d", i + 1, len(phases))
        results.append(_finetune(ctx, model, cfg, teacher if cfg.needs_teacher else None, phase=i))
    ctx.save_model(model)
    return {"finetune": results[-1], "phases": results}


def run_search(ctx: StageContext) -> dict[str, Any]:
    """Bisection for the smallest keep_ratio meeting ``search``'s budget, measured against the base model.

    Raises:
        BudgetExceededError: even ``search.high`` misses the budget.
    """
    from edgefuse.fusion.api import fuse_mlps_, plan_fusion
    from edgefuse.fusion.search import bisect_keep_ratio, width_snapper
    from edgefuse.metrics import Agreement, accuracy, torch_vectors

    cfg, search = ctx.cfg, ctx.cfg.search
    task = cfg.model.task
    base = ctx.load_model("base")
    batches = ctx.eval_batches(search.max_examples, vocab_size=int(base.config.vocab_size))
    reference = [torch_vectors(base, task, b) for b in batches]
    reference_accuracy = accuracy(batches, reference)
    plan = plan_fusion(base, cfg.fusion)
    snap = width_snapper([plan.steps[0].width_before], cfg.fusion.round_to)

    texts, calib_tok = _calibration(ctx, cfg.fusion)

    def measure(ratio: float) -> float:
        model = copy.deepcopy(base)
        fuse_mlps_(model, cfg.fusion.model_copy(update={"keep_ratio": ratio, "width": None}), texts=texts,
                   tokenizer=calib_tok)
        if search.finetune:
            from edgefuse.finetune.api import finetune_

            tok = ctx.tokenizer(required=True)
            for phase in cfg.finetune_phases:
                finetune_(model, phase, cfg.data, teacher=base, tokenizer=tok, progress=False)
        vectors = [torch_vectors(model, task, b) for b in batches]
        if search.metric == "accuracy":
            value = accuracy(batches, vectors)
            return float("nan") if value is None else value
        agreement = Agreement()
        for ref, vec in zip(reference, vectors, strict=True):
            agreement.update(ref, vec)
        return agreement.result()["cosine_mean"]

    if search.metric == "accuracy":
        if reference_accuracy is None:
            from edgefuse.errors import DataError

            raise DataError("search.max_accuracy_drop needs labels in the validation data (data.label_column)")

        def passes(value: float) -> bool:
            return reference_accuracy - value <= search.max_accuracy_drop + 1e-12
    else:

        def passes(value: float) -> bool:
            return value >= search.min_cosine

    result = bisect_keep_ratio(measure, passes, search, snap=snap, reference_value=reference_accuracy)
    tried = ", ".join(f"{p.keep_ratio:.3f}->{p.value:.4f}" for p in result.points)
    if result.keep_ratio is None:
        budget = (f"min_cosine {search.min_cosine}" if search.metric == "cosine"
                  else f"max_accuracy_drop {search.max_accuracy_drop}")
        raise BudgetExceededError(
            f"search: no keep_ratio in [{search.low}, {search.high}] meets {budget} (tried {tried}); "
            "raise search.high, loosen the budget, or set search.finetune: true"
        )
    logger.info("search chose keep_ratio %.4f after %d points (%s)", result.keep_ratio, len(result.points), tried)
    return result.to_dict()
