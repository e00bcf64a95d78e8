"""int4 quality over several calibration sets: the runs of ``bench_int4.py`` pooled per graph recipe and model.

One greedy BLEU score of 55 held-out MRs moves by several points when a graph changes a little (two calibration
sets of the same recipe, with the same perplexity, differ by 2 to 4 BLEU), so a recipe is judged here by its
mean over the runs given, beside the quantities that vary less (perplexity, logit KL and cosine against fp32).
Nothing is measured here: the figures are read from the runs' JSON files, which hold their own commands.

    python benchmarks/int4_calibration.py int4_spread64_plain int4_spread64_pruned ... --out int4_calibration

The row ``edgefuse default (quantize_onnx)`` of a run is the default of that run's commit; ``--default-as``
names it (the recipe it stood for), so runs of one recipe pool under one name.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from collections import defaultdict
from typing import Any

from _common import RESULTS

DEFAULT_ROW = "edgefuse default (quantize_onnx)"
TARGET_DROP = 1.5  # issue 14: int4 BLEU within 1.5 points of fp32, plain and fused


def load(names: list[str]) -> list[dict[str, Any]]:
    runs = []
    for name in names:
        path = RESULTS / f"{name}.json"
        if not path.is_file():
            raise SystemExit(f"{path}: no such results file; run bench_int4.py --out {name} first")
        run = json.loads(path.read_text())
        if not run.get("complete") or "bleu" not in run["rows"].get("fp32", {}):
            raise SystemExit(f"{path}: an incomplete run (no fp32 BLEU or not complete); rerun it")
        run["name"] = name
        runs.append(run)
    return runs


def pool(runs: list[dict[str, Any]], default_as: str, models: dict[str, str]) -> dict[tuple[str, str], list]:
    """(model, recipe) -> one record per run: BLEU drop, perplexity ratio, KL, cosine, calibration."""
    out: dict[tuple[str, str], list] = defaultdict(list)
    for run in runs:
        folder = run["export"]["folder"]
        model = next((name for key, name in models.items() if key in folder), folder)
        fp32 = run["rows"]["fp32"]
        for label, row in run["rows"].items():
            if label == "fp32" or "bleu" not in row:
                continue
            recipe = default_as if label == DEFAULT_ROW else label
            calib = (run.get("calib_rows"), run.get("calib_offset", 0), run.get("calib_select", "first"))
            if any((r["calib_rows"], r["calib_offset"], r["calib_select"]) == calib for r in out[(model, recipe)]):
                continue  # the same recipe on the same calibration set: the same graph (GPTQ is deterministic)
            out[(model, recipe)].append({
                "run": run["name"], "drop": fp32["bleu"] - row["bleu"],
                "ppl_ratio": row["perplexity"] / fp32["perplexity"], "kl": row.get("kl_mean"),
                "cos": row.get("cosine_mean"), "calib_rows": run.get("calib_rows"),
                "calib_offset": run.get("calib_offset", 0), "calib_select": run.get("calib_select", "first"),
            })
    return out


def render(pooled: dict[tuple[str, str], list], runs: list[dict[str, Any]], args: argparse.Namespace) -> str:
    env = runs[0]["environment"]
    lines = [
        "# int4 quality over several calibration sets (issue 14, item 3)", "",
        f"Command: `python benchmarks/int4_calibration.py {shlex.join(sys.argv[1:])}`. It pools the runs below "
        "(each file holds its own command, commit and load); nothing is measured again.", "",
        f"Host of the runs: {env.get('cpu_model')}, {env.get('cores_logical')} logical cores, onnxruntime "
        f"{env.get('versions', {}).get('onnxruntime')}.", "",
        "Runs: " + "; ".join(
            f"`{r['name']}` ({r.get('calib_rows')} rows, "
            + (f"evenly spaced, offset {r.get('calib_offset', 0)}" if r.get("calib_select") == "spread"
               else "first rows")
            + f", commit {str(r['environment'].get('commit')).split()[0]})" for r in runs)
        + ". A recipe run twice on the same calibration set (the same graph) counts once.", "",
        "BLEU drop: fp32 BLEU minus the graph's, greedy, all 55 held-out MRs of the run. KL(fp32 || int4) and logit "
        "cosine over the target positions of the first 16 held-out rows. Mean over the runs; min..max beside it.",
        "",
        "| model | graph recipe | runs | BLEU drop mean | min .. max | ppl / fp32 mean | KL mean | cosine mean "
        f"| mean drop <= {TARGET_DROP}? |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    summary: dict[str, Any] = {}
    for (model, recipe), recs in sorted(pooled.items()):
        drops = [r["drop"] for r in recs]
        kls = [r["kl"] for r in recs if r["kl"] is not None]
        coss = [r["cos"] for r in recs if r["cos"] is not None]
        mean = statistics.fmean(drops)
        met = mean <= TARGET_DROP
        kl = f"{statistics.fmean(kls):.4f}" if kls else ""
        cos = f"{statistics.fmean(coss):.4f}" if coss else ""
        lines.append(
            f"| {model} | {recipe} | {len(recs)} | {mean:.2f} | {min(drops):.2f} .. {max(drops):.2f} | "
            f"{statistics.fmean(r['ppl_ratio'] for r in recs):.4f} | {kl} | {cos} | {'met' if met else 'missed'} |")
        summary[f"{model} | {recipe}"] = {"runs": recs, "mean_drop": mean, "met": met}
    lines += ["", "Per run:", "", "| model | graph recipe | run | BLEU drop | ppl / fp32 | KL | cosine |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for (model, recipe), recs in sorted(pooled.items()):
        for r in recs:
            kl = f"{r['kl']:.4f}" if r["kl"] is not None else ""
            cos = f"{r['cos']:.4f}" if r["cos"] is not None else ""
            lines.append(f"| {model} | {recipe} | {r['run']} | {r['drop']:.2f} | {r['ppl_ratio']:.4f} | {kl} | {cos} |")
    lines += [""] + [f"- {n}" for n in args.note]
    (RESULTS / f"{args.out}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return "\n".join(lines).rstrip() + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("names", nargs="+", help="results names of bench_int4.py runs (benchmarks/results/NAME.json)")
    ap.add_argument("--default-as", required=True, help="the recipe the runs' default row stood for")
    ap.add_argument("--model", action="append", default=[], metavar="KEY=NAME",
                    help="name the model whose export folder path contains KEY (repeatable)")
    ap.add_argument("--note", action="append", default=[], help="a note for the Markdown (repeatable)")
    ap.add_argument("--out", default="int4_calibration", help="results name: benchmarks/results/OUT.{json,md}")
    args = ap.parse_args()
    models = dict(m.split("=", 1) for m in args.model)
    runs = load(args.names)
    text = render(pool(runs, args.default_as, models), runs, args)
    (RESULTS / f"{args.out}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
