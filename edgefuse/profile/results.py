"""Frozen, JSON-serialisable results of the profile stage. Units are in the field names; numbers stay floats.

``ProfileResult.to_dict()`` is what ``edgefuse profile --json`` prints and what ``edgefuse report`` reads back
(``ProfileResult.from_dict``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SCHEMA = "edgefuse.profile.api/1"


@dataclass(frozen=True)
class Environment:
    """Where the numbers were measured. ``emulated`` timings say nothing about a real device."""

    target: str
    emulated: bool
    machine: str
    cpu_model: str
    isa_flags: tuple[str, ...]
    cores_logical: int
    cores_available: int | None
    onnxruntime_version: str
    numpy_version: str
    python_version: str
    provider: str
    available_providers: tuple[str, ...]
    graph_optimization_level: str
    emulated_cpu: str | None = None
    host_cpu_model: str | None = None


@dataclass(frozen=True)
class LatencyPoint:
    """Latency of one graph at one (threads, batch, sequence) point, timed interleaved with the other graphs."""

    threads: int
    batch_size: int
    sequence_length: int
    timed_runs: int
    warmup_runs: int
    latency_ms_mean: float
    latency_ms_std: float
    latency_ms_min: float
    latency_ms_p50: float
    latency_ms_p90: float
    latency_ms_p99: float
    latency_ms_max: float
    throughput_samples_per_s: float
    samples_ms: tuple[float, ...]
    # This graph vs the reference (first) graph, per interleaved round: time_this / time_reference.
    ratio_vs_reference_p50: float
    ratio_vs_reference_mean: float
    ratio_vs_reference_std: float
    ratio_vs_reference_p10: float
    ratio_vs_reference_p90: float
    # which clock the figures above use (wall, or cpu: see cpu_clock), and the other clock's p50 and ratio
    clock: str = "wall"
    cpu_clock: str | None = None  # thread (1 intra-op thread: the calling thread's CPU time) or process
    wall_ms_p50: float | None = None
    wall_ratio_vs_reference_p50: float | None = None
    cpu_ms_p50: float | None = None
    cpu_ratio_vs_reference_p50: float | None = None


@dataclass(frozen=True)
class OpStat:
    """Kernel time of one operator type, per run. ``matmul_precision`` is 'quantized', 'fp32' or None."""

    op_type: str
    time_us_per_run: float
    calls_per_run: float
    share: float
    matmul_precision: str | None


@dataclass(frozen=True)
class NodeStat:
    """Kernel time of one node of the optimised graph, per run."""

    node: str
    op_type: str
    time_us_per_run: float
    share: float
    matmul_precision: str | None


@dataclass(frozen=True)
class OpProfile:
    """Per-operator time from onnxruntime's profiler, aggregated by op type and by node."""

    threads: int
    batch_size: int
    sequence_length: int
    runs: int
    total_kernel_us_per_run: float
    matmul_quantized_us_per_run: float
    matmul_fp32_us_per_run: float
    matmul_quantized_nodes: int
    matmul_fp32_nodes: int
    by_op_type: tuple[OpStat, ...]
    by_node: tuple[NodeStat, ...]
    # the raw onnxruntime profiler trace (keep_trace), relative to the trace folder's parent: "traces/x.json"
    trace: str | None = None


@dataclass(frozen=True)
class MemoryPoint:
    """High-water mark of the memory process after running one shape (shapes run smallest first)."""

    batch_size: int
    sequence_length: int
    peak_rss_mib: float


@dataclass(frozen=True)
class MemoryResult:
    """Memory of one graph in its own fresh process.

    ``runtime_baseline_rss_mib`` is the process after ``import onnxruntime`` (the runtime's own cost);
    ``model_peak_rss_mib`` = ``peak_rss_mib`` - ``runtime_baseline_rss_mib`` is what the graph adds.
    """

    threads: int
    process_baseline_rss_mib: float
    runtime_baseline_rss_mib: float
    after_load_rss_mib: float
    peak_rss_mib: float
    model_peak_rss_mib: float
    load_time_ms: float
    points: tuple[MemoryPoint, ...]


@dataclass(frozen=True)
class OutputParity:
    """One output of a graph on the target against the reference graph's output on this (host) machine."""

    output: str
    cosine: float  # of the flattened output
    max_abs_diff: float
    # Outputs of rank >= 3 (batch, seq, hidden): mean over the sequence axis first, as a sentence embedding is.
    cosine_mean_pooled: float | None = None


@dataclass(frozen=True)
class ParityResult:
    """Whether a graph's outputs on the target agree with the reference computed on this machine."""

    reference_label: str
    reference_machine: str
    batch_size: int
    sequence_length: int
    outputs: tuple[OutputParity, ...]
    metric: str  # which cosine min_cosine is: "flat" or "mean_pooled"
    min_cosine: float
    # The same graph on this machine vs on the target: isolates the target's kernels from quantization error.
    min_cosine_vs_same_graph_here: float | None
    passed: bool | None
    # what the reference is to this graph: "own fp32" (its lineage in the manifest), "first graph" (lineage
    # unknown: gated as before), or "other model" (a different lineage: agreement reported, never gated)
    relation: str = "first graph"
    # what the graphs were fed: "text" (edgefuse/data/corpus.txt through the folders' shared tokenizer),
    # "random token ids" (no shared tokenizer), or "inputs_npz" (the user's arrays)
    inputs: str = "random token ids"


@dataclass(frozen=True)
class GraphProfile:
    """Everything measured for one graph."""

    label: str
    path: str
    file_size_bytes: int
    static_op_counts: dict[str, int]
    matmul_quantized_nodes_static: int
    matmul_fp32_nodes_static: int
    load_time_ms: float | None
    latency: tuple[LatencyPoint, ...]
    memory: MemoryResult | None
    op_profile: OpProfile | None
    parity: ParityResult | None
    # the graph's own onnxruntime session options (e.g. the ones `edgefuse tune` chose); None: the config's
    session_options: dict[str, Any] | None = None


@dataclass(frozen=True)
class ProfileResult:
    """What :func:`edgefuse.profile.api.profile_onnx` measured: every graph, compared with the first (reference)."""

    graphs: tuple[GraphProfile, ...]
    reference_label: str
    environment: Environment
    interleaved: bool
    config: dict[str, Any]
    seconds: float
    schema: str = SCHEMA

    def graph(self, label: str) -> GraphProfile:
        """The graph with this label."""
        for g in self.graphs:
            if g.label == label:
                return g
        raise KeyError(f"no graph labelled {label!r}; have {[g.label for g in self.graphs]}")

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``kind: profile``), read back by :meth:`from_dict`."""
        return {"kind": "profile", **_plain(dataclasses.asdict(self))}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ProfileResult:
        """Rebuild from :meth:`to_dict` output (e.g. a ``profile.json``)."""
        d = dict(d)
        d.pop("kind", None)
        return _build(cls, d)


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def _build(cls: Any, data: Any) -> Any:
    """Inverse of ``asdict`` for the classes above (nested dataclasses, tuples of dataclasses)."""
    import typing

    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            continue
        kwargs[f.name] = _coerce(hints[f.name], data[f.name])
    return cls(**kwargs)


def _coerce(tp: Any, value: Any) -> Any:
    import typing

    if value is None:
        return None
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value) if len(inner) == 1 else value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value)
    if origin is tuple:
        return tuple(_coerce(args[0], v) for v in value)
    return value
