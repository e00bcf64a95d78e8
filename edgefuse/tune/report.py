"""The results of :func:`edgefuse.tune.api.tune_folder` and their Markdown table.

Example:
    >>> row = CandidateResult(name="int8", spec={}, status="rejected", reason="cosine 0.91 < 0.99")
    >>> row.passed
    False
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class CandidateResult:
    """One candidate: what it is, whether it passed the gate (and why not), and what it measured."""

    name: str
    spec: dict[str, Any]
    status: str  # winner | passed | rejected
    reason: str = ""
    cosine_mean: float | None = None
    cosine_min: float | None = None
    target_cosine: float | None = None  # remote target: its outputs vs this machine's run of the same graph
    accuracy: float | None = None
    size_bytes: int | None = None
    latency_ms_p50: float | None = None  # on the ranking clock
    wall_ms_p50: float | None = None
    cpu_ms_p50: float | None = None
    ratio_p50: float | None = None  # vs the fp32 graph, per interleaved round, on the ranking clock
    ratio_p10: float | None = None
    ratio_p90: float | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    build_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status in ("winner", "passed")


@dataclass(frozen=True)
class TuneResult:
    """The winner, its session options, every candidate, where and how they were timed."""

    folder: Path
    winner: str
    graph: str
    session_options: dict[str, Any]
    why: str
    candidates: tuple[CandidateResult, ...]
    clock: str
    cpu_clock: str | None
    threads: int
    batch_size: int
    sequence_length: int
    rounds: int
    target: str
    environment: dict[str, Any]
    accuracy_fp32: float | None
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["folder"] = str(self.folder)
        return d


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _session(spec: dict[str, Any]) -> str:
    opts = spec.get("session") or {}
    parts = [f"no {', '.join(opts['disabled_optimizers'])}"] if opts.get("disabled_optimizers") else []
    parts += ["spinning"] if opts.get("allow_spinning") else []
    parts += [f"{opts['intra_op_threads']} threads"] if opts.get("intra_op_threads") else []
    return "; ".join(parts) or "default"


def _graph(row: CandidateResult) -> str:
    fusions = row.settings.get("fusions", [])
    spec = row.spec
    opt = "no fusions" if not fusions else ("fusions: " + ", ".join(fusions))
    quant = spec.get("quantize", "dynamic")
    if quant != "fp32":
        quant = f"{quant} int8 {'per-channel' if spec.get('per_channel', True) else 'per-tensor'}"
    return f"{quant}; {opt}"


def markdown(result: TuneResult) -> str:
    """The report as Markdown: where it ran, the winner and why, one row per candidate."""
    env = result.environment
    clock = "CPU time" if result.clock == "cpu" else "wall clock"
    if result.clock == "cpu" and result.cpu_clock:
        clock += f" ({result.cpu_clock})"
    lines = [
        f"# edgefuse tune: {result.folder.name}",
        "",
        f"Target {result.target}: {env.get('cpu_model', '?')} ({env.get('machine', '?')}; "
        f"{', '.join(env.get('isa_flags') or []) or 'no ISA flags'}), "
        f"onnxruntime {env.get('onnxruntime_version', '?')}. "
        f"{result.threads} thread(s), batch {result.batch_size}, {result.sequence_length} tokens, "
        f"{result.rounds} interleaved rounds, ranked by {clock}.",
        "",
        f"**Winner: {result.winner}** ({result.graph}). {result.why}",
        "",
        "| candidate | graph | session | cosine vs fp32 | target vs here | p50 ms | wall p50 ms | CPU p50 ms "
        "| vs fp32 p50 [p10-p90] | status |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.candidates:
        ratio = "-" if r.ratio_p50 is None else f"{r.ratio_p50:.3f} [{r.ratio_p10:.3f}-{r.ratio_p90:.3f}]"
        status = r.status + (f": {r.reason}" if r.reason else "")
        lines.append(
            f"| {r.name} | {_graph(r)} | {_session(r.spec)} | {_f(r.cosine_mean, '.5f')} | "
            f"{_f(r.target_cosine, '.5f')} | {_f(r.latency_ms_p50, '.3f')} | {_f(r.wall_ms_p50, '.3f')} | "
            f"{_f(r.cpu_ms_p50, '.3f')} | {ratio} | {status} |")
    return "\n".join(lines) + "\n"
