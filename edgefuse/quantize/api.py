"""``quantize_onnx``: an exported fp32 graph -> a checked int8 (dynamic or static QDQ) or int4 graph.

Names say what differs in the bytes, not which CPU asked for them: dynamic int8 graphs have the same types
for every preset (u8 activations, s8 weights), so they are ``int8``; static graphs differ by activation type
(``qdq-int8-au8`` / ``qdq-int8-as8``); ``-per-tensor`` and ``-reduce-range`` mark the other settings (the
avx2 and avx512 presets turn reduce_range on, so their int8 graphs are ``int8-reduce-range``); int4 is
``int4-b<block>``, ``int4-<algorithm>-b<block>`` for another onnxruntime algorithm, with ``-int8-fallback``
when the auto mode's MatMuls became int8. Written into another folder (the CLI's default ``<EXPORT_DIR>-<variant>``, the
pipeline's ``quantize/quantized``) the graph is ``model.onnx``, so ``ORTModelFor*.from_pretrained(folder)``
loads what was shipped; written beside the fp32 graph it is ``model_<variant>.onnx``. The result is compared
with the fp32 graph on task data (cosine and max difference of the task output, accuracy when labels are
given) and counted (MatMulInteger / QDQ MatMuls / MatMulNBits: each mode's entry in
:data:`~edgefuse.quantize.modes.MODES`), so a quantization that did nothing, or one
below ``min_cosine``, fails with :class:`QuantizationError` (exit 8) and leaves no file. The folder's
``manifest.json`` gets the new graph's entry.

Example:
    >>> from edgefuse.config.quantize import QuantizeConfig
    >>> default_output_name(QuantizeConfig(mode="int4", block_size=64), "avx2")
    'model_int4-b64.onnx'
    >>> [variant_name(QuantizeConfig(mode="dynamic"), p) for p in ("arm64", "avx2", "avx512-vnni")]
    ['int8', 'int8-reduce-range', 'int8']
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgefuse.config.quantize import QuantizeConfig
from edgefuse.errors import ConfigError, OutputExistsError, QuantizationError, TargetNotFoundError
from edgefuse.export.results import QuantizeResult
from edgefuse.io_utils import (
    clean_stale_partials,
    publish_file,
    refuse_symlink,
    write_marker,
)
from edgefuse.manifest import FP32_GRAPH, derived_folder, locate_graph, record_derived
from edgefuse.metrics import passes_min
from edgefuse.names import match_names
from edgefuse.quantize.modes import QuantMode, get_mode

logger = logging.getLogger(__name__)



def variant_name(cfg: QuantizeConfig, preset: str) -> str:
    """What distinguishes the quantized graph's bytes: ``int8``, ``qdq-int8-as8``, ``int8-per-tensor``,
    ``int8-reduce-range``, ``int4-b32`` (the preset only where it changes a type).

    Example:
        >>> variant_name(QuantizeConfig(mode="static"), "avx2"), variant_name(QuantizeConfig(mode="dynamic"), "arm64")
        ('qdq-int8-au8-reduce-range', 'int8')
    """
    from edgefuse.quantize.presets import resolve_preset

    mode, p = get_mode(cfg.mode), resolve_preset(preset)
    name = mode.variant(cfg, p)
    if mode.int8 and not cfg.per_channel:
        name += "-per-tensor"
    if mode.int8 and (p.reduce_range if cfg.reduce_range is None else cfg.reduce_range):
        name += "-reduce-range"
    return name


def default_output_name(cfg: QuantizeConfig, preset: str, *, own_folder: bool = False) -> str:
    """The file name of a quantized graph: ``model.onnx`` in its own folder, else ``model_<variant>.onnx``."""
    if cfg.output_name:
        return cfg.output_name
    return FP32_GRAPH if own_folder else f"model_{variant_name(cfg, preset)}.onnx"


def source_task(src: str | Path) -> str:
    """The task of the fp32 graph at ``src`` (an export folder or a .onnx file): its manifest's, else read from
    the graph's outputs (the weights are not loaded).

    Example:
        >>> source_task("out/smol-onnx")  # doctest: +SKIP
        'causal-lm'
    """
    from edgefuse.ort import load_graph

    folder, name, manifest = locate_graph(Path(src), require_manifest=False)
    task = (manifest or {}).get("task")
    # load_graph: a corrupt or text file is a one-line TargetNotFoundError (exit 3), not a protobuf traceback
    return task or _infer_task(load_graph(folder / name))


def resolved_config(src: str | Path, cfg: QuantizeConfig) -> QuantizeConfig:
    """``cfg`` with the default mode ``int8`` replaced by the int8 form for the graph at ``src``
    (:func:`edgefuse.quantize.modes.resolve_mode`); unchanged for every other mode.

    Example:
        >>> resolved_config("out/smol-onnx", QuantizeConfig()).mode  # doctest: +SKIP
        'int8-blocks'
    """
    from edgefuse.quantize.modes import resolve_mode

    return resolve_mode(cfg, source_task(src)) if cfg.mode == "int8" else cfg


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


@dataclass(frozen=True)
class _Source:
    """Where the fp32 graph is, where the quantized one goes, and what the fp32 graph holds."""

    folder: Path
    name: str
    manifest: dict[str, Any] | None
    out: Path
    out_name: str
    task: str
    exclude: list[str]
    candidates: list[str]

    @property
    def path(self) -> Path:
        return self.folder / self.name

    @property
    def final(self) -> Path:
        return self.out / self.out_name


@dataclass(frozen=True)
class _Inputs:
    """The texts as token batches, the fp32 reference outputs on them, and the calibration feeds."""

    tokenizer: Any
    batches: list[Any]  # the check texts
    refs: list[Any]
    ref_session: Any
    feeds: list[dict[str, Any]]  # the calibration texts
    held_out: bool  # no check text was calibrated on


@dataclass
class _Attempts:
    """Quantize into the partial file with a given exclusion list and measure it; the auto fallback calls it
    once per MatMul it keeps in fp32. ``settings`` holds the backend's settings of the latest attempt."""

    mode: QuantMode
    source: _Source
    inputs: _Inputs
    cfg: QuantizeConfig
    preset: Any
    graph: Path  # the source graph as the quantizer sees it (a link in the private workspace)
    partial: Path  # where the quantizer writes, inside the private workspace
    settings: dict[str, Any] = field(default_factory=dict)

    def __call__(self, exclude: list[str]) -> float:
        from edgefuse.ort import make_session
        from edgefuse.quantize import evaluate as qe

        s, i = self.source, self.inputs
        kept = [n for n in exclude if n not in s.exclude]  # the auto mode's choices, not the user's
        self.settings = self.mode.backend(self.graph, self.partial, self.cfg, self.preset, exclude, i.feeds, kept)
        return qe.compare(make_session(self.partial), s.task, i.batches, i.refs)[0]


def _open_source(src: Path, cfg: QuantizeConfig, out_dir: Path | None, preset: str) -> _Source:
    """Locate the fp32 graph, refuse an existing output or a missing data file before any work, and read the
    task and the MatMuls to quantize."""
    from edgefuse.ort import load_graph
    from edgefuse.quantize import evaluate as qe

    folder, name, manifest = locate_graph(Path(src), require_manifest=False)
    out = folder if out_dir is None else Path(out_dir)
    out_name = default_output_name(cfg, preset, own_folder=out.resolve() != folder.resolve())
    refuse_symlink(out / out_name)
    if (out / out_name).exists() and not cfg.overwrite:  # before any work: fail fast
        raise OutputExistsError(f"{str(out / out_name)!r} already exists; pass --overwrite to replace it")
    for what, path in (("calibration data", cfg.calibration_data), ("eval data", cfg.eval_data)):
        if path is not None and not Path(path).is_file():
            raise TargetNotFoundError(f"{what} {str(path)!r} does not exist")
    if manifest is not None:
        from edgefuse.manifest import verify_graph

        verify_graph(folder, name, manifest)
    fp32 = load_graph(folder / name)
    task = (manifest or {}).get("task") or _infer_task(fp32)
    exclude = resolve_exclude(cfg.exclude, [n.name for n in fp32.graph.node])
    candidates = [n for n in qe.weight_matmuls(fp32) if n not in exclude]
    return _Source(folder, name, manifest, out, out_name, task, exclude, candidates)


def _prepare_inputs(source: _Source, cfg: QuantizeConfig, mode: QuantMode, texts: list[str] | None) -> _Inputs:
    """Token batches of the check texts, the fp32 outputs on them, and the feeds of the calibration texts (one
    uniform-length row per feed when the mode calibrates: ORT's histogram calibrators stack them); the two sets
    are disjoint where the data allows (:func:`edgefuse.quantize.evaluate.fit_and_check_texts`)."""
    from edgefuse.ort import build_feed, make_session
    from edgefuse.quantize import evaluate as qe

    tokenizer = qe.folder_tokenizer(source.folder)
    fit, check, held_out = qe.fit_and_check_texts(cfg.calibration_samples, cfg.calibration_data, texts)
    held_out = held_out and tokenizer is not None  # without a tokenizer both are the same seeded random ids
    vocab = qe.folder_vocab(source.folder)
    batches = qe.token_batches(check, tokenizer, task=source.task, max_length=cfg.max_sequence_length, vocab=vocab)
    ref_session = make_session(source.path)
    refs = qe.reference_vectors(ref_session, source.task, batches)
    calib = qe.token_batches(fit, tokenizer, task=source.task, max_length=cfg.max_sequence_length, vocab=vocab,
                             uniform=mode.needs_calibration)
    feeds = [build_feed(ref_session, ids, mask) for ids, mask in calib]
    return _Inputs(tokenizer, batches, refs, ref_session, feeds, held_out)


def _auto_fallback(
    attempt: _Attempts, cfg: QuantizeConfig, first_cosine: float
) -> tuple[list[str], list[dict[str, Any]]]:
    """Keep the most error-sensitive MatMuls in fp32 until ``auto_target_cosine`` is met (nothing when it is off
    or already met); return (kept, steps). With ``int4_fallback: int8`` the int4 backend quantizes the kept
    MatMuls to dynamic int8 instead (each attempt passes them to the mode's backend as ``kept``), so the target
    is measured on the graph with the fallback in place.

    The order: int4 with ``int4_8bit_rank: output`` takes the 8-bit share's own ranking (the measured effect of
    each MatMul's 4-bit error on the output, on the graph the backend quantizes, scaled where it is), so the
    fallbacks continue where the 8-bit share stopped; every other mode ranks by the simulated error of each
    MatMul's own output (:func:`edgefuse.quantize.auto.rank_matmuls`)."""
    if cfg.auto_target_cosine is None or passes_min(first_cosine, cfg.auto_target_cosine):
        return [], []
    from edgefuse.quantize.auto import auto_keep, rank_matmuls

    s, feeds = attempt.source, attempt.inputs.feeds
    eight = set(attempt.settings.get("sensitive_8bit") or ())  # already 8-bit (int4_8bit_share): not candidates
    candidates = [c for c in s.candidates if c not in eight]
    if cfg.mode == "int4" and cfg.int4_8bit_rank == "output":
        from edgefuse.quantize.modes import int4_ranking, scaled_source

        graph = scaled_source(attempt.graph, cfg, feeds)[0] if cfg.int4_scaling != "none" else attempt.graph
        allowed = set(candidates)
        ranked = [(n, score) for n, score in int4_ranking(graph, cfg, feeds) if n in allowed]
    else:
        ranked = rank_matmuls(attempt.graph, feeds[0], candidates, mode=cfg.mode, per_channel=cfg.per_channel,
                              reduce_range=bool(attempt.settings.get("reduce_range", False)),
                              block_size=cfg.block_size)
    return auto_keep(ranked, s.exclude, cfg.auto_target_cosine, cfg.auto_max_kept, attempt, first_cosine)


def _count_quantized(attempt: _Attempts, kept: list[str]) -> tuple[dict[str, int], int]:
    """(op counts, quantized MatMuls) of the partial graph.

    Raises:
        QuantizationError: no MatMul runs quantized.
    """
    from edgefuse.ort import load_graph
    from edgefuse.quantize import evaluate as qe

    source, mode = attempt.source, attempt.mode
    partial = attempt.partial
    try:
        qmodel = load_graph(partial)
    except TargetNotFoundError:
        # a graph onnxruntime wrote but that does not parse is, in practice, a write cut short by a full disk
        free = shutil.disk_usage(partial.parent).free
        if free < 2 * source.path.stat().st_size:
            from edgefuse.errors import OutputWriteError

            raise OutputWriteError(
                f"no space left while writing the quantized graph in {str(partial.parent.parent.parent)!r} "
                f"({free / 2**20:.0f} MiB free, about {2 * source.path.stat().st_size / 2**20:.0f} MiB needed); "
                "free space or use --out-dir on another disk"
            ) from None
        raise
    counts, n_quant = qe.op_counts(qmodel), mode.count_quantized(qmodel)
    if n_quant == 0:
        raise QuantizationError(
            f"{mode.name} quantization of {str(source.path)!r} quantized no MatMul ({len(source.candidates)} "
            f"candidates, {len(source.exclude) + len(kept)} excluded); check --exclude and --op-types"
        )
    return counts, n_quant


def _check_cosine(attempt: _Attempts, q_session: Any, cfg: QuantizeConfig) -> tuple[float, float, float, int]:
    """(mean cosine, min cosine, max |diff|, rows) of the quantized graph against fp32.

    Raises:
        QuantizationError: the mean cosine is below ``min_cosine`` (or not a number).
    """
    from edgefuse.quantize import evaluate as qe

    s, i = attempt.source, attempt.inputs
    cos_mean, cos_min, max_diff, samples = qe.compare(q_session, s.task, i.batches, i.refs)
    if cfg.min_cosine is not None and not passes_min(cos_mean, cfg.min_cosine):
        # u8 x s8 on AVX2/AVX-512 without VNNI sums pairs in int16 and can saturate: SmolLM2-135M's int8 went
        # from cosine -0.28 to 0.84 with reduce_range on such a host (benchmarks/results/export.md)
        preset = attempt.preset.name
        saturating = (attempt.mode.int8 and preset in ("avx2", "avx512")
                      and not attempt.settings.get("reduce_range"))
        raise QuantizationError(
            f"{s.out_name}: mean cosine {cos_mean:.5f} against fp32 is below min_cosine {cfg.min_cosine}; exclude "
            "sensitive MatMuls (--exclude or --auto-target-cosine) or use per-channel int8"
            + (f"; on this {preset} preset also try --reduce-range (int16 saturation without VNNI)"
               if saturating else "")
        )
    return cos_mean, cos_min, max_diff, samples


def _eval_accuracy(
    source: _Source, inputs: _Inputs, q_session: Any, cfg: QuantizeConfig
) -> tuple[float | None, float | None]:
    """(fp32 accuracy, quantized accuracy) on ``eval_data``; (None, None) without it.

    Raises:
        ConfigError: ``eval_data`` given for a graph that is not a classifier.
    """
    if cfg.eval_data is None:
        return None, None
    from edgefuse.quantize import evaluate as qe

    if source.task != "sequence-classification":
        raise ConfigError(f"eval_data needs a sequence-classification export; this folder is {source.task!r}")
    texts, labels = qe.read_labelled(cfg.eval_data, cfg.eval_samples)
    batches = qe.token_batches(texts, inputs.tokenizer, task=source.task, max_length=cfg.max_sequence_length,
                               vocab=qe.folder_vocab(source.folder))
    return qe.accuracy(inputs.ref_session, batches, labels), qe.accuracy(q_session, batches, labels)


def quantize_onnx(
    src: Path, cfg: QuantizeConfig | Mapping[str, Any] | None = None, out_dir: Path | None = None, *,
    calibration_texts: list[str] | None = None,
) -> QuantizeResult:
    """Quantize an exported graph, check it against fp32, and record it in the folder's manifest.

    The phases: open the source and refuse an existing output; tokenize the texts and run fp32 once;
    quantize (keeping MatMuls in fp32 one by one while the auto target is missed); count the quantized
    MatMuls; compare with fp32 (and accuracy on ``eval_data``); only then move the graph into place and
    record it. Every failure leaves no file.

    Args:
        src: an export folder (its ``model.onnx`` is quantized) or a ``.onnx`` file.
        cfg: mode, preset, exclusions, calibration and the checks: a :class:`QuantizeConfig`, a mapping of its
            keys, or None for the defaults (dynamic int8 for this CPU).
        out_dir: where to write: another folder gets ``model.onnx`` plus the config, tokenizer and a manifest
            (loadable with optimum's ``from_pretrained``); default: beside the source as ``model_<variant>.onnx``.
        calibration_texts: texts to take the calibration and check texts from, as from
            ``cfg.calibration_data`` (:func:`edgefuse.quantize.evaluate.fit_and_check_texts`).

    Raises:
        TargetNotFoundError: the source or an ``exclude`` entry matches nothing.
        OutputExistsError: the output graph exists and ``cfg.overwrite`` is False.
        QuantizationError: nothing was quantized, or the cosine is below ``min_cosine`` / the auto target.

    Example:
        >>> from edgefuse.config.quantize import QuantizeConfig
        >>> res = quantize_onnx("exported/", QuantizeConfig(mode="dynamic", preset="arm64"))  # doctest: +SKIP
        >>> res.onnx_path.name  # doctest: +SKIP
        'model_int8.onnx'
    """
    from edgefuse.config import as_config
    from edgefuse.ort import make_session
    from edgefuse.quantize.presets import resolve_preset

    cfg = as_config(QuantizeConfig, cfg)
    start = time.perf_counter()
    requested = cfg.mode
    cfg = resolved_config(src, cfg)  # the default "int8": dynamic for encoders, int8-blocks for decoders
    if requested != cfg.mode:
        logger.info("mode int8 -> %s for this graph's task", cfg.mode)
    mode = get_mode(cfg.mode)
    preset = resolve_preset(cfg.preset)
    source = _open_source(Path(src), cfg, out_dir, preset.name)
    inputs = _prepare_inputs(source, cfg, mode, calibration_texts)
    with derived_folder(source.folder, out_dir, cfg.overwrite) as (work, _final_dir), \
            _quantizer_workspace(work, source.path, source.out_name) as (graph, partial):
        attempt = _Attempts(mode, source, inputs, cfg, preset, graph=graph, partial=partial)
        kept, steps = _auto_fallback(attempt, cfg, attempt(source.exclude))
        counts, n_quant = _count_quantized(attempt, kept)
        q_session = make_session(partial)
        cos_mean, cos_min, max_diff, samples = _check_cosine(attempt, q_session, cfg)
        acc_fp32, acc = _eval_accuracy(source, inputs, q_session, cfg)
        for f in sorted(partial.parent.iterdir(), key=lambda p: p == partial):  # external data first, graph last
            publish_file(f, work / f.name, overwrite=cfg.overwrite)
        settings = {**attempt.settings, "mode": mode.name, "preset": preset.to_dict(), "excluded": source.exclude,
                    "kept_fp32_auto": kept, "source": source.name}
        checks = {"reference": source.name, "cosine_mean": cos_mean, "cosine_min": cos_min,
                  "max_abs_diff": max_diff, "samples": samples, "held_out": inputs.held_out,
                  "quantized_matmuls": n_quant,
                  "weight_matmuls": len(source.candidates) + len(source.exclude), "op_counts": counts,
                  "accuracy_fp32": acc_fp32, "accuracy": acc, "auto_steps": steps}
        record_derived(source.manifest, source.folder, source.out, work, source.out_name, kind=mode.name,
                       settings=settings, checks=checks)
    logger.info("%s: %d MatMuls quantized, cosine %.5f (min %.5f)", source.out_name, n_quant, cos_mean, cos_min)
    return QuantizeResult(
        src_path=source.path, onnx_path=source.final, mode=mode.name, preset=preset.name, settings=settings,
        op_counts=counts, quantized_nodes=n_quant, kept_fp32=tuple(source.exclude + kept),
        size_bytes_fp32=source.path.stat().st_size, size_bytes=source.final.stat().st_size, cosine_mean=cos_mean,
        cosine_min=cos_min, max_abs_diff=max_diff, samples=samples, accuracy_fp32=acc_fp32, accuracy=acc,
        auto_steps=tuple(steps), seconds=time.perf_counter() - start, held_out=inputs.held_out,
    )
