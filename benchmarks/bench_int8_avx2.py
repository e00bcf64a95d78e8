"""int8 on AVX2 hosts without hand-made exclusions (issue 14, item 3): SmolLM2's int8 graphs judged against the
fp32 graph **as an AVX2-only CPU computes them**, on any x86 host.

onnxruntime picks its int8 kernels from the CPU's flags: on AVX2 without VNNI, dynamic int8 (MatMulInteger) runs
u8 x s8 products through VPMADDUBSW, whose int16 pair sums saturate; on a VNNI host the same graph accumulates in
int32 and gives other numbers. So a VNNI host cannot judge what an AVX2 user gets by running the graph natively.
This benchmark runs every graph twice: natively, and under ``qemu-x86_64-static -cpu Haswell`` (user-mode
emulation of an AVX2/FMA CPU without AVX-512: the CPUID onnxruntime sees says AVX2, so it dispatches its AVX2
kernels; qemu's TCG executes them exactly). Timings under qemu mean nothing and are not reported; the native
decode timing (1 thread) is.

Graphs (all written by :func:`edgefuse.quantize.api.quantize_onnx`, as ``edgefuse quantize`` writes them):

- ``dynamic int8, avx2 preset``: what an AVX2 host gets by default (7-bit weights against the saturation);
- ``dynamic int8, avx512-vnni preset``: what a VNNI host gets by default (8-bit weights), also run as AVX2;
- ``8-bit blocks``: weight-only 8-bit blocks (MatMulNBits bits 8, accuracy level 4: activations quantized per
  block of 32 values of each token at run time), every MatMul and the tied lm_head (``--mode int4
  --int4-8bit-share 1 --int4-tied nbits8``).

Measures: cosine of the next-token logits and top-1 agreement with the fp32 graph (natively computed) over every
real token of the first ``--rows`` held-out E2E texts (``mr\\nref``), per graph and CPU; and the native per-token
decode time. Needs ``qemu-x86_64-static`` (``apt-get install qemu-user-static``).

Command (from the repository root)::

    python benchmarks/bench_int8_avx2.py --rows 8

Writes ``benchmarks/results/int8_avx2.{json,md}``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

log = logging.getLogger("bench_int8_avx2")
QEMU_CPU = "Haswell"  # AVX2 + FMA, no AVX-512, no VNNI: onnxruntime's AVX2 int8 kernels

# label -> QuantizeConfig keywords
GRAPHS: dict[str, dict[str, Any]] = {
    "dynamic int8, avx2 preset": {"mode": "dynamic", "preset": "avx2"},
    "dynamic int8, avx512-vnni preset": {"mode": "dynamic", "preset": "avx512-vnni"},
    "8-bit blocks (MatMulNBits bits 8)": {"mode": "int4", "int4_8bit_share": 1.0, "int4_tied": "nbits8"},
}


def child(graph: Path, feeds_path: Path, out_path: Path) -> None:
    """Run ``graph`` on every feed of ``feeds_path`` with one thread; save the logits (numpy + onnxruntime only:
    this runs under qemu, where every import costs)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
    data = np.load(feeds_path)
    n = int(data["n"])
    outs = {}
    for i in range(n):
        feed = {k.split("/", 1)[1]: data[k] for k in data.files if k.startswith(f"{i}/")}
        outs[f"{i}"] = sess.run(None, feed)[0]
    np.savez(out_path, **outs)


def logits(graph: Path, feeds_path: Path, out_path: Path, *, emulate: bool, qemu: str | None) -> list[np.ndarray]:
    """The logits of every feed, computed natively or under qemu's Haswell, in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", str(graph), str(feeds_path), str(out_path)]
    env = dict(os.environ)
    if emulate:
        # qemu runs the real interpreter binary, which does not know the venv: hand it the venv's site-packages
        cmd = [qemu or "qemu-x86_64-static", "-cpu", QEMU_CPU, os.path.realpath(sys.executable), *cmd[1:]]
        env["PYTHONPATH"] = os.pathsep.join([*site.getsitepackages(), str(ROOT)])
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    data = np.load(out_path)
    return [data[str(i)] for i in range(len(data.files))]


def compare(ref: list[np.ndarray], got: list[np.ndarray], masks: list[np.ndarray]) -> dict[str, float]:
    from edgefuse.metrics import rowwise_cosine

    cos, top1 = [], []
    for r, g, m in zip(ref, got, masks, strict=True):
        keep = m[0].astype(bool)
        r2, g2 = r[0][keep].astype(np.float64), g[0][keep].astype(np.float64)
        cos.extend(rowwise_cosine(r2, g2).tolist())
        top1.extend((r2.argmax(-1) == g2.argmax(-1)).tolist())
    c = np.asarray(cos)
    return {"cosine_mean": float(c.mean()), "cosine_p05": float(np.percentile(c, 5)), "cosine_min": float(c.min()),
            "top1_vs_fp32": float(np.mean(top1)), "positions": len(c)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", type=Path, default=None,
                    help="an fp32 causal-LM export with KV cache (default: the plain SmolLM2 export of bench_int4)")
    ap.add_argument("--rows", type=int, default=8, help="held-out E2E texts to compare on (default 8)")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--decode-rounds", type=int, default=3)
    ap.add_argument("--no-emulation", action="store_true", help="native runs only (no qemu)")
    ap.add_argument("--out", default="int8_avx2", help="results name: benchmarks/results/OUT.{json,md}")
    ap.add_argument("--child", nargs=3, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    import _common as common
    from _common import environment, load_average, markdown_table

    from edgefuse.config.quantize import QuantizeConfig
    from edgefuse.finetune.data import split_rows
    from edgefuse.finetune.generation import decode_latency
    from edgefuse.ort import build_feed, make_session
    from edgefuse.quantize.api import quantize_onnx

    qemu = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
    if qemu is None and not args.no_emulation:
        raise SystemExit("qemu-x86_64-static not found: apt-get install -y qemu-user-static (or --no-emulation)")
    start, load_start = time.perf_counter(), load_average()
    if args.folder is None:
        import bench_int4

        folder, _ = bench_int4.export_folder()
    else:
        folder = args.folder.resolve()
    tok = common.export_tokenizer(folder)
    from bench_int4 import data_config

    train, val, _ = split_rows(data_config(None))
    texts = [f"{r['mr']}\n{r['ref']}" for r in val[: args.rows]]
    calib = [f"{r['mr']}\n{r['ref']}" for r in train[:32]]
    work = common.WORK / "int8_avx2" / folder.name
    work.mkdir(parents=True, exist_ok=True)
    fp32 = make_session(folder / "model.onnx", threads=1)
    feeds, masks = {}, []
    for i, text in enumerate(texts):
        enc = tok([text], return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        masks.append(mask)
        feeds.update({f"{i}/{k}": v for k, v in build_feed(fp32, ids, mask).items()})
    feeds_path = work / "feeds.npz"
    np.savez(feeds_path, n=np.asarray(len(texts)), **feeds)
    del fp32
    ref = logits(folder / "model.onnx", feeds_path, work / "fp32.npz", emulate=False, qemu=qemu)
    rows: dict[str, Any] = {}
    paths: dict[str, Path] = {"fp32": folder / "model.onnx"}
    for label, kw in GRAPHS.items():
        out = work / "".join(c if c.isalnum() else "_" for c in label)
        res = quantize_onnx(folder, QuantizeConfig(overwrite=True, min_cosine=None, **kw), out,
                            calibration_texts=calib)
        paths[label] = res.onnx_path
        row: dict[str, Any] = {"config": kw, "size_mb": res.size_bytes / 1e6, "file": res.onnx_path.name}
        row["native"] = compare(ref, logits(res.onnx_path, feeds_path, out / "native.npz", emulate=False, qemu=qemu),
                                masks)
        log.warning("%s native: cosine %.4f top-1 %.3f (load %s)", label, row["native"]["cosine_mean"],
                    row["native"]["top1_vs_fp32"], load_average())
        if not args.no_emulation:
            t0 = time.perf_counter()
            row["avx2_emulated"] = compare(ref, logits(res.onnx_path, feeds_path, out / "avx2.npz", emulate=True,
                                                       qemu=qemu), masks)
            row["avx2_emulated"]["qemu_s"] = time.perf_counter() - t0
            log.warning("%s as AVX2 (qemu %s): cosine %.4f top-1 %.3f", label, QEMU_CPU,
                        row["avx2_emulated"]["cosine_mean"], row["avx2_emulated"]["top1_vs_fp32"])
        rows[label] = row
    load_dec = load_average()
    sessions = {k: make_session(p, threads=1) for k, p in paths.items()}
    decode = decode_latency(sessions, tok, texts[0].split("\n")[0] + "\n", n_tokens=args.decode_tokens,
                            rounds=args.decode_rounds)
    del sessions
    env = environment()
    state = {"environment": env, "folder": str(folder), "rows": rows, "decode": decode, "texts": len(texts),
             "load_start": load_start, "load_decode": load_dec, "load_end": load_average(),
             "wall_s": time.perf_counter() - start, "qemu_cpu": QEMU_CPU}
    common.write_result(f"{args.out}.json", state)
    lines = [
        "# int8 as an AVX2 CPU computes it: SmolLM2 graphs under qemu's Haswell (issue 14, item 3)", "",
        f"Command: `{env['command']}`. Commit {env['commit'][:10]}, {env['date_utc']} UTC; wall time "
        f"{state['wall_s'] / 60:.1f} min.  ",
        f"Host: {env['cpu_model']}, {env['cores_logical']} logical cores (ISA: {', '.join(env.get('isa_flags') or [])})"
        f", shared; load average {' '.join(map(str, load_start))} at the start, "
        f"{' '.join(map(str, state['load_end']))} at the end.  ",
        f"Model: `{folder}` (fp32, KV cache). Texts: the first {len(texts)} held-out E2E rows (`mr\\nref`), every "
        "real token's next-token logits against the fp32 graph run natively.  ",
        f"AVX2 column: the same graph run by `qemu-x86_64-static -cpu {QEMU_CPU}` (AVX2/FMA, no AVX-512/VNNI), so "
        "onnxruntime dispatches its AVX2 kernels; numerics only.", "",
    ]
    trows = []
    for label, r in rows.items():
        n, e = r["native"], r.get("avx2_emulated") or {}
        t = decode.get(label, {})
        trows.append((label, f"{r['size_mb']:.0f}", f"{n['cosine_mean']:.4f}", f"{n['top1_vs_fp32']:.3f}",
                      f"{e['cosine_mean']:.4f}" if e else "-", f"{e['top1_vs_fp32']:.3f}" if e else "-",
                      f"{e['cosine_p05']:.4f}" if e else "-",
                      f"{t.get('decode_ms_p50', float('nan')):.2f} ({t.get('decode_cpu_ms_p50', float('nan')):.2f})"))
    t = decode["fp32"]
    trows.append(("fp32", "", "1", "1", "", "", "", f"{t['decode_ms_p50']:.2f} ({t['decode_cpu_ms_p50']:.2f})"))
    lines.append(markdown_table(("graph", "MB", f"cosine, this host ({env['cpu_model'][:20]})", "top-1, this host",
                                 "cosine as AVX2", "top-1 as AVX2", "cosine p05 as AVX2",
                                 "decode ms/token p50, this host, 1 thread (CPU)"), trows))
    lines += ["", f"Decode: batch 1, KV cache, {args.decode_tokens} tokens after the first held-out MR, "
              f"{args.decode_rounds} interleaved rounds (load {' '.join(map(str, load_dec))} at its start)."]
    common.write_result(f"{args.out}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
