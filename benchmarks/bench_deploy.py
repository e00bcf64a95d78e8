"""Deployment comparison and physical limit (issue 6, items 2 and 3) for the SST-2 classifier.

What a user shipping the SST-2 classifier (all-MiniLM-L6-v2 + classification head) would compare:

    baseline      the fine-tuned unfused model, exported fp32 by optimum (edgefuse export)
    ort_int8      the same graph through plain ``onnxruntime.quantization.quantize_dynamic(per_channel=True)``
    fused{r}_fp32 the edgefuse fused (keep_ratio r) + recovered classifier, exported fp32
    fused{r}_int8 the same through ``edgefuse quantize`` (int8 dynamic, per channel, host preset)
    fused{r}_mixed ``edgefuse quantize`` auto mode: the most error-sensitive MatMuls stay fp32 until the mean
                  cosine of the logits against the fused fp32 graph reaches ``--auto-target-cosine``

For every graph: SST-2 validation accuracy through onnxruntime, file size, p50/p90 latency at batch 1 x 128 tokens
on 1 and 2 threads and peak memory (fresh process), all from ONE interleaved ``profile_onnx`` run with every ratio
taken per round against the baseline; then the latency lower bound of ``benchmarks/bench_limit.py`` (kernel
GMAC/s x the graph's MACs from ``edgefuse.graph_macs``) and each graph's p50 as a multiple of it; then the issue-6
targets. Run from the repository root:

    python benchmarks/bench_deploy.py                          # default budget (about 20-30 min on 2 loaded cores)
    python benchmarks/bench_deploy.py --runs 20 --n-eval 200   # quick run
    python benchmarks/bench_deploy.py --reuse-graphs           # keep the graphs built by an earlier run

Writes benchmarks/results/deploy.{json,md}; graphs and logs go to benchmarks/_work/deploy/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "benchmarks" / "_work" / "deploy"
RESULTS = ROOT / "benchmarks" / "results"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
RECOVERY = {"teacher": "recovery_teacher.json", "0.5": "recovery_sst2_kr0.5.json", "0.25": "recovery_sst2_kr0.25.json"}
TASK = "sequence-classification"
log = logging.getLogger("bench_deploy")


def variants(ratios: list[str]) -> list[dict[str, str]]:
    """The graphs in profiling order (the baseline first: it is the reference of every ratio)."""
    rows = [{"label": "baseline", "folder": "baseline", "graph": "model.onnx",
             "what": "fine-tuned unfused, optimum export, fp32"},
            {"label": "ort_int8", "folder": "baseline", "graph": "model_int8_ort.onnx",
             "what": "same graph, onnxruntime quantize_dynamic(per_channel=True)"}]
    for r in ratios:
        f = f"fused-{r}"
        rows += [{"label": f"fused{r}_fp32", "folder": f, "graph": "model.onnx",
                  "what": f"edgefuse fused {r} + recovered, fp32"},
                 {"label": f"fused{r}_int8", "folder": f, "graph": "model_int8.onnx",
                  "what": f"edgefuse fused {r}, edgefuse quantize int8 dynamic per channel"},
                 {"label": f"fused{r}_mixed", "folder": f, "graph": "model_int8_mixed.onnx",
                  "what": f"edgefuse fused {r}, edgefuse quantize auto: MatMuls kept fp32 until the logits cosine "
                          "target"}]
    return rows


def _texts(path: Path, n: int) -> list[str]:
    from edgefuse.quantize_eval import read_texts

    return read_texts(path, n)


# ----------------------------------------------------------------------------------------------------- build
def _export(src: Path, name: str) -> dict[str, Any]:
    from edgefuse.config.export import ExportConfig
    from edgefuse.export import export_onnx
    from edgefuse.models import load_model, load_tokenizer

    res = export_onnx(load_model(str(src), TASK), ExportConfig(task=TASK), WORK / name,
                      tokenizer=load_tokenizer(str(src)), overwrite=True)
    return {"source": str(src.relative_to(ROOT)) if src.is_relative_to(ROOT) else str(src), "exporter": res.exporter,
            "fold_scales": res.fold_scales, "max_abs_diff_vs_pytorch": res.max_abs_diff,
            "min_cosine_vs_pytorch": res.min_cosine, "seconds": res.export_seconds + res.validate_seconds}


def _edgefuse_quant(name: str, out: str, texts: list[str], target: float | None, max_kept: int) -> dict[str, Any]:
    from edgefuse.config.quantize import QuantizeConfig
    from edgefuse.quantize import quantize_onnx

    cfg = QuantizeConfig(mode="dynamic", per_channel=True, output_name=out, overwrite=True, min_cosine=None,
                         auto_target_cosine=target, auto_max_kept=max_kept)
    q = quantize_onnx(WORK / name, cfg, calibration_texts=texts)
    return {"preset": q.preset, "quantized_matmuls": q.quantized_nodes, "kept_fp32": list(q.kept_fp32),
            "cosine_mean_vs_fp32": q.cosine_mean, "cosine_min_vs_fp32": q.cosine_min, "samples": q.samples,
            "auto_target_cosine": target, "auto_steps": list(q.auto_steps), "seconds": q.seconds}


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Export the three classifiers and quantize them; returns how each graph was made."""
    from onnxruntime.quantization import quantize_dynamic

    made: dict[str, Any] = {}
    # Calibration/selection texts come from the TRAIN split: the auto mode must not be tuned on validation.
    texts = _texts(SST2 / "train.tsv", args.calib)
    sources = {"baseline": Path(args.teacher), **{f"fused-{r}": Path(d) for r, d in zip(args.ratios, args.fused,
                                                                                         strict=True)}}
    for name, src in sources.items():
        if args.reuse_graphs and (WORK / name / "model.onnx").is_file():
            continue
        t = time.perf_counter()
        made[name] = {"export": _export(src, name)}
        if name == "baseline":
            # what a user would pick instead of edgefuse: onnxruntime's own call with its defaults + per channel
            quantize_dynamic(WORK / name / "model.onnx", WORK / name / "model_int8_ort.onnx", per_channel=True)
            made[name]["ort_int8"] = {"call": "quantize_dynamic(model.onnx, model_int8_ort.onnx, per_channel=True)"}
        else:
            made[name]["int8"] = _edgefuse_quant(name, "model_int8.onnx", texts, None, args.auto_max_kept)
            made[name]["mixed"] = _edgefuse_quant(name, "model_int8_mixed.onnx", texts, args.auto_target_cosine,
                                                  args.auto_max_kept)
        made[name]["seconds"] = time.perf_counter() - t
        log.warning("built %s in %.0f s", name, made[name]["seconds"])
    return made


# -------------------------------------------------------------------------------------------------- accuracy
def accuracy(rows: list[dict[str, str]], n_eval: int | None) -> dict[str, Any]:
    """SST-2 validation accuracy of every graph through onnxruntime (2 threads), and agreement with the baseline."""
    from edgefuse import quantize_eval as qe
    from edgefuse.export_ort import make_session, task_vectors

    texts, labels = qe.read_labelled(SST2 / "validation.tsv", n_eval)
    y = np.asarray(labels)
    out: dict[str, Any] = {}
    base_pred = None
    for row in rows:
        folder = WORK / row["folder"]
        t = time.perf_counter()
        batches = qe.token_batches(texts, qe.folder_tokenizer(folder), task=TASK, max_length=128,
                                   vocab=qe.folder_vocab(folder))
        sess = make_session(folder / row["graph"])
        pred = np.concatenate([task_vectors(sess, TASK, ids, mask).argmax(-1) for ids, mask in batches])
        base_pred = pred if base_pred is None else base_pred
        out[row["label"]] = {"accuracy": float((pred == y).mean()), "n": int(y.size),
                             "agreement_with_baseline": float((pred == base_pred).mean()),
                             "seconds": time.perf_counter() - t}
        log.warning("accuracy %s: %.4f", row["label"], out[row["label"]]["accuracy"])
    return out


# --------------------------------------------------------------------------------------------------- profile
def make_inputs(n_tokens: int) -> Path:
    """Batch 1 x ``n_tokens`` of real text: SST-2 validation sentences joined, no padding (so pooled parity and
    attention see real tokens)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(WORK / "baseline")
    enc = tok(" ".join(_texts(SST2 / "validation.tsv", 200)), truncation=True, max_length=n_tokens, return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    if ids.shape[1] != n_tokens:
        raise RuntimeError(f"joined text gave {ids.shape[1]} tokens, expected {n_tokens}")
    path = WORK / f"inputs_b1_s{n_tokens}.npz"
    np.savez(path, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    return path


def profile(rows: list[dict[str, str]], args: argparse.Namespace) -> Any:
    from edgefuse.config.profile import ProfileConfig
    from edgefuse.profile import profile_onnx

    cfg = ProfileConfig(threads=args.threads, inputs_npz=make_inputs(args.seq), warmup_runs=args.warmup,
                        runs=args.runs, min_cosine=None, memory_runs=3, op_profile_runs=5)
    return profile_onnx([WORK / r["folder"] / r["graph"] for r in rows], cfg)


def limit(rows: list[dict[str, str]], args: argparse.Namespace) -> dict[str, Any]:
    """Kernel throughput and each graph's MAC count and bound, from benchmarks/bench_limit.py (run as is)."""
    out = WORK / "limit"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_limit.py"), "--threads", *map(str, args.threads),
           "--seq", str(args.seq), "--runs", str(args.limit_runs), "--out", str(out), "--graphs",
           *[f"{r['label']}={WORK / r['folder'] / r['graph']}" for r in rows]]
    subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads(out.with_suffix(".json").read_text())


# ---------------------------------------------------------------------------------------------------- tables
def combine(rows: list[dict[str, str]], acc: dict[str, Any], prof: Any, lim: dict[str, Any]) -> list[dict[str, Any]]:
    """One record per graph: accuracy, size, latency per thread count, memory, bound, ratios vs the baseline."""
    base = prof.graphs[0]
    bounds = {(g["graph"], g["threads"]): g for g in lim["graphs"]}
    ort_i = next(i for i, r in enumerate(rows) if r["label"] == "ort_int8")
    out = []
    for row, g in zip(rows, prof.graphs, strict=True):
        rec: dict[str, Any] = {**row, "profile_label": g.label, "file_size_bytes": g.file_size_bytes,
                               "size_ratio": g.file_size_bytes / base.file_size_bytes,
                               "accuracy": acc[row["label"]]["accuracy"],
                               "accuracy_delta_points": 100 * (acc[row["label"]]["accuracy"]
                                                               - acc["baseline"]["accuracy"]),
                               "agreement_with_baseline": acc[row["label"]]["agreement_with_baseline"],
                               "matmuls_quantized_static": g.matmul_quantized_nodes_static,
                               "matmuls_fp32_static": g.matmul_fp32_nodes_static,
                               "logits_cosine_vs_baseline": g.parity.min_cosine if g.parity else None,
                               "sha256": _sha256(Path(g.path)), "latency": []}
        if g.op_profile is not None:
            o = g.op_profile
            rec["op_profile"] = {"threads": o.threads, "runs": o.runs, "kernels_ms": o.total_kernel_us_per_run / 1e3,
                                 "matmul_int8_ms": o.matmul_quantized_us_per_run / 1e3,
                                 "matmul_fp32_ms": o.matmul_fp32_us_per_run / 1e3}
        for p, pb, po in zip(g.latency, base.latency, prof.graphs[ort_i].latency, strict=True):
            b = bounds[(row["label"], p.threads)]
            vs_ort = np.asarray(p.samples_ms) / np.asarray(po.samples_ms)  # same interleaved rounds
            rec["latency"].append({
                "threads": p.threads, "runs": p.timed_runs, "p50_ms": p.latency_ms_p50, "p90_ms": p.latency_ms_p90,
                "min_ms": p.latency_ms_min, "ratio_vs_baseline_p50": p.ratio_vs_reference_p50,
                "ratio_vs_baseline_p10": p.ratio_vs_reference_p10, "ratio_vs_baseline_p90": p.ratio_vs_reference_p90,
                "p50_over_baseline_p50": p.latency_ms_p50 / pb.latency_ms_p50,
                "ratio_vs_ort_int8_p50": float(np.percentile(vs_ort, 50)),
                "ratio_vs_ort_int8_p10": float(np.percentile(vs_ort, 10)),
                "ratio_vs_ort_int8_p90": float(np.percentile(vs_ort, 90)),
                "gmacs": b["gmacs"], "fp32_gmacs": b["fp32_gmacs"], "int8_gmacs": b["int8_gmacs"],
                "bound_ms": b["bound_ms"], "p50_over_bound": p.latency_ms_p50 / b["bound_ms"],
                "min_over_bound": p.latency_ms_min / b["bound_ms"], "bench_limit_p50_ms": b["p50_ms"]})
        m = g.memory
        if m is not None:
            rec["memory"] = {"threads": m.threads, "peak_rss_mib": m.peak_rss_mib,
                             "runtime_baseline_rss_mib": m.runtime_baseline_rss_mib,
                             "model_peak_rss_mib": m.model_peak_rss_mib, "load_time_ms": m.load_time_ms,
                             "peak_ratio": m.peak_rss_mib / base.memory.peak_rss_mib,
                             "model_peak_ratio": m.model_peak_rss_mib / base.memory.model_peak_rss_mib}
        out.append(rec)
    return out


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def _lat(rec: dict[str, Any], threads: int) -> dict[str, Any]:
    return next(p for p in rec["latency"] if p["threads"] == threads)


def targets(recs: list[dict[str, Any]], smallest: str, largest: str) -> list[dict[str, Any]]:
    """The issue-6 deployment and limit targets, each with its measured value and met / not met."""
    by = {r["label"]: r for r in recs}
    small, large = by[f"fused{smallest}_int8"], by[f"fused{largest}_int8"]

    def row(name: str, value: float, limit_: float, unit: str, note: str = "") -> dict[str, Any]:
        return {"target": name, "value": value, "limit": limit_, "unit": unit, "met": bool(value <= limit_),
                "note": note}

    s1, b1, o1 = _lat(small, 1), _lat(by["baseline"], 1), _lat(by["ort_int8"], 1)

    def acc_note(r: dict[str, Any]) -> str:
        fp32 = by[r["label"].replace("_int8", "_fp32")]
        return (f"its fp32 graph: {fp32['accuracy_delta_points']:+.2f} points; int8 vs its own fp32: "
                f"{r['accuracy_delta_points'] - fp32['accuracy_delta_points']:+.2f} points")

    out = [row(f"fused {smallest} int8 p50, 1 thread, vs baseline", s1["ratio_vs_baseline_p50"], 0.25, "x",
               f"ratio of the latency bounds: {s1['bound_ms'] / b1['bound_ms']:.3f}x"),
           row(f"fused {smallest} int8 p50, 1 thread, vs onnxruntime int8 unfused", s1["ratio_vs_ort_int8_p50"], 0.6,
               "x", f"ratio of the latency bounds: {s1['bound_ms'] / o1['bound_ms']:.3f}x"),
           row(f"fused {smallest} int8 accuracy lost vs fine-tuned unfused", -small["accuracy_delta_points"], 2.0,
               "points", acc_note(small)),
           row(f"fused {largest} int8 accuracy lost vs fine-tuned unfused", -large["accuracy_delta_points"], 1.0,
               "points", acc_note(large))]
    if "memory" in small:
        out += [row(f"fused {smallest} int8 peak RSS (whole process) vs baseline", small["memory"]["peak_ratio"], 0.5,
                    "x", "includes the Python interpreter and the onnxruntime library"),
                row(f"fused {smallest} int8 peak RSS added by the model vs baseline",
                    small["memory"]["model_peak_ratio"], 0.5, "x", "peak minus RSS after `import onnxruntime`")]
    for r in (small, large):
        for p in r["latency"]:
            out.append(row(f"{r['label']} p50 / latency bound, {p['threads']} thread(s)", p["p50_over_bound"], 2.5,
                           "x", f"best run / bound {p['min_over_bound']:.2f}x"))
    return out


def environment(prof: Any) -> dict[str, Any]:
    import platform

    import onnxruntime
    import torch
    import transformers

    env = prof.environment
    return {"cpu_model": env.cpu_model, "isa_flags": list(env.isa_flags), "cores_logical": env.cores_logical,
            "cores_available": env.cores_available, "machine": env.machine, "onnxruntime": env.onnxruntime_version,
            "numpy": env.numpy_version, "python": env.python_version, "torch": torch.__version__,
            "transformers": transformers.__version__, "onnxruntime_host": onnxruntime.__version__,
            "provider": env.provider, "graph_optimization_level": env.graph_optimization_level,
            "platform": platform.platform()}


# ------------------------------------------------------------------------------------------------- markdown
def _f(v: float | None, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def markdown(d: dict[str, Any]) -> str:
    recs, meta, env = d["variants"], d["meta"], d["environment"]
    threads = [p["threads"] for p in recs[0]["latency"]]
    lines = [
        "# Deployment comparison and physical limit: the SST-2 classifier (issue 6, items 2 and 3)", "",
        f"Generated by `{meta['command']}` in {meta['wall_s'] / 60:.1f} min "
        f"({time.strftime('%Y-%m-%d %H:%M', time.localtime(meta['finished_unix']))}).", "",
        f"Budget: {meta['runs']} timed runs per graph and thread count after {meta['warmup']} warm-up runs, all "
        f"{len(recs)} graphs in one process, interleaved (A B C ... / ... C B A); memory in one fresh process per "
        f"graph; accuracy on {recs[0]['n_eval']} SST-2 validation sentences; auto mode selection on "
        f"{meta['calib']} SST-2 train sentences; bench_limit with {meta['limit_runs']} runs.", "",
        f"Environment: {env['cpu_model']}, {env['cores_logical']} logical cores ({env['cores_available']} available), "
        f"ISA {', '.join(env['isa_flags']) or 'none reported'}; onnxruntime {env['onnxruntime']} "
        f"({env['provider']}, optimisation `{env['graph_optimization_level']}`, no spinning), torch {env['torch']}, "
        f"transformers {env['transformers']}, Python {env['python']}.", "",
        f"**The machine is a shared 2-core VM**: load average {meta['loadavg_start'][0]:.1f} at the start and "
        f"{meta['loadavg_end'][0]:.1f} at the end (1-minute), from other engineers' jobs. Absolute latencies are "
        "inflated and noisy; the ratios are taken per interleaved round against the baseline and are the numbers "
        "to read.", "",
        "## Variants", "",
        "| graph | what | SST-2 acc % | vs baseline (points) | agreement with baseline | size MB | size ratio | "
        "MatMuls int8 / fp32 | peak RSS MiB (ratio) | model-added MiB (ratio) |",
        "|---|---|---|---|---|---|---|---|---|---|"]
    for r in recs:
        m = r.get("memory") or {}
        lines.append(
            f"| {r['label']} | {r['what']} | {100 * r['accuracy']:.2f} | {r['accuracy_delta_points']:+.2f} | "
            f"{100 * r['agreement_with_baseline']:.1f} % | {r['file_size_bytes'] / 1e6:.1f} | {r['size_ratio']:.3f} | "
            f"{r['matmuls_quantized_static']} / {r['matmuls_fp32_static']} | "
            f"{_f(m.get('peak_rss_mib'), '.1f')} ({_f(m.get('peak_ratio'))}) | "
            f"{_f(m.get('model_peak_rss_mib'), '.1f')} ({_f(m.get('model_peak_ratio'))}) |")
    same: dict[str, list[str]] = {}
    for r in recs:
        same.setdefault(r["sha256"], []).append(r["label"])
    for labels in same.values():
        if len(labels) > 1:
            lines += ["", f"{' and '.join(labels)} are the same file (sha256): the auto mode kept nothing in fp32, "
                      "because the int8 graph already met the cosine target. Both are timed anyway; their ratio is "
                      "a control of the measurement noise."]
    lines += ["", f"Latency, batch 1 x {meta['seq']} tokens of real text (ratios: median of the per-round ratios, "
              "[p10–p90] of them):", ""]
    for t in threads:
        lines += [f"**{t} thread(s)**", "",
                  "| graph | p50 ms | p90 ms | ratio vs baseline p50 [p10–p90] | ratio vs ort_int8 p50 [p10–p90] |",
                  "|---|---|---|---|---|"]
        for r in recs:
            p = _lat(r, t)
            lines.append(f"| {r['label']} | {p['p50_ms']:.2f} | {p['p90_ms']:.2f} | {p['ratio_vs_baseline_p50']:.3f} "
                         f"[{p['ratio_vs_baseline_p10']:.3f}–{p['ratio_vs_baseline_p90']:.3f}] | "
                         f"{p['ratio_vs_ort_int8_p50']:.3f} [{p['ratio_vs_ort_int8_p10']:.3f}–"
                         f"{p['ratio_vs_ort_int8_p90']:.3f}] |")
        lines.append("")
    if all("op_profile" in r for r in recs):
        o0 = recs[0]["op_profile"]
        lines += [f"Kernel time per run from onnxruntime's profiler ({o0['runs']} runs, {o0['threads']} thread(s), "
                  "same process):", "", "| graph | all kernels ms | int8 MatMul ms | fp32 MatMul ms | other ms |",
                  "|---|---|---|---|---|"]
        for r in recs:
            o = r["op_profile"]
            other = o["kernels_ms"] - o["matmul_int8_ms"] - o["matmul_fp32_ms"]
            lines.append(f"| {r['label']} | {o['kernels_ms']:.2f} | {o['matmul_int8_ms']:.2f} | "
                         f"{o['matmul_fp32_ms']:.2f} | {other:.2f} |")
        lines.append("")
    lim = d["limit"]
    mkn = "x".join(map(str, lim["meta"]["kernel_mkn"]))
    lines += ["## The physical limit (benchmarks/bench_limit.py + edgefuse/graph_macs.py)", "",
              f"Kernel throughput, one MatMul of M x K x N = {mkn} (fp32 MatMul; u8 x s8 MatMulInteger; 4-bit "
              "MatMulNBits), best of 3 interleaved rounds:", "",
              "| threads | fp32 GMAC/s | int8 GMAC/s | int4 GMAC/s |", "|---|---|---|---|"]
    for t, pk in lim["peak_gmac_per_s"].items():
        lines.append(f"| {t} | {pk['fp32']:.1f} | {pk['int8']:.1f} | {_f(pk.get('int4'), '.1f')} |")
    lines += ["", "Bound = fp32 MACs / fp32 peak + int8 MACs / int8 peak (every matrix product at the kernel's best "
              "measured speed, everything else free). p50 is the interleaved p50 above; 'best' is the fastest run.",
              "", "| graph | GMAC (fp32 / int8) | " + " | ".join(
                  f"{t}t bound ms | {t}t p50 / bound | {t}t best / bound" for t in threads) + " |",
              "|---|---|" + "---|---|---|" * len(threads)]
    for r in recs:
        p0 = r["latency"][0]
        cells = " | ".join(f"{_lat(r, t)['bound_ms']:.2f} | {_lat(r, t)['p50_over_bound']:.2f}x | "
                           f"{_lat(r, t)['min_over_bound']:.2f}x" for t in threads)
        lines.append(f"| {r['label']} | {p0['gmacs']:.3f} ({p0['fp32_gmacs']:.3f} / {p0['int8_gmacs']:.3f}) | "
                     f"{cells} |")
    lines += ["", "## Targets (issue 6)", "", "| target | measured | limit | met | note |", "|---|---|---|---|---|"]
    for t in d["targets"]:
        lines.append(f"| {t['target']} | {t['value']:.3f} {t['unit']} | ≤ {t['limit']} {t['unit']} | "
                     f"{'**met**' if t['met'] else '**not met**'} | {t['note']} |")
    lines += ["", "## How the graphs were made", ""]
    for name, b in d["build"].items():
        ex = b["export"]
        lines.append(f"- `{name}`: from `{ex['source']}`, exporter {ex['exporter']}, max |diff| vs PyTorch "
                     f"{ex['max_abs_diff_vs_pytorch']:.2e}.")
        for key in ("int8", "mixed"):
            if key in b:
                q = b[key]
                tgt = f", auto target cosine {q['auto_target_cosine']}" if q["auto_target_cosine"] else ""
                lines.append(f"  - {key}: {q['quantized_matmuls']} MatMuls int8, kept fp32: "
                             f"{', '.join(q['kept_fp32']) or 'none'}; logits cosine vs fp32 (mean / min over "
                             f"{q['samples']} train sentences) {q['cosine_mean_vs_fp32']:.5f} / "
                             f"{q['cosine_min_vs_fp32']:.5f}{tgt}.")
        if "ort_int8" in b:
            lines.append(f"  - ort_int8: `{b['ort_int8']['call']}` (onnxruntime's defaults: QInt8 weights, "
                         "MatMul/Gather/... ops, no reduce_range).")
    if d.get("pytorch_accuracy"):
        accs = ", ".join(f"{k} {100 * v:.2f} %" for k, v in d["pytorch_accuracy"].items())
        lines += ["", f"PyTorch accuracy of the same checkpoints (recovery benchmark, 64-token truncation): {accs}."]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------ main
def _pytorch_accuracy() -> dict[str, float]:
    out = {}
    for key, name in RECOVERY.items():
        p = RESULTS / name
        if p.is_file():
            d = json.loads(p.read_text())
            acc = d.get("recovered_after_fold_accuracy")
            if acc is None:
                acc = (d.get("result") or {}).get("final_metrics", {}).get("accuracy")
            if acc is not None:
                out[key] = float(acc)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", default=str(ROOT / "benchmarks/_work/sst2-teacher"), help="fine-tuned unfused folder")
    ap.add_argument("--ratios", nargs="+", default=["0.5", "0.25"], help="keep ratios of the fused classifiers")
    ap.add_argument("--fused", nargs="+", default=None,
                    help="recovered fused folders, one per ratio (default benchmarks/_work/sst2-fused-<r>-recovered)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts")
    ap.add_argument("--seq", type=int, default=128, help="tokens per timed input (batch 1)")
    ap.add_argument("--runs", type=int, default=200, help="timed interleaved runs per graph and thread count")
    ap.add_argument("--warmup", type=int, default=10, help="warm-up runs per graph and thread count")
    ap.add_argument("--n-eval", type=int, default=None, help="SST-2 validation rows to score (default: all 872)")
    ap.add_argument("--calib", type=int, default=64, help="SST-2 train sentences for the quantization checks")
    ap.add_argument("--auto-target-cosine", type=float, default=0.9999,
                    help="mixed precision: target mean cosine of the logits against the fused fp32 graph")
    ap.add_argument("--auto-max-kept", type=int, default=16, help="mixed precision: most MatMuls kept in fp32")
    ap.add_argument("--limit-runs", type=int, default=30, help="runs of bench_limit.py per graph and thread count")
    ap.add_argument("--reuse-graphs", action="store_true", help="keep graphs built by an earlier run")
    ap.add_argument("--out", default=str(RESULTS / "deploy"), help="output stem (.json and .md are written)")
    args = ap.parse_args(argv)
    args.fused = args.fused or [str(ROOT / f"benchmarks/_work/sst2-fused-{r}-recovered") for r in args.ratios]
    if len(args.fused) != len(args.ratios):
        ap.error(f"--fused needs one folder per ratio ({len(args.ratios)}), got {len(args.fused)}")
    for folder in [args.teacher, *args.fused]:
        if not (Path(folder) / "config.json").is_file():
            ap.error(f"{folder!r} is not a model folder (no config.json); run benchmarks/bench_recovery.py first")
    if min(args.threads) != 1:
        ap.error("--threads must include 1 (the targets are stated at 1 thread)")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    start, load0 = time.perf_counter(), os.getloadavg()
    WORK.mkdir(parents=True, exist_ok=True)
    rows = variants(args.ratios)
    built = build(args)
    old = WORK / "build.json"
    if args.reuse_graphs and old.is_file():
        built = {**json.loads(old.read_text()), **built}
    old.write_text(json.dumps(built, indent=2) + "\n")
    acc = accuracy(rows, args.n_eval)
    log.warning("profiling %d graphs interleaved", len(rows))
    prof = profile(rows, args)
    (WORK / "profile.json").write_text(json.dumps(prof.to_dict(), indent=2) + "\n")
    lim = limit(rows, args)
    recs = combine(rows, acc, prof, lim)
    for r in recs:
        r["n_eval"] = acc[r["label"]]["n"]
    ordered = sorted(args.ratios, key=float)
    data = {
        "meta": {"command": "python " + " ".join(["benchmarks/bench_deploy.py", *(argv or sys.argv[1:])]),
                 "runs": args.runs, "warmup": args.warmup, "seq": args.seq, "batch": 1, "threads": args.threads,
                 "n_eval": args.n_eval, "calib": args.calib, "limit_runs": args.limit_runs,
                 "auto_target_cosine": args.auto_target_cosine, "loadavg_start": list(load0),
                 "loadavg_end": list(os.getloadavg()), "wall_s": time.perf_counter() - start,
                 "finished_unix": time.time(), "profile_seconds": prof.seconds},
        "environment": environment(prof), "build": built, "variants": recs, "limit": lim,
        "targets": targets(recs, ordered[0], ordered[-1]), "pytorch_accuracy": _pytorch_accuracy(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(data, indent=2) + "\n"), (".md", markdown(data))):
        tmp = out.with_name(f".{out.name}{suffix}.partial")
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))
    print(markdown(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
