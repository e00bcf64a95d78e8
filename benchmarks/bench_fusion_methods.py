"""Method comparison on the real all-MiniLM-L6-v2: kernel (NTK) and output approximation of every compression
method at several widths, right after compression (method.md 6.1 items 2-3).

For every method (fusion, merge, cluster, centroid, svd, prune, sketch), keep ratio and seed, all 6 MLPs are
compressed in a deep copy of the model, and :func:`edgefuse.ntk.api.measure_ntk` compares it with the original on
the first N SST-2 validation sentences: relative errors of the Adam (sign) kernel ``G sign(G)^T`` and the GD
kernel ``G G^T`` (over the fused MLPs' parameters and, with ``--params fused-mlp all``, over every parameter),
of the final hidden states and of the scalar output (``pooled-projection``: the mean-pooled last hidden state
on a fixed seeded random unit vector, the same for every model). k-means methods and sketch are repeated over
``--seeds`` (mean and standard deviation); svd and prune are deterministic and run once.

Usage (from the repository root):

    python benchmarks/bench_fusion_methods.py                       # n=64, ratios 0.5 0.25, seeds 0 1 2
    python benchmarks/bench_fusion_methods.py --n 32 --ratios 0.5 --seeds 0 --params fused-mlp

Writes benchmarks/results/fusion_methods.json (every run, the aggregates, the command and the environment)
and benchmarks/results/fusion_methods.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import _common as common
from _common import RESULTS, SST2

METHODS = ("fusion", "merge", "cluster", "centroid", "svd", "prune", "sketch")
DETERMINISTIC = ("svd", "prune")  # no seed: one run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=64, help="number of sentences (kernels are n x n)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25], help="keep ratios")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="k-means / sketch seeds")
    p.add_argument("--n-init", type=int, default=1, help="k-means restarts")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--params", default="all", choices=("fused-mlp", "all"),
                   help="kernel parameter set; 'all' also reports the fused-MLP kernels (they are its blocks)")
    p.add_argument("--max-gradient-mib", type=float, default=3072.0, help="memory of one gradient chunk")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    p.add_argument("--data", default=str(SST2 / "validation.tsv"))
    p.add_argument("--out", default=str(RESULTS / "fusion_methods"), help="output path without extension")
    p.add_argument("--diagnose", action="store_true",
                   help="instead of the comparison: analyse fusion's largest k-means cluster per layer (first ratio "
                   "and seed) and split one layer's sign kernel into that cluster and the rest; writes "
                   "<out>.diagnose.json")
    p.add_argument("--diagnose-layer", type=int, default=1, help="layer whose sign kernel --diagnose splits")
    return p.parse_args(argv)


def environment(threads: int) -> dict[str, Any]:
    import sklearn

    return common.environment(torch_threads=threads, scikit_learn=sklearn.__version__)


def run_one(original: Any, batch: dict, method: str, ratio: float, seed: int, args: argparse.Namespace,
            refs: dict[str, Any]) -> dict[str, Any]:
    from edgefuse.config.fusion import FusionConfig
    from edgefuse.config.ntk import NtkConfig
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.ntk.api import measure_ntk, reference_kernels

    comp = copy.deepcopy(original)
    t = time.perf_counter()
    fres = fuse_mlps_(comp, FusionConfig(method=method, keep_ratio=ratio, seed=seed, n_init=args.n_init))
    row: dict[str, Any] = {
        "method": method, "keep_ratio": ratio, "seed": None if method in DETERMINISTIC else seed,
        "fuse_s": time.perf_counter() - t, "params_total": fres.params_total_after,
        "params_mlp": fres.mlp_params_after, "params_total_original": fres.params_total_before,
        "params_mlp_original": fres.mlp_params_before,
        "kmeans_inertia": None if fres.steps[0].kmeans_inertia is None else sum(s.kmeans_inertia or 0.0
                                                                                  for s in fres.steps),
        "max_cluster_size": [s.max_cluster_size for s in fres.steps],
    }
    cfg = NtkConfig(n_examples=args.n, params=args.params, max_gradient_mib=args.max_gradient_mib)
    if "ref" not in refs:  # every run compresses the same 6 MLPs: the original's kernels are computed once
        t = time.perf_counter()
        refs["ref"] = reference_kernels(original, comp, batch, cfg)
        print(f"reference kernels ({args.params}): {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    res = measure_ntk(original, comp, batch, cfg, reference=refs["ref"])
    row["ntk_s"] = time.perf_counter() - t
    row["ntk"] = res.to_dict()
    fused = res.fused_mlp
    assert fused is not None  # all 6 MLPs are compressed
    row["metrics"] = {"sign[fused-mlp]": fused.sign_rel_error, "gd[fused-mlp]": fused.gd_rel_error,
                      "final_hidden": res.final_hidden_rel_error, "output": res.output_rel_error}
    if args.params == "all":
        row["metrics"].update({"sign[all]": res.kernel.sign_rel_error, "gd[all]": res.kernel.gd_rel_error})
    return row


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for method, ratio in dict.fromkeys((r["method"], r["keep_ratio"]) for r in rows):
        group = [r for r in rows if r["method"] == method and r["keep_ratio"] == ratio]
        first = group[0]
        out.append({
            "method": method, "keep_ratio": ratio, "runs": len(group), "params_total": first["params_total"],
            "params_mlp": first["params_mlp"], "kernel_params": first["ntk"]["kernel"]["params_compressed"],
            "fused_mlp_kernel_params": first["ntk"]["fused_mlp"]["params_compressed"],
            "fuse_s": _stats([r["fuse_s"] for r in group]),
            "metrics": {k: _stats([r["metrics"][k] for r in group]) for k in first["metrics"]},
            "layer_hidden_rel_error": {k: _stats([r["ntk"]["layer_hidden_rel_error"][k] for r in group])
                                       for k in first["ntk"]["layer_hidden_rel_error"]},
            "max_cluster_size": [max(r["max_cluster_size"][i] or 0 for r in group)
                                 for i in range(len(first["max_cluster_size"]))],
        })
    return out


def _fmt(s: dict[str, float], runs: int) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}" if runs > 1 else f"{s['mean']:.4f}"


METRIC_NAMES = {"sign[fused-mlp]": "sign-K err (fused MLPs)", "gd[fused-mlp]": "GD-K err (fused MLPs)",
                "sign[all]": "sign-K err (all params)", "gd[all]": "GD-K err (all params)",
                "final_hidden": "final hidden err", "output": "output f(x) err"}


def markdown(agg: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    metrics = list(agg[0]["metrics"])
    cols = ["method", "keep", "runs", "params (model)", "params (MLPs)", *(METRIC_NAMES[m] for m in metrics)]
    lines = [
        "# Kernel and output approximation of the compression methods (all-MiniLM-L6-v2)",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"{meta['n']} SST-2 validation sentences ({meta['data']}), all 6 MLPs compressed, measured right after "
        "compression (no fine-tuning), fp32, eval mode. Scalar output f(x): pooled-projection (mean-pooled last "
        f"hidden state on a fixed random unit vector, head seed 0). Original: {meta['params_total_original']:,} "
        f"parameters, {meta['params_mlp_original']:,} of them in the MLPs. Errors are relative Frobenius errors "
        "against the original; the kernels are n x n, so models with different parameter counts compare "
        "directly. 'fused MLPs': the kernel over the 6 MLPs' up/down weights and biases; 'all params': over every "
        "trainable parameter. Mean ± standard deviation over the k-means/sketch seeds "
        f"{meta['seeds']} (n_init {meta['n_init']}); svd and prune are deterministic (1 run). The frozen fusion "
        "scale is a buffer and in no parameter set.",
        "",
        "| " + " | ".join(cols) + " |",
        "|" + "---|" * len(cols),
    ]
    for a in agg:
        cells = [a["method"], f"{a['keep_ratio']:g}", str(a["runs"]), f"{a['params_total']:,}", f"{a['params_mlp']:,}"]
        cells += [_fmt(a["metrics"][m], a["runs"]) for m in metrics]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Lowest mean error per keep ratio:", ""]
    for ratio in dict.fromkeys(a["keep_ratio"] for a in agg):
        sub = [a for a in agg if a["keep_ratio"] == ratio]
        parts = []
        for m in metrics:
            ranked = sorted(sub, key=lambda a, k=m: a["metrics"][k]["mean"])
            parts.append(f"{METRIC_NAMES[m]}: " + " < ".join(a["method"] for a in ranked))
        lines.append(f"- keep {ratio:g}: " + "; ".join(parts))
    lines += ["", "Largest k-means cluster per layer (max over seeds):", ""]
    for a in agg:
        if any(a["max_cluster_size"]):
            lines.append(f"- {a['method']} keep {a['keep_ratio']:g}: {a['max_cluster_size']}")
    lines += ["", "Why fusion is not the lowest on the sign kernel here (loose k-means clusters, one giant cluster "
              "per layer whose centroid is an input-independent unit): docs/ntk.md, section 'Why: loose clusters', "
              "and `--diagnose`."]
    lines += ["", f"Environment: {json.dumps(meta['environment'])}. Wall time {meta['wall_s']:.0f} s; reference "
              f"kernels {meta['reference_seconds']:.0f} s.", ""]
    return "\n".join(lines)


def cluster_activity(original: Any, batch: dict, ratio: float, seed: int, n_init: int) -> list[dict[str, Any]]:
    """Per layer: the largest fusion cluster's size, how unlike its members are, and how often the members and
    the centroid are active (pre-activation > 0) on the real inputs of that MLP."""
    import numpy as np
    import torch

    from edgefuse.fusion.clustering import subml_features
    from edgefuse.fusion.methods import compress_mlp
    from edgefuse.fusion.sites import find_mlps, read_weights

    sites = find_mlps(original)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [s.up_module.register_forward_hook(lambda mod, a, o, k=s.layer: inputs.__setitem__(k, a[0].detach()))
             for s in sites]
    try:
        with torch.no_grad():
            original(**batch)
    finally:
        for h in hooks:
            h.remove()
    mask = batch["attention_mask"].bool()
    rows = []
    for site in sites:
        w = read_weights(site)
        x = inputs[site.layer][mask]  # (tokens, d): the real inputs of this MLP
        comp = compress_mlp(w, "fusion", max(1, round(w.width * ratio)), seed=seed, n_init=n_init)
        j = int(comp.counts.argmax())
        members = torch.from_numpy(comp.labels == j)
        feats = subml_features(w)[members.numpy()]
        centre = feats.mean(0)
        with torch.no_grad():
            z = x @ w.up.T + w.up_bias  # (tokens, p)
            zc = x @ comp.weights.up[j] + comp.weights.up_bias[j]  # (tokens,)
        rows.append({
            "layer": site.layer, "largest_cluster": int(comp.counts[j]), "kmeans_inertia": comp.inertia,
            "singletons": int((comp.counts == 1).sum()),
            "member_theta_norm_mean": float(np.linalg.norm(feats, axis=1).mean()),
            "centroid_theta_norm": float(np.linalg.norm(centre)),
            "member_distance_to_centroid_mean": float(np.linalg.norm(feats - centre, axis=1).mean()),
            "members_active_fraction": float((z[:, members] > 0).float().mean()),
            "all_units_active_fraction": float((z > 0).float().mean()),
            "centroid_active_fraction": float((zc > 0).float().mean()),
            "centroid_preactivation_mean": float(zc.mean()), "centroid_preactivation_std": float(zc.std()),
        })
    return rows


def split_sign_kernel(original: Any, batch: dict, layer: int, ratio: float, seed: int, n_init: int) -> dict[str, Any]:
    """Compress only ``layer`` with each k-means variant and split its sign kernel (over W1, b1, W2) into the
    largest cluster's units and the rest; errors are relative to the original layer kernel's norm."""
    import numpy as np
    import torch

    from edgefuse.config.fusion import FusionConfig
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.fusion.methods import compress_mlp
    from edgefuse.fusion.sites import find_mlps, read_weights
    from edgefuse.ntk.scalar import projection_head, split_examples

    examples = split_examples(batch)
    head = projection_head(int(original.config.hidden_size), 0)

    def unit_kernels(model: Any) -> np.ndarray:  # (units, n, n): one sign kernel per intermediate unit
        site = next(s for s in find_mlps(model) if s.layer == layer)
        params = [site.up_module.weight, site.up_module.bias, site.down_module.weight]
        rows = []
        for ex in examples:
            f = model(**ex).last_hidden_state[0].mean(0) @ head
            gw1, gb1, gw2 = torch.autograd.grad(f, params)
            rows.append(torch.cat([gw1, gb1[:, None], gw2.T], 1))  # (units, d + 1 + d)
        g = torch.stack(rows)
        return torch.einsum("aiu,biu->iab", g, torch.sign(g)).double().numpy()

    def offdiag_ratio(k: np.ndarray) -> float:
        """mean |K_ab| (a != b) / mean |K_aa|: near 1 when the gradient direction hardly depends on the input."""
        diag = float(np.abs(np.diag(k)).mean())
        off = float((np.abs(k).sum() - np.abs(np.diag(k)).sum()) / (k.shape[0] * (k.shape[0] - 1)))
        return off / diag if diag > 0 else 0.0

    w = read_weights(next(s for s in find_mlps(original) if s.layer == layer))
    ref = compress_mlp(w, "fusion", max(1, round(w.width * ratio)), seed=seed, n_init=n_init)
    j = int(ref.counts.argmax())
    members = ref.labels == j
    k_orig = unit_kernels(original)
    k_comp = {}
    for method in ("fusion", "merge", "cluster", "centroid"):
        comp = copy.deepcopy(original)
        fuse_mlps_(comp, FusionConfig(method=method, keep_ratio=ratio, layers=[layer], seed=seed, n_init=n_init))
        k_comp[method] = unit_kernels(comp)  # unit j of the compressed MLP is cluster j (centroids in label order)
    out: dict[str, Any] = {"layer": layer, "largest_cluster": int(ref.counts[j]), "by_n": {}}
    n_all = len(examples)
    # the kernel of the first m examples is the top-left m x m block: one gradient pass gives every m
    for m in sorted({m for m in (4, 8, 16, 32) if m < n_all} | {n_all}):
        ko = k_orig[:, :m, :m]
        total, giant_o, rest_o = ko.sum(0), ko[members].sum(0), ko[~members].sum(0)
        norm = float(np.linalg.norm(total))
        row: dict[str, Any] = {"kernel_norm": norm, "largest_cluster_kernel_norm": float(np.linalg.norm(giant_o)),
                               "largest_cluster_offdiag_ratio": offdiag_ratio(giant_o),
                               "rest_kernel_norm": float(np.linalg.norm(rest_o)), "methods": {}}
        for method, kc_all in k_comp.items():
            kc = kc_all[:, :m, :m]
            giant_c, rest_c = kc[j], np.delete(kc, j, 0).sum(0)
            row["methods"][method] = {
                "layer_sign_rel_error": float(np.linalg.norm(kc.sum(0) - total)) / norm,
                "largest_cluster_error": float(np.linalg.norm(giant_c - giant_o)) / norm,
                "largest_cluster_kernel_norm": float(np.linalg.norm(giant_c)),
                "largest_cluster_offdiag_ratio": offdiag_ratio(giant_c),
                "rest_error": float(np.linalg.norm(rest_c - rest_o)) / norm,
                "rest_kernel_norm": float(np.linalg.norm(rest_c)),
            }
        out["by_n"][m] = row
    return out


def diagnose(args: argparse.Namespace, original: Any, batch: dict, env: dict[str, Any]) -> int:
    from edgefuse.io_utils import write_json_atomic

    ratio, seed = args.ratios[0], args.seeds[0]
    activity = cluster_activity(original, batch, ratio, seed, args.n_init)
    for row in activity:
        print(json.dumps(row), flush=True)
    split = split_sign_kernel(original, batch, args.diagnose_layer, ratio, seed, args.n_init)
    print(json.dumps(split, indent=2), flush=True)
    command = "python benchmarks/bench_fusion_methods.py " + shlex.join(sys.argv[1:])
    write_json_atomic(Path(args.out + ".diagnose.json"), {  # with_suffix would eat a dotted name
        "command": command.strip(), "keep_ratio": ratio, "seed": seed, "n_init": args.n_init, "n": args.n,
        "cluster_activity": activity, "sign_kernel_split": split, "environment": env})
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from edgefuse.finetune.data import read_records
    from edgefuse.io_utils import write_json_atomic, write_text_atomic
    from edgefuse.models import load_model, load_tokenizer

    start = time.perf_counter()
    env = environment(args.threads)  # recorded at the start: the git commit of the code that runs
    texts = [r["sentence"] for r in read_records(args.data)[: args.n]]
    tok = load_tokenizer("minilm")
    original = load_model("minilm", "feature-extraction")
    batch = dict(tok(texts, truncation=True, max_length=128, padding=True, return_tensors="pt"))
    if args.diagnose:
        return diagnose(args, original, batch, env)
    refs: dict[str, Any] = {}
    rows = []
    for ratio in args.ratios:
        for method in args.methods:
            for seed in args.seeds[:1] if method in DETERMINISTIC else args.seeds:
                row = run_one(original, batch, method, ratio, seed, args, refs)
                rows.append(row)
                brief = ", ".join(f"{k}={v:.4f}" for k, v in row["metrics"].items())
                print(f"{method:8s} keep={ratio:g} seed={row['seed']} fuse={row['fuse_s']:.1f}s "
                      f"ntk={row['ntk_s']:.1f}s {brief}", flush=True)
    agg = aggregate(rows)
    command = "python benchmarks/bench_fusion_methods.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command.strip(), "n": args.n, "data": Path(args.data).name, "seeds": args.seeds,
            "n_init": args.n_init, "params_total_original": rows[0]["params_total_original"],
            "params_mlp_original": rows[0]["params_mlp_original"], "environment": env,
            "wall_s": time.perf_counter() - start,
            "reference_seconds": refs["ref"].seconds, "params": args.params,
            "max_gradient_mib": args.max_gradient_mib}
    write_json_atomic(Path(args.out + ".json"), {"meta": meta, "aggregate": agg, "runs": rows})
    md = markdown(agg, meta)
    write_text_atomic(Path(args.out + ".md"), md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
