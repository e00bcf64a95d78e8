"""Data-parallel recovery: ``torchrun`` with 2 CPU processes (gloo) follows the loss curve of one process with
the same global batch."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_finetune_fixtures import e2e_rows, saved_tiny, sentiment_rows, write_csv, write_tsv
from tolerances import DDP_LOSS_CURVE_RTOL

ROOT = Path(__file__).resolve().parents[1]
# torchrun with 2 processes against 1, twice per task: 30-50 s per test on the shared 2-core machine
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(args: list[str], nproc: int) -> None:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
    }
    if nproc == 1:
        cmd = [sys.executable, "-m", "edgefuse", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc-per-node={nproc}",
            "--nnodes=1",
            f"--master-port={_free_port()}",
            "-m",
            "edgefuse",
            *args,
        ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.parametrize("task", ["sequence-classification", "causal-lm"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, task):
    if task == "sequence-classification":
        model = saved_tiny(tmp_path / "m", fuse=0.5)
        rows = sentiment_rows(80)
        data = [
            "--train",
            str(write_tsv(tmp_path / "t.tsv", rows[:64])),
            "--validation",
            str(write_tsv(tmp_path / "v.tsv", rows[64:])),
        ]
    else:
        model = saved_tiny(tmp_path / "m", arch="llama", head="lm", fuse=0.5)
        # dynamic padding gives the two ranks different token counts: the loss is normalised globally
        data = [
            "--train",
            str(write_csv(tmp_path / "e.csv", e2e_rows(80))),
            "--validation-fraction",
            "0.2",
            "--group-column",
            "mr",
            "--prompt-column",
            "mr",
            "--text-column",
            "ref",
            "--num-samples",
            "0",
        ]
    common = [
        "finetune",
        str(model),
        "--task",
        task,
        *data,
        "--max-steps",
        "5",
        "--lr",
        "5e-3",
        "--eval-every",
        "5",
        "--log-every",
        "1",
        "--no-progress",
        "--json",
        "--group-by-length",
    ]
    _run([*common[:2], str(tmp_path / "one"), *common[2:], "--batch-size", "8"], nproc=1)
    _run([*common[:2], str(tmp_path / "two"), *common[2:], "--batch-size", "4"], nproc=2)
    one = json.loads((tmp_path / "one" / "finetune_result.json").read_text())
    two = json.loads((tmp_path / "two" / "finetune_result.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["global_batch_size"] == one["global_batch_size"] == 8
    curve1 = [v for _, v in one["loss_curve"]]
    curve2 = [v for _, v in two["loss_curve"]]
    assert len(curve1) == len(curve2) == 5
    assert curve1[-1] != curve1[0]  # it trained
    worst = max(abs(a - b) / abs(a) for a, b in zip(curve1, curve2, strict=True))
    print(f"{task}: largest relative loss difference, 2 processes vs 1: {worst:.2e}")
    assert worst <= DDP_LOSS_CURVE_RTOL, (curve1, curve2)
    metric = one["best_metric_name"]
    assert abs(one["final_metrics"][metric] - two["final_metrics"][metric]) <= DDP_LOSS_CURVE_RTOL * abs(
        one["final_metrics"][metric]
    ) + (1 / 16 if metric == "accuracy" else 0)
