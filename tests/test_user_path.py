"""A new user's path, as the README tells it, on a model of their own (a tiny local BERT folder):

fuse -> recover (fine-tune with distillation) -> export (with the onnxruntime Mobile .ort file) -> quantize -> tune
-> profile -> load in optimum (feature extraction and classification) -> the .ort model in onnxruntime.

Every step is the real CLI; every check runs a real onnxruntime session or optimum model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from pipeline_tiny import save_tiny_bert, tiny_tokenizer, write_tsv

from edgefuse.cli import main


@pytest.fixture(scope="module")
def user(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The user's folders after the README's commands (run once for the module)."""
    root = tmp_path_factory.mktemp("user")
    mine = save_tiny_bert(root / "my-bert", head="cls")
    train, val = write_tsv(root / "train.tsv", 48, seed=1), write_tsv(root / "val.tsv", 16, seed=2)
    f = {"root": root, "mine": mine}
    assert main(["fuse", str(mine), str(root / "fused"), "--keep-ratio", "0.5",
                 "--task", "sequence-classification"]) == 0
    assert main(["finetune", str(root / "fused"), str(root / "recovered"), "--task", "sequence-classification",
                 "--train", str(train), "--validation", str(val), "--objective", "task", "--objective",
                 "distill-logits", "--teacher", str(mine), "--max-steps", "3", "--batch-size", "8",
                 "--no-progress"]) == 0
    f["model"] = root / "recovered" / "model"
    assert main(["export", str(f["model"]), str(root / "onnx-cls"), "--task", "sequence-classification",
                 "--format", "ort", "--labels", "negative", "positive"]) == 0
    assert main(["export", str(f["model"]), str(root / "onnx-emb"), "--task", "feature-extraction",
                 "--sentence-embedding"]) == 0
    # -> onnx-cls-int8/model.onnx; without --no-reduce-range an avx2/avx512 host writes onnx-cls-int8-reduce-range
    assert main(["quantize", str(root / "onnx-cls"), "--no-reduce-range"]) == 0
    assert main(["profile", str(root / "onnx-cls" / "model.onnx"), str(root / "onnx-cls-int8" / "model.onnx"),
                 "--threads", "1", "--seq-lens", "8", "--runs", "3", "--warmup-runs", "1", "--no-memory",
                 "--min-cosine", "none", "--out", str(root / "profile")]) == 0
    return f


def _texts() -> list[str]:
    return ["w1 w2 w3 w40", "w50 w51 w7 w8 w9 w10 w11"]


def _ort_logits(graph: Path, batch: dict) -> np.ndarray:
    from edgefuse.ort import make_session

    session = make_session(graph)
    feed = {i.name: batch[i.name] for i in session.get_inputs()}
    return session.run(None, feed)[0]


def test_optimum_loads_what_was_shipped(user: dict[str, Path]) -> None:
    from optimum.onnxruntime import ORTModelForFeatureExtraction, ORTModelForSequenceClassification

    tok = tiny_tokenizer()
    batch = tok(_texts(), padding=True, return_tensors="np")
    for folder in ("onnx-cls", "onnx-cls-int8"):
        model = ORTModelForSequenceClassification.from_pretrained(user["root"] / folder)
        got = model(**tok(_texts(), padding=True, return_tensors="pt")).logits.numpy()
        # from_pretrained(folder) runs the folder's model.onnx: the int8 folder gives the int8 graph's logits
        np.testing.assert_allclose(got, _ort_logits(user["root"] / folder / "model.onnx", dict(batch)), atol=1e-5)
        assert model.config.id2label == {0: "negative", 1: "positive"}  # the names travel with the graph
    fp32 = _ort_logits(user["root"] / "onnx-cls" / "model.onnx", dict(batch))
    int8 = _ort_logits(user["root"] / "onnx-cls-int8" / "model.onnx", dict(batch))
    assert not np.array_equal(fp32, int8)  # really the quantized graph, not the fp32 one again
    emb = ORTModelForFeatureExtraction.from_pretrained(user["root"] / "onnx-emb")
    out = emb(**tok(_texts(), padding=True, return_tensors="pt")).last_hidden_state
    assert tuple(out.shape[:2]) == tuple(batch["input_ids"].shape) and np.isfinite(out.numpy()).all()


def test_ort_mobile_file_is_written_and_agrees(user: dict[str, Path]) -> None:
    folder = user["root"] / "onnx-cls"
    assert (folder / "model.ort").is_file() and (folder / "model.required_operators.config").is_file()
    ops = (folder / "model.required_operators.config").read_text()
    assert "MatMul" in ops  # the operator list of a reduced build names the graph's kernels
    batch = dict(tiny_tokenizer()(_texts(), padding=True, return_tensors="np"))
    np.testing.assert_allclose(_ort_logits(folder / "model.ort", batch), _ort_logits(folder / "model.onnx", batch),
                               atol=1e-5)
    import json

    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["ort_format"]["ort"] == "model.ort" and manifest["ort_format"]["min_cosine_vs_onnx"] > 0.9999


def test_profile_report_of_the_users_graphs(user: dict[str, Path]) -> None:
    html = (user["root"] / "profile" / "report.html").read_text()
    assert "Variants: size, latency and quality" in html and "Per-operator time, threads=1" in html


def test_convert_to_ort_fails_closed(user: dict[str, Path], tmp_path: Path) -> None:
    from edgefuse.errors import TargetNotFoundError
    from edgefuse.export.ort_format import convert_to_ort

    with pytest.raises(TargetNotFoundError, match="does not exist"):
        convert_to_ort(tmp_path / "missing.onnx")
    with pytest.raises(SystemExit) as exc:  # argparse: a usage error, exit 2
        main(["export", str(user["model"]), str(tmp_path / "x"), "--format", "tflite"])
    assert exc.value.code == 2 and not (tmp_path / "x").exists()


def test_unsupported_python_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    import runpy
    import sys

    monkeypatch.setattr(sys, "version_info", (3, 12, 3, "final", 0))
    with pytest.raises(SystemExit) as exc:
        runpy.run_module("edgefuse", run_name="__main__")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1
    assert "Python 3.12.3 is not supported; use Python 3.10 or 3.11" in err


def test_fuse_says_how_far_from_the_original_and_what_next(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import json

    mine = save_tiny_bert(tmp_path / "mine")
    assert main(["fuse", str(mine), str(tmp_path / "fused"), "--keep-ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("vs the original on 16 built-in sentences"))
    assert -1.0 <= float(line.split("mean cosine ")[1].split()[0]) <= 1.0
    assert f"next: edgefuse finetune {tmp_path / 'fused'} {tmp_path / 'fused'}-recovered" in out
    diffs = []
    for ratio in ("0.25", "1.0"):
        assert main(["fuse", str(mine), str(tmp_path / f"f{ratio}"), "--keep-ratio", ratio, "--json"]) == 0
        vs = json.loads(capsys.readouterr().out)["vs_original"]
        assert vs["rows"] == 16
        diffs.append(vs["max_abs_diff"])
    assert diffs[0] > 1e-4 > diffs[1]  # fusion changed the outputs; keep 1.0 (every unit its own cluster) did not


def test_export_and_quantize_say_how_far_from_the_teacher(user: dict[str, Path], tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    """--teacher: the graph against the original model, so fuse -> export -> quantize does not say "ok" all the
    way for a model that is far from it."""
    import json

    assert main(["export", str(user["model"]), str(tmp_path / "e"), "--task", "sequence-classification",
                 "--teacher", str(user["mine"])]) == 0
    assert "vs the teacher " + str(user["mine"]) + " on 16 built-in sentences: mean cosine" in capsys.readouterr().out
    assert main(["quantize", str(tmp_path / "e"), "--teacher", str(user["mine"]), "--json"]) == 0
    vs = json.loads(capsys.readouterr().out)["vs_teacher"]
    assert vs["rows"] == 16 and -1.0 <= vs["cosine_mean"] <= 1.0 and vs["task"] == "sequence-classification"


def test_sentence_embedding_output_is_the_pooled_normalised_embedding(user: dict[str, Path]) -> None:
    from edgefuse.export.pooling import reference_embedding
    from edgefuse.ort import make_session

    session = make_session(user["root"] / "onnx-emb" / "model.onnx")
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "sentence_embedding"]
    batch = dict(tiny_tokenizer()(_texts(), padding=True, return_tensors="np"))
    hidden, emb = session.run(None, {i.name: batch[i.name] for i in session.get_inputs()})
    assert emb.shape == (2, hidden.shape[-1])
    np.testing.assert_allclose(emb, reference_embedding(hidden, batch["attention_mask"]), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    # padding does not change a sentence's embedding
    alone = dict(tiny_tokenizer()(_texts()[:1], return_tensors="np"))
    np.testing.assert_allclose(session.run(["sentence_embedding"], {i.name: alone[i.name]
                                                                     for i in session.get_inputs()})[0][0],
                               emb[0], atol=1e-5)
    with pytest.raises(Exception, match="feature-extraction"):
        from edgefuse import export_onnx

        export_onnx(object(), {"task": "sequence-classification", "sentence_embedding": True},
                    user["root"] / "never")
    assert not (user["root"] / "never").exists()



def test_labels_must_name_every_class(user: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["export", str(user["model"]), str(tmp_path / "x"), "--task", "sequence-classification", "--labels"]
    assert main([*args, "only-one"]) == 2
    assert "must be 2 distinct names" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_tune_then_load_the_tuned_graph_in_optimum(user: dict[str, Path], tmp_path: Path) -> None:
    """README's tune step on the user's export: the winner and its session options travel with the folder, and
    optimum runs exactly that graph when handed the tuned session."""
    import json
    import shutil

    from optimum.onnxruntime import ORTModelForSequenceClassification
    from transformers import AutoConfig

    from edgefuse.ort import session

    folder = tmp_path / "onnx-cls"
    shutil.copytree(user["root"] / "onnx-cls", folder)  # the module's folder stays as the other tests expect
    assert main(["tune", str(folder), "--budget-s", "2", "--seq-len", "8",
                 "--candidates", "int8", "int8-noskipfusion"]) == 0
    tuned = json.loads((folder / "manifest.json").read_text())["tuned"]
    assert (folder / tuned["graph"]).is_file()
    tok = tiny_tokenizer()
    batch = dict(tok(_texts(), padding=True, return_tensors="np"))
    model = ORTModelForSequenceClassification(config=AutoConfig.from_pretrained(folder), session=session(folder))
    got = model(**tok(_texts(), padding=True, return_tensors="pt")).logits.numpy()
    np.testing.assert_allclose(got, _ort_logits(folder / tuned["graph"], batch), atol=1e-5)
