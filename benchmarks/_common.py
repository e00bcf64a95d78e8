"""What the benchmark scripts share: paths, data recipes, model recipes, the environment of a run, Markdown.

Every script imports from here and from nothing else in ``benchmarks/``. The scripts run as
``python benchmarks/bench_NAME.py`` with the project installed (``scripts/setup.sh`` installs it in editable
mode), so ``edgefuse`` imports without touching ``sys.path``, and this module imports as ``_common`` because
Python puts a script's own folder first on the path.

Example:
    >>> str(SST2.relative_to(ROOT.parent))
    'shared/data/sst2'
    >>> markdown_table(("graph", "ms"), [("fp32", "1.0")])
    '| graph | ms |\\n| --- | --- |\\n| fp32 | 1.0 |\\n'
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

# ------------------------------------------------------------------------------------------------------- paths
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
RESULTS = BENCH / "results"  # committed: JSON + Markdown of every run
WORK = BENCH / "_work"  # git-ignored: models, graphs and checkpoints the runs make
# never copied into the repository; EDGEFUSE_SHARED_DATA points elsewhere (a git worktree one level deeper)
SHARED_DATA = Path(os.environ.get("EDGEFUSE_SHARED_DATA") or ROOT.parent / "shared" / "data")
SST2 = SHARED_DATA / "sst2"  # train.tsv, validation.tsv (GLUE: sentence, label)
E2E = SHARED_DATA / "e2e" / "devset.csv"  # mr, ref
# bench_export writes its export folders here and bench_generation reuses them (neither exports twice)
EXPORT_WORK = WORK / "export"


# ------------------------------------------------------------------------------------------------- environment
def git_commit(root: Path = ROOT) -> str:
    """The checked-out commit of ``root``; in a copy of a checkout without git (a benchmark run from a snapshot, so
    that edits cannot change it while it runs), the ``EDGEFUSE_BENCH_COMMIT`` the copy was made from; else
    "unknown"."""
    if os.environ.get("EDGEFUSE_BENCH_COMMIT"):
        return os.environ["EDGEFUSE_BENCH_COMMIT"] + " (a copy of that commit's tree)"
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def load_average() -> list[float]:
    """The 1, 5 and 15-minute load averages, rounded (recorded at the start and end of every run)."""
    return [round(x, 2) for x in os.getloadavg()]


def cpu_model() -> str:
    """The CPU model as the runner reports it (``/proc/cpuinfo``'s model name, or the ARM core name)."""
    from edgefuse.profile.runner.ort_runner import cpuinfo

    return str(cpuinfo()["cpu_model"])


def environment(**extra: Any) -> dict[str, Any]:
    """The machine and software of a run: CPU (model, ISA flags, cores) from the profile runner, the library
    versions the export manifest records, the commit, the command line, the date and the load average now.
    ``extra`` keys (e.g. ``threads``) are added at the top level."""
    from edgefuse.manifest import library_versions
    from edgefuse.profile.runner.ort_runner import cpuinfo

    return {
        "command": "python " + shlex.join(sys.argv),
        "date_utc": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "commit": git_commit(),
        "machine": platform.machine(),
        **cpuinfo(),
        "versions": library_versions(),
        "load_average": load_average(),
        **extra,
    }


def write_result(name: str, obj: Any) -> Path:
    """Write ``benchmarks/results/NAME`` (JSON for a dict or list, else text) atomically; return the path."""
    from edgefuse.io_utils import write_json_atomic, write_text_atomic

    path = RESULTS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(obj, dict | list):
        write_json_atomic(path, obj)
    else:
        write_text_atomic(path, str(obj))
    return path


# ------------------------------------------------------------------------------------------------------ Markdown
def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> str:
    """A Markdown table through the report package's blocks (cells are ``str()``-ed; ``|`` is escaped)."""
    from edgefuse.report.doc import Table
    from edgefuse.report.markdown import render_markdown

    table = Table(tuple(headers), tuple(tuple(str(c) for c in r) for r in rows), caption)
    return render_markdown([table])


# ------------------------------------------------------------------------------------------------- data recipes
def sample_texts(n: int, path: Path = SST2 / "validation.tsv") -> list[str]:
    """The first ``n`` texts of a data file (default: SST-2 validation sentences), for calibration and comparison."""
    from edgefuse.quantize.evaluate import read_texts

    return read_texts(path, n)


def sst2_data(tok: Any, max_length: int = 64) -> Any:
    """SST-2 train/validation tokenized for sequence classification."""
    from edgefuse.config.finetune import DataConfig
    from edgefuse.finetune.data import load_finetune_data

    cfg = DataConfig(train=str(SST2 / "train.tsv"), validation=str(SST2 / "validation.tsv"),
                     text_column="sentence", label_column="label", max_length=max_length)
    return load_finetune_data(cfg, tok, "sequence-classification")


def cls_config(steps: int, lr: float, eval_every: int | None, **kw: Any) -> Any:
    """The fine-tuning recipe of the SST-2 classifiers (teacher and recovered students)."""
    from edgefuse.config.finetune import FinetuneConfig

    # keep_best=False: the validation set is also the reported test set, so the final weights are reported
    # (selecting the best of several evaluations on it would be optimistic)
    return FinetuneConfig(
        task="sequence-classification", max_steps=steps, batch_size=32, learning_rate=lr, warmup_ratio=0.06,
        weight_decay=0.01, max_grad_norm=1.0, eval_every_steps=eval_every, keep_best=False, log_every_steps=10,
        seed=0, group_by_length=True, **kw,
    )


# ---------------------------------------------------------------------------------------------- SmolLM2 recipe
SMOL_FUSED_LAYERS = list(range(15, 30))  # the upper half of SmolLM2's 30 layers
SMOL_GREEDY_TOKENS = 32
# The 9 down projections with the largest simulated per-token int8 error on plain SmolLM2 (edgefuse.quantize.auto
# ranking on 8 E2E references): the layers with "massive activations" (one token's input ~100-3000x the others).
SMOL_INT8_EXCLUDE = r"re:^/model/layers\.(1|2|3|8|9|10|11|28|29)/mlp/down_proj/MatMul$"


def smol_quant_settings(preset: str) -> list[tuple[str, dict]]:
    """(label, QuantizeConfig keywords) of every quantized SmolLM2 graph the benchmarks build."""
    return [
        ("int8, preset defaults", {"mode": "dynamic"}),
        ("int8, reduce_range", {"mode": "dynamic", "reduce_range": True,
                                "output_name": f"model_int8_{preset}_rr.onnx"}),
        ("int8, reduce_range, 9 down_proj fp32", {"mode": "dynamic", "reduce_range": True,
                                                  "exclude": [SMOL_INT8_EXCLUDE],
                                                  "output_name": f"model_int8_{preset}_rr_x9.onnx"}),
        ("int4, block 32", {"mode": "int4", "block_size": 32}),
    ]


def smol_fusion_config() -> Any:
    """The fusion used for SmolLM2 in every benchmark: keep_ratio 0.5 in layers 15..29 (of 30)."""
    from edgefuse.config.fusion import FusionConfig

    return FusionConfig(keep_ratio=0.5, layers=SMOL_FUSED_LAYERS)


def smol_export_config() -> Any:
    """The SmolLM2 export: causal LM with KV cache, greedy tokens compared with PyTorch."""
    from edgefuse.config.export import ExportConfig

    # 30 layers: fp32 kernels differ by up to 1.3e-4 (measured) -> atol 5e-4, as platform.md found with optimum
    return ExportConfig(task="causal-lm", generate_tokens=SMOL_GREEDY_TOKENS, atol=5e-4)


# ------------------------------------------------------------------------------------------------ LM scoring
def lm_batches(split: Any, pad: int, size: int = 8) -> Iterable[tuple[list[int], np.ndarray, np.ndarray, list[int]]]:
    """Right-padded batches (indices, ids, mask, loss_start) of a causal-LM split, sorted by length so padding
    wastes little."""
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
    session: Any, split: Any, pad: int, ref_argmax: dict | None, on_rows: Any = None,
) -> tuple[float, int, dict, float | None]:
    """(perplexity, target tokens, argmax per target position, top-1 agreement with ``ref_argmax``) of a graph,
    over the same target tokens as :func:`edgefuse.finetune.evaluate.evaluate` (``ref`` + EOS). ``on_rows(i,
    logits)`` gets each row's target-position logits (float64) when given."""
    import math

    from edgefuse.ort import build_feed

    nll, count, argmax, same = 0.0, 0, {}, 0
    for idx, ids, mask, starts in lm_batches(split, pad):
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
            if on_rows is not None:
                on_rows(i, rows)
    return math.exp(nll / count), count, argmax, (same / count if ref_argmax is not None else None)


# ------------------------------------------------------------------------------------------------------ exports
def export_row(model: Any, tok: Any, cfg: Any, folder: Path) -> dict[str, Any]:
    """Export ``model`` into ``folder`` (replacing it) and return the row the results record."""
    from edgefuse.export.api import export_onnx

    t = time.perf_counter()
    res = export_onnx(model, cfg, folder, tokenizer=tok, overwrite=True)
    row = {"folder": folder.name, "exporter": res.exporter, "fold": res.fold_scales,
           "size_bytes": res.graph_size_bytes, "max_abs_diff": res.max_abs_diff, "min_cosine": res.min_cosine,
           "export_s": res.export_seconds, "validate_s": res.validate_seconds, "wall_s": time.perf_counter() - t,
           "cases": [{"label": c.label, "max_abs_diff": max(o.max_abs_diff for o in c.outputs)} for c in res.cases]}
    if res.greedy is not None:
        row["greedy"] = {"match": res.greedy.match, "torch": list(res.greedy.torch_tokens),
                         "onnx": list(res.greedy.onnx_tokens)}
    print(json.dumps(row), flush=True)
    return row


def reused_export_row(model: Any, cfg: Any, folder: Path) -> dict[str, Any] | None:
    """The export row of an existing ``folder`` made from the same model and settings (None: export again)."""
    path = folder / "manifest.json"
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    meta = getattr(model.config, "edgefuse", None) or {}
    if manifest.get("export_config") != cfg.model_dump(mode="json") or (manifest.get("fusion") or {}) != meta:
        return None
    checks = manifest["graphs"]["model.onnx"]["checks"]
    greedy = checks["greedy"]
    row = {"folder": folder.name, "reused": True, "exporter": manifest["exporter"], "fold": manifest["fold_scales"],
           "size_bytes": manifest["graphs"]["model.onnx"]["size_bytes"], "max_abs_diff": checks["max_abs_diff"],
           "min_cosine": checks["min_cosine"],
           "cases": [{"label": c["label"], "max_abs_diff": max(o["max_abs_diff"] for o in c["outputs"])}
                     for c in checks["cases"]],
           "greedy": {"match": greedy["match"], "torch": greedy["torch_tokens"], "onnx": greedy["onnx_tokens"]}}
    print(json.dumps(row), flush=True)
    return row


# ------------------------------------------------------------------------------------------------ kernel graphs
def ort_session(path: str | Path, threads: int) -> Any:
    """An onnxruntime CPU session with ``threads`` intra-op threads and no spinning (fair on a shared machine)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def matmul_graphs(tmp: Path, m: int, k: int, n: int) -> dict[str, tuple[str, dict]]:
    """One-node graphs of an ``[m, k] @ [k, n]`` product in fp32 (MatMul), int8 (MatMulInteger) and, where this
    onnxruntime has the quantizer, int4 (MatMulNBits): name -> (path, feeds). Seeded."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    graphs: dict[str, tuple[str, dict]] = {}
    w = rng.standard_normal((k, n)).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("MatMul", ["a", "w"], ["y"])], "fp32",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])], [numpy_helper.from_array(w, "w")])
    p = tmp / "fp32.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    graphs["fp32"] = (str(p), {"a": rng.standard_normal((m, k)).astype(np.float32)})
    wq = rng.integers(-127, 128, (k, n), dtype=np.int8)
    g = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "w", "az"], ["y"])], "int8",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.INT32, [m, n])],
        [numpy_helper.from_array(wq, "w"), numpy_helper.from_array(np.array(128, np.uint8), "az")])
    p = tmp / "int8.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), p)
    graphs["int8"] = (str(p), {"a": rng.integers(0, 256, (m, k), dtype=np.uint8)})
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        q = MatMulNBitsQuantizer(onnx.load(tmp / "fp32.onnx"), block_size=32, is_symmetric=True, bits=4)
        q.process()
        p = tmp / "int4.onnx"
        onnx.save(q.model.model, p)
        graphs["int4"] = (str(p), graphs["fp32"][1])
    except Exception as exc:  # older onnxruntime without the NBits quantizer: report int4 as unmeasured
        print(f"int4 kernel not measured: {exc}", file=sys.stderr)
    return graphs


def export_tokenizer(folder: Path, fallback: str = "smollm2") -> Any:
    """The tokenizer saved beside an exported graph (an export folder has no weights, so
    :func:`edgefuse.models.load_tokenizer` refuses it), else the built-in model ``fallback``'s."""
    from edgefuse.models import load_tokenizer

    if (folder / "tokenizer_config.json").is_file():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    return load_tokenizer(fallback)
