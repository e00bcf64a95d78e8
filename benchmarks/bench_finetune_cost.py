"""Fine-tuning cost of a fused model against the unfused one: seconds per training step and peak memory at the
same batch and sequence length, measured in the same run, interleaved.

Each measurement is a fresh child process (so that its peak RSS is its own) that loads one model, runs the
real training step of :mod:`edgefuse.finetune.loop` (forward, loss, backward, clip, AdamW step) on fixed-length
random token batches for ``--warmup`` + ``--steps`` steps, and reports the median step time, its peak RSS, and
the analytic size of the training state (parameters + gradients + two AdamW moments, fp32). Children alternate
unfused / fused variants for ``--rounds`` rounds; ratios are taken within a round and summarised by their median
and range, which shows the noise of the shared machine.

    python benchmarks/bench_finetune_cost.py --model minilm --keep-ratios 0.5 0.25 --batch 32 --seq 64
    python benchmarks/bench_finetune_cost.py --model smollm2 --keep-ratios 0.5 --layers upper --batch 8 --seq 64
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import _common as common
from _common import RESULTS, environment

WORK = common.WORK / "cost"

TASK = {"minilm": "sequence-classification", "smollm2": "causal-lm"}


def _variant_dir(model: str, keep_ratio: float | None, layers: str) -> Path:
    return WORK / (f"{model}-unfused" if keep_ratio is None else f"{model}-fused{keep_ratio:g}-{layers}")


def prepare(model: str, keep_ratios: list[float], layers: str) -> None:
    """Fuse once per keep ratio and save (scales kept separate: they are what training sees)."""
    from edgefuse.config.fusion import FusionConfig
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.fusion.persist import save_fused
    from edgefuse.models import load_model

    for kr in [None, *keep_ratios]:
        out = _variant_dir(model, kr, layers)
        if (out / "config.json").is_file():
            continue
        m = load_model(model, TASK[model])
        if kr is not None:
            n_layers = m.config.num_hidden_layers
            chosen = list(range(n_layers // 2, n_layers)) if layers == "upper" else None
            fuse_mlps_(m, FusionConfig(keep_ratio=kr, layers=chosen, seed=0))
        save_fused(m, out, overwrite=True)


def child(path: str, task: str, batch: int, seq: int, warmup: int, steps: int, threads: int) -> dict[str, Any]:
    """One measurement in this process: median seconds per training step and peak RSS."""
    import resource

    import torch

    from edgefuse.config.finetune import FinetuneConfig
    from edgefuse.finetune.objectives import causal_lm_loss, classification_loss
    from edgefuse.finetune.setup import build_optimizer, trainable_parameters
    from edgefuse.models import load_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = load_model(path, task)
    model.train()
    rss_loaded = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cfg = FinetuneConfig(task=task, max_steps=1)
    named = trainable_parameters(model, cfg)
    opt = build_optimizer(named, cfg)
    n_params = sum(p.numel() for _, p in named)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(warmup + steps):
        ids = torch.randint(1000, min(vocab, 20000), (batch, seq), generator=gen)
        mask = torch.ones_like(ids)
        t0 = time.perf_counter()
        out = model(input_ids=ids, attention_mask=mask)
        if task == "causal-lm":
            s, n = causal_lm_loss(out.logits, ids)
        else:
            s, n = classification_loss(out.logits, torch.randint(0, 2, (batch,), generator=gen))
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds_per_step_median": statistics.median(times),
        "seconds_per_step_all": times,
        "peak_rss_mib": peak,
        "rss_after_load_mib": rss_loaded,
        "training_growth_mib": peak - rss_loaded,
        "trainable_params": n_params,
        # parameters + gradients + AdamW exp_avg + exp_avg_sq, fp32
        "training_state_mib": n_params * 4 * 4 / 2**20,
    }


def run_child(path: Path, task: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        str(path),
        "--task",
        task,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(TASK), default="minilm")
    p.add_argument("--keep-ratios", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--layers", choices=("all", "upper"), default="all", help="fuse every layer or the upper half")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.task, args.batch, args.seq, args.warmup, args.steps, args.threads)))
        return 0
    import torch

    torch.set_num_threads(args.threads)
    task = TASK[args.model]
    prepare(args.model, args.keep_ratios, args.layers)
    variants = [None, *args.keep_ratios]
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        # alternate the order each round so that a drift in machine load does not favour one variant
        order = variants if r % 2 == 0 else list(reversed(variants))
        measured = {}
        for kr in order:
            key = "unfused" if kr is None else f"fused-{kr:g}"
            measured[key] = run_child(_variant_dir(args.model, kr, args.layers), task, args)
            print(
                f"round {r}: {key}: {measured[key]['seconds_per_step_median']:.3f} s/step, "
                f"peak RSS {measured[key]['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
        rounds.append(measured)
    summary = {}
    for kr in args.keep_ratios:
        key = f"fused-{kr:g}"
        t = [rd[key]["seconds_per_step_median"] / rd["unfused"]["seconds_per_step_median"] for rd in rounds]
        m = [rd[key]["peak_rss_mib"] / rd["unfused"]["peak_rss_mib"] for rd in rounds]
        g = [rd[key]["training_growth_mib"] / rd["unfused"]["training_growth_mib"] for rd in rounds]
        st = rounds[0][key]["training_state_mib"] / rounds[0]["unfused"]["training_state_mib"]
        summary[key] = {
            "step_time_ratio_median": statistics.median(t),
            "step_time_ratio_min": min(t),
            "step_time_ratio_max": max(t),
            "peak_rss_ratio_median": statistics.median(m),
            "peak_rss_ratio_min": min(m),
            "peak_rss_ratio_max": max(m),
            "training_growth_ratio_median": statistics.median(g),
            "training_state_ratio": st,
            "trainable_params": rounds[0][key]["trainable_params"],
        }
    out = {
        "what": f"fine-tuning cost, {args.model} fused vs unfused, batch {args.batch} x seq {args.seq}",
        "command": " ".join(["python", "benchmarks/bench_finetune_cost.py", *(argv or sys.argv[1:])]),
        "model": args.model,
        "layers": args.layers,
        "batch": args.batch,
        "seq": args.seq,
        "threads": args.threads,
        "warmup_steps": args.warmup,
        "timed_steps": args.steps,
        "rounds": rounds,
        "summary": summary,
        "unfused_trainable_params": rounds[0]["unfused"]["trainable_params"],
        "env": environment(),  # its load_average is the one at the end of the run
    }
    from edgefuse.io_utils import write_json_atomic

    path = RESULTS / f"recovery_cost_{args.model}.json"
    write_json_atomic(path, out)
    print(json.dumps(summary, indent=2))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
