"""Which method, which layers, how much (issue 14, item 2): SmolLM2-135M fine-tuned on E2E (the teacher), fused
in different layer ranges, keep ratios and methods, each recovered with the same budget, judged by generating.

For every configuration (``--configs``; see :data:`CONFIGS`):

1. copy the teacher, fuse the chosen layers (``fusion``: the paper's k-means; ``fusion-pruned``: drop the least
   active units, k-means the rest, activation importance on 32 training texts, pool 1.25);
2. validation perplexity of the fused model before recovery (first ``--val-rows`` held-out rows);
3. recover ``--steps`` steps (next-token loss + logit distillation from the teacher, batch 8, AdamW 1e-4, linear
   schedule; the recipe's recovery objectives), fold the frozen scale;
4. validation perplexity again and greedy generation of every held-out meaning representation (at most 64 new
   tokens, EOS stops), scored with sacrebleu BLEU/chrF and rouge-score ROUGE-L against all its references.

The teacher row is the unfused teacher scored the same way. Data: ``../shared/data/e2e/devset.csv`` split by
meaning representation (10 %, seed 0), exactly as the recipe ``export_configs/smollm2-e2e-int4.yaml`` splits it.

Command (from the repository root; about 8 min per configuration on one quiet core at 60 steps)::

    python benchmarks/bench_e2e_sweep.py --teacher runs/smollm2-e2e-int4/teacher/model --steps 60

Finished configurations are kept as JSON in ``benchmarks/_work/e2e_sweep/`` and skipped on a rerun with the same
settings. Writes ``benchmarks/results/e2e_sweep.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as common  # noqa: E402
from _common import environment, load_average, markdown_table  # noqa: E402

WORK = common.WORK / "e2e_sweep"
log = logging.getLogger("bench_e2e_sweep")
UPPER_HALF = list(range(15, 30))
UPPER_TWO_THIRDS = list(range(10, 30))
MASSIVE = {1, 2, 9, 10, 11, 28}  # layers with massive activations found on SmolLM2 (issue 14)

# name -> (method, keep ratio, layers)
CONFIGS: dict[str, tuple[str, float, list[int]]] = {
    "fusion-pruned 0.5, upper half (recipe)": ("fusion-pruned", 0.5, UPPER_HALF),
    "fusion 0.5, upper half": ("fusion", 0.5, UPPER_HALF),
    "fusion-pruned 0.5, upper two thirds": ("fusion-pruned", 0.5, UPPER_TWO_THIRDS),
    "fusion-pruned 0.5, upper two thirds less massive-activation layers": (
        "fusion-pruned", 0.5, [i for i in UPPER_TWO_THIRDS if i not in MASSIVE]),
    "fusion-pruned 0.75, upper two thirds": ("fusion-pruned", 0.75, UPPER_TWO_THIRDS),
    "fusion-pruned 0.5, all layers": ("fusion-pruned", 0.5, list(range(30))),
}


def data_config(val_rows: int | None) -> Any:
    from edgefuse.config.finetune import DataConfig

    return DataConfig(train=str(common.E2E), validation_fraction=0.1, group_column="mr", prompt_column="mr",
                      text_column="ref", max_length=96, seed=0, max_validation_examples=val_rows)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c == "." else "-" for c in name).strip("-")


def score(model: Any, tok: Any, prompts: list[str], refs: list[list[str]]) -> dict[str, Any]:
    """Greedy generation of every prompt, scored (what the recipe's evaluate stage reports for a model)."""
    from edgefuse.finetune.generation import evaluate_generation, generate_torch

    t0 = time.perf_counter()
    s = evaluate_generation(lambda ps: generate_torch(model, tok, ps, max_new_tokens=64), prompts, refs,
                            num_samples=5)
    return {"bleu": s.bleu, "chrf": s.chrf, "rouge_l": s.rouge_l, "degenerate": s.degenerate_fraction,
            "distinct_2": s.distinct_2, "mean_words": s.mean_words, "samples": list(s.samples),
            "generate_s": time.perf_counter() - t0}


def perplexity(model: Any, split: Any, tok: Any) -> float:
    from edgefuse.finetune.evaluate import evaluate

    return float(evaluate(model, split, "causal-lm", pad_token_id=tok.pad_token_id or 0, batch_size=16)["perplexity"])


def run_config(name: str, teacher: Any, tok: Any, data: Any, calib: list[str], prompts: list[str],
               refs: list[list[str]], args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from edgefuse.config.finetune import FinetuneConfig
    from edgefuse.config.fusion import FusionConfig
    from edgefuse.finetune.api import finetune_
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.fusion.scale import fold_scales_

    method, keep, layers = CONFIGS[name]
    t0 = time.perf_counter()
    torch.manual_seed(0)
    student = copy.deepcopy(teacher)
    extra = {"importance": "activations", "pool": 1.25} if method == "fusion-pruned" else {}
    cfg = FusionConfig(method=method, keep_ratio=keep, layers=layers, round_to=32, seed=0, **extra)
    fused = fuse_mlps_(student, cfg, texts=calib, tokenizer=tok)
    rec: dict[str, Any] = {"name": name, "method": method, "keep_ratio": keep, "layers": layers,
                           "params": sum(p.numel() for p in student.parameters()),
                           "fuse_s": fused.seconds, "ppl_fused": perplexity(student, data.validation, tok)}
    log.warning("%s: fused, validation perplexity %.3f; recovering %d steps (load %s)", name, rec["ppl_fused"],
                args.steps, load_average())
    ft = FinetuneConfig(task="causal-lm", task_weight=1.0, logits_weight=1.0, temperature=1.0, learning_rate=1e-4,
                        batch_size=8, max_steps=args.steps, weight_decay=0.0, group_by_length=True,
                        eval_batch_size=16, keep_best=False, num_samples=0, seed=0)
    res = finetune_(student, ft, data, teacher=teacher, tokenizer=tok, progress=False)
    fold_scales_(student)
    student.eval()
    rec.update({"recovery_s": res.train_seconds, "s_per_step": res.seconds_per_step, "steps": res.steps_run,
                "ppl_recovered": perplexity(student, data.validation, tok), **score(student, tok, prompts, refs)})
    rec["seconds"] = time.perf_counter() - t0
    return rec


def render(state: dict[str, Any]) -> str:
    env, t = state["environment"], state["teacher"]
    lines = [
        "# Which layers, how much, which method: fused SmolLM2 on E2E after the same recovery (issue 14, item 2)", "",
        f"Command: `{env['command']}`. Commit {env['commit'][:10]}, {env['date_utc']} UTC; wall time "
        f"{state['wall_s'] / 60:.1f} min.  ",
        f"Host: {env['cpu_model']}, {env['cores_logical']} logical cores, shared with other jobs; torch threads "
        f"{state['threads']}; load average {' '.join(map(str, state['load_start']))} at the start, "
        f"{' '.join(map(str, state['load_end']))} at the end.  ",
        f"Teacher: `{state['teacher_path']}` (the recipe's E2E fine-tuned SmolLM2-135M).  ",
        f"Recovery: {state['steps']} steps x 8 (next-token loss + logit KD from the teacher, AdamW 1e-4, linear "
        "schedule), final weights. Perplexity on the first "
        f"{state['val_rows']} held-out rows; BLEU/chrF/ROUGE-L from greedy generation of all {state['prompts']} "
        "held-out meaning representations against all their references.", "",
    ]
    rows = [("teacher (unfused)", "-", "-", "-", f"{t['params'] / 1e6:.1f} M", "-", f"{t['ppl']:.3f}",
             f"{t['bleu']:.2f}", "0.00", f"{t['chrf']:.2f}", f"{t['rouge_l']:.4f}", f"{t['degenerate']:.3f}")]
    for r in state["rows"]:
        rows.append((r["name"], r["method"], f"{r['keep_ratio']:g}", f"{len(r['layers'])} ({r['layers'][0]}-"
                     f"{r['layers'][-1]})", f"{r['params'] / 1e6:.1f} M", f"{r['ppl_fused']:.2f}",
                     f"{r['ppl_recovered']:.3f}", f"{r['bleu']:.2f}", f"{t['bleu'] - r['bleu']:.2f}",
                     f"{r['chrf']:.2f}", f"{r['rouge_l']:.4f}", f"{r['degenerate']:.3f}"))
    lines.append(markdown_table(("configuration", "method", "keep", "layers fused", "params", "ppl fused",
                                 "ppl recovered", "BLEU", "BLEU drop", "chrF", "ROUGE-L", "degenerate"), rows))
    lines += ["", "Samples (first 3 held-out MRs) per configuration:", ""]
    for r in [{"name": "teacher", **t}, *state["rows"]]:
        lines.append(f"- **{r['name']}**")
        lines += [f"  - `{s['prompt']}` -> {s['generated']!r}" for s in r["samples"][:3]]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", default="runs/smollm2-e2e-int4/teacher/model",
                    help="the E2E fine-tuned SmolLM2 folder (default: the recipe's teacher)")
    ap.add_argument("--steps", type=int, default=60, help="recovery steps per configuration (default 60)")
    ap.add_argument("--configs", nargs="*", default=list(CONFIGS), help="configuration names (default: all)")
    ap.add_argument("--val-rows", type=int, default=48, help="held-out rows for perplexity (default 48)")
    ap.add_argument("--prompts", type=int, default=-1, help="held-out MRs to generate for (-1: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default="e2e_sweep", help="results name: benchmarks/results/OUT.{json,md}")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    unknown = [c for c in args.configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown --configs {unknown}; choose from {list(CONFIGS)}")
    if not Path(args.teacher, "config.json").is_file():
        raise SystemExit(f"--teacher {args.teacher}: no config.json there; run the recipe's teacher stage first "
                         "(edgefuse run export_configs/smollm2-e2e-int4.yaml --until teacher)")
    import torch

    torch.set_num_threads(args.threads)
    from edgefuse.finetune.data import load_finetune_data, split_rows
    from edgefuse.finetune.generation import heldout_groups
    from edgefuse.models import load_model, load_tokenizer

    start, load_start = time.perf_counter(), load_average()
    tok = load_tokenizer(args.teacher)
    teacher = load_model(args.teacher, "causal-lm").eval()
    data = load_finetune_data(data_config(args.val_rows), tok, "causal-lm")
    prompts, refs = heldout_groups(data_config(None), max_prompts=None if args.prompts < 0 else args.prompts)
    train, _, _ = split_rows(data_config(None))
    calib = [f"{r['mr']}\n{r['ref']}" for r in train[:32]]
    WORK.mkdir(parents=True, exist_ok=True)
    settings = {"teacher": args.teacher, "steps": args.steps, "val_rows": args.val_rows, "prompts": len(prompts)}
    tpath = WORK / "teacher.json"
    t = json.loads(tpath.read_text()) if tpath.is_file() else None
    if t is None or t.get("settings") != settings:
        log.warning("scoring the teacher on %d held-out MRs (load %s)", len(prompts), load_average())
        t = {"settings": settings, "name": "teacher", "params": sum(p.numel() for p in teacher.parameters()),
             "ppl": perplexity(teacher, data.validation, tok), **score(teacher, tok, prompts, refs)}
        tpath.write_text(json.dumps(t, indent=1))
    rows = []
    for name in args.configs:
        path = WORK / f"{slug(name)}.json"
        rec = json.loads(path.read_text()) if path.is_file() else None
        if rec is None or rec.get("settings") != settings:
            rec = {"settings": settings, **run_config(name, teacher, tok, data, calib, prompts, refs, args)}
            path.write_text(json.dumps(rec, indent=1))
        log.warning("%s: BLEU %.2f (teacher %.2f), ppl %.3f (%.0f s)", name, rec["bleu"], t["bleu"],
                    rec["ppl_recovered"], rec.get("seconds", 0))
        rows.append(rec)
        state = {"environment": environment(threads=args.threads), "teacher": t, "teacher_path": args.teacher,
                 "rows": rows, "steps": args.steps, "val_rows": args.val_rows, "prompts": len(prompts),
                 "threads": args.threads, "load_start": load_start, "load_end": load_average(),
                 "wall_s": time.perf_counter() - start, "host_load_now": os.getloadavg()}
        common.write_result(f"{args.out}.json", state)  # rewritten after every configuration: partial results stay
        common.write_result(f"{args.out}.md", render(state))
    return 0


if __name__ == "__main__":
    sys.exit(main())
