"""Profile measurements on the real all-MiniLM-L6-v2 (the issue-4 "Done when" numbers).

Usage (from the repository root):

    python benchmarks/bench_profile.py graphs      # export plain + fused (keep 0.5) MiniLM, fp32 + int8 per-channel
    python benchmarks/bench_profile.py x86         # the 4 graphs side by side on this machine (interleaved)
    python benchmarks/bench_profile.py arm         # plain and fused int8 vs x86 fp32 on emulated arm64 (neoverse-n1)
    python benchmarks/bench_profile.py report      # HTML/MD/JSON report of both, checked in headless chromium

Each part writes benchmarks/results/profile_<part>.json; work files go to benchmarks/_work/profile (git-ignored).
Inputs are real text: SST-2 validation sentences, tokenized and truncated to 128 tokens (batch 1).
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common as common
from _common import RESULTS, ROOT, SST2, environment

WORK = common.WORK / "profile"
GRAPHS = WORK / "graphs"
NAMES = ("plain_fp32", "plain_int8", "fused_fp32", "fused_int8")


def _inputs(tok) -> Path:
    """128 real tokens: SST-2 validation sentences joined until the window is full."""
    import numpy as np

    lines = (SST2 / "validation.tsv").read_text(encoding="utf-8").splitlines()[1:60]
    text = " ".join(line.split("\t")[0] for line in lines)
    enc = tok(text, truncation=True, max_length=128, padding="max_length", return_tensors="np")
    path = WORK / "inputs_sst2_b1_s128.npz"
    np.savez(path, **{k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")})
    return path


def graphs() -> dict:
    """Export with the project's export stage (validated against PyTorch), then int8 per-channel (QInt8)."""
    import torch
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from edgefuse.config.export import ExportConfig
    from edgefuse.config.fusion import FusionConfig
    from edgefuse.export.api import export_onnx
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.models import load_model, load_tokenizer

    torch.manual_seed(0)
    GRAPHS.mkdir(parents=True, exist_ok=True)
    tok = load_tokenizer("minilm")
    rows = {}
    for variant in ("plain", "fused"):
        model = load_model("minilm", "feature-extraction")
        if variant == "fused":
            fuse_mlps_(model, FusionConfig(keep_ratio=0.5, seed=0))
        t = time.perf_counter()
        res = export_onnx(model, ExportConfig(), WORK / f"export_{variant}", tokenizer=tok, overwrite=True)
        fp32 = GRAPHS / f"{variant}_fp32.onnx"
        shutil.copyfile(WORK / f"export_{variant}" / "model.onnx", fp32)
        int8 = GRAPHS / f"{variant}_int8.onnx"
        quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True)
        rows[variant] = {"exporter": res.exporter, "export_s": time.perf_counter() - t,
                         "fp32_bytes": fp32.stat().st_size, "int8_bytes": int8.stat().st_size,
                         "export_max_abs_diff": res.max_abs_diff}
    rows["inputs"] = str(_inputs(tok).relative_to(ROOT))
    return rows


def x86() -> dict:
    from edgefuse.config.profile import ProfileConfig
    from edgefuse.profile.api import profile_onnx

    cfg = ProfileConfig(threads=[1, 2], inputs_npz=WORK / "inputs_sst2_b1_s128.npz", warmup_runs=5, runs=40,
                        min_cosine=None)
    return profile_onnx([GRAPHS / f"{n}.onnx" for n in NAMES], cfg).to_dict()


def arm() -> dict:
    """Each int8 graph against its own fp32 graph (plain, then fused), 1 thread, few runs: qemu is ~100x slower."""
    from edgefuse.config.profile import ProfileConfig
    from edgefuse.profile.api import profile_onnx

    cfg = ProfileConfig(target="arm64-emulated", cpu="neoverse-n1", threads=[1], warmup_runs=1, runs=3,
                        op_profile_runs=1, memory_runs=1, inputs_npz=WORK / "inputs_sst2_b1_s128.npz", min_cosine=0.99,
                        parity_metric="mean_pooled")
    return {v: profile_onnx([GRAPHS / f"{v}_fp32.onnx", GRAPHS / f"{v}_int8.onnx"], cfg).to_dict()
            for v in ("plain", "fused")}


def report() -> dict:
    """The HTML report of x86 + ARM, rendered by headless chromium: DOM content and a screenshot."""
    from matplotlib.image import imread

    from edgefuse.report.api import load_results, write_report

    x86_res = load_results([RESULTS / "profile_x86.json"])
    arm_all = json.loads((RESULTS / "profile_arm.json").read_text())
    out = WORK / "report"
    written = write_report([*x86_res, *arm_all.values()], out)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={WORK / 'chrome'}"]
    url = written["html"].resolve().as_uri()
    dom = subprocess.run(["chromium", *flags, "--dump-dom", url], capture_output=True, text=True, check=True).stdout
    shot = WORK / "report.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1280,9000", url], check=True,
                   capture_output=True)
    img = imread(str(shot))[..., :3]
    return {"html_bytes": written["html"].stat().st_size, "tables_in_dom": dom.count("<table"),
            "plots_in_dom": dom.count("data:image/png;base64,"), "screenshot": str(shot.relative_to(ROOT)),
            "screenshot_px": list(img.shape[:2]), "screenshot_std": float(img.std()),
            "colourful_px": int(((img.max(axis=2) - img.min(axis=2)) > 0.25).sum())}


def main(part: str) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    WORK.mkdir(parents=True, exist_ok=True)
    fn = {"graphs": graphs, "x86": x86, "arm": arm, "report": report}[part]
    t = time.perf_counter()
    res = {**fn(), "run_environment": environment()}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"profile_{part}.json").write_text(json.dumps(res, indent=1, default=str) + "\n")
    logging.info("%s done in %.1f s", part, time.perf_counter() - t)


if __name__ == "__main__":
    if sys.argv[1:2] not in (["graphs"], ["x86"], ["arm"], ["report"]):
        print(__doc__)
        sys.exit(0 if sys.argv[1:2] in (["-h"], ["--help"]) else 2)
    main(sys.argv[1])
