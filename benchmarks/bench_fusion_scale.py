"""How the cost of the fusion step grows: time and peak memory of fusing models of growing width and depth.

Each case runs in a fresh process (so peak memory is its own): the model is built (tiny random configs) or
loaded (all-MiniLM-L6-v2, SmolLM2-135M), then every MLP is fused at keep_ratio 0.5 with the default settings.
Reported: seconds of ``fuse_mlps_`` alone, and the extra peak RSS that fusion added over the loaded model.

    python benchmarks/bench_fusion_scale.py                 # all cases
    python benchmarks/bench_fusion_scale.py --cases minilm  # only MiniLM (the 15 s target of issue 2)
    python benchmarks/bench_fusion_scale.py --threads 1     # pin torch/BLAS/OpenMP threads
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import RESULTS, environment, markdown_table

CASES = {
    # name: (kind, hidden, intermediate, layers)
    "llama-h128-l4": ("llama", 128, 512, 4),
    "llama-h256-l8": ("llama", 256, 1024, 8),
    "llama-h576-l8": ("llama", 576, 1536, 8),
    "llama-h576-l16": ("llama", 576, 1536, 16),
    "minilm": ("minilm", 384, 1536, 6),
    "smollm2": ("smollm2", 576, 1536, 30),
}


def _child(case: str, keep_ratio: float, n_init: int) -> dict:
    import resource

    import torch

    from edgefuse.config.fusion import FusionConfig
    from edgefuse.fusion.api import fuse_mlps_

    kind, hidden, inter, layers = CASES[case]
    t0 = time.perf_counter()
    if kind == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                                             num_attention_heads=4, num_key_value_heads=4, vocab_size=1000))
    else:
        from edgefuse.models import load_model

        model = load_model(kind, "feature-extraction" if kind == "minilm" else "causal-lm")
    load_s = time.perf_counter() - t0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    result = fuse_mlps_(model, FusionConfig(keep_ratio=keep_ratio, n_init=n_init))
    fuse_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "case": case, "hidden": hidden, "intermediate": inter, "layers": layers, "mlps": len(result.steps),
        "params_before": result.params_total_before, "params_after": result.params_total_after,
        "load_s": load_s, "fuse_s": fuse_s, "fuse_s_per_mlp": fuse_s / len(result.steps),
        "peak_rss_loaded_mib": rss0, "peak_rss_extra_mib": rss1 - rss0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--keep-ratio", type=float, default=0.5)
    ap.add_argument("--n-init", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0, help="0: library defaults")
    ap.add_argument("--out", default=str(RESULTS / "fusion_scale"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child, args.keep_ratio, args.n_init)))
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if args.threads:
        env.update(OMP_NUM_THREADS=str(args.threads), OPENBLAS_NUM_THREADS=str(args.threads))
    rows = []
    for case in args.cases:
        cmd = [sys.executable, __file__, "--child", case, "--keep-ratio", str(args.keep_ratio),
               "--n-init", str(args.n_init)]
        out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{case:16s} {row['mlps']:4d} MLPs  fuse {row['fuse_s']:7.2f} s ({row['fuse_s_per_mlp']:.2f} s/MLP)  "
              f"extra peak RSS {row['peak_rss_extra_mib']:7.1f} MiB", flush=True)
    meta = {
        **environment(), "cpus": os.cpu_count(), "threads": args.threads or "default", "keep_ratio": args.keep_ratio,
        "n_init": args.n_init,
        "note": "shared 2-core VM: other processes may have been running; times are upper bounds",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [f"Command: `{meta['command']}` (keep_ratio {args.keep_ratio}, n_init {args.n_init}, "
             f"threads {meta['threads']})", "",
             markdown_table(("case", "hidden", "intermediate", "MLPs", "params before -> after", "fuse s", "s/MLP",
                             "extra peak RSS MiB"),
                            [(r["case"], r["hidden"], r["intermediate"], r["mlps"],
                              f"{r['params_before']:,} -> {r['params_after']:,}", f"{r['fuse_s']:.2f}",
                              f"{r['fuse_s_per_mlp']:.2f}", f"{r['peak_rss_extra_mib']:.1f}") for r in rows])]
    Path(args.out + ".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
