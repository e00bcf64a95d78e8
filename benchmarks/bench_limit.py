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
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def _session(path: str, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")  # fair on a shared machine
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def _time(sess, feeds, runs: int, warmup: int = 3) -> list[float]:
    for _ in range(warmup):
        sess.run(None, feeds)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, feeds)
        out.append(time.perf_counter() - t0)
    return out


def _matmul_graphs(tmp: Path, m: int, k: int, n: int) -> dict[str, tuple[str, dict]]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graphs: dict[str, tuple[str, dict]] = {}
    w = rng.standard_normal((k, n)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])], "fp32",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [numpy_helper.from_array(w, "w")])
    p = tmp / "fp32.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    graphs["fp32"] = (str(p), {"a": rng.standard_normal((m, k)).astype(np.float32)})
    wq = rng.integers(-127, 128, (k, n), dtype=np.int8)
    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "az"], ["y"])], "int8",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(wq, "w"), numpy_helper.from_array(np.array(128, np.uint8), "az")])
    p = tmp / "int8.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    graphs["int8"] = (str(p), {"a": rng.integers(0, 256, (m, k), dtype=np.uint8)})
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(tmp / "fp32.onnx"), block_size=32, is_symmetric=True, bits=4)
        q.process()
        p = tmp / "int4.onnx"
        onnx.save(q.model.model, p)
        graphs["int4"] = (str(p), graphs["fp32"][1])
    except Exception as exc:  # older onnxruntime without the NBits quantizer: report int4 as unmeasured
        print(f"int4 kernel not measured: {exc}", file=sys.stderr)
    return graphs


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
    ap.add_argument("--out", default=str(HERE / "results" / "limit"))
    args = ap.parse_args()

    from edgefuse.profile.macs import count_macs

    m, k, n = args.mkn
    kernel_macs = m * k * n
    peaks: dict[int, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        kernels = _matmul_graphs(Path(tmp), m, k, n)
        for threads in args.threads:
            peaks[threads] = {}
            sessions = {name: (_session(p, threads), feeds) for name, (p, feeds) in kernels.items()}
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
            lat = _time(_session(path, threads), _graph_feeds(path, args.batch, args.seq), args.runs)
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

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    meta = {"command": "python " + " ".join(sys.argv), "cpu": cpu, "cores": os.cpu_count(),
            "onnxruntime": ort.__version__, "kernel_mkn": [m, k, n], "batch": args.batch, "seq": args.seq,
            "note": "shared VM: throughput is the best of 3 interleaved rounds; latencies are medians"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "peak_gmac_per_s": peaks, "graphs": rows},
                                                   indent=2) + "\n")
    lines = [f"Command: `{meta['command']}`", "",
             f"CPU: {cpu}, {meta['cores']} cores, onnxruntime {meta['onnxruntime']}",
             "", f"Kernel throughput (MatMul {m}x{k} @ {k}x{n}, best of 3 interleaved rounds):", "",
             "| threads | fp32 GMAC/s | int8 GMAC/s | int4 GMAC/s |", "|---|---|---|---|"]
    for t, pk in peaks.items():
        lines.append(f"| {t} | {pk['fp32']:.1f} | {pk['int8']:.1f} | {pk.get('int4', float('nan')):.1f} |")
    if rows:
        lines += ["", f"Graphs at batch {args.batch} x {args.seq} tokens:", "",
                  "| graph | threads | GMAC (fp32/int8/int4) | bound ms | p50 ms | p50 / bound |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(f"| {r['graph']} | {r['threads']} | {r['gmacs']:.3f} "
                         f"({r['fp32_gmacs']:.3f}/{r['int8_gmacs']:.3f}/{r['int4_gmacs']:.3f}) "
                         f"| {r['bound_ms']:.2f} | {r['p50_ms']:.2f} | {r['multiple_of_bound']:.2f}x |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
