"""Data loading for the recovery stage: formats, columns, splits, dynamic padding and the documented errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_finetune_fixtures import e2e_rows, sentiment_rows, word_tokenizer, write_csv, write_tsv

from edgefuse.config.finetune import DataConfig
from edgefuse.errors import DataError, MissingDependencyError, TargetNotFoundError
from edgefuse.finetune.data import (
    IGNORE_INDEX,
    collate,
    epoch_order,
    load_finetune_data,
    read_records,
    split_by_group,
)


def test_reads_tsv_csv_jsonl_and_txt(tmp_path):
    rows = sentiment_rows(4)
    tsv = write_tsv(tmp_path / "a.tsv", rows)
    csv_rows = [{"mr": 'name[Aromi], area[city "centre"]', "ref": "Aromi, in the centre."}]
    csv_path = write_csv(tmp_path / "a.csv", csv_rows)
    jl = tmp_path / "a.jsonl"
    jl.write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    txt = tmp_path / "a.txt"
    txt.write_text("first line\n\n  second line  \n")
    assert read_records(str(tsv)) == rows
    assert read_records(str(csv_path)) == csv_rows  # quoted commas and quotes survive
    assert read_records(str(jl)) == rows
    assert read_records(str(txt)) == [{"text": "first line"}, {"text": "second line"}]


def test_glue_tsv_with_a_lone_quote(tmp_path):
    path = tmp_path / "g.tsv"
    path.write_text('sentence\tlabel\nthe " best film\t1\n')
    assert read_records(str(path)) == [{"sentence": 'the " best film', "label": "1"}]


def test_missing_column_names_the_file_and_the_column(tmp_path):
    path = write_tsv(tmp_path / "train.tsv", sentiment_rows(4))
    cfg = DataConfig(train=str(path), text_column="text")
    with pytest.raises(DataError, match=r"train\.tsv.*no column 'text'.*\['sentence', 'label'\]"):
        load_finetune_data(cfg, word_tokenizer(), "sequence-classification")
    cfg = DataConfig(train=str(path), label_column="polarity")
    with pytest.raises(DataError, match="no column 'polarity'"):
        load_finetune_data(cfg, word_tokenizer(), "sequence-classification")
    with pytest.raises(DataError, match="no column 'mr'"):
        load_finetune_data(DataConfig(train=str(path), prompt_column="mr"), word_tokenizer("lm"), "causal-lm")


def test_missing_column_in_the_validation_file(tmp_path):
    tr = write_tsv(tmp_path / "train.tsv", sentiment_rows(4))
    va = write_tsv(tmp_path / "val.tsv", [{"sentence": "a good film"}])
    with pytest.raises(DataError, match=r"val\.tsv.*no column 'label'"):
        load_finetune_data(DataConfig(train=str(tr), validation=str(va)), word_tokenizer(), "sequence-classification")


@pytest.mark.parametrize(
    "name, content, error, match",
    [
        ("x.parquet", "", DataError, "extension '.parquet'"),
        ("bad.jsonl", '{"a": 1}\n{oops\n', DataError, r"bad\.jsonl:2: not valid JSON"),
        ("list.jsonl", "[1, 2]\n", DataError, "expected a JSON object"),
        ("empty.tsv", "", DataError, "is empty"),
        ("header.tsv", "sentence\tlabel\n", DataError, "has no rows"),
        ("ragged.csv", "a,b\n1,2,3\n", DataError, r"ragged\.csv:2: 3 fields but the header has 2"),
    ],
)
def test_bad_files_are_data_errors(tmp_path, name, content, error, match):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(error, match=match):
        read_records(str(path))


def test_missing_file_and_empty_values(tmp_path):
    with pytest.raises(TargetNotFoundError, match="does not exist"):
        read_records(str(tmp_path / "nope.tsv"))
    path = write_tsv(tmp_path / "t.tsv", [{"sentence": "good", "label": "1"}, {"sentence": " ", "label": "0"}])
    with pytest.raises(DataError, match=r"row 2: column 'sentence' is empty"):
        load_finetune_data(DataConfig(train=str(path)), word_tokenizer(), "sequence-classification")


def test_unseen_validation_label(tmp_path):
    tr = write_tsv(tmp_path / "train.tsv", [{"sentence": "good", "label": "pos"}, {"sentence": "bad", "label": "neg"}])
    va = write_tsv(tmp_path / "val.tsv", [{"sentence": "fine", "label": "neutral"}])
    with pytest.raises(DataError, match="label 'neutral' was not seen"):
        load_finetune_data(DataConfig(train=str(tr), validation=str(va)), word_tokenizer(), "sequence-classification")


def test_string_labels_are_mapped_in_sorted_order(tmp_path):
    tr = write_tsv(tmp_path / "train.tsv", [{"sentence": "good", "label": "pos"}, {"sentence": "bad", "label": "neg"}])
    data = load_finetune_data(DataConfig(train=str(tr)), word_tokenizer(), "sequence-classification")
    assert data.label_names == ["neg", "pos"] and data.train.labels == [1, 0]


def test_split_by_meaning_representation_keeps_groups_apart(tmp_path):
    rows = e2e_rows(60)
    train, val = split_by_group(rows, 0.25, group_column="mr", seed=3)
    assert len(train) + len(val) == 60 and val
    assert not {r["mr"] for r in train} & {r["mr"] for r in val}
    assert split_by_group(rows, 0.25, group_column="mr", seed=3) == (train, val)  # deterministic
    with pytest.raises(DataError, match="lower validation_fraction"):
        split_by_group(rows[:1], 0.5, group_column="mr", seed=0)


def test_causal_lm_labels_skip_the_prompt_and_padding(tmp_path):
    path = write_csv(tmp_path / "e.csv", e2e_rows(4))
    cfg = DataConfig(train=str(path), prompt_column="mr", text_column="ref", prompt_separator=" ")
    tok = word_tokenizer("lm")
    data = load_finetune_data(cfg, tok, "causal-lm")
    batch = collate(data.train, [0, 1, 2, 3], data.pad_token_id)
    first = data.train.input_ids[0]
    start = data.train.loss_start[0]
    assert tok.decode(first[:start]) == "name " + e2e_rows(4)[0]["mr"].split(" ", 1)[1]
    assert first[-1] == tok.eos_token_id  # the model learns to stop
    labels = batch["labels"][0]
    assert (labels[:start] == IGNORE_INDEX).all() and (labels[start : len(first)] != IGNORE_INDEX).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()
    on_prompt = load_finetune_data(cfg.model_copy(update={"loss_on_prompt": True}), tok, "causal-lm")
    assert on_prompt.train.loss_start[0] == 1


def test_dynamic_padding_pads_to_the_longest_in_the_batch(tmp_path):
    path = write_tsv(
        tmp_path / "t.tsv", [{"sentence": "good", "label": "1"}, {"sentence": "the film was very bad", "label": "0"}]
    )
    data = load_finetune_data(DataConfig(train=str(path)), word_tokenizer(), "sequence-classification")
    short = collate(data.train, [0], data.pad_token_id)
    both = collate(data.train, [0, 1], data.pad_token_id)
    assert short["input_ids"].shape == (1, 3)  # [CLS] good [SEP]: no padding at all
    assert both["input_ids"].shape == (2, 7)
    assert both["attention_mask"].sum(1).tolist() == [3, 7]
    assert torch.equal(both["labels"], torch.tensor([1, 0]))


def test_truncation_and_row_limits(tmp_path):
    rows = [{"sentence": " ".join(["film"] * 30), "label": "1"}] * 5
    path = write_tsv(tmp_path / "t.tsv", rows)
    cfg = DataConfig(train=str(path), max_length=8, max_train_examples=3)
    data = load_finetune_data(cfg, word_tokenizer(), "sequence-classification")
    assert len(data.train) == 3 and max(len(x) for x in data.train.input_ids) == 8


def test_epoch_order_is_deterministic_and_groups_lengths():
    lengths = [i % 37 for i in range(500)]
    a = epoch_order(500, seed=1, epoch=2, lengths=lengths, batch_size=10)
    assert a == epoch_order(500, seed=1, epoch=2, lengths=lengths, batch_size=10)
    assert sorted(a) == list(range(500)) and a != epoch_order(500, seed=1, epoch=3, lengths=lengths, batch_size=10)
    spread = sum(
        max(lengths[i] for i in a[j : j + 10]) - min(lengths[i] for i in a[j : j + 10]) for j in range(0, 500, 10)
    )
    plain = epoch_order(500, seed=1, epoch=2)
    spread_plain = sum(
        max(lengths[i] for i in plain[j : j + 10]) - min(lengths[i] for i in plain[j : j + 10])
        for j in range(0, 500, 10)
    )
    assert spread < spread_plain / 4  # grouping removes most of the padding


def test_hugging_face_dataset_from_a_local_folder(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "ds"
    folder.mkdir()
    write_csv(folder / "train.csv", sentiment_rows(6))
    rows = read_records(f"hf:{folder}@train")
    assert [r["sentence"] for r in rows] == [r["sentence"] for r in sentiment_rows(6)]
    with pytest.raises(DataError, match="could not load Hugging Face dataset"):
        read_records(f"hf:{folder}@nosuchsplit")
    with pytest.raises(DataError, match="names no dataset"):
        read_records("hf:@train")


def test_hugging_face_source_without_the_package(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` fail
    with pytest.raises(MissingDependencyError, match="pip install datasets"):
        read_records("hf:glue:sst2@train")


def test_real_shared_data_formats_when_present():
    """The project's own data files (read-only, outside the repo) parse with the documented columns."""
    root = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not (root / "sst2" / "validation.tsv").is_file():
        pytest.skip("../shared/data is not present")
    sst = read_records(str(root / "sst2" / "validation.tsv"))
    e2e = read_records(str(root / "e2e" / "devset.csv"))
    assert len(sst) == 872 and set(sst[0]) == {"sentence", "label"}
    assert len(e2e) == 4672 and set(e2e[0]) == {"mr", "ref"}


def test_the_shipped_corpus_is_plain_varied_text():
    """edgefuse/data/corpus.txt: the unlabeled text of the embedded demo's distillation."""
    import edgefuse

    path = Path(edgefuse.__file__).parent / "data" / "corpus.txt"
    rows = read_records(str(path))
    texts = [r["text"] for r in rows]
    assert len(texts) >= 250 and len(set(texts)) == len(texts)
    assert all(3 <= len(t.split()) <= 30 for t in texts)
