"""Tiny pipeline fixtures: a tiny BERT saved with a word-level tokenizer, a labelled TSV, and config builders.

Everything is built in-process and written under the test's ``tmp_path`` (no network, no real checkpoint).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tiny import VOCAB, tiny_model

WORDS = [f"w{i}" for i in range(VOCAB - 4)]


def tiny_tokenizer() -> Any:
    """A word-level BERT-style tokenizer over ``w0 .. w59`` (ids 4..63), with [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")


def save_tiny_bert(folder: Path, *, head: str = "base", seed: int = 0) -> Path:
    """A tiny BERT (hidden 16, intermediate 32, 3 layers) and its tokenizer, as a safetensors folder."""
    from edgefuse.fusion.persist import save_fused

    return save_fused(tiny_model("bert", head=head, seed=seed), folder, tokenizer=tiny_tokenizer())


def write_tsv(path: Path, rows: int, *, seed: int = 0) -> Path:
    """``sentence<TAB>label`` rows of random words; the label is whether w0..w29 outnumber w30..w59."""
    rng = random.Random(seed)
    lines = ["sentence\tlabel"]
    for _ in range(rows):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 9))]
        low = sum(int(w[1:]) < 30 for w in words)
        lines.append(f"{' '.join(words)}\t{int(low * 2 > len(words))}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def base_config(model_dir: Path, **sections: Any) -> dict[str, Any]:
    """A pipeline config dict for the tiny model: fusion at 0.5; extra sections merged in."""
    cfg: dict[str, Any] = {
        "schema_version": 1,
        "model": {"name_or_path": str(model_dir)},
        "fusion": {"keep_ratio": 0.5},
    }
    cfg.update(sections)
    return cfg


FAST_PROFILE = {
    "threads": [1], "batch_sizes": [1], "sequence_lengths": [16], "warmup_runs": 1, "runs": 3,
    "op_profile": False, "memory": True, "memory_runs": 1,
}
