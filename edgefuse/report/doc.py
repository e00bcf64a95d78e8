"""The report as a list of blocks (headings, paragraphs, tables, plots), rendered to Markdown and HTML.

This is the one place where numbers become text: results stay floats everywhere else. Emulated profiles are
labelled emulated in every heading, table title and plot title that shows their timings.

Example:
    >>> fmt_ms(12.3456), fmt_ratio(0.41234), fmt_mib(101.26)
    ('12.35', '0.412x', '101.3')
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from edgefuse.report.plots import headline_point


@dataclass(frozen=True)
class Heading:
    level: int
    text: str


@dataclass(frozen=True)
class Para:
    text: str


@dataclass(frozen=True)
class Table:
    headers: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Plot:
    """A figure made only when a renderer needs it (Markdown does not)."""

    title: str
    render: Callable[[], bytes] = field(compare=False)


Block = Heading | Para | Table | Plot


@dataclass(frozen=True)
class ReportData:
    """Everything a report shows, normalised to plain dicts (as in the JSON report)."""

    title: str
    profiles: tuple[dict[str, Any], ...]
    sections: tuple[dict[str, Any], ...]
    variants: tuple[dict[str, Any], ...]


def fmt_ms(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.2f}" if v >= 0.1 else f"{v:.4f}"


def fmt_ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}x"


def fmt_mib(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def fmt_num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        text = json.dumps(v, default=str)
        return text if len(text) <= 120 else text[:117] + "..."
    return str(v)


def target_label(env: Mapping[str, Any]) -> str:
    """'local (x86_64, AMD EPYC ...)' or 'arm64-emulated (neoverse-n1) [EMULATED under qemu: not device latency]'."""
    text = f"{env['target']} ({env['machine']}, {env['cpu_model']})"
    if env.get("emulated"):
        text += " [EMULATED under qemu: timings are not device latency]"
    return text


def build_blocks(data: ReportData, *, top_ops: int, top_nodes: int, plots: bool, dpi: int) -> list[Block]:
    """The whole report, in order."""
    from edgefuse.report import plots as P

    blocks: list[Block] = [Heading(1, data.title)]
    variants = list(data.variants)
    for n, prof in enumerate(data.profiles, 1):
        blocks += _profile_blocks(prof, n, top_ops=top_ops, top_nodes=top_nodes, plots=plots, dpi=dpi)
        variants += profile_variant_rows(prof)
    if variants:
        blocks.append(Heading(2, "Variants: latency against quality"))
        keys = ["variant", "target", "latency_ms", "accuracy", "cosine"]
        extra = sorted({k for r in variants for k in r} - {*keys, "emulated"})
        blocks.append(Table(("variant", "target", "latency p50 (ms)", "accuracy", "cosine", *extra),
                            tuple((str(r.get("variant")), _target_cell(r), fmt_ms(r.get("latency_ms")),
                                   fmt_num(r.get("accuracy")), fmt_num(r.get("cosine")),
                                   *(fmt_num(r.get(k)) for k in extra)) for r in variants)))
        if plots and any(r.get("latency_ms") is not None and (r.get("accuracy") is not None or r.get("cosine")
                                                              is not None) for r in variants):
            blocks.append(Plot("Latency against accuracy / cosine, every variant",
                               partial(P.latency_vs_quality, tuple(variants), dpi=dpi)))
    for sec in data.sections:
        blocks.append(Heading(2, str(sec.get("title", "Section"))))
        body = sec.get("data", {})
        rows = body if isinstance(body, list) else [body]
        if rows and all(isinstance(r, Mapping) for r in rows) and len(rows) > 1:
            cols = list(dict.fromkeys(k for r in rows for k in r))
            blocks.append(Table(tuple(cols), tuple(tuple(fmt_num(r.get(c)) for c in cols) for r in rows)))
        elif rows and isinstance(rows[0], Mapping):
            blocks.append(Table(("key", "value"), tuple((str(k), fmt_num(v)) for k, v in rows[0].items())))
        else:
            blocks.append(Para(fmt_num(body)))
    return blocks


def _target_cell(row: Mapping[str, Any]) -> str:
    t = str(row.get("target", "-"))
    return t + " (EMULATED)" if row.get("emulated") else t


def profile_variant_rows(prof: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One variant row per graph: headline p50 latency and the parity cosine (when measured)."""
    env = prof["environment"]
    rows = []
    for g in prof["graphs"]:
        p = headline_point(g)
        parity = g.get("parity") or {}
        rows.append({"variant": g["label"], "target": env["target"], "emulated": bool(env.get("emulated")),
                     "latency_ms": p["latency_ms_p50"] if p else None,
                     "cosine": parity.get("min_cosine") if parity.get("outputs") else None})
    return rows


def _profile_blocks(prof: Mapping[str, Any], n: int, *, top_ops: int, top_nodes: int, plots: bool,
                    dpi: int) -> list[Block]:
    from edgefuse.report import plots as P

    env, graphs = prof["environment"], prof["graphs"]
    emu = " (EMULATED)" if env.get("emulated") else ""
    lat = "emulated latency" if env.get("emulated") else "latency"
    out: list[Block] = [Heading(2, f"Profile {n}: {target_label(env)}")]
    if env.get("emulated"):
        out.append(Para("These timings come from qemu-user on an x86 host. They check that the arm64 graphs load "
                        "and agree with x86; they are not the latency of any ARM device and must not be compared "
                        "with native numbers."))
    out.append(Table(("environment", "value"), (
        ("target", str(env["target"])), ("emulated", fmt_num(bool(env.get("emulated")))),
        ("emulated CPU", fmt_num(env.get("emulated_cpu"))), ("machine", str(env["machine"])),
        ("CPU model", str(env["cpu_model"])), ("host CPU (if emulated)", fmt_num(env.get("host_cpu_model"))),
        ("ISA flags", " ".join(env.get("isa_flags", ())) or "-"),
        ("cores (logical / available)", f"{env.get('cores_logical')} / {fmt_num(env.get('cores_available'))}"),
        ("onnxruntime", str(env["onnxruntime_version"])), ("provider", str(env["provider"])),
        ("graph optimisation", str(env["graph_optimization_level"])),
        ("reference graph (ratios, parity)", str(prof["reference_label"])),
        ("interleaved (A B A B)", fmt_num(bool(prof.get("interleaved")))),
    )))
    out.append(Heading(3, f"Latency{emu}"))
    rows = []
    for g in graphs:
        for p in g["latency"]:
            rows.append((g["label"], str(p["threads"]), str(p["batch_size"]), str(p["sequence_length"]),
                         str(p["timed_runs"]), fmt_ms(p["latency_ms_mean"]), fmt_ms(p["latency_ms_std"]),
                         fmt_ms(p["latency_ms_p50"]), fmt_ms(p["latency_ms_p90"]), fmt_ms(p["latency_ms_p99"]),
                         f"{p['throughput_samples_per_s']:.1f}",
                         f"{fmt_ratio(p['ratio_vs_reference_p50'])} [{p['ratio_vs_reference_p10']:.3f}-"
                         f"{p['ratio_vs_reference_p90']:.3f}]"))
    out.append(Table(("graph", "threads", "batch", "seq", "runs", f"mean {lat} (ms)", "std (ms)", "p50 (ms)",
                      "p90 (ms)", "p99 (ms)", "samples/s", f"ratio vs {prof['reference_label']} p50 [p10-p90]"),
                     tuple(rows), caption="ratio: per interleaved round, time of the graph / time of the reference"))
    if plots:
        out.append(Plot(f"Latency distributions{emu}", partial(P.latency_distributions, prof, dpi=dpi)))
        if len({pt["threads"] for g in graphs for pt in g["latency"]}) > 1:
            out.append(Plot(f"Latency against threads{emu}", partial(P.latency_vs_threads, prof, dpi=dpi)))
    out.append(Heading(3, f"Size, load time and memory{emu}"))
    mem_rows = []
    for g in graphs:
        m = g.get("memory") or {}
        mem_rows.append((g["label"], f"{g['file_size_bytes'] / 2**20:.2f}", fmt_ms(g.get("load_time_ms")),
                         fmt_mib(m.get("process_baseline_rss_mib")), fmt_mib(m.get("runtime_baseline_rss_mib")),
                         fmt_mib(m.get("peak_rss_mib")), fmt_mib(m.get("model_peak_rss_mib"))))
    out.append(Table(("graph", "file (MiB)", "load (ms)", "empty process RSS (MiB)",
                      "runtime baseline RSS (MiB)", "peak RSS (MiB)", "model adds (MiB)"), tuple(mem_rows),
                     caption="memory: one fresh process per graph; runtime baseline = after import onnxruntime"))
    if plots and any(g.get("memory") for g in graphs):
        out.append(Plot(f"Peak memory{emu}", partial(P.memory_bars, prof, dpi=dpi)))
    profiled = [g for g in graphs if g.get("op_profile")]
    if profiled:
        out.append(Heading(3, f"Per-operator time{emu}"))
        out.append(Table(("graph", "quantized MatMul nodes", "fp32 MatMul nodes", "quantized MatMul (us/run)",
                          "fp32 MatMul (us/run)", "all kernels (us/run)", "MatMul ops in the file"),
                         tuple((g["label"], str(g["op_profile"]["matmul_quantized_nodes"]),
                                str(g["op_profile"]["matmul_fp32_nodes"]),
                                f"{g['op_profile']['matmul_quantized_us_per_run']:.1f}",
                                f"{g['op_profile']['matmul_fp32_us_per_run']:.1f}",
                                f"{g['op_profile']['total_kernel_us_per_run']:.1f}",
                                f"{g['matmul_quantized_nodes_static']} quantized / "
                                f"{g['matmul_fp32_nodes_static']} fp32")
                               for g in profiled)))
        op_rows = [(g["label"], o["op_type"], f"{o['time_us_per_run']:.1f}", f"{100 * o['share']:.1f}%",
                    f"{o['calls_per_run']:.0f}", o["matmul_precision"] or "")
                   for g in profiled for o in g["op_profile"]["by_op_type"][:top_ops]]
        out.append(Table(("graph", "op type", "us/run", "share", "calls/run", "MatMul precision"), tuple(op_rows)))
        node_rows = [(g["label"], nd["node"], nd["op_type"], f"{nd['time_us_per_run']:.1f}",
                      f"{100 * nd['share']:.1f}%", nd["matmul_precision"] or "")
                     for g in profiled for nd in g["op_profile"]["by_node"][:top_nodes]]
        out.append(Table(("graph", "node", "op type", "us/run", "share", "MatMul precision"), tuple(node_rows),
                         caption="slowest nodes of the optimised graph"))
        if plots:
            out.append(Plot(f"Per-operator breakdown{emu}", partial(P.op_breakdown, prof, top_ops, dpi=dpi)))
    checked = [g for g in graphs if g.get("parity")]
    if checked:
        out.append(Heading(3, "Output parity"))
        out.append(Table(("graph", "reference (machine)", "batch x seq", "cosine (flat)", "cosine (mean-pooled)",
                          "checked metric", "max abs diff", "cosine vs same graph on host", "passed"),
                         tuple((g["label"], f"{g['parity']['reference_label']} ({g['parity']['reference_machine']})",
                                f"{g['parity']['batch_size']}x{g['parity']['sequence_length']}",
                                fmt_num(min((o["cosine"] for o in g["parity"]["outputs"]), default=None)),
                                fmt_num(min((o["cosine_mean_pooled"] for o in g["parity"]["outputs"]
                                             if o.get("cosine_mean_pooled") is not None), default=None)),
                                str(g["parity"].get("metric", "flat")),
                                fmt_num(max((o["max_abs_diff"] for o in g["parity"]["outputs"]), default=None)),
                                fmt_num(g["parity"].get("min_cosine_vs_same_graph_here")),
                                fmt_num(g["parity"]["passed"])) for g in checked)))
    return out


def normalise_variant(row: Mapping[str, Any]) -> dict[str, Any]:
    """Accept ``{variant, latency_ms | latency, accuracy | cosine, ...}``; numbers stay numbers."""
    r = dict(row)
    if "variant" not in r:
        raise ValueError(f"a variant row needs a 'variant' key, got keys {sorted(r)}")
    if "latency_ms" not in r and "latency" in r:
        r["latency_ms"] = r.pop("latency")
    return r


def sections_from(objs: Sequence[Any]) -> list[dict[str, Any]]:
    """Generic sections ({title, data}) from stage results that are not profiles."""
    out = []
    for obj in objs:
        d = obj.to_dict() if hasattr(obj, "to_dict") else dict(obj)
        title = d.pop("title", None) or d.get("kind") or type(obj).__name__
        data = d.pop("data", d)
        out.append({"title": str(title), "data": data})
    return out
