"""The report as a list of blocks (headings, paragraphs, tables, plots), rendered to Markdown and HTML.

This is the one place where numbers become text: results stay floats everywhere else. Emulated profiles are
labelled emulated in every heading, table title and plot title that shows their timings.

Example:
    >>> fmt_ms(12.3456), fmt_ratio(0.41234), fmt_mib(101.26)
    ('12.35', '0.412x', '101.3')
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from edgefuse.report.blocks import (  # noqa: F401  (re-exported: the renderers import them from here)
    VARIANT_HEADERS,
    Block,
    Heading,
    Links,
    Para,
    Plot,
    ReportData,
    Summary,
    Table,
    fmt_mib,
    fmt_ms,
    fmt_num,
    fmt_ratio,
    header,
    target_label,
)
from edgefuse.report.plots import headline_point


def build_blocks(data: ReportData, *, top_ops: int, top_nodes: int, plots: bool, dpi: int) -> list[Block]:
    """The whole report, in order: verdict, variants, stage sections, then each profile in detail."""
    from edgefuse.report import plots as P
    from edgefuse.report.sections import section_blocks

    blocks: list[Block] = [Heading(1, data.title)]
    if data.verdict:
        blocks += verdict_blocks(data.verdict)
    variants = list(data.variants)
    if not variants:  # a pipeline passes its own rows (one per graph); a bare profile gives one per graph
        for prof in data.profiles:
            variants += profile_variant_rows(prof)
    if variants:
        blocks.append(Heading(2, "Variants: size, latency and quality"))
        first = ["variant", "target", "size_mib", "latency_ms", "latency_ratio", "accuracy", "cosine"]
        extra = sorted({k for r in variants for k in r} - {*first, "emulated", "label"})
        # a column nobody measured is left out (the MiniLM demo has no labels: no accuracy column)
        cols = [k for k in [*first, *extra]
                if k in ("variant", "latency_ms") or any(r.get(k) is not None for r in variants)]
        blocks.append(Table(tuple(header(k) for k in cols),
                            tuple(tuple(_variant_cell(r, k) for k in cols) for r in variants),
                            caption="latency: p50 at the headline point (first shape, most threads); cosine: "
                                    "mean cosine of the task output to the unfused teacher (pipeline) or the "
                                    "minimum cosine to the reference graph (profile)"))
        if plots:
            for emulated in (False, True):
                rows = tuple(r for r in variants if bool(r.get("emulated")) == emulated)
                if any(r.get("latency_ms") is not None and (r.get("accuracy") is not None or r.get("cosine")
                                                            is not None) for r in rows):
                    title = "Latency against accuracy / cosine" + (
                        " [EMULATED, not device latency]" if emulated else ", measured")
                    blocks.append(Plot(title, partial(P.latency_vs_quality, rows, title=title, dpi=dpi)))
    for sec in data.sections:
        blocks += section_blocks(sec, plots=plots, dpi=dpi)
    for n, prof in enumerate(data.profiles, 1):
        blocks += _profile_blocks(prof, n, top_ops=top_ops, top_nodes=top_nodes, plots=plots, dpi=dpi)
    return blocks


def _variant_cell(row: Mapping[str, Any], key: str) -> str:
    v = row.get(key)
    if key == "target":
        return _target_cell(row)
    if key == "latency_ms":
        return fmt_ms(v)
    if key == "latency_ratio":
        return fmt_ratio(v)
    if key.endswith("_mib"):
        return fmt_mib(v)
    return fmt_num(v)


def verdict_blocks(v: Mapping[str, Any]) -> list[Block]:
    """The verdict: what was shipped, how much smaller and faster, the accuracy cost, and the budgets."""
    items: list[tuple[str, str]] = [("shipped", str(v.get("shipped", "-")))]
    size, ref_size = v.get("size_mib"), v.get("reference_size_mib")
    if size is not None:
        text = f"{fmt_mib(size)} MiB"
        if ref_size:
            ref = v.get("reference", "reference")
            text += f", {ref_size / size:.1f}x smaller than the {ref} ({fmt_mib(ref_size)} MiB)"
        items.append(("size", text))
    lat, ref_lat = v.get("latency_ms"), v.get("reference_latency_ms")
    if lat is not None:
        emu = " [EMULATED, not device latency]" if v.get("emulated") else ""
        text = f"p50 {fmt_ms(lat)} ms"
        ratio = v.get("latency_ratio")
        if ratio:
            text += (f" against {fmt_ms(ref_lat)} ms: {1 / ratio:.2f}x faster" if ratio < 1
                     else f" against {fmt_ms(ref_lat)} ms: {ratio:.2f}x slower")
        items.append(("speed", f"{text} ({v.get('latency_point', '')}, {v.get('target', '-')}){emu}"))
    cost = []
    if v.get("accuracy") is not None:
        acc, teacher = v["accuracy"], v.get("teacher_accuracy")
        cost.append(f"accuracy {acc:.4f}" + ("" if teacher is None else
                                             f" vs teacher {teacher:.4f} ({100 * (acc - teacher):+.1f} points)"))
    if v.get("teacher_cosine") is not None:
        cost.append(f"mean cosine to the unfused teacher {v['teacher_cosine']:.4f}")
    if v.get("evaluated_on"):
        cost.append(f"on {v['evaluated_on']}")
    items.append(("accuracy cost", ", ".join(cost) if cost else "not measured (no evaluate stage)"))
    budgets = v.get("budgets")
    status = "none"
    if budgets:
        passed = [b for b in budgets if b.get("passed")]
        status = "pass" if len(passed) == len(budgets) else "fail"
        failed = ", ".join(b["budget"] for b in budgets if not b.get("passed"))
        items.append(("budgets", f"{len(passed)} of {len(budgets)} passed" + (f"; failed: {failed}" if failed else "")))
    else:
        items.append(("budgets", "none set (add a check section to the config to gate on them)"))
    out: list[Block] = [Heading(2, "Verdict"), Summary(tuple(items), status)]
    quality = [q for q in v.get("quality") or () if q.get("metric")]
    if quality:
        out.append(Table(("model", "held-out metric", "value"),
                         tuple((q["model"], str(q["metric"]),
                                "not measured (set finetune.eval_before: true)" if q.get("value") is None
                                else fmt_num(q["value"])) for q in quality),
                         caption="training runs evaluate on the held-out split; ONNX rows come from the evaluate "
                                 "stage (its own example count, see Agreement)"))
    if budgets:
        out.append(Table(("budget", "limit", "measured", "passed", "where it comes from"),
                         tuple((b["budget"], f"{b['op']} {b['limit']:g} {b.get('unit', '')}".rstrip(),
                                fmt_num(b.get("measured")), fmt_num(bool(b.get("passed"))), str(b.get("detail", "")))
                               for b in budgets)))
    return out


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
            rows.append((g["label"], str(p["threads"]), f"{p['batch_size']} x {p['sequence_length']}",
                         str(p["timed_runs"]), fmt_ms(p["latency_ms_p50"]), fmt_ms(p["latency_ms_p90"]),
                         fmt_ms(p["latency_ms_p99"]), f"{fmt_ms(p['latency_ms_mean'])} ± {fmt_ms(p['latency_ms_std'])}",
                         f"{p['throughput_samples_per_s']:.1f}",
                         f"{fmt_ratio(p['ratio_vs_reference_p50'])} [{p['ratio_vs_reference_p10']:.3f}-"
                         f"{p['ratio_vs_reference_p90']:.3f}]"))
    out.append(Table(("graph", "threads", "batch x seq", "runs", f"p50 {lat} (ms)", "p90 (ms)", "p99 (ms)",
                      "mean ± std (ms)", "samples/s", f"ratio vs {prof['reference_label']} p50 [p10-p90]"),
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
        where = sorted({f"threads={g['op_profile']['threads']}, batch {g['op_profile']['batch_size']} x seq "
                        f"{g['op_profile']['sequence_length']}, {g['op_profile']['runs']} runs" for g in profiled})
        out.append(Heading(3, f"Per-operator time{emu}, {'; '.join(where)}"))
        trace = [g for g in profiled if g["op_profile"].get("trace")]
        if trace:
            out.append(Links(tuple((f"{g['label']}: onnxruntime profiler trace (open in ui.perfetto.dev or "
                                    "chrome://tracing)", g["op_profile"]["trace"]) for g in trace)))
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
            out.append(Plot(f"Per-operator breakdown{emu}, {'; '.join(where)}",
                            partial(P.op_breakdown, prof, top_ops, dpi=dpi)))
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
        stage = d.pop("stage", None)
        data = d.pop("data", d)
        out.append({"title": str(title), "data": data, **({"stage": str(stage)} if stage else {})})
    return out
