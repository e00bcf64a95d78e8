"""The one onnxruntime runner that edgefuse runs on every target: local, emulated arm64 and remote (ssh).

Self-contained on purpose: it imports only the standard library, numpy and onnxruntime, so it can be copied
alone to a device (or run under qemu-user in the arm64 sandbox) next to the graphs. It reads one job file
(JSON), writes one result file (JSON) and, in ``bench`` mode, an ``.npz`` of the graphs' outputs for the
parity check. It never prints results on stdout (logs go to stderr), so a noisy remote shell cannot corrupt
them.

Modes:

- ``env``: describe the machine (CPU model, ISA flags, cores, versions, providers).
- ``bench``: load every graph in this one process and time them interleaved (A B A B ...) at every
  (threads, batch, sequence) point, on two clocks: wall clock, and CPU time (the calling thread's CPU time at 1
  thread, where onnxruntime runs every kernel on that thread; the whole process's otherwise), which a
  preempted or shared machine does not inflate; then profile per-operator time and save the outputs for parity.
- ``outputs``: run every graph once and save its outputs (the host's reference for the parity check).
- ``memory``: load ONE graph in this fresh process and report the process's RSS before importing
  onnxruntime, after importing it (the runtime's baseline) and its high-water mark after running the graph.

Usage:
    python ort_runner.py JOB.json

A graph entry may carry its own session options (``"session": {"disabled_optimizers": [...], "allow_spinning":
true, "intra_op_threads": 2, "session_config": {...}}``), e.g. the ones ``edgefuse tune`` chose for it.

Example job (paths are as seen by the runner):
    {"mode": "memory", "graph": {"label": "a", "path": "a.onnx"}, "inputs_npz": "in.npz",
     "shapes": [[1, 16]], "threads": 1, "runs": 3, "result_path": "out.json"}
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time

RUNNER_VERSION = 2
ISA_FLAGS_X86 = (
    "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16",
)
# ARM "CPU part" numbers (implementer 0x41) -> core names, for the CPU model of devices whose /proc/cpuinfo
# has no "model name" line (most Linux arm64 kernels).
ARM_PARTS = {
    "0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
    "0xd08": "Cortex-A72", "0xd09": "Cortex-A73", "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76",
    "0xd0c": "Neoverse-N1", "0xd0d": "Cortex-A77", "0xd40": "Neoverse-V1", "0xd41": "Cortex-A78",
    "0xd44": "Cortex-X1", "0xd46": "Cortex-A510", "0xd47": "Cortex-A710", "0xd48": "Cortex-X2",
    "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2", "0xd80": "Cortex-A520", "0xd81": "Cortex-A720",
}
# The one op-type table of edgefuse: the matrix-product operators by precision. It lives here because this file
# must stay self-contained; host code (profile/graphs.py, profile/macs.py) imports it from this module. The fp
# set includes the fused kernels that onnxruntime's graph optimizer makes (FusedGemm, Attention), which appear in
# the per-operator profile of the optimized graph but not in the exported file.
INT8_MATMULS = frozenset(
    {"MatMulInteger", "DynamicQuantizeMatMul", "QLinearMatMul", "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeLSTM"}
)
INT4_MATMULS = frozenset({"MatMulNBits", "MatMulBnb4"})
QUANTIZED_MATMULS = INT8_MATMULS | INT4_MATMULS
FP_MATMULS = frozenset({"MatMul", "Gemm", "FusedMatMul", "FusedGemm", "Attention", "MultiHeadAttention"})


def log(msg: str) -> None:
    print(f"ort_runner: {msg}", file=sys.stderr, flush=True)


def rss_kib() -> tuple[int, int]:
    """(current RSS, high-water mark) in KiB: /proc/self/status on Linux, getrusage elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            fields = dict(line.split(":", 1) for line in fh if ":" in line)
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])
    except (OSError, KeyError, ValueError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak // 1024 if sys.platform == "darwin" else peak  # macOS reports bytes, Linux KiB
        return peak, peak


def cpuinfo() -> dict:
    """CPU model, ISA flags and core count from /proc/cpuinfo (what the OS, or qemu's fake file, exposes)."""
    info: dict = {"cpu_model": platform.processor() or platform.machine(), "isa_flags": [],
                  "cores_logical": os.cpu_count()}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError:
        return info
    first: dict = {}
    for line in text.splitlines():
        if ":" in line:
            key, value = (s.strip() for s in line.split(":", 1))
            first.setdefault(key, value)
    if "model name" in first:
        info["cpu_model"] = first["model name"]
    elif first.get("CPU implementer") == "0x41" and "CPU part" in first:
        info["cpu_model"] = "ARM " + ARM_PARTS.get(first["CPU part"], f"part {first['CPU part']}")
    if "flags" in first:  # x86: keep the flags that decide which MLAS kernels run
        have = set(first["flags"].split())
        info["isa_flags"] = [f for f in ISA_FLAGS_X86 if f in have]
    elif "Features" in first:  # arm64: the list is short and every entry matters (asimddp, i8mm, sve, sme)
        info["isa_flags"] = first["Features"].split()
    if hasattr(os, "sched_getaffinity"):
        info["cores_available"] = len(os.sched_getaffinity(0))
    return info


def environment() -> dict:
    import numpy
    import onnxruntime as ort

    env = cpuinfo()
    env.update(
        machine=platform.machine(),
        system=platform.system(),
        python_version=platform.python_version(),
        numpy_version=numpy.__version__,
        onnxruntime_version=ort.__version__,
        available_providers=list(ort.get_available_providers()),
        runner_version=RUNNER_VERSION,
    )
    return env


def make_session(path: str, threads: int, job: dict, profile_prefix: str | None = None, session: dict | None = None):
    """An InferenceSession with the job's options, overridden by the graph's own ``session`` options."""
    import onnxruntime as ort

    own = session or {}
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(own.get("intra_op_threads") or threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[job.get("graph_optimization_level", "all")]
    # Spinning threads burn the cores between runs; on a shared machine that steals time from the other
    # graph of an interleaved pair, so it is off unless the job asks for it.
    spin = own.get("allow_spinning", job.get("allow_spinning"))
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    for key, value in {**(job.get("session_config") or {}), **(own.get("session_config") or {})}.items():
        so.add_session_config_entry(str(key), str(value))
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
    provider = job.get("provider", "CPUExecutionProvider")
    disabled = [str(d) for d in own.get("disabled_optimizers") or ()]
    if disabled:
        return ort.InferenceSession(path, sess_options=so, providers=[provider], disabled_optimizers=disabled)
    return ort.InferenceSession(path, sess_options=so, providers=[provider])


def effective_threads(threads: int, graphs: list) -> list:
    """The intra-op thread count each graph runs with at a point of ``threads`` (its own setting wins)."""
    return [int((g.get("session") or {}).get("intra_op_threads") or threads) for g in graphs]


def cpu_clock_for(threads: list) -> str:
    """``thread`` when every graph runs on the calling thread alone (1 intra-op thread), else ``process``."""
    return "thread" if all(t == 1 for t in threads) else "process"


def load_feeds(npz, graph_index: int, batch: int, seq: int) -> dict:
    prefix = f"{graph_index}|{batch}x{seq}|"
    return {k[len(prefix):]: npz[k] for k in npz.files if k.startswith(prefix)}


def thread_grid(job: dict) -> list:
    threads = job.get("threads")
    if threads:
        return [int(t) for t in threads]
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()) or 1
    return list(range(1, cores + 1))


def time_point(sessions: list, feeds: list, job: dict, clock: str = "thread") -> tuple[list, int, list]:
    """Warm up every graph, then time them interleaved, one run each per round.

    Returns per-graph wall-clock ms lists, the number of rounds, and per-graph CPU ms lists (``clock``: thread
    or process CPU time)."""
    cpu_time = time.thread_time if clock == "thread" else time.process_time
    warmup, runs, min_runs = int(job.get("warmup_runs", 5)), int(job.get("runs", 20)), int(job.get("min_runs", 3))
    budget = job.get("time_budget_s")
    for _ in range(warmup):
        for sess, fd in zip(sessions, feeds):  # noqa: B905 (the runner supports Python < 3.10)
            sess.run(None, fd)
    times: list = [[] for _ in sessions]
    cpu: list = [[] for _ in sessions]
    start = time.perf_counter()
    rounds = 0
    while True:
        if budget is None and rounds >= runs:
            break
        if budget is not None and rounds >= min_runs and (time.perf_counter() - start >= budget or rounds >= runs):
            break
        # Alternate the order every round so neither graph always runs right after the other (cache, turbo).
        order = range(len(sessions)) if rounds % 2 == 0 else range(len(sessions) - 1, -1, -1)
        for i in order:
            c0, t0 = cpu_time(), time.perf_counter()
            sessions[i].run(None, feeds[i])
            t1, c1 = time.perf_counter(), cpu_time()
            times[i].append((t1 - t0) * 1e3)
            cpu[i].append((c1 - c0) * 1e3)
        rounds += 1
    return times, rounds, cpu


def op_profile(path: str, threads: int, fd: dict, job: dict, workdir: str, session: dict | None = None,
               keep_as: str = "") -> dict:
    """Per-operator kernel time from onnxruntime's profiling trace, per run, after the warm-up runs.

    ``keep_as``: move the raw trace there (for Perfetto) instead of deleting it."""
    warmup, runs = int(job.get("warmup_runs", 5)), int(job.get("op_profile_runs", 5))
    sess = make_session(path, threads, job, profile_prefix=os.path.join(workdir, "ort_profile"), session=session)
    for _ in range(warmup + runs):
        sess.run(None, fd)
    trace = sess.end_profiling()
    try:
        with open(trace, encoding="utf-8") as fh:
            events = json.load(fh)
    finally:
        if keep_as:
            shutil.move(trace, keep_as)
        else:
            os.unlink(trace)
    model_runs = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e.get("name") == "model_run")
    t_start = model_runs[warmup] if len(model_runs) > warmup else 0
    by_node: dict = {}
    by_op: dict = {}
    calls: dict = {}
    for e in events:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time") or e["ts"] < t_start:
            continue
        node = e["name"][: -len("_kernel_time")]
        op = e.get("args", {}).get("op_name", "?")
        by_node.setdefault(node, [op, 0.0])[1] += float(e["dur"])
        by_op[op] = by_op.get(op, 0.0) + float(e["dur"])
        calls[op] = calls.get(op, 0) + 1
    n = max(1, min(runs, len(model_runs) - warmup) if model_runs else runs)
    total = sum(by_op.values()) / n

    def kind(op: str):
        return "quantized" if op in QUANTIZED_MATMULS else ("fp32" if op in FP_MATMULS else None)

    ops = [
        {"op_type": op, "time_us_per_run": us / n, "calls_per_run": calls[op] / n,
         "share": (us / n) / total if total else 0.0, "matmul_precision": kind(op)}
        for op, us in sorted(by_op.items(), key=lambda kv: -kv[1])
    ]
    nodes = [
        {"node": node, "op_type": op, "time_us_per_run": us / n, "share": (us / n) / total if total else 0.0,
         "matmul_precision": kind(op)}
        for node, (op, us) in sorted(by_node.items(), key=lambda kv: -kv[1][1])
    ]
    return {"runs": n, "threads": threads, "total_kernel_us_per_run": total, "by_op_type": ops, "by_node": nodes,
            "trace": keep_as or None}


def bench(job: dict) -> dict:
    import numpy as np

    graphs = job["graphs"]
    npz = np.load(job["inputs_npz"], allow_pickle=False)
    shapes = [tuple(s) for s in job["shapes"]]
    points = []
    for threads in thread_grid(job):
        sessions = [make_session(g["path"], threads, job, session=g.get("session")) for g in graphs]
        clock = cpu_clock_for(effective_threads(threads, graphs))
        for batch, seq in shapes:
            feeds = [load_feeds(npz, i, batch, seq) for i in range(len(graphs))]
            log(f"timing {len(graphs)} graph(s) at threads={threads} batch={batch} seq={seq}")
            times, rounds, cpu = time_point(sessions, feeds, job, clock)
            points.append({"threads": threads, "batch_size": batch, "sequence_length": seq, "rounds": rounds,
                           "latencies_ms": times, "cpu_ms": cpu, "cpu_clock": clock,
                           "graph_threads": effective_threads(threads, graphs)})
        del sessions
    result: dict = {"points": points, "op_profiles": [], "outputs_npz": None}
    threads0 = max(thread_grid(job))
    batch0, seq0 = shapes[0]
    with tempfile.TemporaryDirectory(prefix="edgefuse-ortprof-") as work:
        if job.get("op_profile", True):
            for i, g in enumerate(graphs):
                log(f"per-operator profile of {g['label']}")
                keep = (job.get("trace_paths") or [""] * len(graphs))[i]
                result["op_profiles"].append(
                    dict(op_profile(g["path"], threads0, load_feeds(npz, i, batch0, seq0), job, work,
                                    session=g.get("session"), keep_as=keep),
                         batch_size=batch0, sequence_length=seq0)
                )
    if job.get("outputs_npz"):
        result["outputs_npz"] = outputs(job)
    return result


def outputs(job: dict) -> str:
    """Run every graph once at the first shape (1 thread) and save its outputs as ``"{graph}|{output}"``."""
    import numpy as np

    npz = np.load(job["inputs_npz"], allow_pickle=False)
    batch0, seq0 = job["shapes"][0]
    outs = {}
    for i, g in enumerate(job["graphs"]):
        sess = make_session(g["path"], 1, job, session={**(g.get("session") or {}), "intra_op_threads": 1})
        names = [o.name for o in sess.get_outputs()]
        for name, value in zip(names, sess.run(None, load_feeds(npz, i, batch0, seq0))):  # noqa: B905
            outs[f"{i}|{name}"] = np.asarray(value)
    np.savez(job["outputs_npz"], **outs)  # type: ignore[arg-type]  # numpy's stub reads **kw as allow_pickle
    return job["outputs_npz"]


def memory(job: dict) -> dict:
    # Measured before onnxruntime is imported: the cost of an empty Python process (with json/stdlib).
    rss_empty, _ = rss_kib()
    import numpy as np
    import onnxruntime  # noqa: F401  (the import itself is the runtime's baseline)

    rss_runtime, _ = rss_kib()
    g = job["graph"]
    npz = np.load(job["inputs_npz"], allow_pickle=False)
    t0 = time.perf_counter()
    sess = make_session(g["path"], int(job["threads"]), job, session=g.get("session"))
    load_ms = (time.perf_counter() - t0) * 1e3
    rss_loaded, _ = rss_kib()
    peaks = []
    # Smallest shapes first: the high-water mark only grows, so each point's peak is meaningful.
    for batch, seq in sorted((tuple(s) for s in job["shapes"]), key=lambda s: s[0] * s[1]):
        fd = load_feeds(npz, int(job.get("graph_index", 0)), batch, seq)
        for _ in range(max(1, int(job.get("runs", 3)))):
            sess.run(None, fd)
        peaks.append({"batch_size": batch, "sequence_length": seq, "peak_rss_kib": rss_kib()[1]})
    return {"process_baseline_rss_kib": rss_empty, "runtime_baseline_rss_kib": rss_runtime,
            "after_load_rss_kib": rss_loaded, "peak_rss_kib": rss_kib()[1], "load_time_ms": load_ms,
            "threads": int(job["threads"]), "peaks": peaks}


def main(argv: list) -> int:
    if len(argv) != 2:
        log("usage: ort_runner.py JOB.json")
        return 2
    with open(argv[1], encoding="utf-8") as fh:
        job = json.load(fh)
    mode = job.get("mode")
    if mode == "memory":
        body = memory(job)  # first, before anything else is imported or allocated
    elif mode == "bench":
        body = bench(job)
    elif mode == "outputs":
        body = {"outputs_npz": outputs(job)}
    elif mode == "env":
        body = {}
    else:
        log(f"unknown mode {mode!r}; expected env, bench, outputs or memory")
        return 2
    body["environment"] = environment()
    body["mode"] = mode
    tmp = job["result_path"] + ".tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(body, fh)
    os.replace(tmp, job["result_path"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
