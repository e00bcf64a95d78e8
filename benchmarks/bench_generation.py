"""Generation benchmark (issue 6, item 4): SmolLM2-135M per-token decode latency with the KV cache and E2E
validation perplexity, plain / fused / recovered, fp32 / int8 / int4 ONNX graphs.

Usage (from the repository root):

    python benchmarks/bench_generation.py                          # default budget (64 new tokens x 5 rounds, 200 refs)
    python benchmarks/bench_generation.py --tokens 16 --rounds 2 --n-eval 20   # quick run
    python benchmarks/bench_generation.py --recovered benchmarks/_work/<run>/model   # add a recovered fused model

What it does:

1. Uses bench_export's SmolLM2 folders under ``benchmarks/_work/export/`` (``smollm2``,
   ``smollm2_fused_<fold>``, ``smollm2_recovered_<fold>``), exporting one when it is missing or was made from another
   model or settings (``edgefuse.export.export_onnx``: optimum-onnx, ``text-generation-with-past``, validated
   against PyTorch incl. 32 greedy tokens), and quantizes the graphs that are missing, with bench_export's
   settings: ``int8`` = dynamic per-channel, reduce_range, the 9 massive-activation down projections in fp32
   (the recommended SmolLM2 recipe on this AVX2 host); ``int8-all`` = the same with every MatMul quantized;
   ``int4`` = MatMulNBits, block 32. Variants: ``plain``; ``fused`` = keep_ratio 0.5 in layers 15..29 of 30,
   fusion scale folded as ``fold_scales=auto``; ``recovered`` = a fine-tuned fused model folder (``--recovered``,
   or found under ``benchmarks/_work``).
2. Perplexity on the E2E validation split of the recovery stage (``edgefuse.finetune_data``: devset.csv split by
   meaning representation, ``validation_fraction`` 0.1, seed 0, first ``--n-eval`` references; sequence
   ``mr + "\\n" + ref + EOS``, at most 96 tokens; loss over the ``ref`` + EOS tokens only), for every graph through
   onnxruntime and for each PyTorch fp32 model (``edgefuse.finetune_eval.evaluate``) as the reference.
3. Decode latency through a direct onnxruntime loop (not optimum's ``ORTModelForCausalLM``: one
   ``session.run`` per token, the ``present.*`` outputs fed back as ``past_key_values.*``, greedy, EOS suppressed
   so every run decodes exactly ``--tokens`` tokens) after a fixed prompt (the first validation MR). For each
   thread count, every graph gets its own session; the graphs take turns within each round (rotated order), so
   load changes on this shared machine hit all of them alike. Per-token time = one decode step (feed + run +
   argmax), p50/p90 over all steps of all rounds; the prompt's prefill is reported separately.

Writes ``benchmarks/results/generation.json`` and ``generation.md``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
RESULTS = ROOT / "benchmarks" / "results"
E2E = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"
INT4_BLOCK = 32
MAX_LENGTH = 96  # as the recovery benchmark truncates E2E
PRECISIONS = ("fp32", "int8", "int4")

logger = logging.getLogger("bench_generation")


# ------------------------------------------------------------------------------------------------ models
def find_recovered() -> Path | None:
    """The newest fine-tuned fused SmolLM2 under ``benchmarks/_work``: a ``model/`` folder (llama, with edgefuse
    fusion metadata) beside the ``finetune_result.json`` of an ``edgefuse finetune`` run."""
    found = []
    for result in (ROOT / "benchmarks" / "_work").glob("**/finetune_result.json"):
        cfg = result.parent / "model" / "config.json"
        if cfg.is_file():
            conf = json.loads(cfg.read_text())
            if conf.get("model_type") == "llama" and (conf.get("edgefuse") or {}).get("widths"):
                found.append(result.parent / "model")
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def _smol_model(variant: str, recovered: Path | None) -> Any:
    """The PyTorch model of a variant (fused: freshly fused, deterministic from the seed)."""
    from bench_export import smol_fusion_config

    from edgefuse.fusion import fuse_mlps_
    from edgefuse.models import load_model
    from edgefuse.persist import load_fused

    if variant == "recovered":
        return load_fused(recovered)
    model = load_model("smollm2", "causal-lm")
    if variant == "fused":
        fuse_mlps_(model, smol_fusion_config())
    return model.eval()


def precisions() -> dict[str, tuple[str, dict]]:
    """precision label -> (graph file, QuantizeConfig keywords or {} for fp32), from bench_export's settings."""
    from bench_export import smol_quant_settings

    from edgefuse.config.quantize import QuantizeConfig
    from edgefuse.quantize import default_output_name
    from edgefuse.quantize_presets import detect_host_preset

    preset = detect_host_preset()
    by_label = dict(smol_quant_settings(preset))
    out = {"fp32": ("model.onnx", {})}
    for label, key in (("int8", "int8, reduce_range, 9 down_proj fp32"), ("int8-all", "int8, reduce_range"),
                       ("int4", "int4, block 32")):
        kw = by_label[key]
        out[label] = (default_output_name(QuantizeConfig(**kw), preset), kw)
    return out


def folder_name(variant: str, model: Any) -> str:
    """The bench_export folder name of a variant (shared, so neither benchmark exports twice)."""
    from edgefuse.export import resolve_fold

    if variant == "plain":
        return "smollm2"
    fold = resolve_fold(model, "auto")  # "none" for a recovered model saved already folded
    return f"smollm2_{variant}" + ("" if fold == "none" else f"_{fold}")


def build_folder(variant: str, model: Any, tok: Any, texts: list[str], rebuild: bool) -> dict[str, Any]:
    """Export (unless bench_export's folder for the same model and settings exists) and quantize what is missing."""
    from bench_export import WORK as EXPORT_WORK
    from bench_export import _export, _reused_row, smol_export_config

    from edgefuse.config.quantize import QuantizeConfig
    from edgefuse.export import resolve_fold
    from edgefuse.quantize import quantize_onnx

    name = folder_name(variant, model)
    fold = resolve_fold(model, "auto")
    # the fold spelled out for fused models, as bench_export's fold study writes it, so its folder is reused
    cfg = smol_export_config() if fold == "none" else smol_export_config().model_copy(update={"fold_scales": fold})
    row = None if rebuild else _reused_row(model, cfg, name)
    row = row or _export(model, tok, cfg, name)
    folder = EXPORT_WORK / name
    graphs = set(json.loads((folder / "manifest.json").read_text())["graphs"])
    quantized = {}
    for label, (graph, kw) in precisions().items():
        if kw and (rebuild or graph not in graphs):
            q = quantize_onnx(folder, QuantizeConfig(**kw, overwrite=True, min_cosine=None), calibration_texts=texts)
            quantized[label] = {"graph": graph, "quantized_matmuls": q.quantized_nodes, "cosine_mean": q.cosine_mean}
    return {**row, "folder": str(folder.relative_to(ROOT)), "quantized_now": quantized}


# ------------------------------------------------------------------------------------------------ data
def e2e_validation(tok: Any, n_eval: int) -> Any:
    """The recovery stage's E2E validation split (grouped by MR), first ``n_eval`` references, tokenized."""
    from edgefuse.config.finetune import DataConfig
    from edgefuse.finetune_data import load_finetune_data

    cfg = DataConfig(train=str(E2E), validation_fraction=0.1, group_column="mr", text_column="ref",
                     prompt_column="mr", max_length=MAX_LENGTH, max_validation_examples=n_eval, seed=0)
    return load_finetune_data(cfg, tok, "causal-lm")


def _batches(split: Any, pad: int, size: int = 8):
    """Right-padded batches (ids, mask, loss_start), sorted by length so padding wastes little."""
    order = sorted(range(len(split)), key=lambda i: len(split.input_ids[i]))
    for s in range(0, len(order), size):
        idx = order[s : s + size]
        width = max(len(split.input_ids[i]) for i in idx)
        ids = np.full((len(idx), width), pad, dtype=np.int64)
        mask = np.zeros((len(idx), width), dtype=np.int64)
        for r, i in enumerate(idx):
            ids[r, : len(split.input_ids[i])] = split.input_ids[i]
            mask[r, : len(split.input_ids[i])] = 1
        yield idx, ids, mask, [split.loss_start[i] for i in idx]


def onnx_perplexity(
    session: Any, split: Any, pad: int, ref_argmax: dict | None
) -> tuple[float, int, dict, float | None]:
    """(perplexity, target tokens, argmax per target position, top-1 agreement with ``ref_argmax``) of a graph,
    over the same target tokens as :func:`edgefuse.finetune_eval.evaluate` (``ref`` + EOS)."""
    from edgefuse.export_ort import build_feed

    nll, count, argmax, same = 0.0, 0, {}, 0
    for idx, ids, mask, starts in _batches(split, pad):
        logits = session.run(["logits"], build_feed(session, ids, mask))[0]  # (batch, seq, vocab)
        for r, i in enumerate(idx):
            n = int(mask[r].sum())
            pos = np.arange(starts[r], n)  # target token positions, predicted from pos - 1
            rows = logits[r, pos - 1].astype(np.float64)
            top = rows.max(axis=-1, keepdims=True)
            logz = np.log(np.exp(rows - top).sum(axis=-1)) + top[:, 0]
            nll += float((logz - rows[np.arange(len(pos)), ids[r, pos]]).sum())
            count += len(pos)
            argmax[i] = rows.argmax(-1)
            if ref_argmax is not None:
                same += int((argmax[i] == ref_argmax[i]).sum())
    return math.exp(nll / count), count, argmax, (same / count if ref_argmax is not None else None)


def probe_down_inputs(model: Any, split: Any, n: int = 8) -> list[dict[str, float]]:
    """Per layer: the largest |input| of the MLP down projection over ``n`` validation sequences, the median over
    tokens of each token's largest |input|, and the position of the largest (0 = the first token). Shows the
    "massive activations" that break per-tensor int8 activation scales."""
    import torch

    stats: list[dict[str, float]] = []
    hooks = []
    per_layer: dict[int, list[torch.Tensor]] = {}
    for i, layer in enumerate(model.model.layers):
        def hook(_mod: Any, inp: tuple, i: int = i) -> None:
            per_layer.setdefault(i, []).append(inp[0].detach().abs().amax(-1)[0])  # (seq,) per-token max
        hooks.append(layer.mlp.down_proj.register_forward_pre_hook(hook))
    try:
        with torch.inference_mode():
            for ids in split.input_ids[:n]:
                model(input_ids=torch.tensor([ids]))
    finally:
        for h in hooks:
            h.remove()
    for i in sorted(per_layer):
        tok_max = torch.cat(per_layer[i])
        first = max(float(t[0]) for t in per_layer[i])
        stats.append({"layer": i, "max": float(tok_max.max()), "median_token_max": float(tok_max.median()),
                      "first_token_max": first})
    return stats


# ------------------------------------------------------------------------------------------------ timing
def decode_run(
    session: Any, prompt_ids: np.ndarray, n_tokens: int, eos_ids: list[int]
) -> tuple[float, list[float], list[int]]:
    """Prefill the prompt, then decode ``n_tokens`` greedily with the KV cache; (prefill ms, per-step ms, tokens)."""
    from edgefuse.export_ort import PAST_PREFIX, build_feed

    names = [o.name for o in session.get_outputs()]
    mask = np.ones_like(prompt_ids)
    t0 = time.perf_counter()
    outs = dict(zip(names, session.run(None, build_feed(session, prompt_ids, mask)), strict=True))
    prefill_ms = (time.perf_counter() - t0) * 1e3
    steps, tokens = [], []
    for _ in range(n_tokens):
        t0 = time.perf_counter()
        logits = outs["logits"][0, -1].copy()
        logits[eos_ids] = -np.inf
        nxt = np.array([[int(logits.argmax())]], dtype=np.int64)
        past = {n.replace("present.", PAST_PREFIX): v for n, v in outs.items() if n.startswith("present.")}
        mask = np.concatenate([mask, np.ones((1, 1), dtype=np.int64)], axis=1)
        outs = dict(zip(names, session.run(None, build_feed(session, nxt, mask[:, -1:], past=past, full_mask=mask)),
                        strict=True))
        steps.append((time.perf_counter() - t0) * 1e3)
        tokens.append(int(nxt[0, 0]))
    return prefill_ms, steps, tokens


def time_graphs(graphs: dict[str, Path], threads: int, prompt_ids: np.ndarray, n_tokens: int, rounds: int,
                eos_ids: list[int]) -> dict[str, dict[str, Any]]:
    """Interleaved decode timing of every graph on ``threads`` intra-op threads."""
    from edgefuse.export_ort import make_session

    sessions = {key: make_session(path, threads=threads) for key, path in graphs.items()}
    keys = list(sessions)
    for key in keys:  # warm-up: one full run each (allocations, prepacked weights)
        decode_run(sessions[key], prompt_ids, min(n_tokens, 8), eos_ids)
    steps: dict[str, list[float]] = {k: [] for k in keys}
    prefill: dict[str, list[float]] = {k: [] for k in keys}
    tokens: dict[str, list[int]] = {}
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[: r % len(keys)]:  # rotate who goes first
            p, s, toks = decode_run(sessions[key], prompt_ids, n_tokens, eos_ids)
            prefill[key].append(p)
            steps[key].extend(s)
            tokens.setdefault(key, toks)
        logger.warning("threads %d: round %d/%d done", threads, r + 1, rounds)
    del sessions
    gc.collect()
    return {k: {"decode_ms_p50": float(np.percentile(steps[k], 50)),
                "decode_ms_p90": float(np.percentile(steps[k], 90)), "decode_ms_mean": float(np.mean(steps[k])),
                "decode_steps": len(steps[k]),
                "prefill_ms_p50": float(np.percentile(prefill[k], 50)), "tokens": tokens[k]} for k in keys}


# ------------------------------------------------------------------------------------------------ report
def _env() -> dict[str, Any]:
    from edgefuse.manifest import library_versions
    from edgefuse.quantize_presets import detect_host_preset

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    return {"machine": platform.machine(), "cpu": cpu, "cpu_count": os.cpu_count(), "host_preset": detect_host_preset(),
            "versions": library_versions(), "load_average_start": os.getloadavg()}


def write_markdown(data: dict[str, Any], path: Path) -> None:
    b = data["budget"]
    lines = [
        "# Generation: SmolLM2-135M decode latency and E2E perplexity (issue 6, item 4)", "",
        f"Command: `{data['command']}` ({data['total_s']:.0f} s). Host: {data['env']['cpu']}, "
        f"{data['env']['cpu_count']} cores (shared; load average {data['env']['load_average_start'][0]:.1f} at the "
        f"start, {data['env']['load_average_end'][0]:.1f} at the end), onnxruntime "
        f"{data['env']['versions']['onnxruntime']}, torch {data['env']['versions']['torch']}, int8 preset "
        f"`{data['env']['host_preset']}`.", "",
        f"Budget: prompt of {b['prompt_tokens']} tokens (the first validation MR), {b['tokens']} new tokens per run, "
        f"{b['rounds']} interleaved rounds per thread count (p50/p90 over {b['tokens'] * b['rounds']} decode steps "
        f"per graph); perplexity on {b['n_eval']} E2E validation references ({data['eval_tokens']} target tokens).",
        "",
        "Decode loop: a direct onnxruntime loop over the exported `text-generation-with-past` graph (one "
        "`session.run` per token, KV cache fed back, greedy, EOS suppressed), CPUExecutionProvider, ORT_ENABLE_ALL, "
        "inter-op 1 thread, spinning off. The machine is shared with other jobs: absolute times are noisy; the "
        "ratios come from one interleaved run.", "",
        "| variant | graph | size MB | E2E ppl (ONNX) | ppl PyTorch fp32 | top-1 = fp32 | "
        + "".join(f"{t} thr p50 / p90 ms | x plain fp32 | " for t in b["threads"])
        + (f"prefill ms ({b['threads'][0]} thr) |" if b["threads"] else ""),
        "| --- | --- | --- | --- | --- | --- | " + "".join("--- | --- | " for _ in b["threads"])
        + ("--- |" if b["threads"] else ""),
    ]
    for row in data["rows"]:
        cells = [row["variant"], f"{row['precision']} `{row['graph']}`", f"{row['size_bytes'] / 1e6:.1f}",
                 f"{row['perplexity']:.3f}",
                 f"{row['perplexity_pytorch']:.3f}" if row.get("perplexity_pytorch") is not None else "",
                 "" if row["top1_vs_fp32"] is None else f"{row['top1_vs_fp32']:.3f}"]
        for t in b["threads"]:
            tm = row["timing"][str(t)]
            cells += [f"{tm['decode_ms_p50']:.2f} / {tm['decode_ms_p90']:.2f}", f"{tm['ratio_p50_vs_plain_fp32']:.2f}"]
        if b["threads"]:
            cells.append(f"{row['timing'][str(b['threads'][0])]['prefill_ms_p50']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Exports (validated against PyTorch in the same run unless reused):", ""]
    for variant, info in data["exports"].items():
        greedy = info["greedy"]
        lines.append(f"- {variant}: `{info['folder']}`, {info['exporter']}, fold `{info['fold']}`, fp32 max |diff| "
                     f"{info['max_abs_diff']:.2g}; greedy {len(greedy['torch'])} tokens identical to PyTorch: "
                     f"{greedy['match']}" + (" (folder reused from an earlier run)" if info.get("reused") else ""))
    if data.get("down_proj_input_probe"):
        big = [p for p in data["down_proj_input_probe"] if p["max"] > 20 * p["median_token_max"]]
        lines += ["", "Massive activations (plain model, PyTorch, first 8 validation sequences): layers whose largest "
                  "down-projection input exceeds 20x the median token's largest: "
                  + ", ".join(f"{p['layer']} ({p['max']:.0f} vs {p['median_token_max']:.1f}, first token "
                              f"{p['first_token_max']:.0f})" for p in big) + "."]
    lines += ["", "Greedy continuations of the timing prompt (first round, first thread count):", ""]
    lines += [f"- {key}: `{text!r}`" for key, text in data["samples"].items()]
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per timed run (default 64)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per thread count (default 5)")
    parser.add_argument("--n-eval", type=int, default=200, help="E2E validation references for perplexity (200)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="intra-op thread counts (1 2)")
    parser.add_argument("--variants", nargs="+", default=["plain", "fused"], choices=["plain", "fused"])
    parser.add_argument("--recovered", default="auto",
                        help="a recovered fused model folder to add; auto (default): the newest fine-tuned fused "
                        "SmolLM2 under benchmarks/_work (a model/ folder beside finetune_result.json); none: skip")
    parser.add_argument("--rebuild", action="store_true", help="re-export even when a matching folder exists")
    parser.add_argument("--skip-timing", action="store_true",
                        help="perplexity only (e.g. a recovered model: its graphs have the fused graphs' shapes)")
    parser.add_argument("--out", default="generation", help="result file stem under benchmarks/results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    import torch
    from bench_export import _texts

    from edgefuse.finetune_eval import evaluate
    from edgefuse.models import load_tokenizer

    torch.set_num_threads(2)
    start = time.perf_counter()
    env = _env()
    tok = load_tokenizer("smollm2")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data = e2e_validation(tok, args.n_eval)
    split, pad = data.validation, data.pad_token_id
    calib = _texts(32, E2E)
    recovered = find_recovered() if args.recovered == "auto" else (None if args.recovered == "none"
                                                                     else Path(args.recovered))
    variants = list(args.variants) + (["recovered"] if recovered else [])
    exports, graphs, rows, eos_ids, probe = {}, {}, [], [], None
    for variant in variants:
        model = _smol_model(variant, recovered)
        eos = model.generation_config.eos_token_id
        eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        exports[variant] = build_folder(variant, model, tok, calib, args.rebuild)
        folder = ROOT / exports[variant]["folder"]
        manifest = json.loads((folder / "manifest.json").read_text())
        ppl_torch = evaluate(model, split, "causal-lm", pad_token_id=pad, batch_size=8)["perplexity"]
        if variant == "plain":
            probe = probe_down_inputs(model, split)
        logger.warning("%s: PyTorch fp32 perplexity %.4f", variant, ppl_torch)
        del model
        gc.collect()
        from edgefuse.export_ort import make_session

        ref_argmax = None
        for precision, (name, _) in precisions().items():
            path = folder / name
            graphs[f"{variant}/{precision}"] = path
            ppl, n_tok, argmax, top1 = onnx_perplexity(make_session(path), split, pad, ref_argmax)
            ref_argmax = argmax if precision == "fp32" else ref_argmax
            size = manifest["graphs"][name]["size_bytes"]
            rows.append({"variant": variant, "precision": precision, "graph": name, "size_bytes": size,
                         "perplexity": ppl, "eval_tokens": n_tok, "top1_vs_fp32": top1,
                         "perplexity_pytorch": ppl_torch if precision == "fp32" else None, "timing": {}})
            logger.warning("%s/%s: ONNX perplexity %.4f (top-1 vs fp32 %s)", variant, precision, ppl, top1)
    prompt_ids = np.asarray([tok(split.prompts[0])["input_ids"]], dtype=np.int64)
    samples = {}
    for threads in [] if args.skip_timing else args.threads:
        timing = time_graphs(graphs, threads, prompt_ids, args.tokens, args.rounds, eos_ids)
        base = timing["plain/fp32"]["decode_ms_p50"] if "plain/fp32" in timing else float("nan")
        for row in rows:
            tm = timing[f"{row['variant']}/{row['precision']}"]
            tm["ratio_p50_vs_plain_fp32"] = tm["decode_ms_p50"] / base
            row["timing"][str(threads)] = tm
            samples.setdefault(f"{row['variant']}/{row['precision']}", tok.decode(tm["tokens"]))
    env["load_average_end"] = os.getloadavg()
    out = {
        "command": " ".join(["python", "benchmarks/bench_generation.py", *(sys.argv[1:] if argv is None else argv)]),
        "budget": {"tokens": args.tokens, "rounds": args.rounds, "n_eval": args.n_eval,
                   "threads": [] if args.skip_timing else args.threads,
                   "prompt_tokens": int(prompt_ids.shape[1]), "prompt": split.prompts[0], "max_length": MAX_LENGTH},
        "eval_tokens": rows[0]["eval_tokens"], "env": env, "exports": exports, "rows": rows, "samples": samples,
        "down_proj_input_probe": probe,
        "recovered_source": None if recovered is None else str(recovered),
        "total_s": time.perf_counter() - start,
    }
    from edgefuse.io_utils import write_json_atomic

    write_json_atomic(RESULTS / f"{args.out}.json", out)
    write_markdown(out, RESULTS / f"{args.out}.md")
    logger.warning("wrote %s (%.0f s)", RESULTS / f"{args.out}.json", out["total_s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
