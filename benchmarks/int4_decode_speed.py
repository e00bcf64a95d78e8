"""Decode speed of finished int4 graphs, side by side (issue 14, items 3 and 4): every graph given with
``--graph LABEL=PATH`` is timed in one interleaved run by bench_int4's timer (1 intra-op thread, a warm-up, then
rounds that alternate the graph order; per decode token: CPU time from the process clock, wall p50/p90 over steps,
and the prefill's wall time). Ratios are taken inside this one run only. Quality is not measured here: the graphs
come from runs that scored them (their files say which).

    python benchmarks/int4_decode_speed.py --tokenizer runs/x/export/fp32 \\
        --graph fp32=runs/x/export/fp32/model.onnx --graph int4=OUT/int4/model.onnx \\
        --ratio 'int4/fp32<=0.5' --rounds 9 --out int4_decode_speed
"""
from __future__ import annotations

import argparse
import logging
import math
import time
from pathlib import Path

import _common as common
import bench_int4 as B

logger = logging.getLogger("int4_decode_speed")


def parse_graph(text: str) -> tuple[str, Path]:
    """``LABEL=PATH`` -> (label, path); the path must be an ONNX file."""
    label, sep, path = text.partition("=")
    if not sep or not label or not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"--graph {text!r}: expected LABEL=PATH to an existing .onnx file")
    return label, Path(path)


def ratio(a: float, b: float) -> float:
    """``a / b`` when both are finite and positive, else nan (which fails every ``<=`` target).

    >>> ratio(1.0, 2.0), math.isnan(ratio(1.0, 0.0))
    (0.5, True)
    """
    return a / b if math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0 else math.nan


def parse_ratio(text: str, graphs: dict[str, Path]) -> tuple[str, str, float | None]:
    """``A/B`` or ``A/B<=LIMIT`` -> (A, B, LIMIT or None); both labels must be graphs given."""
    pair, sep, limit = text.partition("<=")
    a, slash, b = pair.partition("/")
    if not slash or a not in graphs or b not in graphs:
        raise SystemExit(f"--ratio {text!r}: expected A/B[<=LIMIT] with both labels given by --graph")
    try:
        return a, b, float(limit) if sep else None
    except ValueError:
        raise SystemExit(f"--ratio {text!r}: the limit after <= is not a number") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graph", type=parse_graph, action="append", required=True, help="LABEL=PATH (repeatable)")
    ap.add_argument("--tokenizer", type=Path, required=True, help="an export folder holding the tokenizer")
    ap.add_argument("--ratio", action="append", default=[],
                    help="A/B or A/B<=LIMIT: CPU and wall p50 of graph A over graph B, with a target (met when the "
                         "CPU ratio is at most LIMIT) (repeatable)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--note", action="append", default=[])
    ap.add_argument("--out", default="int4_decode_speed")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    graphs = dict(args.graph)
    ratios = [parse_ratio(r, graphs) for r in args.ratio]
    env = common.environment(threads=1)
    tok = common.export_tokenizer(args.tokenizer)
    from edgefuse.finetune.generation import heldout_groups

    prompt = heldout_groups(B.data_config(None), max_prompts=1)[0][0]
    t0 = time.perf_counter()
    timing = B.decode_timing(graphs, tok, prompt, args.tokens, args.rounds)
    load_end = common.load_average()
    res = {"environment": env, "graphs": {k: str(v) for k, v in graphs.items()}, "timing": timing,
           "tokens": args.tokens, "rounds": args.rounds, "load_end": load_end, "prompt": prompt,
           "wall_s": time.perf_counter() - t0, "notes": args.note, "ratios": []}
    for a, b, limit in ratios:
        # a clock that did not move (or went backwards) measures nothing: the ratio is nan and the target missed
        cpu = ratio(timing[a]["decode_cpu_ms"], timing[b]["decode_cpu_ms"])
        wall = ratio(timing[a]["decode_ms_p50"], timing[b]["decode_ms_p50"])
        res["ratios"].append({"a": a, "b": b, "cpu": cpu, "wall_p50": wall, "limit": limit,
                              "met": None if limit is None else bool(cpu <= limit)})
    common.write_result(f"{args.out}.json", res)
    common.write_result(f"{args.out}.md", markdown(res))
    print(markdown(res))


def markdown(res: dict) -> str:
    """The run as Markdown: command, host and load, one row per graph, then the ratios."""
    env, t = res["environment"], res["timing"]
    rows = [(k, f"{v['decode_cpu_ms']:.2f}", f"{v['decode_ms_p50']:.2f}", f"{v['decode_ms_p90']:.2f}",
             f"{v['prefill_ms_p50']:.1f}", v["decode_steps"], f"`{res['graphs'][k]}`") for k, v in t.items()]
    out = [
        "# int4 decode speed, side by side (issue 14)", "",
        f"Command: `{env['command']}`. Commit {env['commit']}, {env['date_utc']} UTC; {res['wall_s']:.0f} s.", "",
        f"Host: {env['cpu_model']}, {env.get('cores_logical', '?')} logical cores (ISA: "
        f"{', '.join(env.get('isa_flags', [])) or 'unknown'}); onnxruntime "
        f"{env['versions'].get('onnxruntime', '?')}; load average (1/5/15 min) "
        f"{' '.join(map(str, env['load_average']))} at the start, {' '.join(map(str, res['load_end']))} at the end.",
        "",
        f"Decode: greedy, {res['tokens']} tokens after one held-out E2E MR, 1 intra-op thread, {res['rounds']} "
        "interleaved rounds (order reversed every other round) after a warm-up. CPU ms per token = (CPU time of the "
        "run - CPU time of a prefill-only run) / decode tokens, median over rounds; wall p50/p90 over all steps.", "",
        common.markdown_table(["graph", "decode CPU ms/token", "wall p50 ms", "wall p90 ms", "prefill ms",
                               "steps", "file"], rows),
    ]
    if res["ratios"]:
        out += ["", common.markdown_table(
            ["ratio", "CPU", "wall p50", "target", "met"],
            [(f"{r['a']} / {r['b']}", f"{r['cpu']:.3f}x", f"{r['wall_p50']:.3f}x",
              "" if r["limit"] is None else f"CPU <= {r['limit']:.2f}x",
              "" if r["met"] is None else ("met" if r["met"] else "**missed**")) for r in res["ratios"]])]
    out += [""] + [f"- {n}" for n in res["notes"]]
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
