"""The verdict at the top of a run's report: what was shipped, how much smaller and faster than the unfused
model, what it cost in accuracy, and which budgets of the config's ``check`` section passed.

Every number is read from the run's stage records (the same values ``edgefuse check`` judges); nothing is
measured here.

Example:
    >>> verdict_of({}, store=None, cfg=None)["shipped"]
    'nothing exported yet'
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgefuse.pipeline.measure import ROLE_NAMES

# pipeline graph role -> the name the CLI prints in its summary table (and the report uses everywhere)


def shipped_role(records: dict[str, Any], cfg: Any) -> str | None:
    """The graph a user ships: the check's candidate when set, else the quantized graph, else the fp32 one."""
    check = getattr(cfg, "check", None)
    if check is not None:
        return "quantized" if check.candidate == "quantized" and "quantize" in records else "fp32"
    if "quantize" in records:
        return "quantized"
    return "fp32" if "export" in records else None


def verdict_of(records: dict[str, Any], store: Any, cfg: Any) -> dict[str, Any]:
    """The verdict dict (``kind: verdict``) that :func:`edgefuse.report.api.write_report` puts at the top."""
    from edgefuse.pipeline.measure import variant_rows

    role = shipped_role(records, cfg)
    if role is None:
        return {"kind": "verdict", "shipped": "nothing exported yet"}
    from edgefuse.pipeline.measure import graphs_of

    graphs = graphs_of(records, store)
    rows = {r["role"]: r for r in variant_rows(records, {k: str(v) for k, v in graphs.items()}, with_role=True)}
    me, ref = rows[role], rows.get("reference")
    out: dict[str, Any] = {"kind": "verdict", "role": role, "reference": ROLE_NAMES["reference"]}
    what = ROLE_NAMES[role]
    if role == "quantized":
        q = records["quantize"].result.get("quantize", {})
        what += f" ({q.get('mode')} {'int4' if q.get('mode') == 'int4' else 'int8'}, preset {q.get('preset')})"
    out["shipped"] = f"{what}: {Path(graphs[role]).relative_to(store.run_dir).as_posix()}"
    out["size_mib"] = me.get("size_mib")
    out["reference_size_mib"] = None if ref is None else ref.get("size_mib")
    if "profile" in records:
        prof = records["profile"].result
        out["latency_ms"] = me.get("latency_ms")
        out["reference_latency_ms"] = None if ref is None else ref.get("latency_ms")
        out["latency_ratio"] = me.get("latency_ratio") if prof.get("reference_role") == "reference" else None
        out["emulated"] = bool(prof.get("emulated"))
        out["target"] = prof.get("target")
        pcfg = cfg.profile
        threads = max(pcfg.threads) if pcfg.threads else "all cores"
        out["latency_point"] = (f"threads {threads}, batch {pcfg.batch_sizes[0]}, sequence "
                                f"{pcfg.sequence_lengths[0]}")
    if "evaluate" in records:
        ev = records["evaluate"].result
        g = ev["graphs"].get(role, {})
        out["accuracy"] = g.get("accuracy")
        out["teacher_accuracy"] = ev["pytorch"].get("teacher_accuracy")
        out["teacher_cosine"] = (g.get("vs_teacher") or {}).get("cosine_mean")
        out["evaluated_on"] = f"{ev['examples']} {ev['text']} examples ({ev['task_vector']})"
    out["quality"] = quality_rows(records)
    if getattr(cfg, "check", None) is not None:
        from edgefuse.check.budgets import judge
        from edgefuse.pipeline.measure import measure

        values, details, _, _ = measure(cfg, store.run_dir, records)
        out["budgets"] = [v.to_dict() for v in judge(cfg.check.budgets, values, details)]
    return out


def quality_rows(records: dict[str, Any]) -> list[dict[str, Any]]:
    """The held-out metric along the pipeline: teacher, fused before recovery, recovered, and each graph."""
    rows: list[dict[str, Any]] = []
    ev = records["evaluate"].result if "evaluate" in records else None
    recover = records["finetune"].result if "finetune" in records else None
    phases = (recover.get("phases") or [recover.get("finetune")]) if recover else []
    metric = (phases[-1] or {}).get("best_metric_name") if phases else None
    if "teacher" in records:
        ft = records["teacher"].result.get("finetune", {})
        rows.append({"model": "teacher (after fine-tuning)", "metric": ft.get("best_metric_name"),
                     "value": (ft.get("final_metrics") or {}).get(ft.get("best_metric_name") or "")})
    elif ev is not None and ev["pytorch"].get("teacher_accuracy") is not None:
        rows.append({"model": "teacher", "metric": "accuracy", "value": ev["pytorch"]["teacher_accuracy"]})
    if phases and metric:
        first, last = phases[0] or {}, phases[-1] or {}
        before = (first.get("initial_metrics") or {}).get(first.get("best_metric_name") or "")
        rows.append({"model": "fused, before recovery", "metric": first.get("best_metric_name"), "value": before})
        rows.append({"model": "fused, recovered", "metric": metric, "value": (last.get("final_metrics") or {})
                     .get(metric)})
    if ev is not None:
        for role, g in ev["graphs"].items():
            if g.get("accuracy") is not None:
                rows.append({"model": f"{ROLE_NAMES.get(role, role)} (ONNX)", "metric": "accuracy",
                             "value": g["accuracy"]})
    return rows
