"""``tune_folder``: build the candidates, gate them against fp32, time the survivors on the target, keep the winner.

Example:
    >>> from edgefuse.config.tune import TuneConfig
    >>> res = tune_folder("out/minilm-onnx", TuneConfig(budget_s=30))  # doctest: +SKIP
    >>> res.winner, res.session_options  # doctest: +SKIP
    ('int8-noskipfusion', {'disabled_optimizers': ['SkipLayerNormFusion']})
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgefuse.config.tune import CandidateConfig, TuneConfig
from edgefuse.errors import OutputExistsError, QuantizationError, TargetNotFoundError
from edgefuse.manifest import FP32_GRAPH, add_graph, read_manifest, write_manifest
from edgefuse.metrics import passes_min
from edgefuse.tune.report import CandidateResult, TuneResult, markdown

logger = logging.getLogger(__name__)

REPORT_JSON = "tune_report.json"
REPORT_MD = "tune_report.md"


class _Data:
    """The texts of the gate (tokenized once), the fp32 reference outputs, and the static calibration feeds."""

    def __init__(self, folder: Path, task: str, cfg: TuneConfig, texts: list[str] | None) -> None:
        from edgefuse.ort import build_feed, make_session
        from edgefuse.quantize import evaluate as qe

        tok = qe.folder_tokenizer(folder)
        vocab = qe.folder_vocab(folder)
        # the gate checks texts that static calibration did not see, where the data allows
        fit, check, _ = qe.fit_and_check_texts(cfg.calibration_samples, cfg.calibration_data, texts)
        self.task = task
        self.batches = qe.token_batches(check, tok, task=task, max_length=cfg.max_sequence_length, vocab=vocab)
        ref = make_session(folder / FP32_GRAPH)
        self.refs = qe.reference_vectors(ref, task, self.batches)
        calib = qe.token_batches(fit, tok, task=task, max_length=cfg.max_sequence_length, vocab=vocab, uniform=True)
        self.feeds = [build_feed(ref, ids, mask) for ids, mask in calib]
        self.eval_batches: list[Any] = []
        self.labels: list[int] = []
        self.accuracy_fp32 = None
        if cfg.eval_data is not None:
            if task != "sequence-classification":
                from edgefuse.errors import ConfigError

                raise ConfigError(f"eval_data needs a sequence-classification export; this folder is {task!r}")
            eval_texts, self.labels = qe.read_labelled(cfg.eval_data, cfg.eval_samples)
            self.eval_batches = qe.token_batches(eval_texts, tok, task=task, max_length=cfg.max_sequence_length,
                                                 vocab=vocab)
            self.accuracy_fp32 = qe.accuracy(ref, self.eval_batches, self.labels)

    def gate(self, graph: Path, options: dict[str, Any], cfg: TuneConfig) -> tuple[float, float, float | None, str]:
        """(mean cosine, min cosine, accuracy, reason it fails or '') of ``graph`` with its session options."""
        from edgefuse.ort import make_session
        from edgefuse.quantize import evaluate as qe

        session = make_session(graph, threads=1, options=options)
        cos_mean, cos_min, _, _ = qe.compare(session, self.task, self.batches, self.refs)
        acc = qe.accuracy(session, self.eval_batches, self.labels) if self.eval_batches else None
        if not passes_min(cos_mean, cfg.min_cosine):
            return cos_mean, cos_min, acc, f"cosine {cos_mean:.5f} < {cfg.min_cosine} against fp32"
        if cfg.max_accuracy_drop is not None:
            drop = None if acc is None or self.accuracy_fp32 is None else self.accuracy_fp32 - acc
            if drop is None or drop != drop or drop > cfg.max_accuracy_drop:
                return cos_mean, cos_min, acc, f"accuracy drop {drop} > {cfg.max_accuracy_drop}"
        return cos_mean, cos_min, acc, ""


def _same_as_reference(cand: CandidateConfig) -> bool:
    return cand.quantize == "fp32" and cand.fusions == "none" and not cand.session.to_options()


def tune_folder(folder: Path, cfg: TuneConfig, *, calibration_texts: list[str] | None = None) -> TuneResult:
    """Tune an export folder: the winner goes to ``folder/cfg.output_name`` with its session options recorded.

    Args:
        folder: a folder written by ``edgefuse export`` (its ``model.onnx`` is the fp32 reference).
        cfg: the candidates, the gate, the timing point and budget, the target.
        calibration_texts: texts to take the static calibration and gate texts from, as from
            ``cfg.calibration_data`` (:func:`edgefuse.quantize.evaluate.fit_and_check_texts`).

    Raises:
        TargetNotFoundError: not an export folder.
        OutputExistsError: an earlier tuned graph or report exists and ``cfg.overwrite`` is False.
        QuantizationError: no candidate passed the gate (nothing is written).
        ProfileError: timing on the target failed.
    """
    from edgefuse.optimize.fusions import heads_and_hidden, ort_model_type_or_none

    start = time.perf_counter()
    folder = Path(folder)
    manifest = read_manifest(folder)
    if FP32_GRAPH not in manifest.get("graphs", {}):
        raise TargetNotFoundError(f"{str(folder)!r} has no fp32 {FP32_GRAPH} in its manifest; re-export it")
    outputs = [folder / cfg.output_name, folder / REPORT_JSON, folder / REPORT_MD]
    existing = [p.name for p in outputs if p.exists()]
    if existing and not cfg.overwrite:
        raise OutputExistsError(f"{', '.join(existing)} already exist in {str(folder)!r}; pass --overwrite to re-tune")
    task = manifest.get("task", "feature-extraction")
    ort_type = ort_model_type_or_none(str(manifest.get("model_type", "?")))
    from edgefuse.tune.candidates import build, default_candidates

    candidates = list(cfg.candidates) if cfg.candidates is not None else default_candidates(ort_type, task)
    heads, hidden = heads_and_hidden(folder)
    data = _Data(folder, task, cfg, calibration_texts)
    work = folder / f".tune-{os.getpid()}.partial"
    work.mkdir()
    try:
        rows, graphs = _build_and_gate(candidates, folder, work, cfg, data, ort_type, heads, hidden, build)
        timed = [n for n, r in rows.items() if r.passed]
        if not timed:
            reasons = "; ".join(f"{r.name}: {r.reason}" for r in rows.values())
            raise QuantizationError(f"no candidate passed the gate (min_cosine {cfg.min_cosine}): {reasons}; lower "
                                    "min_cosine only if that loss is acceptable, or add fp32 candidates")
        profile = _time(folder, cfg, task, [c for c in candidates if c.name in timed], graphs, work)
        rows = _merge_timing(rows, timed, profile, cfg)
        winner, why = _choose(rows, cfg)
        return _write(folder, manifest, cfg, rows, winner, why, graphs, profile, data, start)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # this call's own work folder


def _build_and_gate(
    candidates: list[CandidateConfig], folder: Path, work: Path, cfg: TuneConfig, data: _Data, ort_type: str | None,
    heads: int, hidden: int, build: Any,
) -> tuple[dict[str, CandidateResult], dict[str, Path]]:
    rows: dict[str, CandidateResult] = {}
    graphs: dict[str, Path] = {}
    optimized: dict[tuple[str, ...], Path] = {}
    for cand in candidates:
        t0 = time.perf_counter()
        spec = cand.model_dump(mode="json")
        try:
            graph, settings = build(cand, folder / FP32_GRAPH, work, ort_type=ort_type, heads=heads, hidden=hidden,
                                    feeds=data.feeds, optimized=optimized)
            cos, cos_min, acc, reason = data.gate(graph, cand.session.to_options(), cfg)
        except Exception as exc:  # a candidate that cannot be built or run is rejected, with the reason shown
            logger.debug("candidate %s failed", cand.name, exc_info=True)
            first = (str(exc).splitlines() or [""])[0][:200]
            rows[cand.name] = CandidateResult(cand.name, spec, "rejected", f"failed: {type(exc).__name__}: {first}",
                                              build_seconds=time.perf_counter() - t0)
            continue
        graphs[cand.name] = graph
        rows[cand.name] = CandidateResult(
            cand.name, spec, "rejected" if reason else "passed", reason, cosine_mean=cos, cosine_min=cos_min,
            accuracy=acc, size_bytes=graph.stat().st_size, settings=settings, build_seconds=time.perf_counter() - t0)
        logger.info("candidate %s: cosine %.5f %s", cand.name, cos, reason or "passed")
    return rows, graphs


def _time(folder: Path, cfg: TuneConfig, task: str, timed: list[CandidateConfig], graphs: dict[str, Path],
          work: Path) -> Any:
    """One interleaved profile: the fp32 graph first (the reference of ratios and of the target's parity)."""
    from edgefuse.config.profile import ProfileConfig
    from edgefuse.profile.api import profile_onnx

    settings: dict[str, Any] = {
        **cfg.profile_settings, "target": cfg.target, "threads": [cfg.threads], "batch_sizes": [cfg.batch_size],
        "sequence_lengths": [cfg.sequence_length], "runs": 1_000_000, "time_budget_s": cfg.budget_s,
        "min_runs": cfg.min_rounds, "warmup_runs": cfg.warmup_runs, "clock": cfg.clock, "memory": False,
        "op_profile": False, "check_outputs": cfg.target != "local", "min_cosine": None, "seed": cfg.seed,
    }
    if task == "causal-lm":
        from edgefuse.profile.graphs import write_prefill_inputs

        npz = work / "prefill_inputs.npz"
        if write_prefill_inputs(folder / FP32_GRAPH, cfg.batch_size, cfg.sequence_length, cfg.seed, npz):
            settings["inputs_npz"] = npz
    # every graph gets a distinct file name, so the profile's labels are the candidate names
    paths, options = [work / "reference" / "fp32-reference.onnx"], [None]
    paths[0].parent.mkdir()
    _link_or_copy(folder / FP32_GRAPH, paths[0])
    for cand in timed:
        path = work / "timed" / cand.name / f"{cand.name}.onnx"
        path.parent.mkdir(parents=True)
        _link_or_copy(graphs[cand.name], path)
        paths.append(path)
        options.append(cand.session.to_options() or None)
    logger.info("timing %d candidates + the fp32 reference for %.0f s on %s", len(timed), cfg.budget_s, cfg.target)
    return profile_onnx(paths, ProfileConfig.model_validate(settings), session_options=options)


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link (no copy of a large graph) where the file system allows it, else a copy."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _merge_timing(rows: dict[str, CandidateResult], timed: list[str], profile: Any, cfg: TuneConfig,
                  ) -> dict[str, CandidateResult]:
    import dataclasses

    for name, g in zip(timed, profile.graphs[1:], strict=True):
        p = g.latency[0]
        ratios = np.asarray(p.samples_ms) / np.asarray(profile.graphs[0].latency[0].samples_ms)
        # the gate was judged on real text here; a remote device must also agree with this machine's run of the
        # same graph (its kernels differ), on the profile's random inputs, at least as closely as the gate demands
        agree = None if g.parity is None else g.parity.min_cosine_vs_same_graph_here
        row = dataclasses.replace(
            rows[name], latency_ms_p50=p.latency_ms_p50, wall_ms_p50=p.wall_ms_p50, cpu_ms_p50=p.cpu_ms_p50,
            ratio_p50=p.ratio_vs_reference_p50, ratio_p10=float(np.percentile(ratios, 10)),
            ratio_p90=float(np.percentile(ratios, 90)), target_cosine=agree)
        if cfg.target != "local" and not passes_min(agree, cfg.min_cosine):
            row = dataclasses.replace(row, status="rejected", reason=f"outputs on {cfg.target} agree with this "
                                      f"machine's run of the same graph to cosine {agree} < {cfg.min_cosine}")
        rows[name] = row
    return rows


def _choose(rows: dict[str, CandidateResult], cfg: TuneConfig) -> tuple[str, str]:
    """The passing candidate with the lowest per-round ratio to fp32 on the ranking clock, and why."""
    passing = sorted((r for r in rows.values() if r.passed and r.ratio_p50 is not None), key=lambda r: r.ratio_p50)
    if not passing:
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in rows.values())
        raise QuantizationError(f"no candidate passed the gate on the target: {reasons}")
    best = passing[0]
    clock = "CPU time" if cfg.clock == "cpu" else "wall clock"
    where = "" if cfg.target == "local" else f", and the same outputs on {cfg.target}"
    why = (f"Fastest of {len(passing)} candidates that passed the gate (cosine >= {cfg.min_cosine} against fp32 on "
           f"real text{where}): {best.ratio_p50:.3f}x the fp32 graph's {clock} per interleaved round")
    if len(passing) > 1:
        second = passing[1]
        overlap = second.ratio_p10 is not None and best.ratio_p90 is not None and second.ratio_p10 <= best.ratio_p90
        why += (f", against {second.ratio_p50:.3f}x for the runner-up {second.name}"
                + (" (their p10-p90 ranges overlap: a close call)" if overlap else ""))
    rejected = [r.name for r in rows.values() if not r.passed]
    if rejected:
        why += f"; rejected: {', '.join(rejected)}"
    return best.name, why + "."


def _write(folder: Path, manifest: dict[str, Any], cfg: TuneConfig, rows: dict[str, CandidateResult], winner: str,
           why: str, graphs: dict[str, Path], profile: Any, data: _Data, start: float) -> TuneResult:
    import dataclasses

    from edgefuse.io_utils import write_json_atomic, write_text_atomic

    rows = {n: (dataclasses.replace(r, status="winner") if n == winner else r) for n, r in rows.items()}
    best = rows[winner]
    cand = CandidateConfig.model_validate(best.spec)
    options = cand.session.to_options()
    graph_name = FP32_GRAPH if graphs[winner] == folder / FP32_GRAPH else cfg.output_name
    if graph_name != FP32_GRAPH:
        tmp = folder / f".{cfg.output_name}.partial.onnx"
        shutil.copy2(graphs[winner], tmp)
        os.replace(tmp, folder / cfg.output_name)
        add_graph(manifest, folder, cfg.output_name, kind="tuned",
                  settings={"candidate": best.spec, **best.settings, "source": FP32_GRAPH},
                  checks={"reference": FP32_GRAPH, "cosine_mean": best.cosine_mean, "cosine_min": best.cosine_min,
                          "target_cosine": best.target_cosine, "accuracy": best.accuracy,
                          "accuracy_fp32": data.accuracy_fp32, "ratio_vs_fp32_p50": best.ratio_p50})
    elif (folder / cfg.output_name).exists() and manifest.get("graphs", {}).get(cfg.output_name, {}).get("kind") \
            == "tuned":
        (folder / cfg.output_name).unlink()  # an earlier tuned graph edgefuse wrote, replaced by fp32
        manifest["graphs"].pop(cfg.output_name, None)
    point = profile.graphs[0].latency[0]
    env = dataclasses.asdict(profile.environment)
    result = TuneResult(
        folder=folder, winner=winner, graph=graph_name, session_options=options, why=why,
        candidates=tuple(rows.values()), clock=cfg.clock, cpu_clock=point.cpu_clock, threads=cfg.threads,
        batch_size=cfg.batch_size, sequence_length=cfg.sequence_length, rounds=point.timed_runs, target=cfg.target,
        environment=env, accuracy_fp32=data.accuracy_fp32, seconds=time.perf_counter() - start)
    manifest["tuned"] = {
        "graph": graph_name, "candidate": winner, "session_options": options, "target": cfg.target,
        "cpu_model": env.get("cpu_model"), "onnxruntime_version": env.get("onnxruntime_version"),
        "clock": cfg.clock, "threads": cfg.threads, "batch_size": cfg.batch_size,
        "sequence_length": cfg.sequence_length, "ratio_vs_fp32_p50": best.ratio_p50, "report": REPORT_JSON,
    }
    write_json_atomic(folder / REPORT_JSON, result.to_dict())
    write_text_atomic(folder / REPORT_MD, markdown(result))
    write_manifest(folder, manifest)
    return result
