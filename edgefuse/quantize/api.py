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

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgefuse.config.quantize import QuantizeConfig
from edgefuse.errors import ConfigError, OutputExistsError, QuantizationError, TargetNotFoundError
from edgefuse.export.results import QuantizeResult
from edgefuse.io_utils import (
    MARKER,
    atomic_dir,
    clean_stale_partials,
    is_marked,
    publish_file,
    refuse_dot_outputs,
    refuse_symlink,
    write_marker,
)
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
        return f"model_int4_b{cfg.block_size}.onnx"
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


@contextlib.contextmanager
def _output_folder(folder: Path, out_dir: Path | None, overwrite: bool) -> Iterator[tuple[Path, Path]]:
    """(folder to build in, folder the result ends up in).

    In place: both are the export folder. A new ``out_dir`` is built whole in a temporary sibling (config,
    tokenizer, graph, manifest) and appears only when complete; an existing one must be an edgefuse output.
    """
    if out_dir is None or Path(out_dir).resolve() == folder.resolve():
        yield folder, folder
        return
    out = Path(out_dir)
    refuse_dot_outputs(out)
    refuse_symlink(out, "--out-dir")
    if out.exists():
        if not is_marked(out):
            raise OutputExistsError(
                f"--out-dir {str(out)!r} exists and edgefuse did not write it (no {MARKER} file); give a new folder"
            )
        yield out, out
        return
    with atomic_dir(out, inputs=[folder]) as tmp:
        for f in folder.iterdir():
            if f.is_file() and not f.is_symlink() and f.suffix != ".onnx" and f.name != MANIFEST_NAME \
                    and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        yield tmp, out


@contextlib.contextmanager
def _quantizer_workspace(work: Path, src_path: Path, out_name: str) -> Iterator[tuple[Path, Path]]:
    """A private folder (mkdtemp, 0700) in ``work`` with a link to the source graph and the output's temp path.

    onnxruntime writes helper files beside its *input* (``<name>-inferred.onnx`` during calibration): giving it a
    link inside our own folder keeps the export folder untouched (it may be read-only) and no planted file or
    symlink there is ever written through.
    """
    clean_stale_partials(work / src_path.name)  # the workspace of a killed run
    private = Path(tempfile.mkdtemp(prefix=f".{src_path.name}.", suffix=".partial", dir=work))
    try:
        write_marker(private, kind="quantize-workspace")
        for f in src_path.parent.glob(f"{src_path.name}*"):  # the graph and any external-data files
            if f.is_file():
                (private / f.name).symlink_to(f.resolve())
        (private / "out").mkdir()
        yield private / src_path.name, private / "out" / out_name
    finally:
        shutil.rmtree(private, ignore_errors=True)


def _run(mode: str, src: Path, dst: Path, cfg: QuantizeConfig, preset: Any, exclude: list[str], feeds: list) -> dict:
    from edgefuse.quantize import backends as qb

    if mode == "dynamic":
        return qb.quantize_dynamic_int8(src, dst, cfg, preset, exclude)
    if mode == "static":
        return qb.quantize_static_qdq(src, dst, cfg, preset, exclude, feeds)
    return qb.quantize_int4(src, dst, cfg, exclude)


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
    from edgefuse.ort import build_feed, load_graph, make_session
    from edgefuse.quantize import evaluate as qe
    from edgefuse.quantize.presets import resolve_preset

    start = time.perf_counter()
    folder, src_name, manifest = _locate(Path(src))
    src_path = folder / src_name
    preset = resolve_preset(cfg.preset)
    name = default_output_name(cfg, preset.name)
    out = folder if out_dir is None else Path(out_dir)
    final = out / name
    refuse_symlink(final)
    if final.exists() and not cfg.overwrite:  # before any work: fail fast
        raise OutputExistsError(f"{str(final)!r} already exists; pass --overwrite to replace it")
    if cfg.calibration_data is not None and not Path(cfg.calibration_data).is_file():
        raise TargetNotFoundError(f"calibration data {str(cfg.calibration_data)!r} does not exist")
    if cfg.eval_data is not None and not Path(cfg.eval_data).is_file():
        raise TargetNotFoundError(f"eval data {str(cfg.eval_data)!r} does not exist")
    if manifest is not None:
        from edgefuse.manifest import verify_graph

        verify_graph(folder, src_name, manifest)
    fp32 = load_graph(src_path)
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

    settings: dict[str, Any] = {}
    with _output_folder(folder, out_dir, cfg.overwrite) as (work, out), \
            _quantizer_workspace(work, src_path, name) as (src_link, tmp):

        def attempt(excl: list[str]) -> float:
            settings.update(_run(cfg.mode, src_link, tmp, cfg, preset, excl, feeds))
            return qe.compare(make_session(tmp), task, batches, refs)[0]

        cos_first = attempt(exclude)
        kept: list[str] = []
        steps: list[dict[str, Any]] = []
        if cfg.auto_target_cosine is not None and not passes_min(cos_first, cfg.auto_target_cosine):
            from edgefuse.quantize.auto import auto_keep, rank_matmuls

            ranked = rank_matmuls(src_link, feeds[0], candidates, mode=cfg.mode, per_channel=cfg.per_channel,
                                  reduce_range=bool(settings.get("reduce_range", False)), block_size=cfg.block_size)
            kept, steps = auto_keep(ranked, exclude, cfg.auto_target_cosine, cfg.auto_max_kept, attempt, cos_first)
        qmodel = load_graph(tmp)
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
        for f in sorted(tmp.parent.iterdir(), key=lambda p: p == tmp):  # external data first, the graph last
            publish_file(f, work / f.name, overwrite=cfg.overwrite)
        settings.update({"mode": cfg.mode, "preset": preset.to_dict(), "excluded": exclude, "kept_fp32_auto": kept,
                         "source": src_name})
        checks = {"reference": src_name, "cosine_mean": cos_mean, "cosine_min": cos_min, "max_abs_diff": max_diff,
                  "samples": samples, "quantized_matmuls": n_quant, "weight_matmuls": len(candidates) + len(exclude),
                  "op_counts": counts, "accuracy_fp32": acc_fp32, "accuracy": acc, "auto_steps": steps}
        if manifest is not None or out != folder:
            if out == folder and manifest is not None:
                target_manifest = manifest
            elif (work / MANIFEST_NAME).is_file():  # an earlier quantize into the same --out-dir
                target_manifest = read_manifest(work)
            else:
                target_manifest = {**(manifest or {}), "graphs": {}, "source_folder": str(folder)}
            add_graph(target_manifest, work, name, kind=f"{cfg.mode}", settings=settings, checks=checks)
            write_manifest(work, target_manifest)
    final = out / name
    logger.info("%s: %d MatMuls quantized, cosine %.5f (min %.5f)", name, n_quant, cos_mean, cos_min)
    return QuantizeResult(
        src_path=src_path, onnx_path=final, mode=cfg.mode, preset=preset.name, settings=settings, op_counts=counts,
        quantized_nodes=n_quant, kept_fp32=tuple(exclude + kept), size_bytes_fp32=src_path.stat().st_size,
        size_bytes=final.stat().st_size, cosine_mean=cos_mean, cosine_min=cos_min, max_abs_diff=max_diff,
        samples=samples, accuracy_fp32=acc_fp32, accuracy=acc, auto_steps=tuple(steps),
        seconds=time.perf_counter() - start,
    )
