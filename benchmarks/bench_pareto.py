"""The accuracy-latency front on SST-2 (issue 16 item 5): int8 graphs of every compression method, same teacher,
same recovery budget, accuracy on the 872 SST-2 validation sentences against 1-thread latency.

Deployment order for every variant: the cached SST-2 teacher (all-MiniLM-L6-v2 + head, fine-tuned) -> compress
-> recover (task loss + logit distillation from the teacher, AdamW 5e-5, batch 32, linear schedule, 6 % warm-up,
64 tokens) -> fold the frozen scale -> export ONNX (validated against PyTorch) -> int8 dynamic per channel
(``edgefuse quantize``, host preset) -> accuracy of the int8 graph through onnxruntime.

Teacher: the SST-2 recipes' own teacher (``export_configs/minilm-sst2-x86_64-int8.yaml``: 2,100 steps, one epoch,
kept in ``runs/.teacher-cache``), so the front and the shipped recipes start from the same model; pass its folder
with ``--teacher``.

Selection protocol: recovery evaluates on a held-out slice of the SST-2 *training* file (2 %, seed 0) and keeps
the best checkpoint there. (The recipe's teacher trained on every training row, so these rows only pick the
checkpoint; they are not unseen text.) The SST-2 validation file is used only once per variant, to report the
int8 graph's accuracy.

Variants (``--variants``; widths ``--ratios``):
    teacher-int8           the teacher itself, int8 (no compression, no recovery)
    fusion-all-R           the paper's fusion in all 6 MLPs, keep ratio R
    fusion-upper-R         the paper's fusion in the upper two thirds (layers 2-5 of 6), as the authors did
    pruned-all-R / pruned-upper-R   fusion-pruned (prune the tail, fuse the rest), activation importance, pool 1.25
    prune-R / svd-R        structured pruning (aligned units) / truncated SVD, all 6 MLPs
    drop-N                 keep N of the 6 layers (evenly spaced, first and last kept), distilled the same way

Latency: every int8 graph on batch 1 x ``--seq`` tokens of real text, 1 intra-op thread, CPU time of the calling
thread (``time.thread_time``; with one thread onnxruntime computes on it, so the share of the core other jobs take
does not count) and wall clock. Every graph is timed in its own process (``--rounds`` rounds over all graphs,
forward and reverse order): one process holding every session ordered the graphs differently from pass to pass.

Usage (from the repository root):

    python benchmarks/bench_pareto.py --teacher runs/.teacher-cache/<key>/model    # small default budget
    python benchmarks/bench_pareto.py --teacher runs/.teacher-cache/<key>/model --full     # one epoch, 3 seeds (hours)
    python benchmarks/bench_pareto.py --report-only                                # tables from finished runs

Without ``--teacher`` the teacher is trained once (one epoch, the recipe's settings) into
``benchmarks/_work/pareto/teacher`` and reused. Finished variants are kept as JSON under
``benchmarks/_work/pareto/<budget>/`` and skipped on a rerun with the same settings. Writes
``benchmarks/results/pareto.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
WORK = ROOT / "benchmarks" / "_work" / "pareto"
RESULTS = ROOT / "benchmarks" / "results"
TASK = "sequence-classification"
log = logging.getLogger("bench_pareto")

SMALL = {"steps": 120, "seeds": [0], "selection_examples": 400, "eval_every": 40,
         "variants": ["teacher-int8", "fusion-all", "fusion-upper", "pruned-all", "pruned-upper", "prune", "svd",
                      "drop-4", "drop-3"],
         "ratios": [0.5, 0.25]}
FULL = {"steps": 2000, "seeds": [0, 1, 2], "selection_examples": 1347, "eval_every": 250,
        "variants": SMALL["variants"], "ratios": [0.5, 0.25]}
LEADING = ("fusion-all", "fusion-upper", "pruned-all", "pruned-upper")  # the methods --full runs on every seed


def _data_dir() -> Path:
    """``../shared/data/sst2`` relative to the repository root, else the machine's shared data folder."""
    for cand in (ROOT.parent / "shared" / "data" / "sst2", Path("/work/shared/data/sst2")):
        if (cand / "train.tsv").is_file():
            return cand
    raise SystemExit("SST-2 not found: expected ../shared/data/sst2/{train,validation}.tsv")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--full", action="store_true", help="one-epoch recovery (2000 steps), seeds 0 1 2 (hours)")
    p.add_argument("--teacher", help="a fine-tuned SST-2 teacher folder (default: train/reuse the cached one)")
    p.add_argument("--teacher-epochs", type=float, default=1.0, help="when training the teacher here (default 1)")
    p.add_argument("--steps", type=int, help="recovery steps per variant (default 120; --full 2000)")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds (default 0; --full 0 1 2 for the fusion family)")
    p.add_argument("--variants", nargs="+", help="subset of the variants (default: all)")
    p.add_argument("--ratios", type=float, nargs="+", help="keep ratios (default 0.5 0.25)")
    p.add_argument("--selection-examples", type=int, help="held-out training rows used for selection")
    p.add_argument("--eval-every", type=int, help="selection evaluation every N steps")
    p.add_argument("--max-train-examples", type=int, help="use only the first N training rows (quick checks)")
    p.add_argument("--n-eval", type=int, help="validation sentences for the reported accuracy (default: all 872)")
    p.add_argument("--seq", type=int, default=64, help="tokens per latency run (default 64, the task's length)")
    p.add_argument("--runs", type=int, default=40, help="timed latency runs per graph and round (default 40)")
    p.add_argument("--rounds", type=int, default=3,
                   help="latency rounds; each times every graph once, in its own process (default 3)")
    p.add_argument("--time-graph", type=Path, help=argparse.SUPPRESS)  # internal: the per-graph timing child
    p.add_argument("--time-tuned", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--time-feeds", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=2, help="torch threads for recovery (default 2)")
    p.add_argument("--tune", action="store_true",
                   help="also run `edgefuse tune` on every variant's export (this host's fastest graph that passes\n"
                   "the gate) and report its accuracy and latency beside the plain int8 graph's")
    p.add_argument("--tune-budget-s", type=float, default=8.0, help="tune's timing budget per variant (default 8)")
    p.add_argument("--tune-min-cosine", type=float, default=0.9,
                   help="tune's gate on the two-logit cosine vs fp32 (default 0.9: accuracy is the judge here)")
    p.add_argument("--out", help="results base name (default benchmarks/results/pareto; a quick run: _work)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the tables from finished runs")
    args = p.parse_args(argv)
    budget = FULL if args.full else SMALL
    for key in ("steps", "seeds", "selection_examples", "eval_every", "variants", "ratios"):
        if getattr(args, key) is None:
            setattr(args, key, budget[key])
    quick = args.max_train_examples is not None or args.n_eval is not None
    args.out = Path(args.out) if args.out else (WORK / "quick" / "pareto" if quick else RESULTS / "pareto")
    args.budget_tag = f"steps{args.steps}-sel{args.selection_examples}" + ("-quick" if quick else "")
    return args


# ------------------------------------------------------------------------------------------------ teacher
def teacher_folder(args: argparse.Namespace, data_dir: Path) -> Path:
    """The teacher: ``--teacher``, else the cached one, else train it (the recipe's settings, one epoch)."""
    if args.teacher:
        path = Path(args.teacher)
        if not (path / "config.json").is_file():
            raise SystemExit(f"--teacher {path} holds no saved model (config.json); give the model folder")
        return path
    path = WORK / "teacher"
    if (path / "config.json").is_file():
        return path
    import torch

    from edgefuse.config.finetune import FinetuneConfig
    from edgefuse.finetune.api import finetune_
    from edgefuse.fusion.persist import save_fused
    from edgefuse.models import load_model, load_tokenizer

    tok = load_tokenizer("minilm")
    data = _train_data(tok, data_dir, args, selection=1347)
    torch.manual_seed(0)
    model = load_model("minilm", TASK, num_labels=2)
    cfg = FinetuneConfig(task=TASK, epochs=args.teacher_epochs, batch_size=32, learning_rate=5e-5,
                         eval_every_steps=500, keep_best=True, seed=0)
    t = time.perf_counter()
    res = finetune_(model, cfg, data, progress=False)
    save_fused(model, path, tokenizer=tok, overwrite=True)
    (path / "teacher_result.json").write_text(json.dumps({"seconds": time.perf_counter() - t,
                                                          "result": res.to_dict()}, indent=1))
    return path


def _train_data(tok: Any, data_dir: Path, args: argparse.Namespace, *, selection: int) -> Any:
    """SST-2 train with 2 % held out (seed 0) for selection; the first ``selection`` held-out rows are used."""
    from edgefuse.config.finetune import DataConfig
    from edgefuse.finetune.data import load_finetune_data

    cfg = DataConfig(train=str(data_dir / "train.tsv"), validation_fraction=0.02, seed=0, text_column="sentence",
                     label_column="label", max_length=64, max_validation_examples=selection,
                     max_train_examples=args.max_train_examples)
    return load_finetune_data(cfg, tok, TASK)


# ----------------------------------------------------------------------------------------------- variants
def variant_specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (variant, ratio, seed) to run, leading methods on every seed, the others on the first seed only
    (``--full``) or on every given seed."""
    specs: list[dict[str, Any]] = []
    # width-major order: an interrupted run has every method at the first width before any at the next
    for v in args.variants:
        seeds = args.seeds if (v in LEADING or not args.full) else args.seeds[:1]
        if v == "teacher-int8":
            specs.append({"variant": v, "ratio": None, "seed": 0})
        elif v.startswith("drop-"):
            specs += [{"variant": v, "ratio": None, "seed": s} for s in seeds]
    for r in args.ratios:
        for s in args.seeds:
            for v in args.variants:
                if v == "teacher-int8" or v.startswith("drop-"):
                    continue
                if s in (args.seeds if (v in LEADING or not args.full) else args.seeds[:1]):
                    specs.append({"variant": v, "ratio": r, "seed": s})
    return specs


def label(spec: dict[str, Any]) -> str:
    return spec["variant"] + ("" if spec["ratio"] is None else f"-{spec['ratio']:g}")


def kept_layers(n_keep: int, n_layers: int = 6) -> list[int]:
    """Evenly spaced layers, the first and the last always kept (``round(linspace)``): 4 of 6 -> [0, 2, 3, 5]."""
    return sorted({round(float(x)) for x in np.linspace(0, n_layers - 1, n_keep)})


def compress(model: Any, spec: dict[str, Any], texts: list[str], tok: Any) -> dict[str, Any]:
    """Apply ``spec``'s compression to ``model`` in place; return what was done."""
    from torch import nn

    from edgefuse.config.fusion import FusionConfig
    from edgefuse.fusion.api import fuse_mlps_

    v, r = spec["variant"], spec["ratio"]
    if v == "teacher-int8":
        return {"what": "no compression"}
    if v.startswith("drop-"):
        keep = kept_layers(int(v.split("-")[1]), model.config.num_hidden_layers)
        model.bert.encoder.layer = nn.ModuleList([model.bert.encoder.layer[i] for i in keep])
        model.config.num_hidden_layers = len(keep)
        return {"kept_layers": keep}
    upper = [2, 3, 4, 5] if v.endswith("-upper") else None
    method = {"fusion": "fusion", "pruned": "fusion-pruned", "prune": "prune", "svd": "svd"}[v.split("-")[0]]
    extra = {"importance": "activations", "pool": 1.25} if method == "fusion-pruned" else {}
    cfg = FusionConfig(method=method, keep_ratio=r, layers=upper, seed=spec["seed"], **extra)
    res = fuse_mlps_(model, cfg, texts=texts, tokenizer=tok)
    return {"fusion_config": cfg.model_dump(), "params_after": res.params_total_after,
            "max_cluster_size": max((s.max_cluster_size or 0) for s in res.steps), "seconds": res.seconds}


def run_variant(spec: dict[str, Any], ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Compress, recover, fold, export, int8-quantize and score one variant; returns its record."""
    import torch

    from edgefuse.config.export import ExportConfig
    from edgefuse.config.finetune import FinetuneConfig
    from edgefuse.config.quantize import QuantizeConfig
    from edgefuse.export.api import export_onnx
    from edgefuse.finetune.api import finetune_
    from edgefuse.fusion.scale import fold_scales_
    from edgefuse.quantize.api import quantize_onnx

    t0 = time.perf_counter()
    torch.manual_seed(spec["seed"])
    student = copy.deepcopy(ctx["teacher"])
    rec: dict[str, Any] = {**spec, "label": label(spec), "compression": compress(student, spec, ctx["calib"],
                                                                                  ctx["tok"])}
    rec["params"] = sum(p.numel() for p in student.parameters())
    if spec["variant"] != "teacher-int8":
        cfg = FinetuneConfig(task=TASK, task_weight=1.0, logits_weight=1.0, temperature=2.0, learning_rate=5e-5,
                             batch_size=32, max_steps=args.steps, eval_every_steps=args.eval_every, eval_before=True,
                             keep_best=True, group_by_length=True, seed=spec["seed"])
        res = finetune_(student, cfg, ctx["data"], teacher=ctx["teacher"], progress=False)
        rec["recovery"] = {"steps": res.steps_run, "seconds": res.train_seconds, "s_per_step": res.seconds_per_step,
                           "selection_before": res.initial_metrics.get("accuracy"),
                           "selection_best": res.best_metric, "best_step": res.best_step,
                           "history": [{"step": h.get("step"), "accuracy": h.get("accuracy")}
                                       for h in res.eval_history]}
    fold_scales_(student)
    student.eval()
    rec["pytorch_accuracy"] = _torch_accuracy(student, ctx)
    folder = WORK / args.budget_tag / f"{label(spec)}-s{spec['seed']}"
    exp = export_onnx(student, ExportConfig(task=TASK), folder, tokenizer=ctx["tok"], overwrite=True)
    q = quantize_onnx(folder, QuantizeConfig(mode="dynamic", per_channel=True, output_name="model_int8.onnx",
                                             overwrite=True, min_cosine=None), calibration_texts=ctx["calib"])
    rec["export_max_abs_diff"] = exp.max_abs_diff
    rec["int8"] = {"preset": q.preset, "quantized_matmuls": q.quantized_nodes, "cosine_mean_vs_fp32": q.cosine_mean}
    rec["graph"] = str((folder / "model_int8.onnx").relative_to(ROOT))
    rec["accuracy"] = _ort_accuracy(folder / "model_int8.onnx", ctx)
    if args.tune:
        rec["tuned"] = _tune(folder, ctx, args)
    rec["seconds"] = time.perf_counter() - t0
    return rec


def _tune(folder: Path, ctx: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """``edgefuse tune`` on the export folder (1 thread, ``--seq`` tokens); the winner's accuracy through
    :func:`edgefuse.ort.session`, i.e. opened exactly as a user of the folder would open it."""
    from edgefuse.config.tune import TuneConfig
    from edgefuse.ort import session, task_vectors
    from edgefuse.tune.api import tune_folder
    from edgefuse.tune.candidates import default_candidates

    # tune's default candidates for BERT less static QDQ: its calibration costs a minute per variant on 2 shared
    # cores, and tune rejected it on MiniLM on this host (cosine 0.74-0.84, benchmarks/results/tune.md)
    cands = [c for c in default_candidates("bert", TASK) if c.quantize != "static"]
    res = tune_folder(folder, TuneConfig(candidates=cands, budget_s=args.tune_budget_s, sequence_length=args.seq,
                                         threads=1, min_cosine=args.tune_min_cosine, overwrite=True),
                      calibration_texts=ctx["calib"])
    sess = session(folder, threads=2)
    pred = np.concatenate([task_vectors(sess, TASK, ids, mask).argmax(-1) for ids, mask in ctx["val_batches"]])
    return {"winner": res.winner, "graph": res.graph, "session_options": res.session_options, "why": res.why,
            "accuracy": float((pred == ctx["val_labels"]).mean()), "seconds": res.seconds}


def _torch_accuracy(model: Any, ctx: dict[str, Any]) -> float:
    import torch

    preds = []
    with torch.no_grad():
        for ids, mask in ctx["val_batches"]:
            logits = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits
            preds.append(logits.argmax(-1).numpy())
    return float((np.concatenate(preds) == ctx["val_labels"]).mean())


def _ort_accuracy(graph: Path, ctx: dict[str, Any]) -> float:
    from edgefuse.ort import make_session, task_vectors

    sess = make_session(graph, threads=2)
    pred = np.concatenate([task_vectors(sess, TASK, ids, mask).argmax(-1) for ids, mask in ctx["val_batches"]])
    return float((pred == ctx["val_labels"]).mean())


# ------------------------------------------------------------------------------------------------ latency
def latency(records: list[dict[str, Any]], args: argparse.Namespace, tok: Any, data_dir: Path) -> dict[str, Any]:
    """1-thread CPU time and wall clock (ms) of every distinct graph, **each graph timed in its own process**.

    One process holding 24 sessions gave orderings that changed from pass to pass (cache and allocator state shared
    between sessions), so every graph gets a fresh interpreter: ``--rounds`` rounds, each visiting every graph once
    in forward or reverse order (so slow drifts of the shared machine's load fall on all graphs alike); a visit
    loads the graph, runs 5 warm-ups and ``--runs`` timed runs. Reported: the median over all timed runs of all
    rounds, and the spread of the per-round medians.
    """
    import subprocess

    from edgefuse.quantize.evaluate import read_texts

    enc = tok(" ".join(read_texts(data_dir / "validation.tsv", 200)), truncation=True, max_length=args.seq,
              return_tensors="np")
    ids = enc["input_ids"].astype(np.int64)
    feeds_path = WORK / f"latency-feeds-seq{args.seq}.npz"
    WORK.mkdir(parents=True, exist_ok=True)
    np.savez(feeds_path, input_ids=ids, attention_mask=np.ones_like(ids), token_type_ids=np.zeros_like(ids))
    graphs: dict[str, list[str]] = {}
    for r in records:
        key = f"{r['label']}-s{r['seed']}"
        if key not in graphs and (ROOT / r["graph"]).is_file():
            graphs[key] = ["--time-graph", str(ROOT / r["graph"])]
        if r.get("tuned") and f"{key}-tuned" not in graphs:  # the tuned graph with its session options
            graphs[f"{key}-tuned"] = ["--time-graph", str((ROOT / r["graph"]).parent), "--time-tuned"]
    keys = list(graphs)
    samples: dict[str, dict[str, list[float]]] = {k: {"cpu": [], "wall": [], "round_cpu": []} for k in keys}
    for rnd in range(args.rounds):
        order = keys if rnd % 2 == 0 else keys[::-1]
        log.warning("latency round %d/%d: %d graphs, one process each (load %s)", rnd + 1, args.rounds, len(keys),
                    " ".join(f"{x:.2f}" for x in os.getloadavg()))
        for k in order:
            cmd = [sys.executable, str(Path(__file__).resolve()), *graphs[k], "--time-feeds", str(feeds_path),
                   "--runs", str(args.runs)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            res = json.loads(out)
            samples[k]["cpu"] += res["cpu_ms"]
            samples[k]["wall"] += res["wall_ms"]
            samples[k]["round_cpu"].append(float(np.median(res["cpu_ms"])))
    return {k: {"cpu_ms_median": float(np.median(v["cpu"])), "cpu_ms_p10": float(np.percentile(v["cpu"], 10)),
                "wall_ms_median": float(np.median(v["wall"])), "round_cpu_ms_medians": v["round_cpu"],
                "runs": len(v["cpu"]), "method": "one process per graph per round"}
            for k, v in samples.items()}


def time_one_graph(target: Path, tuned: bool, feeds_path: Path, runs: int) -> dict[str, list[float]]:
    """The child of :func:`latency`: time one graph (or an export folder's tuned graph) at 1 intra-op thread."""
    from edgefuse.ort import make_session, session

    sess = session(target, threads=1) if tuned else make_session(target, threads=1)
    data = np.load(feeds_path)
    feeds = {i.name: data[i.name] for i in sess.get_inputs()}
    for _ in range(5):
        sess.run(None, feeds)
    cpu, wall = [], []
    for _ in range(runs):
        c, w = time.thread_time(), time.perf_counter()
        sess.run(None, feeds)
        cpu.append((time.thread_time() - c) * 1e3)
        wall.append((time.perf_counter() - w) * 1e3)
    return {"cpu_ms": cpu, "wall_ms": wall}


# ------------------------------------------------------------------------------------------------- report
def _ms(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def aggregate(records: list[dict[str, Any]], lat: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per variant label: accuracy and latency mean ± std over its seeds."""
    rows: dict[str, dict[str, Any]] = {}
    for r in records:
        row = rows.setdefault(r["label"], {"label": r["label"], "acc": [], "cpu": [], "wall": [], "seeds": [],
                                           "params": r["params"], "t_acc": [], "t_cpu": [], "winners": []})
        row["acc"].append(r["accuracy"])
        row["seeds"].append(r["seed"])
        t = lat.get(f"{r['label']}-s{r['seed']}")
        if t:
            row["cpu"].append(t["cpu_ms_median"])
            row["wall"].append(t["wall_ms_median"])
        tt = lat.get(f"{r['label']}-s{r['seed']}-tuned")
        if r.get("tuned") and tt:
            row["t_acc"].append(r["tuned"]["accuracy"])
            row["t_cpu"].append(tt["cpu_ms_median"])
            row["winners"].append(r["tuned"]["winner"])
    out = []
    for row in rows.values():
        acc_m, acc_s = _ms(row["acc"])
        cpu_m, cpu_s = _ms(row["cpu"]) if row["cpu"] else (float("nan"), 0.0)
        wall_m, _ = _ms(row["wall"]) if row["wall"] else (float("nan"), 0.0)
        tuned = {}
        if row["t_acc"]:
            (ta, ta_s), (tc, tc_s) = _ms(row["t_acc"]), _ms(row["t_cpu"])
            tuned = {"tuned_accuracy_mean": ta, "tuned_accuracy_std": ta_s, "tuned_cpu_ms_mean": tc,
                     "tuned_cpu_ms_std": tc_s, "tuned_winners": sorted(set(row["winners"]))}
        out.append({"label": row["label"], "n_seeds": len(row["seeds"]), "accuracy_mean": acc_m,
                    "accuracy_std": acc_s, "cpu_ms_mean": cpu_m, "cpu_ms_std": cpu_s, "wall_ms_mean": wall_m,
                    "params": row["params"], **tuned})
    tuned_all = all("tuned_cpu_ms_mean" in r for r in out)
    for row in out:  # dominated: another row faster AND more accurate beyond the seed spread
        row["dominated_by"] = _dominators(row, out, "")
        if tuned_all:
            row["tuned_dominated_by"] = _dominators(row, out, "tuned_")
    return sorted(out, key=lambda r: r["cpu_ms_mean"])


def _dominators(row: dict[str, Any], rows: list[dict[str, Any]], prefix: str) -> list[str]:
    """Rows faster than ``row`` and more accurate beyond both seed spreads (``prefix`` "tuned_": tuned graphs)."""
    acc, std, cpu = f"{prefix}accuracy_mean", f"{prefix}accuracy_std", f"{prefix}cpu_ms_mean"
    return [o["label"] for o in rows if o is not row and o[cpu] < row[cpu] and o[acc] - o[std] > row[acc] + row[std]]


def plot(rows: list[dict[str, Any]], path: Path, title: str, prefix: str = "") -> None:
    from edgefuse.report.plots import _figure, _png, _title

    fig = _figure(7.5, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    for r in rows:
        fam = r["label"].split("-")[0]
        marker = {"fusion": "o", "pruned": "*", "prune": "s", "svd": "^", "drop": "D", "teacher": "P"}.get(fam, "x")
        x, y = r[f"{prefix}cpu_ms_mean"], 100 * r[f"{prefix}accuracy_mean"]
        ax.errorbar(x, y, yerr=100 * r[f"{prefix}accuracy_std"], xerr=r[f"{prefix}cpu_ms_std"], fmt=marker,
                    capsize=3, label=r["label"])
        ax.annotate(r["label"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(("tuned graph" if prefix else "int8") + " latency, 1 thread, CPU time per run (ms)")
    ax.set_ylabel("SST-2 validation accuracy (%)")
    ax.grid(alpha=0.3)
    _title(ax, title)
    path.write_bytes(_png(fig, 110))


def targets(rows: list[dict[str, Any]], teacher_acc: float | None) -> list[tuple[str, str, str]]:
    by = {r["label"]: r for r in rows}
    out = []
    out.append(("teacher >= 88.5 % SST-2 validation (PyTorch fp32)",
                "n/a" if teacher_acc is None else f"{100 * teacher_acc:.2f} %",
                "n/a" if teacher_acc is None else ("met" if teacher_acc >= 0.885 else "missed")))
    base = by.get("teacher-int8")
    for r, tol in ((0.5, 0.7), (0.25, 1.5)):
        cands = [by[k] for k in (f"fusion-all-{r:g}", f"fusion-upper-{r:g}", f"pruned-all-{r:g}",
                                 f"pruned-upper-{r:g}") if k in by]
        if not cands or teacher_acc is None:
            out.append((f"fused {r:g} int8 within {tol} points of the teacher", "not run", "missed"))
            continue
        best = max(cands, key=lambda x: x["accuracy_mean"])
        gap = 100 * (teacher_acc - best["accuracy_mean"])
        out.append((f"fused {r:g} int8 within {tol} points of the teacher (best fusion-family: {best['label']})",
                    f"{gap:+.2f} points below", "met" if gap <= tol else "missed"))
        front = [c["label"] for c in cands if not c["dominated_by"]]
        out.append((f"a fusion-family method on the front at {r:g} (plain int8 graphs)", ", ".join(front) or "none",
                    "met" if front else "missed"))
        if all("tuned_dominated_by" in c for c in cands):
            tfront = [c["label"] for c in cands if not c["tuned_dominated_by"]]
            out.append((f"a fusion-family method on the front at {r:g} (tuned graphs)", ", ".join(tfront) or "none",
                        "met" if tfront else "missed"))
    if base is None:
        out.append(("plain int8 teacher measured", "not run", "missed"))
    return out


def write_report(args: argparse.Namespace, records: list[dict[str, Any]], lat: dict[str, Any],
                 meta: dict[str, Any]) -> None:
    rows = aggregate(records, lat)
    teacher_acc = meta.get("teacher_pytorch_accuracy")
    tg = targets(rows, teacher_acc)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    plot(rows, png, f"SST-2, all-MiniLM-L6-v2, int8, recovery {args.steps} steps; {meta['env']['cpu']}")
    tuned = all("tuned_cpu_ms_mean" in r for r in rows)
    tpng = args.out.parent / f"{args.out.name}_tuned.png"
    if tuned:
        plot(rows, tpng, f"SST-2, all-MiniLM-L6-v2, tuned graphs, recovery {args.steps} steps", prefix="tuned_")
    payload = {"meta": meta, "rows": rows, "targets": tg, "records": records, "latency": lat}
    args.out.with_suffix(".json").write_text(json.dumps(payload, indent=1, default=str))
    env = meta["env"]
    lines = [
        "# Accuracy-latency front on SST-2 (bench_pareto.py)", "",
        f"Command: `{meta['command']}`  ",
        f"Host: {env['cpu']}, {env['cores']} cores; onnxruntime {env['onnxruntime']}, torch {env['torch']}; "
        f"commit {env['commit'][:10]}  ",
        f"Load average: {meta['load_start']} at the start, {meta['load_end']} at the end (shared machine)  ",
        f"Date: {meta['date']}; wall time {meta['wall_s'] / 60:.1f} min", "",
        f"Teacher: `{meta['teacher']}`, SST-2 validation accuracy (PyTorch fp32) "
        + ("n/a" if teacher_acc is None else f"{100 * teacher_acc:.2f} %") + ".  ",
        f"Recovery: {args.steps} steps x 32 (task + logit KD, T=2), selection on {args.selection_examples} held-out "
        f"training rows every {args.eval_every} steps; reported: int8 graph on {meta['n_eval']} SST-2 validation "
        f"sentences (never used for selection). Seeds: {args.seeds}"
        + (" (leading methods; others seed 0)" if args.full else "") + ".  ",
        f"Latency: batch 1 x {args.seq} tokens, 1 intra-op thread, each graph in its own process, {args.rounds} "
        f"rounds (forward/reverse order) x {args.runs} runs, median CPU time of the calling thread (wall clock "
        "beside it).", "",
        "| variant | seeds | accuracy % (mean ± std) | CPU ms (1 thread) | wall ms | params | dominated by |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['label']} | {r['n_seeds']} | {100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}"
                     f" | {r['cpu_ms_mean']:.2f} ± {r['cpu_ms_std']:.2f} | {r['wall_ms_mean']:.2f} | "
                     f"{r['params'] / 1e6:.2f} M | {', '.join(r['dominated_by']) or '-'} |")
    lines += ["", f"![front]({png.name})", ""]
    if tuned:
        lines += ["## Tuned graphs (`edgefuse tune` on every variant's export, this host)", "",
                  f"Gate: cosine of the two logits vs the variant's fp32 graph >= {args.tune_min_cosine} (accuracy is "
                  f"the judge); timing budget {args.tune_budget_s} s per variant. The winner is opened as a user "
                  "would (`edgefuse.ort.session(folder)`: its graph and session options).", "",
                  "| variant | winner | accuracy % | CPU ms (1 thread) | dominated by |", "|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['label']} | {', '.join(r['tuned_winners'])} | {100 * r['tuned_accuracy_mean']:.2f} ± "
                         f"{100 * r['tuned_accuracy_std']:.2f} | {r['tuned_cpu_ms_mean']:.2f} ± "
                         f"{r['tuned_cpu_ms_std']:.2f} | {', '.join(r['tuned_dominated_by']) or '-'} |")
        lines += ["", f"![front, tuned]({tpng.name})", ""]
    lines += ["## Targets (issue 16)", "", "| target | measured | verdict |",
              "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in tg]
    lines += ["", "## Per run", "", "| run | before recovery (selection) | best (selection) | step | PyTorch val % | "
              "int8 val % | int8 cos vs fp32 | s/step | s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        rc = r.get("recovery") or {}
        sb, sx = rc.get("selection_before"), rc.get("selection_best")
        lines.append(f"| {r['label']} s{r['seed']} | {'-' if sb is None else f'{100 * sb:.2f}'} | "
                     f"{'-' if sx is None else f'{100 * sx:.2f}'} | {rc.get('best_step', '-')} | "
                     f"{100 * r['pytorch_accuracy']:.2f} | {100 * r['accuracy']:.2f} | "
                     f"{r['int8']['cosine_mean_vs_fp32']:.4f} | {rc.get('s_per_step', float('nan')):.2f} | "
                     f"{r['seconds']:.0f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    log.warning("wrote %s", args.out.with_suffix(".md"))


def environment() -> dict[str, Any]:
    import onnxruntime
    import torch
    from _common import git_commit

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "onnxruntime": onnxruntime.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "commit": git_commit()}


def _load(path: Path, spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    return rec if rec.get("settings") == _settings(spec, args) else None


def _settings(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    return {**spec, "steps": args.steps, "selection": args.selection_examples, "eval_every": args.eval_every,
            "teacher": str(args.teacher_path), "n_eval": args.n_eval, "max_train": args.max_train_examples,
            **({"tune": [args.tune_budget_s, args.tune_min_cosine]} if args.tune else {})}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.time_graph is not None:  # the latency child: one graph, one process, JSON on stdout
        print(json.dumps(time_one_graph(args.time_graph, args.time_tuned, args.time_feeds, args.runs)))
        return 0
    data_dir = _data_dir()
    start = time.perf_counter()
    load_start = " ".join(f"{x:.2f}" for x in os.getloadavg())
    import torch

    torch.set_num_threads(args.threads)
    from edgefuse.models import load_model, load_tokenizer
    from edgefuse.quantize.evaluate import read_labelled, read_texts

    args.teacher_path = teacher_folder(args, data_dir)
    tok = load_tokenizer(str(args.teacher_path))
    teacher = load_model(str(args.teacher_path), TASK).eval()
    texts, labels = read_labelled(data_dir / "validation.tsv", args.n_eval)
    from edgefuse.ort import tokenize

    batches = [tokenize(tok, texts[i:i + 64], 64) for i in range(0, len(texts), 64)]
    ctx: dict[str, Any] = {"tok": tok, "teacher": teacher, "val_batches": batches,
                           "val_labels": np.asarray(labels),
                           "calib": read_texts(data_dir / "train.tsv", 64)}
    teacher_acc = _torch_accuracy(teacher, ctx)
    log.warning("teacher %s: SST-2 validation %.4f (PyTorch)", args.teacher_path, teacher_acc)
    run_dir = WORK / args.budget_tag
    run_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for spec in variant_specs(args):
        path = run_dir / f"{label(spec)}-s{spec['seed']}.json"
        rec = _load(path, spec, args)
        if rec is None and not args.report_only:
            if "data" not in ctx:
                ctx["data"] = _train_data(tok, data_dir, args, selection=args.selection_examples)
            log.warning("running %s seed %d", label(spec), spec["seed"])
            rec = {"settings": _settings(spec, args), **run_variant(spec, ctx, args)}
            path.write_text(json.dumps(rec, indent=1, default=str))
            log.warning("%s seed %d: int8 validation %.4f (%.0f s)", label(spec), spec["seed"], rec["accuracy"],
                        rec["seconds"])
        if rec is not None:
            records.append(rec)
    if not records:
        raise SystemExit("no finished run to report")
    lat = latency(records, args, tok, data_dir)
    meta = {"command": shlex.join(["python", "benchmarks/bench_pareto.py", *(argv if argv is not None
                                                                             else sys.argv[1:])]),
            "env": environment(), "load_start": load_start,
            "load_end": " ".join(f"{x:.2f}" for x in os.getloadavg()),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "wall_s": time.perf_counter() - start,
            "teacher": str(args.teacher_path), "teacher_pytorch_accuracy": teacher_acc, "n_eval": len(labels)}
    write_report(args, records, lat, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
