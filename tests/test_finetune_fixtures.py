"""Shared helpers of the recovery tests: a word-level tokenizer built in-process (no network), tiny data sets
written to ``tmp_path`` and tiny models saved with their tokenizer. Holds no tests itself."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from tiny import VOCAB, tiny_model

POSITIVE = ["good", "great", "fine", "nice", "happy", "superb"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly", "dull"]
FILLER = ["the", "film", "was", "a", "plot", "and", "very", "story", "actors", "it", "is", "of"]
NAMES = ["Alimentum", "Aromi", "Bibimbap", "Cotto"]
AREAS = ["centre", "riverside"]
LM_WORDS = ["name", "area", "in", "the", "is", "a", "place", ".", *NAMES, *AREAS]
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[EOS]"]


def word_tokenizer(kind: str = "bert") -> Any:
    """A whitespace word-level fast tokenizer over the words above (fits the tiny models' 64-token vocabulary).

    ``kind="bert"`` adds [CLS]/[SEP] around each text; ``kind="lm"`` adds nothing and has an EOS token.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted(set(POSITIVE + NEGATIVE + FILLER + LM_WORDS))
    vocab = {w: i for i, w in enumerate(SPECIALS + words)}
    assert len(vocab) <= VOCAB
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if kind == "bert":
        tk.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
        )
        return PreTrainedTokenizerFast(
            tokenizer_object=tk,
            pad_token="[PAD]",
            unk_token="[UNK]",
            cls_token="[CLS]",
            sep_token="[SEP]",
            eos_token="[EOS]",
        )
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def sentiment_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """Sentences of 3-9 words; label 1 when they hold a positive word, 0 for a negative one."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, rng.randint(2, 8))
        words.insert(rng.randint(0, len(words)), rng.choice(POSITIVE if label else NEGATIVE))
        rows.append({"sentence": " ".join(words), "label": str(label)})
    return rows


def e2e_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """E2E-like (meaning representation, reference) rows with a deterministic mapping."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, area = rng.choice(NAMES), rng.choice(AREAS)
        rows.append({"mr": f"name {name} area {area}", "ref": f"{name} is a place in the {area} ."})
    return rows


def write_tsv(path: Path, rows: list[dict[str, str]]) -> Path:
    cols = list(rows[0])
    path.write_text("\t".join(cols) + "\n" + "".join("\t".join(r[c] for c in cols) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    import csv

    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def saved_tiny(tmp: Path, arch: str = "bert", head: str = "cls", *, fuse: float | None = None, **config: Any) -> Path:
    """Save a tiny seeded model (optionally fused at keep_ratio ``fuse``, scales unfolded) with a tokenizer."""
    from edgefuse.config.fusion import FusionConfig
    from edgefuse.fusion.api import fuse_mlps_
    from edgefuse.fusion.persist import save_fused

    model = tiny_model(arch, head=head)
    for key, value in config.items():
        setattr(model.config, key, value)
    if fuse is not None:
        fuse_mlps_(model, FusionConfig(keep_ratio=fuse))
    return save_fused(model, tmp, tokenizer=word_tokenizer("bert" if arch in ("bert", "roberta") else "lm"))
