"""The profile stage: latency, memory and per-operator time of ONNX graphs, compared side by side.

``profile_onnx(paths, cfg)`` runs every graph on the chosen target (this machine, the emulated arm64 sandbox or a
device over ssh) with the one self-contained runner (``edgefuse/profile/runner/ort_runner.py``):

1. one runner process loads all graphs and times them interleaved (A B A B ...) at every (threads, batch,
   sequence) point, so the machine's drift hits every graph alike; ratios to the first graph are per round;
2. the same process profiles per-operator time (onnxruntime's profiler) and saves the outputs;
3. one fresh process per graph measures memory: the empty process, the runtime after ``import onnxruntime``,
   and the high-water mark after running the graph;
4. the outputs on the target are compared with the first graph's outputs computed on this machine (for an
   emulated or remote target: the x86 fp32 reference when the first graph is fp32).

Example (the skipped lines are not run: they need two exported graphs):
    >>> from edgefuse.config.profile import ProfileConfig
    >>> res = profile_onnx(["a.onnx", "a_int8.onnx"], ProfileConfig(threads=[1], runs=5))  # doctest: +SKIP
    >>> res.graph("a_int8").latency[0].ratio_vs_reference_p50  # doctest: +SKIP
    0.41
"""

from __future__ import annotations

import dataclasses
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgefuse.config.profile import ProfileConfig
from edgefuse.errors import ConfigError, ProfileError
from edgefuse.manifest import tuned_session_options
from edgefuse.metrics import passes_min
from edgefuse.profile.graphs import (
    GraphInfo,
    inspect_graph,
    make_feeds,
    real_text_feeds,
    resolve_graphs,
    unique_labels,
)
from edgefuse.profile.results import (
    Environment,
    GraphProfile,
    MemoryPoint,
    MemoryResult,
    NodeStat,
    OpProfile,
    OpStat,
    OutputParity,
    ParityResult,
    ProfileResult,
)
from edgefuse.profile.stats import compare_outputs, latency_point
from edgefuse.profile.targets import open_target
from edgefuse.profile.targets.local import TargetSession

logger = logging.getLogger(__name__)
KIB_PER_MIB = 1024.0

__all__ = ["ProfileConfig", "ProfileResult", "profile_onnx"]


def profile_onnx(
    paths: Sequence[Path | str], cfg: ProfileConfig | Mapping[str, Any] | None = None, *,
    session_options: Sequence[dict[str, Any] | None] | None = None, trace_dir: Path | str | None = None,
) -> ProfileResult:
    """Profile one or more ONNX graphs on ``cfg.target``; the first graph is the reference of the ratios.

    Args:
        paths: ``.onnx`` files or folders of them (a folder expands to its ``*.onnx``, sorted).
        cfg: what to measure and where: a :class:`ProfileConfig`, a mapping of its keys, or None (local, threads
            1..cores, batch 1, sequence 128).
        session_options: per graph, onnxruntime session options of its own (``disabled_optimizers``,
            ``allow_spinning``, ``intra_op_threads``, ``session_config``). None: a graph that ``edgefuse tune``
            chose gets the options recorded with it in its folder's manifest; other graphs get ``cfg``'s.
        trace_dir: with ``cfg.keep_trace``, the folder that receives each graph's raw onnxruntime profiler
            trace (``<label>.json``, Chrome trace format: open it in Perfetto); its path relative to the folder
            above ``trace_dir`` is recorded as ``op_profile.trace``.

    Returns:
        A frozen :class:`ProfileResult` with one :class:`GraphProfile` per graph and the environment.

    Raises:
        TargetNotFoundError: a graph path does not exist.
        ProfileError: a runner failed, the target is unreachable, or a graph's output cosine against the
            reference is below ``cfg.min_cosine`` (the result is attached as ``exc.result``).
        MissingDependencyError: the emulated or ssh target lacks a host tool.

    Example (the skipped lines are not run: the profiling calls need an exported graph):
        >>> cfg = ProfileConfig(threads=[1], sequence_lengths=[16], runs=3, memory=False)
        >>> profile_onnx(["tiny.onnx"], cfg).graphs[0].latency[0].latency_ms_p50 > 0  # doctest: +SKIP
        True
    """
    from edgefuse.config import as_config

    cfg = as_config(ProfileConfig, cfg)
    if cfg.keep_trace and (trace_dir is None or not cfg.op_profile):
        raise ConfigError("keep_trace needs op_profile on and a folder for the traces (profile_onnx(trace_dir=...), "
                          "or --out with edgefuse profile --keep-trace)")
    start = time.perf_counter()
    graph_paths = resolve_graphs(paths)
    for p in graph_paths:
        _verify_listed(Path(p))
    infos = [inspect_graph(p, lab) for p, lab in zip(graph_paths, unique_labels(graph_paths), strict=True)]
    if session_options is not None and len(session_options) != len(infos):
        raise ProfileError(f"{len(session_options)} session option sets for {len(infos)} graphs")
    sessions = list(session_options) if session_options is not None else [tuned_session_options(p) for p in graph_paths]
    shapes = [(b, s) for b in cfg.batch_sizes for s in cfg.sequence_lengths]
    with tempfile.TemporaryDirectory(prefix="edgefuse-profile-") as tmp:
        work = Path(tmp)
        text = {} if cfg.inputs_npz is not None or not cfg.check_outputs else real_text_feeds(infos, shapes)
        shapes = make_feeds(infos, shapes, work / "inputs.npz", seed=cfg.seed, inputs_npz=cfg.inputs_npz, text=text)
        fed = "inputs_npz" if cfg.inputs_npz is not None else ("text" if text else "random token ids")
        with open_target(cfg, work) as session:
            bench, memories, target_outputs = _run_on_target(session, infos, shapes, cfg, work, sessions)
            if cfg.keep_trace and trace_dir is not None:
                _fetch_traces(session, bench, infos, Path(trace_dir))
            env = _environment(bench["environment"], session, cfg)
        parity: list[ParityResult | None] = [None] * len(infos)
        if cfg.check_outputs:
            parity = _parity(infos, shapes, cfg, work, session, target_outputs, env, fed)
    result = ProfileResult(
        graphs=tuple(dataclasses.replace(_graph_profile(i, info, bench, memories, parity, cfg),
                                         session_options=sessions[i]) for i, info in enumerate(infos)),
        reference_label=infos[0].label,
        environment=env,
        interleaved=len(infos) > 1,
        config=cfg.model_dump(mode="json"),
        seconds=time.perf_counter() - start,
    )
    _check_parity(result, cfg)
    return result


def _run_on_target(
    session: TargetSession, infos: list[GraphInfo], shapes: list[tuple[int, int]], cfg: ProfileConfig, work: Path,
    options: list[dict[str, Any] | None],
) -> tuple[dict[str, Any], list[dict[str, Any] | None], dict[str, np.ndarray] | None]:
    inputs = session.stage(work / "inputs.npz")
    graphs = [{"label": info.label, "path": session.stage_group(list(info.files), f"g{i}")[0], "session": options[i]}
              for i, info in enumerate(infos)]
    common = {"provider": cfg.provider, "graph_optimization_level": cfg.graph_optimization_level,
              "allow_spinning": cfg.allow_spinning, "session_config": dict(cfg.session_config),
              "inputs_npz": inputs, "shapes": [list(s) for s in shapes]}
    logger.info("timing %d graph(s) on %s", len(infos), session.name)
    bench = session.run({
        **common, "mode": "bench", "graphs": graphs, "threads": cfg.threads, "warmup_runs": cfg.warmup_runs,
        "runs": cfg.runs, "time_budget_s": cfg.time_budget_s, "min_runs": cfg.min_runs,
        "op_profile": cfg.op_profile, "op_profile_runs": cfg.op_profile_runs,
        "trace_paths": [session.remote_path(f"trace-{i}.json") for i in range(len(infos))] if cfg.keep_trace else None,
        "outputs_npz": session.remote_path("outputs.npz") if cfg.check_outputs else None,
    })
    target_outputs = None
    if cfg.check_outputs:
        session.fetch(bench["outputs_npz"], work / "target_outputs.npz")
        target_outputs = _load_npz(work / "target_outputs.npz")
    memories: list[dict[str, Any] | None] = [None] * len(infos)
    if cfg.memory:
        threads = max(p["threads"] for p in bench["points"])
        for i, g in enumerate(graphs):
            logger.info("memory of %s in a fresh process", g["label"])
            memories[i] = session.run({**common, "mode": "memory", "graph": g, "graph_index": i, "threads": threads,
                                       "runs": cfg.memory_runs})
    return bench, memories, target_outputs


def _fetch_traces(session: TargetSession, bench: dict[str, Any], infos: list[GraphInfo], trace_dir: Path) -> None:
    """Copy each graph's raw profiler trace into ``trace_dir`` and record its path relative to the parent."""
    trace_dir.mkdir(parents=True, exist_ok=True)
    for info, ops in zip(infos, bench.get("op_profiles") or [], strict=False):
        if not ops.get("trace"):
            continue
        dest = trace_dir / (info.label.replace("/", "__") + ".json")
        session.fetch(ops["trace"], dest)
        ops["trace"] = f"{trace_dir.name}/{dest.name}"


def _environment(raw: dict[str, Any], session: TargetSession, cfg: ProfileConfig) -> Environment:
    from edgefuse.profile.runner.ort_runner import cpuinfo

    return Environment(
        target=session.name,
        emulated=session.emulated,
        machine=raw["machine"],
        cpu_model=raw["cpu_model"],
        isa_flags=tuple(raw.get("isa_flags", ())),
        cores_logical=int(raw.get("cores_logical") or 0),
        cores_available=raw.get("cores_available"),
        onnxruntime_version=raw["onnxruntime_version"],
        numpy_version=raw["numpy_version"],
        python_version=raw["python_version"],
        provider=cfg.provider,
        available_providers=tuple(raw.get("available_providers", ())),
        graph_optimization_level=cfg.graph_optimization_level,
        emulated_cpu=session.emulated_cpu,
        host_cpu_model=cpuinfo()["cpu_model"] if session.emulated else None,
    )


def _parity(
    infos: list[GraphInfo],
    shapes: list[tuple[int, int]],
    cfg: ProfileConfig,
    work: Path,
    session: TargetSession,
    target_outputs: dict[str, np.ndarray] | None,
    env: Environment,
    fed: str = "random token ids",
) -> list[ParityResult | None]:
    """Compare each graph's outputs on the target with the reference (first graph) computed on this machine."""
    import platform

    if target_outputs is None:
        return [None] * len(infos)
    if session.name == "local":
        host = target_outputs
    else:
        # The reference run is always native on this machine, in its own fresh process.
        local = TargetSession(work, cfg.timeout_s)
        graphs = [{"label": i.label, "path": str(i.path.resolve())} for i in infos]
        res = local.run({"mode": "outputs", "graphs": graphs,
                         "inputs_npz": str((work / "inputs.npz").resolve()), "shapes": [list(shapes[0])],
                         "provider": cfg.provider, "graph_optimization_level": cfg.graph_optimization_level,
                         "outputs_npz": str((work / "host_outputs.npz").resolve())})
        host = _load_npz(Path(res["outputs_npz"]))
    out: list[ParityResult | None] = []
    lineage = [fp32_lineage(info.path) for info in infos]
    for i in range(len(infos)):
        ref, relation = _reference_of(i, infos, lineage)
        got = _outputs_of(target_outputs, i)
        compared = compare_outputs(got, _outputs_of(host, ref))
        same = compare_outputs(got, _outputs_of(host, i)) if session.name != "local" else ()
        values = [_metric(o, cfg.parity_metric) for o in compared]
        # nan anywhere (or nothing compared) must stay nan: min() would silently skip a nan that is not first
        worst = float("nan") if not values or any(v != v for v in values) else min(values)
        out.append(ParityResult(
            reference_label=infos[ref].label,
            reference_machine=platform.machine(),
            batch_size=shapes[0][0],
            sequence_length=shapes[0][1],
            outputs=compared,
            metric=cfg.parity_metric,
            min_cosine=worst,
            min_cosine_vs_same_graph_here=min((o.cosine for o in same), default=None),
            # fails closed: nothing compared, or a nan cosine, is a failure when a minimum is set; another
            # model's outputs are agreement to report, not a gate
            passed=None if cfg.min_cosine is None or relation == "other model" else passes_min(worst, cfg.min_cosine),
            relation=relation,
            inputs=fed,
        ))
    return out


def _verify_listed(path: Path) -> None:
    """A graph that its folder's manifest lists must still be the graph the manifest vouches for (sha256).

    Raises:
        TargetNotFoundError: the graph changed since it was exported or quantized.
    """
    import json

    from edgefuse.manifest import verify_graph

    try:
        manifest = json.loads((path.parent / "manifest.json").read_text(encoding="utf-8"))
        listed = path.name in manifest["graphs"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # no readable manifest: a bare graph, nothing to check against
    if listed:
        verify_graph(path.parent, path.name, manifest)


def fp32_lineage(path: Path) -> Path | None:
    """The fp32 graph a graph was made from, read from its folder's ``manifest.json`` (itself for an fp32
    graph; the quantizer's ``source`` for a quantized one); None when no manifest says.

    Example:
        >>> fp32_lineage(Path("/nonexistent/model.onnx")) is None
        True
    """
    import json

    path = Path(path)
    try:
        manifest = json.loads((path.parent / "manifest.json").read_text(encoding="utf-8"))
        entry = manifest["graphs"][path.name]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not isinstance(entry, dict):
        return None
    if entry.get("kind") == "fp32":
        return path.resolve()
    source = (entry.get("settings") or {}).get("source")
    if not isinstance(source, str):
        return None
    folder = Path(manifest.get("source_folder") or path.parent)
    return (folder / source).resolve()


def _reference_of(i: int, infos: list[GraphInfo], lineage: list[Path | None]) -> tuple[int, str]:
    """(index of the graph whose host outputs graph ``i`` is compared with, how they are related)."""
    mine = lineage[i]
    if mine is None or lineage[0] is None:
        return 0, "first graph"  # lineage unknown: the first graph, gated as before
    for j, info in enumerate(infos):
        if info.path.resolve() == mine:
            return j, "own fp32"
    if mine == lineage[0]:
        return 0, "first graph"  # same model, its fp32 not profiled: the first graph is of the same lineage
    return 0, "other model"


def _graph_profile(
    i: int,
    info: GraphInfo,
    bench: dict[str, Any],
    memories: list[dict[str, Any] | None],
    parity: list[ParityResult | None],
    cfg: ProfileConfig,
) -> GraphProfile:
    latency = tuple(_latency(p, i, cfg) for p in bench["points"])
    mem = memories[i]
    memory = None
    if mem is not None:
        memory = MemoryResult(
            threads=mem["threads"],
            process_baseline_rss_mib=mem["process_baseline_rss_kib"] / KIB_PER_MIB,
            runtime_baseline_rss_mib=mem["runtime_baseline_rss_kib"] / KIB_PER_MIB,
            after_load_rss_mib=mem["after_load_rss_kib"] / KIB_PER_MIB,
            peak_rss_mib=mem["peak_rss_kib"] / KIB_PER_MIB,
            model_peak_rss_mib=(mem["peak_rss_kib"] - mem["runtime_baseline_rss_kib"]) / KIB_PER_MIB,
            load_time_ms=mem["load_time_ms"],
            points=tuple(MemoryPoint(p["batch_size"], p["sequence_length"], p["peak_rss_kib"] / KIB_PER_MIB)
                         for p in mem["peaks"]),
        )
    ops = bench["op_profiles"][i] if bench.get("op_profiles") else None
    op_profile = None
    if ops is not None:
        by_op = tuple(OpStat(**o) for o in ops["by_op_type"])
        op_profile = OpProfile(
            threads=ops["threads"], batch_size=ops["batch_size"], sequence_length=ops["sequence_length"],
            runs=ops["runs"], total_kernel_us_per_run=ops["total_kernel_us_per_run"],
            matmul_quantized_us_per_run=sum(o.time_us_per_run for o in by_op if o.matmul_precision == "quantized"),
            matmul_fp32_us_per_run=sum(o.time_us_per_run for o in by_op if o.matmul_precision == "fp32"),
            matmul_quantized_nodes=sum(1 for n in ops["by_node"] if n["matmul_precision"] == "quantized"),
            matmul_fp32_nodes=sum(1 for n in ops["by_node"] if n["matmul_precision"] == "fp32"),
            by_op_type=by_op,
            by_node=tuple(NodeStat(**n) for n in ops["by_node"][: cfg.top_nodes]),
            trace=ops.get("trace") if cfg.keep_trace else None,
        )
    return GraphProfile(
        label=info.label,
        path=str(info.path),
        file_size_bytes=info.file_size_bytes,
        static_op_counts=dict(sorted(info.op_counts.items())),
        matmul_quantized_nodes_static=info.matmul_quantized_nodes,
        matmul_fp32_nodes_static=info.matmul_fp32_nodes,
        load_time_ms=memory.load_time_ms if memory else None,
        latency=latency,
        memory=memory,
        op_profile=op_profile,
        parity=parity[i],
    )


def _latency(point: dict[str, Any], i: int, cfg: ProfileConfig) -> Any:
    """Graph ``i``'s statistics at one point on ``cfg.clock``, with both clocks' p50 and ratio recorded."""
    wall, cpu = point["latencies_ms"], point.get("cpu_ms")
    if cfg.clock == "cpu" and cpu is None:
        raise ProfileError("the runner on the target recorded no CPU time (an older runner); use clock: wall")
    main = cpu if cfg.clock == "cpu" else wall
    lp = latency_point(main[i], main[0], threads=point["threads"], batch=point["batch_size"],
                       seq=point["sequence_length"], warmup=cfg.warmup_runs)
    p50 = {name: (float(np.percentile(t[i], 50)), float(np.percentile(np.divide(t[i], t[0]), 50)))
           for name, t in (("wall", wall), ("cpu", cpu)) if t is not None}
    return dataclasses.replace(
        lp, clock=cfg.clock, cpu_clock=point.get("cpu_clock"),
        wall_ms_p50=p50["wall"][0], wall_ratio_vs_reference_p50=p50["wall"][1],
        cpu_ms_p50=p50.get("cpu", (None, None))[0], cpu_ratio_vs_reference_p50=p50.get("cpu", (None, None))[1])


def _metric(o: OutputParity, metric: str) -> float:
    # Outputs without a sequence axis (e.g. a pooled or logits output) have only the flat cosine.
    return o.cosine_mean_pooled if metric == "mean_pooled" and o.cosine_mean_pooled is not None else o.cosine


def _check_parity(result: ProfileResult, cfg: ProfileConfig) -> None:
    bad = [g for g in result.graphs if g.parity is not None and g.parity.passed is False]
    if not bad:
        return
    env = result.environment
    where = env.target + (" (emulated)" if env.emulated else "")
    worst = ", ".join(f"{g.label}: {g.parity.min_cosine:.6f} against {g.parity.reference_label!r}"
                      for g in bad if g.parity)
    machine = bad[0].parity.reference_machine if bad[0].parity else "?"
    blind = [g.label for g in bad if g.parity and g.parity.min_cosine != g.parity.min_cosine]
    if blind:  # nan: no output in common, or a nan in the outputs; a check that measured nothing fails
        err = ProfileError(
            f"output check: nothing could be compared for {', '.join(blind)} against the reference "
            f"{result.reference_label!r} on {where} (no output of the same name and shape, or nan outputs); "
            "profile graphs of the same model, or pass --no-check-outputs to skip the check"
        )
        err.result = result  # type: ignore[attr-defined]
        raise err
    err = ProfileError(
        f"output {cfg.parity_metric} cosine against the reference computed on {machine} "
        f"is below min_cosine={cfg.min_cosine} on {where} for {worst}; check the graph (or its quantization), "
        f"or lower --min-cosine"
    )
    err.result = result  # type: ignore[attr-defined]  # so the CLI can still write what was measured
    raise err


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def _outputs_of(outputs: dict[str, np.ndarray], index: int) -> dict[str, np.ndarray]:
    prefix = f"{index}|"
    return {k[len(prefix):]: v for k, v in outputs.items() if k.startswith(prefix)}
