"""The physical limit: this CPU's fp32, int8 and int4 matrix-multiply throughput with onnxruntime, each graph's
multiply-accumulate count, and the resulting lower bound on its latency.

Throughput is measured on large single-MatMul graphs (fp32 MatMul; u8 x s8 MatMulInteger; 4-bit MatMulNBits
weights with fp32 activations) with the same session settings as the profiler. A graph's bound is
``fp32_MACs / fp32_peak + int8_MACs / int8_peak + int4_MACs / int4_peak``: the time if every matrix product ran at
the kernel's best measured speed and nothing else cost anything. Each graph's measured p50 is reported as a
multiple of its bound (1.0 would be perfect).

    python benchmarks/bench_limit.py --graphs fp32=out/minilm/model.onnx int8=out/minilm/model_int8_avx512-vnni.onnx
    python benchmarks/bench_limit.py --threads 1 2 --seq 128 --runs 50

Outputs benchmarks/results/limit.{json,md} (or --out).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, cpu_model, load_average, markdown_table, matmul_graphs, ort_session


def _time(sess, feeds, runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        sess.run(None, feeds)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        out.append(time.perf_counter() - t0)
    return out


def _graph_feeds(path: str, batch: int, seq: int) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {}
    for inp in sess.get_inputs():
        if "mask" in inp.name:
            feeds[inp.name] = np.ones((batch, seq), np.int64)
        elif "type" in inp.name:
            feeds[inp.name] = np.zeros((batch, seq), np.int64)
        else:
            feeds[inp.name] = rng.integers(1000, 2000, (batch, seq), dtype=np.int64)
    return feeds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--graphs", nargs="*", default=[], metavar="LABEL=PATH", help="ONNX graphs to bound and time")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--mkn", type=int, nargs=3, default=[512, 1536, 1536], metavar=("M", "K", "N"))
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--out", default=str(RESULTS / "limit"))
    args = ap.parse_args()

    from edgefuse.profile.macs import count_macs

    m, k, n = args.mkn
    kernel_macs = m * k * n
    peaks: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        kernels = matmul_graphs(Path(tmp), m, k, n)
        for threads in args.threads:
            peaks[threads] = {}
            sessions = {name: (ort_session(p, threads), feeds) for name, (p, feeds) in kernels.items()}
            best = {name: float("inf") for name in sessions}
            for _ in range(3):  # interleaved rounds; keep the best (the machine is shared)
                for name, (sess, feeds) in sessions.items():
                    best[name] = min(best[name], min(_time(sess, feeds, max(5, args.runs // 3))))
            for name, seconds in best.items():
                peaks[threads][name] = kernel_macs / seconds / 1e9  # GMAC/s
            print(f"threads={threads}: " + ", ".join(f"{n_} {v:.1f} GMAC/s" for n_, v in peaks[threads].items()))

    rows = []
    graphs = [g.split("=", 1) for g in args.graphs]
    for label, path in graphs:
        macs = count_macs(path, {"batch": args.batch, "seq": args.seq})
        if macs.unresolved_nodes or macs.total == 0:
            # a bound from a partial MAC count would be too low and flatter nobody: refuse it rather than divide by 0
            sys.exit(f"{label}: shape inference left {macs.unresolved_nodes} matrix products unresolved "
                     f"({macs.total} MACs counted) in {path}; re-export with static or named dynamic axes")
        for threads in args.threads:
            pk = peaks[threads]
            bound_s = macs.fp32 / (pk["fp32"] * 1e9) + macs.int8 / (pk["int8"] * 1e9)
            if macs.int4:
                bound_s += macs.int4 / (pk.get("int4", pk["fp32"]) * 1e9)
            lat = _time(ort_session(path, threads), _graph_feeds(path, args.batch, args.seq), args.runs)
            p50 = statistics.median(lat)
            rows.append({"graph": label, "path": path, "threads": threads, "gmacs": macs.total / 1e9,
                         "fp32_gmacs": macs.fp32 / 1e9, "int8_gmacs": macs.int8 / 1e9, "int4_gmacs": macs.int4 / 1e9,
                         "unresolved_matmuls": macs.unresolved_nodes, "bound_ms": bound_s * 1e3,
                         "p50_ms": p50 * 1e3, "p90_ms": float(np.percentile(lat, 90)) * 1e3,
                         "multiple_of_bound": p50 / bound_s})
            r = rows[-1]
            print(f"{label:24s} t={threads} {r['gmacs']:.3f} GMAC  bound {r['bound_ms']:.2f} ms  "
                  f"p50 {r['p50_ms']:.2f} ms  = {r['multiple_of_bound']:.2f}x bound")

    import onnxruntime as ort

    cpu = cpu_model()
    meta = {"command": "python " + " ".join(sys.argv), "cpu": cpu, "cores": os.cpu_count(),
            "load_average": load_average(), "onnxruntime": ort.__version__, "kernel_mkn": [m, k, n],
            "batch": args.batch, "seq": args.seq,
            "note": "shared VM: throughput is the best of 3 interleaved rounds; latencies are medians"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "peak_gmac_per_s": peaks, "graphs": rows},
                                                   indent=2) + "\n")
    lines = [f"Command: `{meta['command']}`", "",
             f"CPU: {cpu}, {meta['cores']} cores, onnxruntime {meta['onnxruntime']}",
             "", f"Kernel throughput (MatMul {m}x{k} @ {k}x{n}, best of 3 interleaved rounds):", "",
             markdown_table(("threads", "fp32 GMAC/s", "int8 GMAC/s", "int4 GMAC/s"),
                            [(t, f"{pk['fp32']:.1f}", f"{pk['int8']:.1f}", f"{pk.get('int4', float('nan')):.1f}")
                             for t, pk in peaks.items()])]
    if rows:
        lines += [f"Graphs at batch {args.batch} x {args.seq} tokens:", "",
                  markdown_table(("graph", "threads", "GMAC (fp32/int8/int4)", "bound ms", "p50 ms", "p50 / bound"),
                                 [(r["graph"], r["threads"],
                                   f"{r['gmacs']:.3f} ({r['fp32_gmacs']:.3f}/{r['int8_gmacs']:.3f}/"
                                   f"{r['int4_gmacs']:.3f})", f"{r['bound_ms']:.2f}", f"{r['p50_ms']:.2f}",
                                   f"{r['multiple_of_bound']:.2f}x") for r in rows])]
    out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
