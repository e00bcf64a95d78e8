"""What a finished run measured, metric by metric: the values that ``edgefuse check`` budgets judge and the
report's verdict shows (size, size ratio, latency ratio and ms, peak memory, cosine, teacher cosine, accuracy
drop; for decoders judged by generating: BLEU drop, degenerate share, per-token decode ms and ratio), each
with where it came from. Read from the stage records only; nothing is re-run.

Example:
    >>> from edgefuse.config.pipeline import PipelineConfig
    >>> measure(PipelineConfig(schema_version=1, model="minilm"), Path("runs/x"), {})  # doctest: +SKIP
    ({}, {}, '', None)
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from edgefuse.config.pipeline import PipelineConfig
from edgefuse.errors import ConfigError
from edgefuse.pipeline.store import RunStore, StageRecord

ROLES: tuple[str, ...] = ("reference", "fp32", "optimized", "quantized", "tuned")
ROLE_STAGE = {"reference": "reference", "fp32": "export", "optimized": "optimize", "quantized": "quantize",
              "tuned": "tune"}
ROLE_NAMES = {"reference": "unfused fp32", "fp32": "final fp32", "optimized": "final optimized fp32",
              "quantized": "final quantized", "tuned": "final tuned"}


def graph_size_bytes(path: Path) -> int | None:
    """Bytes on disk of a graph and its external-data files (``model.onnx_data``, ``model.onnx.data``)."""
    path = Path(path)
    if not path.is_file():
        return None
    extra = [p for p in path.parent.glob(path.name + "*") if p != path and p.is_file()]
    return path.stat().st_size + sum(p.stat().st_size for p in extra)


def _graph(store: RunStore, records: dict[str, StageRecord], stage: str) -> Path | None:
    record = records.get(stage)
    return None if record is None else store.stage_dir(stage) / record.result["graph"]


def _latency(
    profile: dict[str, Any], cand_label: str, ref_label: str, statistic: str
) -> tuple[float | None, float | None, str]:
    """(worst ratio, worst absolute ms, detail) over the profile's latency points."""
    graphs = {g["label"]: g for g in profile["graphs"]}
    cand, ref = graphs[cand_label], graphs[ref_label]
    paired = ref_label == profile["reference_label"]
    key = f"latency_ms_{statistic}"
    ref_points = {(p["threads"], p["batch_size"], p["sequence_length"]): p for p in ref["latency"]}
    worst_ratio: tuple[float, str] | None = None
    worst_ms: tuple[float, str] | None = None
    for p in cand["latency"]:
        where = f"threads={p['threads']} batch={p['batch_size']} seq={p['sequence_length']}"
        r = ref_points.get((p["threads"], p["batch_size"], p["sequence_length"]))
        if r is not None:
            if paired and statistic in ("p50", "mean"):
                ratio = p[f"ratio_vs_reference_{statistic}"]
            else:
                ratio = p[key] / r[key] if r[key] else None
            if ratio is not None and (worst_ratio is None or ratio > worst_ratio[0]):
                worst_ratio = (ratio, where)
        if worst_ms is None or p[key] > worst_ms[0]:
            worst_ms = (p[key], where)
    emulated = " (EMULATED: not a device timing)" if profile.get("environment", {}).get("emulated") else ""
    detail = f"{statistic}, worst of {len(cand['latency'])} point(s): " + (
        worst_ratio[1] if worst_ratio else (worst_ms[1] if worst_ms else "none")) + emulated
    return (None if worst_ratio is None else float(worst_ratio[0]),
            None if worst_ms is None else float(worst_ms[0]), detail)


def judged_bleu_drop(teacher_bleu: float | None, drop: float | None) -> float | None:
    """The BLEU drop a budget may judge, or None (not measured, so the budget fails) when the teacher's BLEU is
    not a finite number above 0: a drop of 0 from a teacher that writes nothing matching is no evidence.

    Example:
        >>> judged_bleu_drop(56.9, 1.2), judged_bleu_drop(0.0, 0.0), judged_bleu_drop(float("nan"), 0.0)
        (1.2, None, None)
    """
    if teacher_bleu is None or not math.isfinite(teacher_bleu) or teacher_bleu <= 0:
        return None
    return drop


def measure(
    cfg: PipelineConfig, run_dir: Path, records: dict[str, StageRecord]
) -> tuple[dict[str, float | None], dict[str, str], str, str | None]:
    """The measured value of every metric a budget can limit, from a finished run's records.

    Returns:
        (metric -> value, metric -> where it came from, candidate graph path, reference graph path).
    """
    check = cfg.check
    if check is None:
        raise ConfigError("the config has no check section; add check.budgets (see docs/cli.md)")
    store = RunStore(run_dir)
    role = "quantized" if check.candidate == "quantized" else "fp32"
    if role == "quantized" and "tune" in records:
        role = "tuned"  # the tuned graph is what the run ships: it is the candidate
    cand = _graph(store, records, {"quantized": "quantize", "tuned": "tune", "fp32": "export"}[role])
    ref_role = "reference" if check.reference == "original-fp32" and "reference" in records else "fp32"
    ref = _graph(store, records, "reference" if ref_role == "reference" else "export")
    values: dict[str, float | None] = {}
    details: dict[str, str] = {}
    if cand is not None:
        size = graph_size_bytes(cand)
        values["size_mib"] = None if size is None else size / 2**20
        details["size_mib"] = f"{cand.name} + external data"
        if ref is not None and size is not None:
            ref_size = graph_size_bytes(ref)
            values["size_ratio"] = size / ref_size if ref_size else None
            details["size_ratio"] = f"vs {ref_role} graph {ref.name}"
    if "profile" in records:
        prof_roles = records["profile"].result["roles"]
        profile = json.loads((store.stage_dir("profile") / records["profile"].result["profile"]).read_text())
        if role in prof_roles and ref_role in prof_roles:
            stat = check.budgets.latency_statistic
            ratio, ms, where = _latency(profile, prof_roles[role]["label"], prof_roles[ref_role]["label"], stat)
            values["latency_ratio"], values["latency_ms"] = ratio, ms
            details["latency_ratio"] = f"vs {ref_role} graph, {where}"
            details["latency_ms"] = where
        if role in prof_roles:
            values["peak_rss_mib"] = prof_roles[role]["peak_rss_mib"]
            details["peak_rss_mib"] = "fresh process, includes the onnxruntime runtime itself"
    if "evaluate" in records:
        ev = records["evaluate"].result
        graph = ev["graphs"].get(role, {})
        n = f"{ev['examples']} examples ({ev['text']}), {ev['task_vector']}"
        values["cosine"] = (graph.get("vs_pytorch") or {}).get("cosine_mean")
        values["abs_diff"] = (graph.get("vs_pytorch") or {}).get("max_abs_diff")
        values["teacher_cosine"] = (graph.get("vs_teacher") or {}).get("cosine_mean")
        values["accuracy_drop"] = graph.get("accuracy_drop_vs_teacher")
        for key in ("cosine", "abs_diff"):
            details[key] = f"vs PyTorch, {n}"
        details["teacher_cosine"] = f"vs the unfused teacher, {n}"
        teacher_acc = ev["pytorch"]["teacher_accuracy"]
        details["accuracy_drop"] = f"teacher {teacher_acc} vs candidate {graph.get('accuracy')}, {n}"
        gen = ev.get("generation")
        if gen is not None:  # judged by generating (evaluate.generation_prompts)
            values["bleu_drop"] = judged_bleu_drop(gen["teacher"].get("bleu"), graph.get("bleu_drop_vs_teacher"))
            usable = values["bleu_drop"] is not None
            values["degenerate_fraction"] = graph.get("degenerate_fraction")
            values["decode_ms"] = graph.get("decode_ms_p50")
            ref_ms = ev["graphs"].get(ref_role, {}).get("decode_ms_p50")
            values["decode_ratio"] = (graph["decode_ms_p50"] / ref_ms
                                      if ref_ms and graph.get("decode_ms_p50") is not None else None)
            where = f"greedy, {gen['prompts']} held-out prompts ({gen['references']} references)"
            details["bleu_drop"] = (f"teacher BLEU {gen['teacher']['bleu']:.2f} vs candidate {graph.get('bleu')}, "
                                    f"{where}" + ("" if usable else "; the teacher's BLEU is not > 0, so no drop "
                                                  "can be judged (fails closed)"))
            details["degenerate_fraction"] = where
            details["decode_ms"] = "p50 per token, batch 1, interleaved with the other graphs"
            details["decode_ratio"] = f"vs {ref_role} graph, p50 per token, same interleaved run"
    return values, details, "" if cand is None else str(cand), None if ref is None else str(ref)


def graphs_of(records: dict[str, Any], store: Any) -> dict[str, Path]:
    """``role -> graph file`` from a run's records."""
    out = {}
    for role in ROLES:
        stage = ROLE_STAGE[role]
        if stage in records:
            out[role] = store.stage_dir(stage) / records[stage].result["graph"]
    return out


def variant_rows(records: dict[str, Any], graphs: dict[str, str], *, with_role: bool = False) -> list[dict[str, Any]]:
    """One row per graph: size, latency, ratio, memory, agreement and accuracy (what the summary table shows)."""
    names = ROLE_NAMES
    profile = records["profile"].result.get("roles", {}) if "profile" in records else {}
    evaluate = records["evaluate"].result.get("graphs", {}) if "evaluate" in records else {}
    rows = []
    for role in ROLES:
        if role not in graphs:
            continue
        prof, ev = profile.get(role, {}), evaluate.get(role, {})
        size = graph_size_bytes(Path(graphs[role]))
        rows.append({
            "variant": names[role],
            "size_mib": None if size is None else size / 2**20,
            "latency_ms": prof.get("latency_ms_p50"),
            "latency_ratio": prof.get("ratio_vs_reference_p50"),
            "peak_rss_mib": prof.get("peak_rss_mib"),
            "cosine": (ev.get("vs_teacher") or {}).get("cosine_mean"),
            "cosine_vs_pytorch": (ev.get("vs_pytorch") or {}).get("cosine_mean"),
            "accuracy": ev.get("accuracy"),
            # causal LMs judged by generating (evaluate.generation_prompts): greedy BLEU and per-token decode;
            # absent (not None) otherwise, so that reports of other models get no empty columns
            **({"bleu": ev["bleu"], "degenerate_fraction": ev.get("degenerate_fraction"),
                "decode_ms": ev.get("decode_ms_p50")} if ev.get("bleu") is not None else {}),
            **({"role": role} if with_role else {}),
        })
    return rows
