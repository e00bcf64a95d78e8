"""``export_onnx``: a (fused) transformers model -> one validated ONNX folder.

The folder holds ``model.onnx``, the model's ``config.json`` (+ ``generation_config.json``), the tokenizer, and
``manifest.json`` (sha256, size, settings, validation figures, library versions), so optimum's
``ORTModelFor*`` classes load it as is. It is written through a temporary sibling and renamed only after the
graph agreed with PyTorch; a miss raises :class:`ExportValidationError` (exit 7) and leaves nothing behind.

The frozen fusion scale (:mod:`edgefuse.fusion.scale`) is handled by ``ExportConfig.fold_scales``; the caller's model
is never modified (folding happens on a copy). Sparse MoE blocks (Mixtral, Qwen2-MoE) are traced with an
equivalent gather-compute-scatter forward, Switch and any sparse graph that misses validation with the
dense-routing forward (:mod:`edgefuse.export.moe`), set on the block instances for the trace only.

Example (the skipped lines are not run: the export and its validation take tens of seconds):
    >>> import tempfile, pathlib
    >>> from transformers import BertConfig, BertModel
    >>> from edgefuse.config.export import ExportConfig
    >>> m = BertModel(BertConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
    ...                          intermediate_size=32, vocab_size=64)).eval()
    >>> res = export_onnx(m, ExportConfig(), pathlib.Path(tempfile.mkdtemp()) / "onnx")  # doctest: +SKIP
    >>> res.max_abs_diff < 1e-4  # doctest: +SKIP
    True
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgefuse.config.export import ExportConfig
from edgefuse.errors import ConfigError, ExportValidationError
from edgefuse.export.backends import ONNX_NAME, export_graph
from edgefuse.export.moe import moe_routing
from edgefuse.export.results import ExportResult, GreedyCheck, ValidationCase
from edgefuse.io_utils import atomic_dir
from edgefuse.manifest import add_graph, new_manifest, write_manifest

logger = logging.getLogger(__name__)

# Activations for which relu(n z) = n relu(z) (n > 0), so the cluster sizes can go into the up projection.
POSITIVE_HOMOGENEOUS = ("relu", "leaky_relu")


def up_fold_is_exact(model: Any) -> bool:
    """Whether folding the sizes into the up projection is exact: a gated MLP (the sizes go into the linear
    ``up`` branch of ``act(gate x) * (up x)``) or a positively homogeneous activation such as ReLU."""
    from edgefuse.fusion.scale import find_fused_sites
    from edgefuse.fusion.sites import find_mlps, model_arch

    sites = list(find_fused_sites(model)) or find_mlps(model)
    if sites and all(s.kind.gate is not None for s in sites):
        return True
    act = str(getattr(model.config, model_arch(model).act_field, "")).lower()
    return act in POSITIVE_HOMOGENEOUS


def resolve_fold(model: Any, choice: str) -> str:
    """The fold that ``choice`` means for ``model``: ``none`` (no fusion scale), ``keep``, ``down`` or ``up``.

    ``auto`` is the choice with the lowest int8 error measured in ``benchmarks/results/export.md``: ``up``
    where it is exact (gated MLPs, ReLU), else ``down``.

    Raises:
        ConfigError: ``up`` for a model where it would change the function (e.g. GELU, non-gated).
    """
    from edgefuse.fusion.scale import has_scales

    if not has_scales(model):
        return "none"
    if choice == "auto":
        return "up" if up_fold_is_exact(model) else "down"
    if choice == "up" and not up_fold_is_exact(model):
        act = getattr(model.config, "hidden_act", getattr(model.config, "activation_function", "?"))
        raise ConfigError(
            f"fold_scales 'up' is exact only for gated MLPs or ReLU-type activations; {model.config.model_type!r} "
            f"uses {act!r} without a gate: use 'down' or 'keep'"
        )
    return choice


def _prepared(model: Any, fold: str) -> Any:
    """The model to trace: the caller's own (``keep``/``none``) or a folded copy."""
    if fold in ("none", "keep"):
        return model
    from edgefuse.fusion.scale import fold_scales_

    clone = copy.deepcopy(model)
    fold_scales_(clone, into=fold)
    return clone


def _opset_of(path: Path) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    return max((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _failure_message(
    cases: list[ValidationCase], greedy: GreedyCheck | None, problems: list[str], cfg: ExportConfig
) -> str:
    parts = list(problems)
    for case in cases:
        for o in case.outputs:
            if not o.passed:
                parts.append(f"{case.label}: {o.name} shape {list(o.shape)} max|diff| {o.max_abs_diff:.3g} "
                             f"cos {o.cosine:.6f}")
    if greedy is not None and not greedy.match:
        first = next(i for i, (a, b) in enumerate(zip(greedy.torch_tokens, greedy.onnx_tokens, strict=True)) if a != b)
        parts.append(f"greedy tokens differ from step {first}: torch {list(greedy.torch_tokens)} vs onnx "
                     f"{list(greedy.onnx_tokens)}")
    shown = "; ".join(parts[:6]) + (f"; ... {len(parts) - 6} more" if len(parts) > 6 else "")
    return (f"ONNX graph disagrees with PyTorch beyond atol={cfg.atol:g}, rtol={cfg.rtol:g}: {shown}. "
            "Nothing was written; loosen --atol/--rtol only if the difference is expected")


def _set_labels(model: Any, cfg: ExportConfig) -> None:
    """Name the classes in the model's config (saved as config.json's id2label / label2id)."""
    labels = list(cfg.labels or [])
    n = int(getattr(model.config, "num_labels", 0) or 0)
    if cfg.task != "sequence-classification":
        raise ConfigError(f"labels name the classes of a sequence-classification export, not {cfg.task!r}")
    if len(labels) != n or len(set(labels)) != len(labels):
        raise ConfigError(f"labels {labels} must be {n} distinct names, one per class of the model (num_labels {n})")
    model.config.id2label = dict(enumerate(labels))
    model.config.label2id = {name: i for i, name in enumerate(labels)}


def export_onnx(
    model: Any, cfg: ExportConfig | Mapping[str, Any] | None, out_dir: Path, *, tokenizer: Any = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export ``model`` to ``out_dir`` as a validated ONNX folder.

    Args:
        model: a transformers model for ``cfg.task`` (fused or not; any architecture of ``edgefuse.fusion.archs``).
        cfg: the export settings (task, exporter, fold of the fusion scale, tolerances, shapes): an
            :class:`ExportConfig`, a mapping of its keys, or None for the defaults (as every API function).
        out_dir: the folder to create.
        tokenizer: saved into the folder and used for a real-text validation case and the generation prompt.
        overwrite: replace an existing ``out_dir``.

    Returns:
        What was written, which exporter was used, and every validation figure.

    Raises:
        OutputExistsError: ``out_dir`` exists and ``overwrite`` is False.
        ConfigError: a fold choice or exporter that does not apply to this model.
        ExportValidationError: the graph missed the tolerance, lacks an output, or generates other tokens.

    Example:
        >>> from edgefuse.config.export import ExportConfig
        >>> ExportConfig(task="causal-lm", generate_tokens=16).generate_tokens
        16
    """
    from edgefuse.config import as_config
    from edgefuse.fusion.scale import iter_scaled

    cfg = as_config(ExportConfig, cfg)
    if cfg.sentence_embedding and cfg.task != "feature-extraction":
        raise ConfigError(f"sentence_embedding needs task feature-extraction, not {cfg.task!r}")
    if cfg.labels is not None:
        _set_labels(model, cfg)
    out_dir = Path(out_dir)
    model.eval()
    fold = resolve_fold(model, cfg.fold_scales)
    fused = sum(1 for _ in iter_scaled(model))
    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        from edgefuse.export.validate import validate_export

        traced = _prepared(model, fold)
        # sparse MoE blocks trace wrongly as transformers writes them (data-dependent Python loops): an equivalent
        # traceable forward during the trace only (gather-compute-scatter, or dense as the fallback); validation
        # below runs the caller's model with transformers' own forward
        modes = [cfg.moe_routing] + (["dense"] if cfg.moe_routing == "sparse" else [])
        fallback_reason = None
        for mode in modes:
            start = time.perf_counter()
            with moe_routing(traced, mode) as routing:
                exporter = export_graph(traced, cfg, tmp)
            if cfg.sentence_embedding:
                from edgefuse.export.pooling import add_sentence_embedding

                add_sentence_embedding(tmp / ONNX_NAME)
                exporter += "; + sentence_embedding (mean pooling, L2 normalisation)"
            if routing.blocks:
                exporter = f"{exporter}; {routing.describe()}"
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            export_s = time.perf_counter() - start
            start = time.perf_counter()
            # reference: the caller's model itself (scale hooks active), so the fold is validated too
            cases, greedy, problems = validate_export(model, tmp / ONNX_NAME, cfg, tokenizer=tokenizer)
            validate_s = time.perf_counter() - start
            failed = problems or any(not c.passed for c in cases) or (greedy is not None and not greedy.match)
            if not failed or routing.sparse_blocks == 0 or mode == modes[-1]:
                break
            fallback_reason = _failure_message(cases, greedy, problems, cfg)
            logger.warning("sparse MoE graph missed validation (%s); exporting the dense-routing trace instead",
                           fallback_reason)
        if failed:
            raise ExportValidationError(_failure_message(cases, greedy, problems, cfg))
        if fallback_reason is not None:
            exporter = f"{exporter} (fallback: the sparse trace missed validation)"
        outputs = [o for c in cases for o in c.outputs]
        max_diff = max((o.max_abs_diff for o in outputs), default=0.0)
        min_cos = min((o.cosine for o in outputs), default=1.0)
        opset = _opset_of(tmp / ONNX_NAME)
        meta = getattr(model.config, "edgefuse", None) or {}
        manifest = new_manifest(
            task=cfg.task, model_type=model.config.model_type, exporter=exporter, fold_scales=fold,
            fused_mlps=fused, fusion=meta, export_config=cfg.model_dump(mode="json"),
            moe_routing=routing.to_manifest(),
        )
        checks = {
            "reference": "pytorch", "atol": cfg.atol, "rtol": cfg.rtol, "max_abs_diff": max_diff, "min_cosine": min_cos,
            "cases": [{"label": c.label, "outputs": [vars(o) for o in c.outputs]} for c in cases],
            "greedy": None if greedy is None else vars(greedy),
        }
        entry = add_graph(manifest, tmp, ONNX_NAME, kind="fp32", checks=checks,
                          settings={"opset": opset, "with_past": cfg.task == "causal-lm" and cfg.with_past})
        ort = None
        if cfg.ort:
            from edgefuse.export.ort_format import convert_to_ort

            conv = convert_to_ort(tmp / ONNX_NAME, optimization_style=cfg.ort_optimization, seed=cfg.seed)
            ort = {"ort": Path(conv.ort_path).name, "operators_config": Path(conv.operators_config).name,
                   "optimization_style": conv.optimization_style, "size_bytes": conv.size_bytes,
                   "max_abs_diff_vs_onnx": conv.max_abs_diff, "min_cosine_vs_onnx": conv.min_cosine}
            manifest["ort_format"] = ort
        write_manifest(tmp, manifest)
    logger.info("exported %s to %s with %s (max|diff| %.2g)", model.config.model_type, out_dir, exporter, max_diff)
    return ExportResult(
        out_dir=out_dir, onnx_path=out_dir / ONNX_NAME, task=cfg.task, model_type=model.config.model_type,
        exporter=exporter, opset=opset, fold_scales=fold, fused_mlps=fused, graph_size_bytes=entry["size_bytes"],
        sha256=entry["sha256"], atol=cfg.atol, rtol=cfg.rtol, max_abs_diff=max_diff, min_cosine=min_cos,
        cases=tuple(cases), greedy=greedy, export_seconds=export_s, validate_seconds=validate_s,
        moe_routing=routing.to_manifest(), ort=ort,
    )
