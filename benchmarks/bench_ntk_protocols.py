"""What each NTK protocol sees (issue 16 item 3): the sign (Adam) kernel error of every method on all-MiniLM-L6-v2
with a seeded random classification head, under three parameter sets, at initialisation (before any training).

Compression as in the paper: the upper two thirds of the layers (2-5 of 6), k-means ``n_init`` 30 (``--n-init``),
seed 0. Output f = softmax(logits)[0] (class-0 probability) for every protocol. Parameter sets:

fusion-pruned uses the data-free importance with pool 1.25 (keep 0.5) or 2.0 (keep 0.25).

    paper      the MLP of layer 0 (unfused), the authors' own check (``edgefuse ntk --protocol paper``)
    fused-mlp  the fused MLPs' own parameters (``--params fused-mlp``)
    all        every trainable parameter (``--params all``)

fusion, merge and centroid share one k-means per width: merge is fusion with the counts folded into the down
projection (``fold_scales_``), centroid is fusion with the counts removed. Run from the repository root:

    python benchmarks/bench_ntk_protocols.py               # n 16, keep 0.5 and 0.25 (minutes)
    python benchmarks/bench_ntk_protocols.py --n 32 --n-init 30

Writes benchmarks/results/ntk_protocols.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
METHODS = ("fusion", "merge", "centroid", "fusion-pruned", "prune", "svd")


def _data() -> Path:
    for cand in (ROOT.parent / "shared" / "data" / "sst2", Path("/work/shared/data/sst2")):
        if (cand / "validation.tsv").is_file():
            return cand / "validation.tsv"
    raise SystemExit("SST-2 validation not found (../shared/data/sst2/validation.tsv)")


def compressed_models(base: Any, ratio: float, layers: list[int], n_init: int) -> dict[str, Any]:
    from edgefuse.config.fusion import FusionConfig
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.fusion.scale import detach_scale_, fold_scales_, iter_scaled

    out = {}
    fusion = copy.deepcopy(base)
    fuse_mlps_(fusion, FusionConfig(keep_ratio=ratio, layers=layers, n_init=n_init, seed=0))
    out["fusion"] = fusion
    out["merge"] = copy.deepcopy(fusion)
    fold_scales_(out["merge"])
    out["centroid"] = copy.deepcopy(fusion)
    for _, m in list(iter_scaled(out["centroid"])):
        detach_scale_(m)
    for method in ("fusion-pruned", "prune", "svd"):
        m = copy.deepcopy(base)
        fuse_mlps_(m, FusionConfig(method=method, keep_ratio=ratio, layers=layers, n_init=n_init, seed=0,
                                   pool=1.25 if ratio >= 0.5 else 2.0))
        out[method] = m
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=16, help="examples (kernels are n x n; default 16)")
    p.add_argument("--n-init", type=int, default=30, help="k-means restarts (default 30, the paper's)")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(RESULTS / "ntk_protocols"))
    args = p.parse_args(argv)
    import torch
    from _common import git_commit

    from edgefuse.config.ntk import NtkConfig, paper_layers
    from edgefuse.models import load_model, load_tokenizer
    from edgefuse.ntk.api import measure_ntk, reference_kernels
    from edgefuse.ntk.protocol import paper_defaults
    from edgefuse.quantize.evaluate import read_labelled

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    load_start = os.getloadavg()
    tok = load_tokenizer("minilm")
    torch.manual_seed(0)  # the random head, shared by every compressed copy
    base = load_model("minilm", "sequence-classification", num_labels=2).eval()
    texts, _ = read_labelled(_data(), args.n)
    batch = tok(texts, truncation=True, max_length=64, padding=True, return_tensors="pt")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    layers = paper_layers(base.config.num_hidden_layers)
    protos = {"paper": NtkConfig(params="modules", modules=paper_defaults(base)["modules"], output="class0-prob",
                                 n_examples=args.n),
              "fused-mlp": NtkConfig(params="fused-mlp", output="class0-prob", n_examples=args.n),
              "all": NtkConfig(params="all", output="class0-prob", n_examples=args.n)}
    rows = []
    for ratio in args.ratios:
        t = time.perf_counter()
        models = compressed_models(base, ratio, layers, args.n_init)
        compress_s = time.perf_counter() - t
        refs = {name: reference_kernels(base, models["fusion"], inputs, cfg) for name, cfg in protos.items()}
        for method, model in models.items():
            row: dict[str, Any] = {"keep_ratio": ratio, "method": method}
            for name, cfg in protos.items():
                res = measure_ntk(base, model, inputs, cfg, reference=refs[name])
                row[name] = res.kernel.sign_rel_error
                row[f"{name}_gd"] = res.kernel.gd_rel_error
                row["final_hidden"] = res.final_hidden_rel_error
                row["output"] = res.output_rel_error
            rows.append(row)
            print(json.dumps(row), flush=True)
        rows[-1]["compress_seconds_all_methods"] = compress_s
    meta = {"command": shlex.join(["python", "benchmarks/bench_ntk_protocols.py", *(argv or sys.argv[1:])]),
            "n": args.n, "n_init": args.n_init, "layers": layers, "commit": git_commit(),
            "load_start": [round(x, 2) for x in load_start], "load_end": [round(x, 2) for x in os.getloadavg()],
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "wall_s": time.perf_counter() - start, "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = ["# NTK protocols on all-MiniLM-L6-v2 (bench_ntk_protocols.py)", "",
             f"Command: `{meta['command']}`; {args.n} SST-2 validation sentences, layers {layers} compressed, "
             f"k-means n_init {args.n_init}, seed 0, f = class-0 probability of a seeded random head. "
             f"Load {meta['load_start']} -> {meta['load_end']}; {meta['wall_s'] / 60:.1f} min; {meta['date']}.", "",
             "Relative Frobenius error of the sign (Adam) kernel G sign(G)^T against the unfused model's; lower "
             "is closer. paper = over layer 0's (unfused) MLP; fused-mlp = over the compressed MLPs' own "
             "parameters; all = every trainable parameter. final hidden = relative error of the last hidden states.",
             "", "| keep | method | paper (layer-0 MLP) | fused-mlp | all | final hidden |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['keep_ratio']:g} | {r['method']} | {r['paper']:.4f} | {r['fused-mlp']:.4f} | "
                     f"{r['all']:.4f} | {r['final_hidden']:.4f} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
