"""``optimize_onnx``: an exported fp32 graph -> the graph with the chosen onnxruntime transformer fusions.

File in, file out, like the quantizer: the optimized graph is written beside its source (or into ``out_dir``,
with the config and tokenizer files copied), compared with the fp32 graph (:mod:`edgefuse.optimize.check`),
counted (fused operators per type) and recorded in the folder's ``manifest.json`` as kind ``optimized``.

Example:
    >>> from edgefuse.config.optimize import OptimizeConfig
    >>> res = optimize_onnx("exported/", OptimizeConfig(disable=["skip_layer_norm"]))  # doctest: +SKIP
    >>> res.fused_ops["Attention"]  # doctest: +SKIP
    6
"""

from __future__ import annotations

import contextlib
import io
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgefuse.config.optimize import OptimizeConfig
from edgefuse.errors import ExportValidationError, OutputExistsError
from edgefuse.io_utils import publish_file, refuse_symlink

# one implementation of "write beside the source, or into out_dir with its config and tokenizer files"
from edgefuse.manifest import derived_folder, locate_graph, record_derived
from edgefuse.metrics import passes_min
from edgefuse.optimize.results import OptimizeResult

logger = logging.getLogger(__name__)

DEFAULT_NAME = "model_opt.onnx"


def run_optimizer(src: Path, dst: Path, *, ort_type: str, heads: int, hidden: int, fusions: tuple[str, ...],
                  opt_level: int, rewrite: Callable[[Any], None] | None = None) -> dict[str, int]:
    """onnxruntime's ``optimize_model`` with exactly ``fusions``, then ``rewrite`` (edgefuse's own passes) on the
    in-memory graph; saves to ``dst``; returns onnxruntime's fused-op counts."""
    from onnxruntime.transformers.optimizer import optimize_model

    from edgefuse.optimize.fusions import fusion_options

    # the fusion modules log every pattern they did not match, under top-level logger names (fusion_attention...)
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            model = optimize_model(str(src), model_type=ort_type, num_heads=heads, hidden_size=hidden,
                                   optimization_options=fusion_options(ort_type, fusions), opt_level=opt_level)
            stats = model.get_fused_operator_statistics()
            if rewrite is not None:
                rewrite(model.model)
            model.save_model_to_file(str(dst), use_external_data_format=False)
    finally:
        logging.disable(logging.NOTSET)
    return {k: int(v) for k, v in stats.items() if v}


def _config_json(folder: Path) -> dict[str, Any]:
    import json

    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def optimize_onnx(
    src: Path, cfg: OptimizeConfig, out_dir: Path | None = None, *, tokenizer: Any = None
) -> OptimizeResult:
    """Apply the configured fusions to an exported graph, check it against fp32, record it in the manifest.

    Args:
        src: an export folder (its ``model.onnx`` is optimized) or a graph file listed in a folder's manifest.
        cfg: which fusions, the optimizer class, the tolerances and shapes of the comparison.
        out_dir: where to write (default: beside the source graph).
        tokenizer: for a real-text comparison case (default: the folder's own tokenizer, if any).

    Raises:
        TargetNotFoundError: the source is not an exported graph.
        UnsupportedArchitectureError: ``model_type`` auto for an architecture the fusions do not cover.
        OutputExistsError: the output exists and ``cfg.overwrite`` is False.
        ExportValidationError: the optimized graph disagrees with fp32 beyond atol/rtol or ``min_cosine``.
    """

    from edgefuse.optimize.check import compare_graphs
    from edgefuse.optimize.fusions import heads_and_hidden, ort_model_type
    from edgefuse.ort import load_graph, make_session
    from edgefuse.quantize import evaluate as qe

    start = time.perf_counter()
    folder, src_name, manifest = locate_graph(Path(src))  # an optimized graph is always recorded in a manifest
    src_path = folder / src_name
    out = folder if out_dir is None else Path(out_dir)
    name = cfg.output_name or DEFAULT_NAME
    final = out / name
    refuse_symlink(final)
    if final.exists() and not cfg.overwrite:  # before any work: fail fast
        raise OutputExistsError(f"{str(final)!r} already exists; pass --overwrite to replace it")
    model_type = str(manifest.get("model_type", "?"))
    ort_type = ort_model_type(model_type, cfg.model_type)
    heads, hidden = heads_and_hidden(folder)
    fusions = cfg.enabled()
    task = manifest.get("task", "feature-extraction")
    with derived_folder(folder, out_dir, cfg.overwrite) as (work, _final_dir):
        # a private folder (mkdtemp, O_EXCL) in the folder it is built in: no planted file is written through
        private = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=work))
        try:
            tmp = private / name
            passes: list[Any] = []  # the GroupQueryAttention pass's result, when it ran

            def own_passes(model: Any) -> None:
                # after onnxruntime's fusions: its symbolic shape inference (which its norm fusions need) does
                # not know the fused node's optional inputs
                from edgefuse.optimize.gqa import fuse_group_query_attention

                passes.append(fuse_group_query_attention(model, _config_json(folder)))
                if not passes[-1].layers:
                    logger.info("group_query_attention not applied: %s", passes[-1].reason)

            fused = run_optimizer(src_path, tmp, ort_type=ort_type, heads=heads, hidden=hidden, fusions=fusions,
                                  opt_level=cfg.opt_level,
                                  rewrite=own_passes if "group_query_attention" in fusions else None)
            gqa = passes[0] if passes else None
            cases = compare_graphs(
                make_session(src_path), make_session(tmp), task=task, vocab=qe.folder_vocab(folder),
                shapes=list(cfg.validate_shapes), atol=cfg.atol, rtol=cfg.rtol, seed=cfg.seed,
                tokenizer=tokenizer if tokenizer is not None else qe.folder_tokenizer(folder),
                own_cache=gqa is not None and gqa.layers > 0)
            outputs = [o for c in cases for o in c.outputs]
            max_diff = max((o.max_abs_diff for o in outputs), default=float("nan"))
            min_cos = min((o.cosine for o in outputs), default=float("nan"))
            bad = [f"{c.label}: {o.name} max|diff| {o.max_abs_diff:.3g} cos {o.cosine:.6f}"
                   for c in cases for o in c.outputs if not o.passed]
            if (not outputs or bad or any(o.cosine != o.cosine for o in outputs)
                    or not passes_min(min_cos, cfg.min_cosine)):
                shown = "; ".join(bad[:4]) or f"min cosine {min_cos:.6f} below {cfg.min_cosine}"
                raise ExportValidationError(
                    f"the graph optimized with fusions {list(fusions)} disagrees with {src_name} beyond "
                    f"atol={cfg.atol:g}, rtol={cfg.rtol:g}: {shown}. Nothing was written; disable the fusion that "
                    "changes it (--disable)")
            counts = qe.op_counts(load_graph(tmp))
            if gqa is not None and gqa.layers:  # the pass replaced what onnxruntime fused (RotaryEmbedding): recount
                from edgefuse.optimize.fusions import FUSED_OPS

                fused = {op: counts[op] for op in FUSED_OPS if counts.get(op)}
            counts_fp32 = qe.op_counts(load_graph(src_path))
            publish_file(tmp, work / name, overwrite=cfg.overwrite)
        finally:
            shutil.rmtree(private, ignore_errors=True)
        from onnxruntime import __version__ as ort_version

        settings = {"source": src_name, "fusions": list(fusions), "ort_model_type": ort_type, "num_heads": heads,
                    "hidden_size": hidden, "opt_level": cfg.opt_level, "optimizer": f"onnxruntime {ort_version}"}
        if gqa is not None:
            # the KV-cache convention changes with it: keys rotated at absolute positions (docs/optimize.md)
            settings["group_query_attention"] = {"layers": gqa.layers, "packed_qkv": gqa.packed_qkv,
                                                 "not_applied": gqa.reason}
        checks = {"reference": src_name, "atol": cfg.atol, "rtol": cfg.rtol, "max_abs_diff": max_diff,
                  "min_cosine": min_cos, "fused_ops": fused, "op_counts": counts,
                  "cases": [{"label": c.label, "outputs": [vars(o) for o in c.outputs]} for c in cases]}
        entry = record_derived(manifest, folder, out, work, name, kind="optimized", settings=settings,
                               checks=checks)
    logger.info("%s: fusions %s -> %s (max|diff| %.2g)", name, list(fusions), fused, max_diff)
    return OptimizeResult(
        src_path=src_path, onnx_path=final, model_type=model_type, ort_model_type=ort_type, fusions=fusions,
        op_counts=counts, op_counts_fp32=counts_fp32, fused_ops=fused, max_abs_diff=max_diff, min_cosine=min_cos,
        cases=tuple(cases), size_bytes=entry["size_bytes"] if entry else final.stat().st_size,
        seconds=time.perf_counter() - start,
    )
