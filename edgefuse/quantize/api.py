"""``quantize_onnx``: an exported fp32 graph -> a checked int8 (dynamic or static QDQ) or int4 graph.

File in, file out (onnxruntime style). The result is written next to the fp32 graph under a conventional
name (``model_int8_<preset>.onnx``, ``model_qdq_int8_<preset>.onnx``, ``model_int4_b<block>.onnx``), compared
with the fp32 graph on task data (cosine and max difference of the task output, accuracy when labels are
given) and counted (MatMulInteger / QDQ MatMuls / MatMulNBits), so a quantization that did nothing, or one
below ``min_cosine``, fails with :class:`QuantizationError` (exit 8) and leaves no file. The folder's
``manifest.json`` gets the new graph's entry.

Example:
    >>> from edgefuse.config.quantize import QuantizeConfig
    >>> default_output_name(QuantizeConfig(mode="int4", block_size=64), "avx2")
    'model_int4_b64.onnx'
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

from edgefuse.config.quantize import QuantizeConfig
from edgefuse.errors import ConfigError, OutputExistsError, QuantizationError, TargetNotFoundError
from edgefuse.export.results import QuantizeResult
from edgefuse.manifest import MANIFEST_NAME, add_graph, read_manifest, write_manifest
from edgefuse.metrics import passes_min
from edgefuse.names import match_names

logger = logging.getLogger(__name__)

SOURCE_NAME = "model.onnx"


def default_output_name(cfg: QuantizeConfig, preset: str) -> str:
    """The conventional file name of a quantized graph (see the module docstring)."""
    if cfg.output_name:
        return cfg.output_name
    if cfg.mode == "int4":
        algo = "" if cfg.int4_algorithm == "default" else f"_{cfg.int4_algorithm}"
        fallback = "_int8" if cfg.int4_fallback == "int8" and cfg.auto_target_cosine is not None else ""
        return f"model_int4{algo}_b{cfg.block_size}{fallback}.onnx"
    prefix = "model_qdq_int8" if cfg.mode == "static" else "model_int8"
    return f"{prefix}_{preset}{'' if cfg.per_channel else '_per_tensor'}.onnx"


def _locate(src: Path) -> tuple[Path, str, dict[str, Any] | None]:
    """(folder, graph file name, manifest or None) for a folder or a .onnx file."""
    src = Path(src)
    if src.is_dir():
        manifest = read_manifest(src)
        if SOURCE_NAME not in manifest.get("graphs", {}):
            raise TargetNotFoundError(f"{str(src)!r} has no fp32 {SOURCE_NAME} in its manifest; re-export it")
        return src, SOURCE_NAME, manifest
    if src.suffix != ".onnx" or not src.is_file():
        raise TargetNotFoundError(f"{str(src)!r} is neither an export folder nor an existing .onnx file")
    manifest = read_manifest(src.parent) if (src.parent / MANIFEST_NAME).is_file() else None
    return src.parent, src.name, manifest


def _infer_task(model: Any) -> str:
    outputs = {o.name for o in model.graph.output}
    if "last_hidden_state" in outputs:
        return "feature-extraction"
    if any(o.startswith("present.") for o in outputs):
        return "causal-lm"
    return "sequence-classification"


def resolve_exclude(patterns: list[str], node_names: list[str]) -> list[str]:
    """Node names matched by ``patterns`` (exact, or ``re:`` + regular expression with ``re.search``).

    Raises:
        ConfigError: an invalid expression.
        TargetNotFoundError: an entry that matches no node (with similar names).
    """
    return match_names(patterns, node_names, what="exclude entry")


def _prepare_out(folder: Path, out_dir: Path | None, manifest: dict[str, Any] | None) -> Path:
    """The folder to write into; a separate ``out_dir`` gets the config and tokenizer files copied."""
    if out_dir is None or Path(out_dir).resolve() == folder.resolve():
        return folder
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in folder.iterdir():
        if f.is_file() and f.suffix != ".onnx" and f.name != MANIFEST_NAME and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)
    return out


def _run(
    mode: str, src: Path, dst: Path, cfg: QuantizeConfig, preset: Any, exclude: list[str], feeds: list,
    cfg_exclude: list[str] = (),  # type: ignore[assignment]
) -> dict:
    from edgefuse.quantize import backends as qb

    if mode == "dynamic":
        return qb.quantize_dynamic_int8(src, dst, cfg, preset, exclude)
    if mode == "static":
        return qb.quantize_static_qdq(src, dst, cfg, preset, exclude, feeds)
    # the auto mode's choices (beyond the user's own exclusions) fall back to int8 when asked
    int8 = [n for n in exclude if n not in cfg_exclude] if cfg.int4_fallback == "int8" else []
    return qb.quantize_int4(src, dst, cfg, exclude, feeds, preset=preset, int8_nodes=int8)


def quantize_onnx(
    src: Path, cfg: QuantizeConfig, out_dir: Path | None = None, *, calibration_texts: list[str] | None = None
) -> QuantizeResult:
    """Quantize an exported graph, check it against fp32, and record it in the folder's manifest.

    Args:
        src: an export folder (its ``model.onnx`` is quantized) or a ``.onnx`` file.
        cfg: mode, preset, exclusions, calibration and the checks.
        out_dir: where to write (default: beside the source graph).
        calibration_texts: texts to calibrate and compare on (instead of ``cfg.calibration_data``).

    Raises:
        TargetNotFoundError: the source or an ``exclude`` entry matches nothing.
        OutputExistsError: the output graph exists and ``cfg.overwrite`` is False.
        QuantizationError: nothing was quantized, or the cosine is below ``min_cosine`` / the auto target.

    Example:
        >>> from edgefuse.config.quantize import QuantizeConfig
        >>> res = quantize_onnx("exported/", QuantizeConfig(mode="dynamic", preset="arm64"))  # doctest: +SKIP
        >>> res.onnx_path.name  # doctest: +SKIP
        'model_int8_arm64.onnx'
    """
    import onnx

    from edgefuse.ort import build_feed, make_session
    from edgefuse.quantize import evaluate as qe
    from edgefuse.quantize.presets import resolve_preset

    start = time.perf_counter()
    folder, src_name, manifest = _locate(Path(src))
    src_path = folder / src_name
    preset = resolve_preset(cfg.preset)
    out = _prepare_out(folder, out_dir, manifest)
    name = default_output_name(cfg, preset.name)
    final = out / name
    if final.exists() and not cfg.overwrite:
        raise OutputExistsError(f"{str(final)!r} already exists; pass --overwrite to replace it")
    fp32 = onnx.load(str(src_path), load_external_data=False)
    task = (manifest or {}).get("task") or _infer_task(fp32)
    exclude = resolve_exclude(cfg.exclude, [n.name for n in fp32.graph.node])
    candidates = [n for n in qe.weight_matmuls(fp32) if n not in exclude]
    del fp32

    tokenizer = qe.folder_tokenizer(folder)
    texts = calibration_texts or (qe.read_texts(cfg.calibration_data, cfg.calibration_samples)
                                  if cfg.calibration_data else list(qe.BUILTIN_TEXTS))
    batches = qe.token_batches(texts, tokenizer, task=task, max_length=cfg.max_sequence_length,
                               vocab=qe.folder_vocab(folder))
    ref_session = make_session(src_path)
    refs = qe.reference_vectors(ref_session, task, batches)
    calib = batches if cfg.mode != "static" else qe.token_batches(
        texts, tokenizer, task=task, max_length=cfg.max_sequence_length, vocab=qe.folder_vocab(folder), uniform=True)
    feeds = [build_feed(ref_session, ids, mask) for ids, mask in calib]

    tmp = out / f".{name}.partial.onnx"
    settings: dict[str, Any] = {}

    def attempt(excl: list[str]) -> float:
        settings.update(_run(cfg.mode, src_path, tmp, cfg, preset, excl, feeds, exclude))
        return qe.compare(make_session(tmp), task, batches, refs)[0]

    try:
        cos_first = attempt(exclude)
        kept: list[str] = []
        steps: list[dict[str, Any]] = []
        if cfg.auto_target_cosine is not None and not passes_min(cos_first, cfg.auto_target_cosine):
            from edgefuse.quantize.auto import auto_keep, rank_matmuls

            ranked = rank_matmuls(src_path, feeds[0], candidates, mode=cfg.mode, per_channel=cfg.per_channel,
                                  reduce_range=bool(settings.get("reduce_range", False)), block_size=cfg.block_size)
            kept, steps = auto_keep(ranked, exclude, cfg.auto_target_cosine, cfg.auto_max_kept, attempt, cos_first)
        qmodel = onnx.load(str(tmp), load_external_data=False)
        counts = qe.op_counts(qmodel)
        n_quant = qe.quantized_matmuls(cfg.mode, counts, qdq_matmuls=qe.qdq_matmul_count(qmodel))
        del qmodel
        if n_quant == 0:
            raise QuantizationError(
                f"{cfg.mode} quantization of {str(src_path)!r} quantized no MatMul ({len(candidates)} candidates, "
                f"{len(exclude) + len(kept)} excluded); check --exclude and --op-types"
            )
        q_session = make_session(tmp)
        cos_mean, cos_min, max_diff, samples = qe.compare(q_session, task, batches, refs)
        if cfg.min_cosine is not None and not passes_min(cos_mean, cfg.min_cosine):
            # u8 x s8 on AVX2/AVX-512 without VNNI sums pairs in int16 and can saturate: SmolLM2-135M's int8 went
            # from cosine -0.28 to 0.84 with reduce_range on such a host (benchmarks/results/export.md)
            saturating = cfg.mode != "int4" and preset.name in ("avx2", "avx512") and not settings.get("reduce_range")
            raise QuantizationError(
                f"{name}: mean cosine {cos_mean:.5f} against fp32 is below min_cosine {cfg.min_cosine}; exclude "
                "sensitive MatMuls (--exclude or --auto-target-cosine) or use per-channel int8"
                + (f"; on this {preset.name} preset also try --reduce-range (int16 saturation without VNNI)"
                   if saturating else "")
            )
        acc_fp32 = acc = None
        if cfg.eval_data is not None:
            if task != "sequence-classification":
                raise ConfigError(f"eval_data needs a sequence-classification export; this folder is {task!r}")
            eval_texts, labels = qe.read_labelled(cfg.eval_data, cfg.eval_samples)
            eval_batches = qe.token_batches(eval_texts, tokenizer, task=task, max_length=cfg.max_sequence_length,
                                            vocab=qe.folder_vocab(folder))
            acc_fp32, acc = qe.accuracy(ref_session, eval_batches, labels), qe.accuracy(q_session, eval_batches, labels)
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)

    settings.update({"mode": cfg.mode, "preset": preset.to_dict(), "excluded": exclude, "kept_fp32_auto": kept,
                     "source": src_name})
    checks = {"reference": src_name, "cosine_mean": cos_mean, "cosine_min": cos_min, "max_abs_diff": max_diff,
              "samples": samples, "quantized_matmuls": n_quant, "weight_matmuls": len(candidates) + len(exclude),
              "op_counts": counts, "accuracy_fp32": acc_fp32, "accuracy": acc, "auto_steps": steps}
    if manifest is not None or out != folder:
        target_manifest = manifest if out == folder and manifest is not None else {
            **(manifest or {}), "graphs": {}, "source_folder": str(folder)}
        add_graph(target_manifest, out, name, kind=f"{cfg.mode}", settings=settings, checks=checks)
        write_manifest(out, target_manifest)
    logger.info("%s: %d MatMuls quantized, cosine %.5f (min %.5f)", name, n_quant, cos_mean, cos_min)
    return QuantizeResult(
        src_path=src_path, onnx_path=final, mode=cfg.mode, preset=preset.name, settings=settings, op_counts=counts,
        quantized_nodes=n_quant, kept_fp32=tuple(exclude + kept), size_bytes_fp32=src_path.stat().st_size,
        size_bytes=final.stat().st_size, cosine_mean=cos_mean, cosine_min=cos_min, max_abs_diff=max_diff,
        samples=samples, accuracy_fp32=acc_fp32, accuracy=acc, auto_steps=tuple(steps),
        seconds=time.perf_counter() - start,
    )
