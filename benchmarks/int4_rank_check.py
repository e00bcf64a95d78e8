"""The int4 8-bit share ranked by output KL against ranked by own error (issue 14, item 3): the same graph, the
same calibration set (64 training rows evenly spaced, rotated by OFFSET), the same channel scales and GPTQ; only
the choice of the 8-bit MatMuls differs. Scored against the fp32 graph on the first 16 of 96 held-out E2E rows:
perplexity, KL(fp32 || int4), logit cosine, top-1 agreement (bench_int4's scorer). No BLEU (bench_int4.py does
that). The "error" run patches nothing; the "output" run ranks with edgefuse.quantize.sensitivity.rank_by_output
(the same function int4_8bit_rank: output calls) and records the ranking.

    python benchmarks/int4_rank_check.py FP32_EXPORT_FOLDER OUT_DIR OFFSET output,error
"""
import json
import logging
import sys
import time
from pathlib import Path

import bench_int4 as B

import edgefuse.quantize.modes as M
from edgefuse.config.quantize import QuantizeConfig
from edgefuse.finetune.data import load_finetune_data, split_rows
from edgefuse.quantize.api import quantize_onnx
from edgefuse.quantize.sensitivity import rank_by_output
from edgefuse.records import spread

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
for noisy in ("onnxruntime", "neural_compressor", "root"):
    logging.getLogger(noisy).setLevel(logging.ERROR)
folder, out = Path(sys.argv[1]), Path(sys.argv[2])
offset, modes = int(sys.argv[3]), sys.argv[4].split(",")
out.mkdir(parents=True, exist_ok=True)
tok = B.common.export_tokenizer(folder)
train, _, _ = split_rows(B.data_config(None))
rows = spread(train[offset:] + train[:offset], 64)
calib = [f"{r['mr']}\n{r['ref']}" for r in rows]
orig = M.sensitive_matmuls
def by_output(src, cfg, feeds, exclude):
    import math

    import onnx

    from edgefuse.quantize.evaluate import weight_matmuls
    key = ("out", str(src.resolve()), src.stat().st_mtime_ns, cfg.block_size)
    if key not in M._RANKED:
        names = weight_matmuls(onnx.load(str(src), load_external_data=False))
        t = time.time()
        M._RANKED[key] = rank_by_output(src, feeds, names, block_size=cfg.block_size)
        print("rank_by_output took %.1f s" % (time.time() - t), flush=True)
        (out / "ranked_output.json").write_text(json.dumps(M._RANKED[key]))
    k = math.ceil(cfg.int4_8bit_share * len(M._RANKED[key]))
    return [n for n, _ in M._RANKED[key] if n not in set(exclude)][:k]
split = load_finetune_data(B.data_config(96), tok, "causal-lm").validation
ref = B.Reference(set(range(16)))
fp = B.score(folder / "model.onnx", split, tok, ref, None, [], None, 2, 1)
am = fp.pop("_argmax")
res = {}
for mode in modes:
    M.sensitive_matmuls = by_output if mode == "output" else orig
    cfg = QuantizeConfig(mode="int4", overwrite=True, min_cosine=None, calibration_samples=64)
    t = time.time()
    r = quantize_onnx(folder, cfg, out / mode, calibration_texts=calib)
    b = time.time() - t
    s = B.score(r.onnx_path, split, tok, ref, am, [], [], 2, 1)
    res[mode] = {"ppl": s["perplexity"], "fp32_ppl": fp["perplexity"], "kl": s["kl_mean"], "cos": s["cosine_mean"],
                 "top1": s["top1_vs_fp32"], "build_s": b,
                 "eight": r.settings.get("sensitive_8bit")}
    print(mode, json.dumps({k: v for k, v in res[mode].items() if k != "eight"}), flush=True)
(out / "result.json").write_text(json.dumps(res, indent=1))
