"""Training data for the recovery stage: rows from :mod:`edgefuse.records` (TSV/CSV/JSONL/text files or Hugging
Face datasets), checked columns, split by group, tokenize once, and pad each batch only to its own longest
sequence (dynamic padding).

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "d.tsv"
    >>> _ = p.write_text("sentence\\tlabel\\ngood film\\t1\\nbad film\\t0\\n")
    >>> [r["label"] for r in read_records(str(p))]
    ['1', '0']
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from edgefuse.config.finetune import DataConfig
from edgefuse.errors import DataError
from edgefuse.metrics import EvalBatch
from edgefuse.records import check_columns, read_records

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100  # label value that the causal-LM loss skips (prompt tokens and padding)


@dataclass
class TokenizedSplit:
    """One tokenized split. ``labels`` holds class ids (classification); ``loss_start`` the index of the first
    target token of each sequence (causal LM: earlier tokens are the prompt and carry no loss)."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None = None
    labels: list[int] | None = None
    loss_start: list[int] | None = None
    prompts: list[str] = field(default_factory=list)
    references: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class FinetuneData:
    """The tokenized train (and optional validation) split of one task, for :func:`edgefuse.finetune.api.finetune_`."""

    task: str
    train: TokenizedSplit
    validation: TokenizedSplit | None
    pad_token_id: int
    label_names: list[str] | None = None
    source: str = ""


# ------------------------------------------------------------------------------------- holding out rows
def split_by_group(
    rows: Sequence[dict[str, Any]], fraction: float, *, group_column: str | None, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Hold out about ``fraction`` of the rows; with ``group_column`` no group value is in both parts.

    Example:
        >>> rows = [{"mr": str(i // 2), "ref": "x"} for i in range(10)]
        >>> tr, va = split_by_group(rows, 0.2, group_column="mr", seed=0)
        >>> sorted({r["mr"] for r in tr} & {r["mr"] for r in va}), len(va)
        ([], 2)
    """
    keys = [str(r[group_column]) if group_column else str(i) for i, r in enumerate(rows)]
    groups = sorted(set(keys))
    random.Random(seed).shuffle(groups)
    n_val = max(1, round(len(groups) * fraction))
    if n_val >= len(groups):
        raise DataError(
            f"cannot hold out {fraction} of {len(groups)} group(s) and keep training data; lower validation_fraction"
        )
    val_groups = set(groups[:n_val])
    train = [r for r, k in zip(rows, keys, strict=True) if k not in val_groups]
    val = [r for r, k in zip(rows, keys, strict=True) if k in val_groups]
    return train, val


# ---------------------------------------------------------------------------------------------- tokenizing
def _text(row: dict[str, Any], col: str, source: str, idx: int) -> str:
    value = row[col]
    if value is None or (isinstance(value, str) and not value.strip()):
        raise DataError(f"data source {source!r} row {idx + 1}: column {col!r} is empty; remove the row or fill it")
    return str(value)


def _label_map(rows: Sequence[dict[str, Any]], col: str) -> tuple[dict[str, int], list[str]]:
    values = sorted({str(r[col]).strip() for r in rows})
    if all(v.lstrip("-").isdigit() for v in values):
        ids = sorted({int(v) for v in values})
        if ids[0] < 0:
            raise DataError(f"label column {col!r} holds negative labels {ids[:3]}; labels must be 0..num_labels-1")
        names = [str(i) for i in range(ids[-1] + 1)]
        return {str(i): i for i in range(ids[-1] + 1)}, names
    return {v: i for i, v in enumerate(values)}, values


def tokenize_classification(
    rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: DataConfig, label_map: dict[str, int] | None, source: str
) -> TokenizedSplit:
    """Tokenize (text[, pair][, label]) rows, truncated to ``cfg.max_length`` (no labels when ``label_map`` is None)."""
    cols = [cfg.text_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    if label_map is not None:
        cols.append(str(cfg.label_column))
    check_columns(rows, cols, source)
    texts = [_text(r, cfg.text_column, source, i) for i, r in enumerate(rows)]
    pairs = [_text(r, cfg.text_pair_column, source, i) for i, r in enumerate(rows)] if cfg.text_pair_column else None
    enc = tokenizer(texts, pairs, truncation=True, max_length=cfg.max_length)
    tt = enc.get("token_type_ids")
    if label_map is None:
        return TokenizedSplit(
            input_ids=list(enc["input_ids"]), token_type_ids=list(tt) if tt is not None else None, references=texts
        )
    labels = []
    label_column = str(cfg.label_column)
    for i, r in enumerate(rows):
        key = str(r[label_column]).strip()
        if key not in label_map:
            raise DataError(
                f"data source {source!r} row {i + 1}: label {key!r} was not seen in the training data "
                f"(known: {sorted(label_map)[:10]})"
            )
        labels.append(label_map[key])
    return TokenizedSplit(
        input_ids=list(enc["input_ids"]),
        token_type_ids=list(tt) if tt is not None else None,
        labels=labels,
        references=texts,
    )


def tokenize_causal_lm(rows: Sequence[dict[str, Any]], tokenizer: Any, cfg: DataConfig, source: str) -> TokenizedSplit:
    """Tokenize ``[prompt + separator] + text + EOS`` rows; ``loss_start`` marks where the target begins."""
    cols = [cfg.text_column] + ([cfg.prompt_column] if cfg.prompt_column else [])
    check_columns(rows, cols, source)
    ids_all, starts, prompts, refs = [], [], [], []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    for i, r in enumerate(rows):
        text = _text(r, cfg.text_column, source, i)
        prompt = _text(r, cfg.prompt_column, source, i) + cfg.prompt_separator if cfg.prompt_column else ""
        # tokenizing the prompt on its own gives its length; the separator keeps BPE from merging across it
        p_ids = tokenizer(prompt)["input_ids"] if prompt else []
        full = tokenizer(prompt + text)["input_ids"] + eos
        full = full[: cfg.max_length]
        start = 1 if cfg.loss_on_prompt or not prompt else min(len(p_ids), len(full) - 1)
        ids_all.append(full)
        starts.append(max(1, start))
        prompts.append(prompt)
        refs.append(text)
    return TokenizedSplit(input_ids=ids_all, loss_start=starts, prompts=prompts, references=refs)


def split_rows(cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None, str]:
    """The (train rows, validation rows or None, validation source name) that ``cfg`` describes, untokenized: the
    one place that applies the validation file or the grouped held-out split and the example caps, so recovery
    and generation evaluation (:mod:`edgefuse.finetune.generation`) see exactly the same rows.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "e2e.csv"
        >>> _ = p.write_text("mr,ref\\n" + "".join(f"m{i // 2},r{i}\\n" for i in range(20)))
        >>> tr, va, _ = split_rows(DataConfig(train=str(p), validation_fraction=0.2, group_column="mr"))
        >>> len(tr), len(va), sorted({r["mr"] for r in tr} & {r["mr"] for r in va})
        (16, 4, [])

    Raises:
        TargetNotFoundError, DataError, MissingDependencyError: see :func:`read_records`; a missing group column
            names the file and the column.
    """
    train_rows = read_records(cfg.train)
    val_rows: list[dict[str, Any]] | None = None
    val_source = cfg.validation or f"{cfg.train} (held-out part)"
    if cfg.validation:
        val_rows = read_records(cfg.validation)
    elif cfg.validation_fraction:
        if cfg.group_column:
            check_columns(train_rows, [cfg.group_column], cfg.train)
        train_rows, val_rows = split_by_group(
            train_rows, cfg.validation_fraction, group_column=cfg.group_column, seed=cfg.seed
        )
    if cfg.max_train_examples:
        train_rows = train_rows[: cfg.max_train_examples]
    if val_rows is not None and cfg.max_validation_examples:
        val_rows = val_rows[: cfg.max_validation_examples]
    return list(train_rows), val_rows, val_source


def load_finetune_data(cfg: DataConfig, tokenizer: Any, task: str) -> FinetuneData:
    """Read, split and tokenize the data that ``cfg`` names for ``task``.

    Example (not run: needs a data file and a tokenizer):
        >>> from transformers import AutoTokenizer  # doctest: +SKIP
        >>> tok = AutoTokenizer.from_pretrained("./sst2-teacher")  # doctest: +SKIP
        >>> data = load_finetune_data(DataConfig(train="train.tsv"), tok, "sequence-classification")  # doctest: +SKIP

    Raises:
        TargetNotFoundError, DataError, MissingDependencyError: see :func:`read_records`; a missing column or
            an empty value names the file, the row and the column.
    """
    train_rows, val_rows, val_source = split_rows(cfg)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise DataError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token first")
    if task in ("sequence-classification", "feature-extraction"):
        label_map, names = None, None
        if task == "sequence-classification" and cfg.label_column is not None:
            check_columns(train_rows, [cfg.label_column], cfg.train)
            label_map, names = _label_map(train_rows, cfg.label_column)
        train = tokenize_classification(train_rows, tokenizer, cfg, label_map, cfg.train)
        val = None if val_rows is None else tokenize_classification(val_rows, tokenizer, cfg, label_map, val_source)
        return FinetuneData(task, train, val, int(pad), names, cfg.train)
    train = tokenize_causal_lm(train_rows, tokenizer, cfg, cfg.train)
    val = None if val_rows is None else tokenize_causal_lm(val_rows, tokenizer, cfg, val_source)
    return FinetuneData(task, train, val, int(pad), None, cfg.train)


# ---------------------------------------------------------------------------------------------- batching
def collate(split: TokenizedSplit, indices: Sequence[int], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Pad the examples ``indices`` of ``split`` to their longest member (right padding).

    Returns ``input_ids``, ``attention_mask`` (and ``token_type_ids``), plus ``labels``: class ids for
    classification, or next-token targets with :data:`IGNORE_INDEX` on prompt and padding for causal LM.
    """
    seqs = [split.input_ids[i] for i in indices]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)  # (batch, seq)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[row, : len(s)] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if split.token_type_ids is not None:
        tt = torch.zeros_like(ids)
        for row, i in enumerate(indices):
            t = split.token_type_ids[i]
            tt[row, : len(t)] = torch.tensor(t, dtype=torch.long)
        batch["token_type_ids"] = tt
    if split.labels is not None:
        batch["labels"] = torch.tensor([split.labels[i] for i in indices], dtype=torch.long)
    elif split.loss_start is not None:
        labels = ids.clone()
        labels[mask == 0] = IGNORE_INDEX
        for row, i in enumerate(indices):
            labels[row, : split.loss_start[i]] = IGNORE_INDEX
        batch["labels"] = labels
    return batch


def epoch_order(
    n: int, *, seed: int, epoch: int, lengths: Sequence[int] | None = None, batch_size: int = 1
) -> list[int]:
    """The shuffled example order of ``epoch``: a pure function of (seed, epoch), so a resumed run and a
    data-parallel run see exactly the same global batches as an uninterrupted single process.

    With ``lengths``, examples of similar length are grouped into the same batch (as the HF Trainer's
    ``group_by_length``): the shuffled order is cut into mega-batches of 50 batches, each sorted by length and
    cut into batches of ``batch_size``, and the batches are shuffled again. With dynamic padding this removes
    most padding (SST-2: about 3x fewer tokens per step) while every batch stays a random draw of lengths.

    Example:
        >>> order = epoch_order(8, seed=0, epoch=0, lengths=[1, 9, 2, 8, 3, 7, 4, 6], batch_size=2)
        >>> sorted(order) == list(range(8))
        True
    """
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=gen).tolist()
    if lengths is None or batch_size <= 1:
        return order
    mega = batch_size * 50
    batches: list[list[int]] = []
    for start in range(0, n, mega):
        chunk = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    full = [b for b in batches if len(b) == batch_size]
    rest = [i for b in batches if len(b) != batch_size for i in b]
    perm = torch.randperm(len(full), generator=gen).tolist()
    return [i for k in perm for i in full[k]] + rest


def batches_from_split(split: Any, pad_token_id: int, batch_size: int, max_examples: int) -> list[EvalBatch]:
    """Cut a tokenized split (:class:`TokenizedSplit`) into padded :class:`EvalBatch` es.

    Example:
        >>> split = TokenizedSplit(input_ids=[[1, 2, 3], [4, 5]], labels=[0, 1])
        >>> b = batches_from_split(split, pad_token_id=0, batch_size=8, max_examples=10)[0]
        >>> b.input_ids.tolist(), b.labels.tolist()
        ([[1, 2, 3], [4, 5, 0]], [0, 1])
    """
    n = min(len(split), max_examples)
    out = []
    for start in range(0, n, batch_size):
        idx = list(range(start, min(n, start + batch_size)))
        t = collate(split, idx, pad_token_id)
        labels = t.get("labels")
        out.append(
            EvalBatch(
                input_ids=t["input_ids"].numpy(),
                attention_mask=t["attention_mask"].numpy(),
                token_type_ids=t["token_type_ids"].numpy() if "token_type_ids" in t else None,
                labels=labels.numpy() if labels is not None and split.labels is not None else None,
            )
        )
    return out
