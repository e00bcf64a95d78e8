"""Report plots, made with matplotlib's Agg canvas (no display, no pyplot global state) and returned as PNG bytes.

Every function takes the plain dicts of the JSON report, so a report can be rebuilt from ``profile.json`` files.
Titles of plots from emulated profiles say so.

Example:
    >>> png = latency_vs_quality([{"variant": "fp32", "latency_ms": 30.0, "cosine": 1.0}])
    >>> png[:8] == b"\\x89PNG\\r\\n\\x1a\\n"
    True
"""

from __future__ import annotations

import io
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _title(ax: Any, text: str) -> None:
    # Long titles (target + the EMULATED warning) wrap instead of being cut at the figure's edge.
    ax.set_title(textwrap.fill(text, 70), fontsize=9)


def _png(fig: Any, dpi: int) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    # bbox "tight" grows the canvas to every artist (legends outside the axes, wrapped titles): nothing clipped
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", pad_inches=0.1)
    return buf.getvalue()


def _ms_axis(axis: Any, values: Sequence[float]) -> None:
    """Latency axis in plain milliseconds ("20 ms", not 2x10^1); log scale only when values span > 20x."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    positive = [v for v in values if v and v > 0]
    fmt = FuncFormatter(lambda v, _pos: f"{v:g} ms")
    if positive and max(positive) / min(positive) > 20:
        # Axis has no public scale setter: the Axes' set_xscale/set_yscale is the API
        (axis.axes.set_yscale if axis.axis_name == "y" else axis.axes.set_xscale)("log")
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_minor_formatter(NullFormatter())
    axis.set_major_formatter(fmt)


def _suffix(prof: Mapping[str, Any]) -> str:
    env = prof["environment"]
    return f" - {env['target']}" + (" [EMULATED, not device latency]" if env.get("emulated") else "")


def headline_point(graph: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The latency point used in summaries: the first shape at the largest thread count."""
    pts = graph.get("latency") or []
    if not pts:
        return None
    first = (pts[0]["batch_size"], pts[0]["sequence_length"])
    same = [p for p in pts if (p["batch_size"], p["sequence_length"]) == first]
    return max(same, key=lambda p: p["threads"])


def latency_distributions(prof: Mapping[str, Any], *, dpi: int = 96) -> bytes:
    """Box plots of every graph's timed runs at the headline point (first shape, most threads)."""
    graphs = prof["graphs"]
    fig = _figure(max(5.0, 1.4 * len(graphs) + 2), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    pts = [headline_point(g) for g in graphs]
    ax.boxplot([p["samples_ms"] if p else [0.0] for p in pts], showfliers=True)
    ax.set_xticks(range(1, len(graphs) + 1), [g["label"] for g in graphs], rotation=15)
    p0 = pts[0] or {}
    ax.set_ylabel("latency per run")
    _ms_axis(ax.yaxis, [v for p in pts if p for v in p["samples_ms"]])
    _title(ax, f"threads={p0.get('threads')} batch={p0.get('batch_size')} seq={p0.get('sequence_length')}"
           f"{_suffix(prof)}")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig, dpi)


def latency_vs_threads(prof: Mapping[str, Any], *, dpi: int = 96) -> bytes:
    """p50 latency against intra-op threads, one line per (graph, shape)."""
    fig = _figure(6.0, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    for g in prof["graphs"]:
        shapes = sorted({(p["batch_size"], p["sequence_length"]) for p in g["latency"]})
        for b, s in shapes:
            pts = sorted((p["threads"], p["latency_ms_p50"]) for p in g["latency"]
                         if (p["batch_size"], p["sequence_length"]) == (b, s))
            ax.plot([t for t, _ in pts], [v for _, v in pts], marker="o", label=f"{g['label']} b{b} s{s}")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("intra-op threads")
    ax.set_ylabel("p50 latency")
    _ms_axis(ax.yaxis, [p["latency_ms_p50"] for g in prof["graphs"] for p in g["latency"]])
    _title(ax, "Thread sweep" + _suffix(prof))
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _png(fig, dpi)


def memory_bars(prof: Mapping[str, Any], *, dpi: int = 96) -> bytes:
    """Stacked bars: empty process, what ``import onnxruntime`` adds, and what the graph adds at its peak."""
    graphs = [g for g in prof["graphs"] if g.get("memory")]
    fig = _figure(max(5.0, 1.3 * len(graphs) + 2), 3.8)
    ax = fig.add_subplot(1, 1, 1)
    labels = [g["label"] for g in graphs]
    empty = [g["memory"]["process_baseline_rss_mib"] for g in graphs]
    runtime = [g["memory"]["runtime_baseline_rss_mib"] - e for g, e in zip(graphs, empty, strict=True)]
    model = [g["memory"]["model_peak_rss_mib"] for g in graphs]
    x = range(len(graphs))
    ax.bar(x, empty, label="empty process", color="#bbbbbb")
    ax.bar(x, runtime, bottom=empty, label="import onnxruntime", color="#7fa7d6")
    ax.bar(x, model, bottom=[a + b for a, b in zip(empty, runtime, strict=True)], label="model (peak)", color="#d6877f")
    ax.set_xticks(list(x), labels, rotation=15)
    ax.set_ylabel("RSS (MiB)")
    _title(ax, "Peak memory, one fresh process per graph" + _suffix(prof))
    ax.legend(fontsize=7)
    return _png(fig, dpi)


def op_breakdown(prof: Mapping[str, Any], top: int = 8, *, dpi: int = 96) -> bytes:
    """Horizontal stacked bars of kernel time per run by op type (the ``top`` slowest types, the rest 'other')."""
    graphs = [g for g in prof["graphs"] if g.get("op_profile")]
    totals: dict[str, float] = {}
    for g in graphs:
        for o in g["op_profile"]["by_op_type"]:
            totals[o["op_type"]] = totals.get(o["op_type"], 0.0) + o["time_us_per_run"]
    keep = [op for op, _ in sorted(totals.items(), key=lambda kv: -kv[1])[:top]]
    fig = _figure(7.0, max(3.2, 0.6 * len(graphs) + 2.6))
    ax = fig.add_subplot(1, 1, 1)
    cmap = __import__("matplotlib").colormaps["tab20"]
    left = [0.0] * len(graphs)
    for k, op in enumerate([*keep, "other"]):
        vals = []
        for g in graphs:
            ops = {o["op_type"]: o["time_us_per_run"] for o in g["op_profile"]["by_op_type"]}
            vals.append(sum(v for name, v in ops.items() if name not in keep) if op == "other" else ops.get(op, 0.0))
        ax.barh(range(len(graphs)), [v / 1e3 for v in vals], left=left, label=op, color=cmap(k % 20))
        left = [a + v / 1e3 for a, v in zip(left, vals, strict=True)]
    ax.set_yticks(range(len(graphs)), [g["label"] for g in graphs])
    ax.set_xlabel("kernel time per run (ms)")
    _title(ax, "Per-operator time" + _suffix(prof))
    # beside the axes, one entry a line: never on the bars, and the tight bounding box keeps all of it
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, title="op type",
              title_fontsize=7)
    return _png(fig, dpi)


def latency_vs_quality(rows: Sequence[Mapping[str, Any]], *, title: str = "", dpi: int = 96) -> bytes:
    """Scatter of latency against accuracy (or cosine): one point per graph, named in the legend (no labels on
    the points to overlap). Pass native and emulated rows separately: their timings must not share an axis."""
    fig = _figure(6.4, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    metric = "accuracy" if any(r.get("accuracy") is not None for r in rows) else "cosine"
    pts = [r for r in rows if r.get("latency_ms") is not None and r.get(metric) is not None]
    markers = "osD^vP*Xh<>"
    cmap = __import__("matplotlib").colormaps["tab10"]
    for k, r in enumerate(pts):
        emulated = bool(r.get("emulated"))
        ax.scatter([r["latency_ms"]], [r[metric]], s=60, marker=markers[k % len(markers)], color=cmap(k % 10),
                   facecolors="none" if emulated else cmap(k % 10), label=str(r["variant"]))
    _ms_axis(ax.xaxis, [r["latency_ms"] for r in pts])
    ax.set_xlabel("p50 latency")
    ax.set_ylabel(metric)
    _title(ax, title or f"Latency against {metric}")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(alpha=0.3)
    return _png(fig, dpi)


def training_curves(series: Sequence[tuple[Any, ...]], *, dpi: int = 96) -> bytes:
    """Training loss and the held-out metric against step, runs (phases) one after another on one step axis.

    ``series``: ``(name, ((step, loss), ...), ((step, metric), ...), metric_name, has_initial, initial_value)``.
    """
    fig = _figure(9.0, 3.4)
    ax_loss, ax_metric = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    offset = 0
    metric_names = []
    for name, loss, metric, metric_name, _has_initial, initial in series:
        if loss:
            ax_loss.plot([offset + s for s, _ in loss], [v for _, v in loss], marker="." if len(loss) < 30 else None,
                         label=name)
        pts = [(offset + int(s), v) for s, v in metric]
        if initial is not None:
            pts.insert(0, (offset, initial))
        if pts:
            ax_metric.plot([s for s, _ in pts], [v for _, v in pts], marker="o", label=f"{name}: {metric_name}")
        metric_names.append(metric_name)
        offset += max([int(s) for s, _ in loss] + [int(s) for s, _ in metric] + [0])
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss")
    _title(ax_loss, "Training loss")
    ax_metric.set_xlabel("step")
    ax_metric.set_ylabel(", ".join(dict.fromkeys(metric_names)))
    _title(ax_metric, "Held-out metric (step 0: before training)")
    for ax in (ax_loss, ax_metric):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    return _png(fig, dpi)
