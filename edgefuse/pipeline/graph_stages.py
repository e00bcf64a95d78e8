"""The ONNX stages of the pipeline: ``export``, ``optimize``, ``quantize``, ``reference``, ``evaluate``, ``profile``,
``report``.

Graphs are referred to by *role*: ``reference`` (the unfused teacher in fp32, the baseline of ratios),
``fp32`` (the final model's export), ``optimized`` (with onnxruntime's fusions) and ``quantized``. Each stage
stores the paths of what it wrote relative to its own folder (``"graph": "onnx/model.onnx"``), so a run folder
can be moved.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

from edgefuse.pipeline.context import StageContext, producer
from edgefuse.pipeline.measure import ROLE_STAGE, ROLES, graph_size_bytes, graphs_of, variant_rows  # noqa: F401

logger = logging.getLogger(__name__)

# graph folder per role; the names become the profiler's labels ("fp32/model", "reference-fp32/model")
ONNX_DIRS = {"fp32": "fp32", "reference": "reference-fp32", "optimized": "optimized", "quantized": "quantized",
             "tuned": "tuned"}
def graph_paths(ctx: StageContext) -> dict[str, Path]:
    """``role -> graph file`` for every graph this run has produced so far."""
    return graphs_of(ctx.records, ctx.store)


def run_summary(records: dict[str, Any], store: Any) -> dict[str, Any]:
    """Headline numbers of a finished run: one row per graph, the report files, fusion and recovery figures."""
    summary: dict[str, Any] = {}
    if "search" in records:
        summary["search_keep_ratio"] = records["search"].result.get("keep_ratio")
    if "fuse" in records:
        fusion = records["fuse"].result.get("fusion", {})
        summary["params_before"] = fusion.get("params_total_before")
        summary["params_after"] = fusion.get("params_total_after")
    if "finetune" in records:
        ft = records["finetune"].result.get("finetune", {})
        summary["finetune_steps"] = ft.get("steps_run")
        summary["finetune_metrics"] = ft.get("final_metrics")
    summary["graphs"] = variant_rows(records, {r: str(p) for r, p in graphs_of(records, store).items()})
    if "report" in records:
        files = records["report"].result.get("files", {})
        summary["report_files"] = {fmt: str(store.stage_dir("report") / rel) for fmt, rel in files.items()}
    return summary


def _relative(ctx: StageContext, path: Path) -> str:
    return Path(path).relative_to(ctx.out).as_posix()


def _export(ctx: StageContext, role: str, folder: str) -> dict[str, Any]:
    from edgefuse.export.api import export_onnx

    model = ctx.load_model(role)  # type: ignore[arg-type]
    result = export_onnx(model, ctx.cfg.export, ctx.out / folder, tokenizer=ctx.tokenizer())
    data = result.to_dict()
    data["out_dir"], data["onnx_path"] = folder, _relative(ctx, result.onnx_path)
    return {"graph": _relative(ctx, result.onnx_path), "export": data}


def run_export(ctx: StageContext) -> dict[str, Any]:
    """Export the final model (fused and recovered) to a validated fp32 ONNX folder."""
    return _export(ctx, "final", ONNX_DIRS["fp32"])


def run_reference(ctx: StageContext) -> dict[str, Any]:
    """Export the unfused teacher in fp32 with the same settings: the baseline of every ratio."""
    return _export(ctx, "base", ONNX_DIRS["reference"])


def run_optimize(ctx: StageContext) -> dict[str, Any]:
    """The exported folder, copied into this stage's folder, with the configured fusions applied and checked."""
    import shutil

    from edgefuse.optimize.api import optimize_onnx

    folder = ctx.out / ONNX_DIRS["optimized"]
    shutil.copytree(graph_paths(ctx)["fp32"].parent, folder)
    result = optimize_onnx(folder, ctx.cfg.optimize, tokenizer=ctx.tokenizer())
    data = result.to_dict()
    data["src_path"], data["onnx_path"] = _relative(ctx, result.src_path), _relative(ctx, result.onnx_path)
    return {"graph": data["onnx_path"], "optimize": data}


def run_quantize(ctx: StageContext) -> dict[str, Any]:
    """Quantize the fp32 graph, or the optimized one when that stage is on, into this stage's folder."""
    from edgefuse.quantize.api import quantize_onnx

    qcfg = ctx.cfg.quantize
    graphs = graph_paths(ctx)
    src = graphs.get("optimized", graphs["fp32"])
    # calibrate on the task's own text unless the quantize section names a file, and check on as many other rows
    texts = None if qcfg.calibration_data is not None else ctx.texts(2 * qcfg.calibration_samples)
    result = quantize_onnx(src, qcfg, ctx.out / ONNX_DIRS["quantized"], calibration_texts=texts)
    data = result.to_dict()
    data["src_path"] = str(src)
    data["onnx_path"] = _relative(ctx, Path(result.onnx_path))
    return {"graph": data["onnx_path"], "quantize": data}


def run_tune(ctx: StageContext) -> dict[str, Any]:
    """The exported folder, copied into this stage's folder, tuned: the winner and its session options recorded."""
    import shutil

    from edgefuse.tune.api import tune_folder

    tcfg = ctx.cfg.tune
    folder = ctx.out / ONNX_DIRS["tuned"]
    src = graph_paths(ctx)["fp32"].parent
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("model_tuned*.onnx", "tune_report.*"))
    texts = None if tcfg.calibration_data is not None else ctx.texts(2 * tcfg.calibration_samples)
    result = tune_folder(folder, tcfg, calibration_texts=texts)
    data = result.to_dict()
    data["folder"] = _relative(ctx, folder)
    return {"graph": _relative(ctx, folder / result.graph), "tune": data}


def run_evaluate(ctx: StageContext) -> dict[str, Any]:
    """Every graph against the PyTorch model it was exported from and against the teacher, on the same text;
    accuracy where the data has labels. Batches are processed one at a time (causal-LM logits are large)."""
    from edgefuse.metrics import Agreement, torch_vectors
    from edgefuse.ort import make_session, onnx_vectors

    cfg, ev = ctx.cfg, ctx.cfg.evaluate
    task = cfg.model.task
    final = ctx.load_model("final")
    same = producer(cfg, "final") == producer(cfg, "base")
    teacher = final if same else ctx.load_model("base")
    batches = ctx.eval_batches(ev.max_examples, vocab_size=int(final.config.vocab_size), batch_size=ev.batch_size)
    graphs = graph_paths(ctx)
    sessions = {role: make_session(path, threads=ev.threads) for role, path in graphs.items()}
    vs_torch = {role: Agreement() for role in graphs}
    vs_teacher = {role: Agreement() for role in graphs}
    final_vs_teacher = Agreement()
    correct = {role: 0 for role in [*graphs, "pytorch", "teacher"]}
    total = 0
    for batch in batches:
        t_final = torch_vectors(final, task, batch)
        t_teacher = t_final if same else torch_vectors(teacher, task, batch)
        final_vs_teacher.update(t_teacher, t_final)
        outputs = {"pytorch": t_final, "teacher": t_teacher}
        for role, session in sessions.items():
            vec = onnx_vectors(session, task, batch)
            vs_torch[role].update(t_teacher if role == "reference" else t_final, vec)
            vs_teacher[role].update(t_teacher, vec)
            outputs[role] = vec
        if batch.labels is not None:
            total += int(batch.labels.size)
            for role, vec in outputs.items():
                correct[role] += int((vec.argmax(axis=-1) == batch.labels).sum())
    accuracy = {role: (correct[role] / total if total else None) for role in correct}
    source = "random tokens" if cfg.data is None or ctx.tokenizer() is None else (
        "validation" if (cfg.data.validation or cfg.data.validation_fraction) else "train")
    result: dict[str, Any] = {
        "examples": sum(int(b.input_ids.shape[0]) for b in batches),
        "text": source,
        "task_vector": {"feature-extraction": "mean-pooled embedding", "sequence-classification": "logits",
                        "causal-lm": "next-token logits of every real token"}[task],
        "pytorch": {"accuracy": accuracy["pytorch"], "teacher_accuracy": accuracy["teacher"],
                    "vs_teacher": final_vs_teacher.result()},
        "graphs": {},
    }
    for role in graphs:
        result["graphs"][role] = {
            "vs_pytorch": vs_torch[role].result(),
            "vs_teacher": vs_teacher[role].result(),
            "accuracy": accuracy[role],
            "accuracy_drop_vs_teacher": None if accuracy[role] is None else accuracy["teacher"] - accuracy[role],
        }
    if ev.generation_prompts is not None:
        result["generation"] = _evaluate_generation(ctx, final, None if same else teacher, sessions)
        for role, gen in result["generation"]["graphs"].items():
            result["graphs"][role].update(gen)
    return result


def _evaluate_generation(ctx: StageContext, final: Any, teacher: Any, sessions: dict[str, Any]) -> dict[str, Any]:
    """Judge by generating: greedy decoding of the held-out prompts by the teacher, the final PyTorch model and
    every graph, scored against all references of each prompt; and each graph's per-token decode latency."""
    from edgefuse.finetune.generation import (
        decode_latency,
        evaluate_generation,
        generate_onnx,
        generate_torch,
        heldout_groups,
    )

    ev, tok = ctx.cfg.evaluate, ctx.tokenizer()
    assert ctx.cfg.data is not None and tok is not None  # the config check requires data with a prompt column
    prompts, refs = heldout_groups(ctx.cfg.data, max_prompts=ev.generation_prompts)
    kw = {"max_new_tokens": ev.generation_max_new_tokens, "batch_size": ev.batch_size}

    def torch_scores(model: Any) -> dict[str, Any]:
        s = evaluate_generation(lambda ps: generate_torch(model, tok, ps, **kw), prompts, refs)
        return {**s.metrics(), "samples": list(s.samples)}

    out: dict[str, Any] = {"prompts": len(prompts), "references": sum(len(r) for r in refs),
                           "max_new_tokens": ev.generation_max_new_tokens, "pytorch": torch_scores(final)}
    out["teacher"] = out["pytorch"] if teacher is None else torch_scores(teacher)
    latency = decode_latency(sessions, tok, prompts[0], n_tokens=ev.decode_tokens, rounds=ev.decode_rounds)
    teacher_bleu = out["teacher"]["bleu"]
    graphs: dict[str, Any] = {}
    for role, session in sessions.items():
        s = evaluate_generation(lambda ps, se=session: generate_onnx(se, tok, ps, **kw), prompts, refs)
        graphs[role] = {**{k: v for k, v in s.metrics().items() if k not in ("prompts", "references")},
                        "bleu_drop_vs_teacher": teacher_bleu - s.bleu, "samples": list(s.samples), **latency[role]}
    out["graphs"] = graphs
    return out


def run_profile(ctx: StageContext) -> dict[str, Any]:
    """Profile every graph interleaved; the first (the reference, else the fp32 graph) is the ratios' baseline."""
    from edgefuse.profile.api import profile_onnx
    from edgefuse.profile.graphs import write_prefill_inputs

    graphs = graph_paths(ctx)
    order = [r for r in ROLES if r in graphs]
    pcfg = ctx.cfg.profile
    if "reference" in graphs and pcfg.min_cosine is not None:
        # the reference is another model (unfused); output agreement with it is judged by evaluate and check,
        # not by the profiler's parity floor, which is meant for the same model on another machine
        logger.info("profile: output parity against the unfused reference is reported, not enforced")
        pcfg = pcfg.model_copy(update={"min_cosine": None})
    if pcfg.inputs_npz is None:
        # KV-cache graphs: time the prefill of a prompt with an empty cache (the profiler's random feeds assume
        # (batch, sequence) inputs only); every graph of the run has the same inputs
        npz = ctx.out / "prefill_inputs.npz"
        if write_prefill_inputs(graphs[order[0]], pcfg.batch_sizes[0], pcfg.sequence_lengths[0], pcfg.seed, npz):
            pcfg = pcfg.model_copy(update={"inputs_npz": npz})
    result = profile_onnx([graphs[r] for r in order], pcfg, trace_dir=ctx.out / "traces" if pcfg.keep_trace else None)
    from edgefuse.io_utils import write_json_atomic

    write_json_atomic(ctx.out / "profile.json", result.to_dict())
    roles: dict[str, Any] = {}
    for role, g in zip(order, result.graphs, strict=True):
        first = g.latency[0] if g.latency else None
        roles[role] = {
            "label": g.label,
            "file_size_bytes": g.file_size_bytes,
            "latency_ms_p50": None if first is None else first.latency_ms_p50,
            "ratio_vs_reference_p50": None if first is None else first.ratio_vs_reference_p50,
            "peak_rss_mib": None if g.memory is None else g.memory.peak_rss_mib,
        }
    return {"profile": "profile.json", "reference_role": order[0], "roles": roles,
            "emulated": result.environment.emulated, "target": result.environment.target}


def read_profile(ctx_or_dir: StageContext | Path) -> dict[str, Any]:
    """The full profile result dict of a run (``profile/profile.json``)."""
    folder = ctx_or_dir.stage_dir("profile") if isinstance(ctx_or_dir, StageContext) else Path(ctx_or_dir)
    return json.loads((folder / "profile.json").read_text(encoding="utf-8"))


def run_report(ctx: StageContext) -> dict[str, Any]:
    """The JSON / Markdown / HTML report of the run: a verdict at the top, one row per graph, every stage's
    result as tables, and the profile (graphs named as the CLI's summary names them)."""
    from edgefuse.pipeline.verdict import verdict_of
    from edgefuse.report.api import write_report

    results: list[Any] = [verdict_of(ctx.records, ctx.store, ctx.cfg)]
    titles = {"search": "keep_ratio search", "teacher": "Teacher fine-tune", "fuse": "Fusion",
              "finetune": "Recovery (fine-tuning the fused model)", "export": "Export (fp32)",
              "reference": "Reference export (unfused fp32)",
              "optimize": "Graph optimisation (onnxruntime fusions)", "quantize": "Quantization",
              "tune": "Tuning on the target",
              "evaluate": "Agreement with PyTorch and the teacher"}
    for stage, title in titles.items():
        if stage in ctx.records:
            results.append({"title": title, "stage": stage, "data": ctx.records[stage].result})
    if "profile" in ctx.records:
        results.append(_named_profile(read_profile(ctx), ctx.records["profile"].result.get("roles", {})))
    rows = variant_rows(ctx.records, {r: str(p) for r, p in graph_paths(ctx).items()})
    written = write_report(results, ctx.out, cfg=ctx.cfg.report, variants=rows)
    return {"files": {fmt: _relative(ctx, path) for fmt, path in written.items()}}


def _named_profile(profile: dict[str, Any], roles: dict[str, Any]) -> dict[str, Any]:
    """The profile with each graph labelled by its role's name ("final quantized"), not its file path."""
    from edgefuse.pipeline.verdict import ROLE_NAMES

    names = {r["label"]: ROLE_NAMES.get(role, role) for role, r in roles.items()}
    profile = copy.deepcopy(profile)
    for g in profile["graphs"]:
        g["label"] = names.get(g["label"], g["label"])
        if (g.get("op_profile") or {}).get("trace"):  # the report lives in report/, the traces in profile/
            g["op_profile"]["trace"] = f"../profile/{g['op_profile']['trace']}"
        if g.get("parity"):
            g["parity"]["reference_label"] = names.get(g["parity"]["reference_label"], g["parity"]["reference_label"])
    profile["reference_label"] = names.get(profile["reference_label"], profile["reference_label"])
    return profile
