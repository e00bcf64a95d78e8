"""Export + quantize measurements on the real models (the issue-7 "Done when" numbers).

Usage (from the repository root; each part writes benchmarks/results/export_<part>.json):

    python benchmarks/bench_export.py minilm      # plain + fused MiniLM: fp32 validation, int8, int4, fold choices
    python benchmarks/bench_export.py smollm2     # plain + fused SmolLM2-135M with KV cache: greedy, int8, int4, folds
    python benchmarks/bench_export.py sst2 DIR    # a fine-tuned classifier folder: export, int8, SST-2 accuracy

Work folders go to benchmarks/_work/ (git-ignored). Timings are wall-clock on a shared 2-core machine.
"""

from __future__ import annotations

import json
import logging
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
WORK = ROOT / "benchmarks" / "_work" / "export"
RESULTS = ROOT / "benchmarks" / "results"
SST2 = ROOT.parent / "shared" / "data" / "sst2"
E2E = ROOT.parent / "shared" / "data" / "e2e" / "devset.csv"


def _texts(n: int, path: Path = SST2 / "validation.tsv") -> list[str]:
    from edgefuse.quantize_eval import read_texts

    return read_texts(path, n)


def _export(model, tok, cfg, name):
    from edgefuse.export import export_onnx

    t = time.perf_counter()
    res = export_onnx(model, cfg, WORK / name, tokenizer=tok, overwrite=True)
    row = {"folder": name, "exporter": res.exporter, "fold": res.fold_scales, "size_bytes": res.graph_size_bytes,
           "max_abs_diff": res.max_abs_diff, "min_cosine": res.min_cosine, "export_s": res.export_seconds,
           "validate_s": res.validate_seconds, "wall_s": time.perf_counter() - t,
           "cases": [{"label": c.label, "max_abs_diff": max(o.max_abs_diff for o in c.outputs)} for c in res.cases]}
    if res.greedy is not None:
        row["greedy"] = {"match": res.greedy.match, "torch": list(res.greedy.torch_tokens),
                         "onnx": list(res.greedy.onnx_tokens)}
    print(json.dumps(row), flush=True)
    return row


def _quant(name, texts, **kw):
    from edgefuse.config.quantize import QuantizeConfig
    from edgefuse.quantize import quantize_onnx

    cfg = QuantizeConfig(overwrite=True, min_cosine=None, **kw)
    t = time.perf_counter()
    q = quantize_onnx(WORK / name, cfg, calibration_texts=texts)
    row = {"folder": name, "graph": q.onnx_path.name, "mode": q.mode, "preset": q.preset, "size_bytes": q.size_bytes,
           "size_bytes_fp32": q.size_bytes_fp32, "quantized_matmuls": q.quantized_nodes, "cosine_mean": q.cosine_mean,
           "cosine_min": q.cosine_min, "max_abs_diff": q.max_abs_diff, "samples": q.samples,
           "kept_fp32": list(q.kept_fp32), "accuracy_fp32": q.accuracy_fp32, "accuracy": q.accuracy,
           "wall_s": time.perf_counter() - t}
    print(json.dumps(row), flush=True)
    return row


def minilm() -> dict:
    from edgefuse.config.export import ExportConfig
    from edgefuse.config.fusion import FusionConfig
    from edgefuse.fusion import fuse_mlps_
    from edgefuse.models import load_model, load_tokenizer

    texts = _texts(64)
    tok = load_tokenizer("minilm")
    out = {"exports": [], "quant": []}
    model = load_model("minilm", "feature-extraction")
    out["exports"].append(_export(model, tok, ExportConfig(), "minilm"))
    out["quant"].append(_quant("minilm", texts, mode="dynamic"))
    out["quant"].append(_quant("minilm", texts, mode="dynamic", per_channel=False))
    out["quant"].append(_quant("minilm", texts, mode="static", calibration_method="minmax"))
    out["quant"].append(_quant("minilm", texts, mode="static", calibration_method="percentile",
                               output_name="model_qdq_int8_percentile.onnx"))
    out["quant"].append(_quant("minilm", texts, mode="int4"))
    out["quant"].append(_quant("minilm", texts, mode="dynamic", per_channel=False, auto_target_cosine=0.99,
                               output_name="model_int8_per_tensor_auto.onnx"))
    fused = load_model("minilm", "feature-extraction")
    fres = fuse_mlps_(fused, FusionConfig(keep_ratio=0.5))
    out["fusion"] = {"max_cluster_size": max(s.max_cluster_size or 0 for s in fres.steps), "seconds": fres.seconds}
    for fold in ("keep", "down"):  # MiniLM is GELU without a gate: folding into the up projection is not exact
        name = f"minilm_fused_{fold}"
        out["exports"].append(_export(fused, tok, ExportConfig(fold_scales=fold), name))
        out["quant"].append(_quant(name, texts, mode="dynamic"))
        out["quant"].append(_quant(name, texts, mode="int4"))
    return out


def smollm2() -> dict:
    from edgefuse.config.export import ExportConfig
    from edgefuse.config.fusion import FusionConfig
    from edgefuse.fusion import fuse_mlps_
    from edgefuse.models import load_model, load_tokenizer

    texts = _texts(32, E2E)
    tok = load_tokenizer("smollm2")
    out = {"exports": [], "quant": []}
    cfg = ExportConfig(task="causal-lm", generate_tokens=16, atol=5e-4)  # 30 layers: 1.3e-4 measured
    model = load_model("smollm2", "causal-lm")
    out["exports"].append(_export(model, tok, cfg, "smollm2"))
    out["quant"].append(_quant("smollm2", texts, mode="dynamic"))
    out["quant"].append(_quant("smollm2", texts, mode="int4"))
    del model
    fused = load_model("smollm2", "causal-lm")
    fres = fuse_mlps_(fused, FusionConfig(keep_ratio=0.5))
    out["fusion"] = {"max_cluster_size": max(s.max_cluster_size or 0 for s in fres.steps), "seconds": fres.seconds}
    for fold in ("up", "keep", "down"):
        name = f"smollm2_fused_{fold}"
        out["exports"].append(_export(fused, tok, cfg, name))
        out["quant"].append(_quant(name, texts, mode="dynamic"))
        if fold == "up":
            out["quant"].append(_quant(name, texts, mode="int4"))
        if fold != "up":
            import shutil

            shutil.rmtree(WORK / name, ignore_errors=True)  # 300-500 MB each; keep only the default's folder
    return out


def sst2(folder: str) -> dict:
    from edgefuse.config.export import ExportConfig
    from edgefuse.models import load_model, load_tokenizer

    tok = load_tokenizer(folder)
    model = load_model(folder, "sequence-classification")
    out = {"source": folder, "exports": [_export(model, tok, ExportConfig(task="sequence-classification"), "sst2")]}
    eval_tsv = SST2 / "validation.tsv"
    out["quant"] = [_quant("sst2", _texts(64, SST2 / "train.tsv"), mode="dynamic", eval_data=eval_tsv),
                    _quant("sst2", _texts(64, SST2 / "train.tsv"), mode="int4", eval_data=eval_tsv)]
    return out


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    part = sys.argv[1]
    WORK.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    data = {"minilm": minilm, "smollm2": smollm2}[part]() if part != "sst2" else sst2(sys.argv[2])
    from edgefuse.manifest import library_versions
    from edgefuse.quantize_presets import detect_host_preset

    data.update({"command": " ".join(["python", "benchmarks/bench_export.py", *sys.argv[1:]]),
                 "host_preset": detect_host_preset(), "machine": platform.machine(),
                 "versions": library_versions(), "total_s": time.perf_counter() - start})
    (RESULTS / f"export_{part}.json").write_text(json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    main()
