"""Stage sections of the report as real tables: fusion per layer, training runs with their curves, export
validation cases, quantization settings, agreement per graph. Any other result is flattened into a
``key | value`` table (nested keys joined with dots; lists of rows as their own table), never a JSON string.

Each renderer takes the stage's result dict (as stored in the run's ``record.json``) and is chosen by the
section's ``stage`` key; a section without one is shown generically.

Example:
    >>> blocks = section_blocks({"title": "Accuracy", "data": {"sst2": {"accuracy": 0.91, "examples": 872}}},
    ...                         plots=False, dpi=96)
    >>> blocks[1].rows
    (('sst2.accuracy', '0.91'), ('sst2.examples', '872'))
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

from edgefuse.report.blocks import Block, Heading, Para, Plot, Table, fmt_mib, fmt_num, header


def section_blocks(sec: Mapping[str, Any], *, plots: bool, dpi: int) -> list[Block]:
    """Blocks of one stage section: its heading, then the stage's own tables (or the generic ones)."""
    data = sec.get("data", {})
    render = RENDERERS.get(str(sec.get("stage", "")))
    out: list[Block] = [Heading(2, str(sec.get("title", "Section")))]
    if render is not None and isinstance(data, Mapping):
        try:
            out += render(data, plots=plots, dpi=dpi)
            return out
        except (KeyError, TypeError, ValueError, IndexError):  # an older record layout: show it generically
            out = out[:1]
    return out + generic_blocks(data)


def flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``[("a.b", 1), ("c", [1, 2])]`` (lists of rows are kept whole)."""
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out += flatten(v, key + ".")
        else:
            out.append((key, v))
    return out


def _cell(v: Any) -> str:
    if isinstance(v, (list, tuple)) and all(not isinstance(x, (Mapping, list, tuple)) for x in v):
        return ", ".join(fmt_num(x) for x in v) if v else "-"
    return fmt_num(v)


def rows_table(rows: Sequence[Mapping[str, Any]], caption: str = "") -> Table:
    """A list of dicts as one table (columns: every key, in first-seen order; nested keys flattened)."""
    flat = [dict(flatten(r)) for r in rows]
    cols = list(dict.fromkeys(k for r in flat for k in r))
    return Table(tuple(header(c) for c in cols), tuple(tuple(_cell(r.get(c)) for c in cols) for r in flat), caption)


def generic_blocks(data: Any) -> list[Block]:
    """Any result: scalars as ``key | value``, every list of rows as its own table below."""
    if isinstance(data, list) and data and all(isinstance(r, Mapping) for r in data):
        return [rows_table(data)]
    if not isinstance(data, Mapping):
        return [Para(fmt_num(data))]
    scalars, tables = [], []
    for k, v in flatten(data):
        if isinstance(v, list) and v and all(isinstance(r, Mapping) for r in v):
            tables.append(rows_table(v, caption=k))
        else:
            scalars.append((k, _cell(v)))
    return ([Table(("key", "value"), tuple(scalars))] if scalars else []) + tables


def kv(pairs: Sequence[tuple[str, Any]]) -> Table:
    """A two-column table of the pairs whose value is not None."""
    return Table(("", "value"), tuple((k, v if isinstance(v, str) else fmt_num(v)) for k, v in pairs if v is not None))


# ------------------------------------------------------------------------------------------ stages


def fusion_blocks(d: Mapping[str, Any], *, plots: bool, dpi: int) -> list[Block]:
    f = d["fusion"]
    steps = f.get("steps", [])
    before, after = f["params_total_before"], f["params_total_after"]
    out: list[Block] = [kv([
        ("method", f.get("method")), ("keep ratio", d.get("keep_ratio")), ("width", d.get("width")),
        ("parameters", f"{before:,} -> {after:,} ({100 * (1 - after / before):.1f}% fewer)" if before else None),
        ("MLP parameters", f"{f['mlp_params_before']:,} -> {f['mlp_params_after']:,}"
         if f.get("mlp_params_before") is not None else None),
        ("fused MLPs", len(steps)),
        ("config changes", ", ".join(f"{k} = {v}" for k, v in (f.get("config_field_updates") or {}).items()) or None),
        ("seconds", f.get("seconds")),
    ])]
    if steps:
        out.append(Table(("MLP", "layer", "width", "parameters", "frozen scale entries", "k-means inertia",
                          "largest cluster"),
                         tuple((s["name"], fmt_num(s.get("layer")), f"{s['width_before']} -> {s['width_after']}",
                                f"{s['params_before']:,} -> {s['params_after']:,}",
                                fmt_num(s.get("frozen_scale_entries")), fmt_num(s.get("kmeans_inertia")),
                                fmt_num(s.get("max_cluster_size"))) for s in steps),
                         caption="width: hidden units of the MLP before -> after fusion (k-means clusters)"))
    return out


def _run_row(name: str, r: Mapping[str, Any]) -> tuple[str, ...]:
    w = r.get("objective_weights") or {}
    objective = " + ".join(f"{v:g} {k.replace('_', ' ')}" for k, v in w.items() if v) or "-"
    best = "-" if r.get("best_metric") is None else (
        f"{r['best_metric_name']} {r['best_metric']:.4f} at step {r.get('best_step')}"
        + (" (restored)" if r.get("best_restored") else ""))
    return (name, objective, f"{r['steps_run']} / {r.get('total_steps')}", str(r.get("stopped_by", "-")),
            fmt_num(r.get("final_train_loss")), best, f"{r.get('train_seconds', 0):.1f}",
            fmt_num(r.get("examples_per_second")), f"{r['trainable_params']:,}" if r.get("trainable_params") else "-")


RUN_HEADERS = ("run", "objective", "steps", "stopped by", "final train loss", "best held-out metric",
               "train time (s)", "examples/s", "trainable parameters")


def finetune_blocks(d: Mapping[str, Any], *, plots: bool, dpi: int) -> list[Block]:
    """One row per training run (each recovery phase), the held-out metric history, and the curves."""
    runs = list(d.get("phases") or [d["finetune"]])
    names = [f"phase {i + 1}" for i in range(len(runs))] if len(runs) > 1 else ["training"]
    out: list[Block] = [Table(RUN_HEADERS, tuple(_run_row(n, r) for n, r in zip(names, runs, strict=True)))]
    history = []
    offset = 0
    for name, r in zip(names, runs, strict=True):
        if r.get("initial_metrics"):
            history.append({"run": name, "step": offset, **{k: v for k, v in r["initial_metrics"].items()}})
        history += [{"run": name, **dict(e, step=int(e["step"]) + offset)} for e in r.get("eval_history", [])]
        offset += int(r.get("steps_run") or 0)
    if history:
        out.append(rows_table(history, caption="held-out evaluation; steps count across phases; step 0 "
                                               "(when present) is the fused model before recovery"))
    if plots and any(r.get("loss_curve") or r.get("eval_history") for r in runs):
        from edgefuse.report import plots as P

        series = tuple(_curve(n, r) for n, r in zip(names, runs, strict=True))
        out.append(Plot("Training curves: loss and held-out metric against step",
                        partial(P.training_curves, series, dpi=dpi)))
    return out


def _curve(name: str, r: Mapping[str, Any]) -> tuple[Any, ...]:
    """(name, loss points, metric points, metric name, has initial, initial value) of one training run."""
    metric = str(r.get("best_metric_name") or "")
    evals = tuple((int(e["step"]), e[metric]) for e in r.get("eval_history", []) if e.get(metric) is not None)
    initial = (r.get("initial_metrics") or {}).get(metric)
    return (name, tuple(map(tuple, r.get("loss_curve") or ())), evals, metric or "metric", initial is not None,
            initial)


def export_blocks(d: Mapping[str, Any], *, plots: bool, dpi: int) -> list[Block]:
    e = d["export"]
    out: list[Block] = [kv([
        ("graph", e.get("onnx_path")), ("task", e.get("task")), ("exporter", e.get("exporter")),
        ("opset", e.get("opset")),
        (f"fused MLPs (scales folded: {e.get('fold_scales')})", e.get("fused_mlps")),
        ("size (MiB)", None if e.get("graph_size_bytes") is None else fmt_mib(e["graph_size_bytes"] / 2**20)),
        ("max abs diff vs PyTorch", e.get("max_abs_diff")), ("min cosine vs PyTorch", e.get("min_cosine")),
        ("tolerance", f"atol {e.get('atol')}, rtol {e.get('rtol')}"), ("sha256", e.get("sha256")),
    ])]
    cases = [(c["label"], o["name"], " x ".join(map(str, o["shape"])), fmt_num(o["max_abs_diff"]),
              fmt_num(o["cosine"]), fmt_num(bool(o["passed"]))) for c in e.get("cases", []) for o in c["outputs"]]
    if cases:
        out.append(Table(("validation case", "output", "shape", "max abs diff", "cosine", "passed"), tuple(cases),
                         caption="the ONNX graph against the PyTorch model it was exported from"))
    return out


def quantize_blocks(d: Mapping[str, Any], *, plots: bool, dpi: int) -> list[Block]:
    q = d["quantize"]
    st = q.get("settings") or {}
    preset = st.get("preset") if isinstance(st.get("preset"), Mapping) else {}
    size, size32 = q.get("size_bytes"), q.get("size_bytes_fp32")
    return [kv([
        ("graph", q.get("onnx_path")), ("mode", q.get("mode")), ("preset", q.get("preset")),
        ("why this preset", preset.get("rationale")), ("format", st.get("format")),
        ("weights / activations", f"{st.get('weight_type')} / {st.get('activation_type')}" if st else None),
        ("per channel", st.get("per_channel")), ("operators quantized", ", ".join(st.get("op_types") or []) or None),
        ("quantized nodes", q.get("quantized_nodes")), ("kept in fp32", ", ".join(q.get("kept_fp32") or []) or "none"),
        ("size (MiB)", f"{fmt_mib(size32 / 2**20)} -> {fmt_mib(size / 2**20)}" if size and size32 else None),
        ("cosine vs fp32 graph (mean / min)", f"{fmt_num(q.get('cosine_mean'))} / {fmt_num(q.get('cosine_min'))}"
         if q.get("cosine_mean") is not None else None),
    ])]


def evaluate_blocks(d: Mapping[str, Any], *, plots: bool, dpi: int) -> list[Block]:
    names = {"reference": "unfused fp32", "fp32": "final fp32", "quantized": "final quantized"}
    pt = d.get("pytorch") or {}
    rows = [("teacher (PyTorch)", "-", "-", "1", fmt_num(pt.get("teacher_accuracy"))),
            ("final (PyTorch)", "-", "-", fmt_num((pt.get("vs_teacher") or {}).get("cosine_mean")),
             fmt_num(pt.get("accuracy")))]
    for role, g in (d.get("graphs") or {}).items():
        vp, vt = g.get("vs_pytorch") or {}, g.get("vs_teacher") or {}
        rows.append((names.get(role, role), fmt_num(vp.get("cosine_mean")), fmt_num(vp.get("max_abs_diff")),
                     fmt_num(vt.get("cosine_mean")), fmt_num(g.get("accuracy"))))
    return [Table(("model", "cosine vs its PyTorch model", "max abs diff vs PyTorch", "cosine vs teacher (mean)",
                   "accuracy"), tuple(rows),
                  caption=f"{d.get('examples')} examples ({d.get('text')}), compared on the {d.get('task_vector')}")]


RENDERERS: dict[str, Callable[..., list[Block]]] = {
    "fuse": fusion_blocks, "teacher": finetune_blocks, "finetune": finetune_blocks, "export": export_blocks,
    "reference": export_blocks, "quantize": quantize_blocks, "evaluate": evaluate_blocks,
}
