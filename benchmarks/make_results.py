"""Assemble benchmarks/RESULTS.md from the per-benchmark Markdown files in benchmarks/results/.

Each benchmark script writes its own ``results/<name>.md`` (tables, the exact command, the environment);
this script only concatenates them, in pipeline order, under one heading each, after the hand-written summary
in ``results/_summary.md``. Run it after any benchmark:

    python benchmarks/make_results.py
"""

from __future__ import annotations

import argparse

from _common import BENCH, RESULTS

SECTIONS = [
    ("fusion_methods", "Fusion: kernel and output approximation of every method (issue 2, issue 6 item 1)"),
    ("method_accuracy", "Fusion: SST-2 accuracy of every method after the same fine-tuning budget (issue 6 item 1)"),
    ("fusion_scale", "Fusion: time and memory of the fusion step (issue 2 speed, issue 6 item 5)"),
    ("ntk_protocols", "Fusion: what each NTK protocol sees (issue 16)"),
    ("recovery", "Recovery: SST-2 and E2E fine-tuning (issue 3)"),
    ("pareto", "The accuracy-latency front on SST-2 (issue 16)"),
    ("export", "Export and quantize (issue 7)"),
    ("export_smollm2", "Export and quantize: SmolLM2-135M (issue 7)"),
    ("profile", "Profile: x86, emulated ARM, SSH, HTML report (issue 4)"),
    ("deploy", "Deployment comparison and the physical limit (issue 6 items 2-3)"),
    ("generation", "Generation: SmolLM2 decode latency and perplexity (issue 6 item 4)"),
    ("tune", "Host-tuned graphs: fusions, int8 and session options chosen by measurement (issue 13)"),
    ("generation_e2e", "Generation: E2E NLG judged by generating, teacher vs fused vs int4 (issue 14)"),
    ("moe", "MoE export: sparse (gather-compute-scatter) vs dense-routing graphs (issue 14)"),
    ("decode", "Decode speed against onnxruntime-genai and llama.cpp: SmolLM2-135M (issue 14 item 4)"),
    ("int4", "int4 that keeps quality: MatMulNBits variants on SmolLM2-135M (issue 14 item 3)"),
    ("int4_e2e", "int4 on the E2E fine-tuned SmolLM2, judged by BLEU (issue 14 item 3)"),
    ("int4_plain", "int4 on the E2E fine-tuned, unfused SmolLM2 (the teacher), judged by BLEU (issue 14 item 3)"),
    ("int4_pruned", "int4 on the recipe's fusion-pruned, recovered SmolLM2, judged by BLEU (issue 14 item 3)"),
    ("int4_pruned_share", "int4 8-bit share from 0 to 0.75 on the fusion-pruned SmolLM2 (issue 14 item 3)"),
    ("int4_qat", "int4 after quantization-aware recovery, judged by BLEU (issue 14 item 3)"),
    ("int4_speed", "int4 8-bit share: decode time side by side on a quiet machine (issue 14 item 3)"),
    ("int4_scaling_plain", "int4 with activation-aware scaling and clipping: the unfused teacher (issue 14 item 3)"),
    ("int4_scaling_pruned", "int4 with activation-aware scaling and clipping: the fusion-pruned model (issue 14)"),
    ("int4_gptq_plain", "int4 with edgefuse's GPTQ: the unfused teacher (issue 14 item 3)"),
    ("int4_gptq_pruned", "int4 with edgefuse's GPTQ: the fusion-pruned model (issue 14 item 3)"),
    ("int4_gptq2_pruned", "int4 GPTQ variants (activation order, clipped scales): the fusion-pruned model (issue 14)"),
    ("int4_default_plain", "The int4 default (GPTQ) against the previous one: the unfused teacher (issue 14)"),
    ("int4_default_pruned", "The int4 default (GPTQ) against the previous one: the fusion-pruned model (issue 14)"),
    ("int4_default64_plain", "The int4 default calibrated on 64 rows: the unfused teacher (issue 14)"),
    ("int4_default64_pruned", "The int4 default calibrated on 64 rows: the fusion-pruned model (issue 14)"),
    ("int4_calibration", "The int4 default chosen over four calibration sets per model (issue 14)"),
    ("int4_rank_pruned", "The int4 8-bit share ranked by output KL or by own error, fused SmolLM2 (issue 14)"),
    ("int4_rank_plain", "The int4 8-bit share ranked by output KL, unfused SmolLM2 (issue 14)"),
    ("int4_rank_speed", "Decode speed of the int4 default ranked by output KL against the previous default (issue 14)"),
    ("int4_spread64_plain", "int4 calibrated on 64 evenly spaced rows: the unfused teacher (issue 14)"),
    ("int4_spread64_pruned", "int4 calibrated on 64 evenly spaced rows: the fusion-pruned model (issue 14)"),
    ("int4_spread64o22_plain", "int4, a second set of 64 evenly spaced rows: the unfused teacher (issue 14)"),
    ("int4_spread64o22_pruned", "int4, a second set of 64 evenly spaced rows: the fusion-pruned model (issue 14)"),
    ("int4_spread64o44_plain", "int4, a third set of 64 evenly spaced rows: the unfused teacher (issue 14)"),
    ("int4_spread64o44_pruned", "int4, a third set of 64 evenly spaced rows: the fusion-pruned model (issue 14)"),
    ("int4_spread256_plain", "int4 calibrated on 256 evenly spaced rows: the unfused teacher (issue 14)"),
    ("int4_spread256_pruned", "int4 calibrated on 256 evenly spaced rows: the fusion-pruned model (issue 14)"),
    ("int4_floor64_plain", "Every MatMul as 8-bit blocks, the BLEU noise floor: the unfused teacher (issue 14)"),
    ("int4_floor64_pruned", "Every MatMul as 8-bit blocks, the BLEU noise floor: the fusion-pruned model (issue 14)"),
    ("int4_builtin64_plain", "int4 calibrated on the built-in corpus (no task text): the unfused teacher (issue 14)"),
    ("int4_builtin64_pruned", "int4 calibrated on the built-in corpus (no task text): the fusion-pruned model"),
    ("decode_spinning", "Decode at 2 threads with onnxruntime's thread spinning, as onnxruntime-genai runs (issue 14)"),
    ("int8_avx2", "int8 as an AVX2 CPU computes it: SmolLM2 under qemu's Haswell (issue 14 item 3)"),
    ("smollm2_recipe", "The SmolLM2 E2E recipe end to end: fine-tune, fuse, recover, int4, generate (issue 14)"),
    ("e2e_sweep", "Which layers, how much, which method: SmolLM2 on E2E (issue 14 item 2)"),
]


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    parts = [(RESULTS / "_summary.md").read_text().rstrip() + "\n"]
    for name, title in SECTIONS:
        path = RESULTS / f"{name}.md"
        if not path.is_file():
            parts.append(f"\n## {title}\n\nNot measured in this version (no `results/{name}.md`).\n")
            continue
        body = path.read_text().strip()
        # demote the file's own headings by two levels so that they nest under the section title
        body = "\n".join("##" + line if line.startswith("#") else line for line in body.splitlines())
        body = body.replace(f"]({name}.png)", f"](results/{name}.png)")  # images sit beside the .md in results/
        parts.append(f"\n## {title}\n\nSource: `benchmarks/results/{name}.md`\n\n{body}\n")
    (BENCH / "RESULTS.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
