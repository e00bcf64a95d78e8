"""Classify text with the fused int8 SST-2 graph through optimum's ORTModelForSequenceClassification.

First build the graph (fine-tunes the teacher, fuses, recovers, exports, quantizes; 30 to 50 minutes on a 2-core
CPU with SST-2 in data/sst2/, most of it the teacher's fine-tune, which later recipes reuse from
runs/.teacher-cache; a few minutes on the bundled sample, whose accuracy means nothing):

    edgefuse run export_configs/minilm-sst2-x86_64-int8.yaml

then, from the repository root:

    python examples/classify_int8_optimum.py [QUANTIZED_FOLDER]

The quantize stage's folder holds the int8 graph as model.onnx with the model config and tokenizer beside it, so
optimum loads it as is; no PyTorch model is needed at inference time.
"""

from __future__ import annotations

import sys
from pathlib import Path

FOLDER = Path("runs/minilm-sst2-x86_64-int8/quantize/quantized")
VALIDATION = Path("data/sst2/validation.tsv")   # SST-2 (GLUE) validation split, sentence<TAB>label
NAMES = {"LABEL_0": "negative", "LABEL_1": "positive"}   # SST-2: label 0 is negative, 1 positive
SENTENCES = [
    "a gorgeous, witty, seductive movie.",
    "the plot is nothing but boilerplate clichés from start to finish.",
    "it's a charming and often affecting journey.",
]


def main() -> int:
    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoTokenizer, pipeline

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER
    if not (folder / "model.onnx").is_file():
        print(f"no quantized graph in {folder}; run: edgefuse run export_configs/minilm-sst2-x86_64-int8.yaml",
              file=sys.stderr)
        return 1
    model = ORTModelForSequenceClassification.from_pretrained(folder)  # the folder's model.onnx: the int8 graph
    tokenizer = AutoTokenizer.from_pretrained(folder)
    classify = pipeline("text-classification", model=model, tokenizer=tokenizer)
    print(f"graph: {folder / 'model.onnx'}")
    for sentence, pred in zip(SENTENCES, classify(SENTENCES), strict=True):
        print(f"  {NAMES.get(pred['label'], pred['label']):>8} {pred['score']:.3f}  {sentence}")

    if VALIDATION.is_file():  # accuracy on the first 200 validation sentences
        rows = [line.rstrip("\n").split("\t") for line in VALIDATION.read_text(encoding="utf-8").splitlines()[1:201]]
        preds = classify([r[0] for r in rows], batch_size=32)
        label_ids = {name: i for i, name in model.config.id2label.items()}
        correct = sum(int(label_ids[p["label"]] == int(r[1])) for p, r in zip(preds, rows, strict=True))
        print(f"accuracy on {len(rows)} SST-2 validation sentences: {correct / len(rows):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
