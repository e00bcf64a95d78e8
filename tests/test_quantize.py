"""Quantize stage: every mode, node counts, exclusion, auto mode, failure paths, manifest, presets, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from test_export import fused, tiny_tokenizer
from tolerances import QUANT_MODEL_CALM_MAX_ERROR, QUANT_MODEL_OUTLIER_MIN_ERROR, QUANT_TINY_MIN_COSINE

from edgefuse.config.export import ExportConfig
from edgefuse.config.quantize import QuantizeConfig
from edgefuse.errors import ConfigError, DataError, OutputExistsError, QuantizationError, TargetNotFoundError
from edgefuse.export.api import export_onnx
from edgefuse.manifest import read_manifest, sha256_file
from edgefuse.quantize.api import quantize_onnx
from edgefuse.quantize.evaluate import op_counts, read_labelled, read_texts, weight_matmuls
from edgefuse.quantize.presets import PRESETS, preset_from_flags, resolve_preset

TEXTS = ["the quick brown fox jumps over the lazy dog", "a man is eating food", "good movie", "bad movie",
         "edge models run small", "the dog is lazy", "a quick fox", "the man is good", "w7 w8 w9 the a"]


@pytest.fixture(scope="module")
def small_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fused BERT classifier big enough (hidden 64, intermediate 256) for int8/int4 to shrink the file."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from edgefuse.config.fusion import FusionConfig
    from edgefuse.fusion.api import fuse_mlps_

    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("q")
    tok = tiny_tokenizer(tmp / "tok")
    model = BertForSequenceClassification(BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256, vocab_size=tok.vocab_size,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5))
    export_onnx(model, ExportConfig(task="sequence-classification"), tmp / "export", tokenizer=tok)
    return tmp / "export"


def _n_weight_matmuls(folder: Path, mode: str) -> int:
    """Weight MatMuls, plus the Gemm heads (pooler, classifier) that int8 also quantizes; int4 takes MatMul only."""
    model = onnx.load(str(folder / "model.onnx"))
    return len(weight_matmuls(model)) + (0 if mode == "int4" else op_counts(model).get("Gemm", 0))


@pytest.mark.parametrize(("mode", "op", "extra"), [
    ("dynamic", "MatMulInteger", {}),
    ("static", "QuantizeLinear", {"calibration_method": "minmax"}),
    ("static", "QuantizeLinear", {"calibration_method": "percentile", "output_name": "p.onnx"}),
    ("static", "QuantizeLinear", {"calibration_method": "entropy", "output_name": "e.onnx"}),
    ("int4", "MatMulNBits", {"block_size": 16}),
], ids=["dynamic", "static-minmax", "static-percentile", "static-entropy", "int4"])
def test_modes_count_and_shrink(small_bert: Path, mode: str, op: str, extra: dict) -> None:
    res = quantize_onnx(small_bert, QuantizeConfig(mode=mode, overwrite=True, **extra), calibration_texts=TEXTS)
    expected = _n_weight_matmuls(small_bert, mode)
    counts = op_counts(onnx.load(str(res.onnx_path)))
    assert counts.get(op, 0) > 0 and res.op_counts == counts
    if mode == "static":
        assert res.quantized_nodes >= expected  # QDQ also wraps the attention MatMuls
    else:
        assert res.quantized_nodes == expected
    assert res.size_bytes < res.size_bytes_fp32
    assert QUANT_TINY_MIN_COSINE <= res.cosine_mean < 1.0  # close to fp32, and not identical (it did something)


def test_manifest_and_names(small_bert: Path) -> None:
    res = quantize_onnx(small_bert, QuantizeConfig(preset="arm64", overwrite=True), calibration_texts=TEXTS)
    assert res.onnx_path.name == "model_int8.onnx"  # named by what differs in the bytes, not by the preset
    entry = read_manifest(small_bert)["graphs"]["model_int8.onnx"]
    assert entry["sha256"] == sha256_file(res.onnx_path)
    assert entry["settings"]["preset"]["name"] == "arm64" and entry["settings"]["per_channel"] is True
    assert entry["checks"]["quantized_matmuls"] == res.quantized_nodes
    assert "model.onnx" in read_manifest(small_bert)["graphs"]
    with pytest.raises(OutputExistsError, match="--overwrite"):
        quantize_onnx(small_bert, QuantizeConfig(preset="arm64"), calibration_texts=TEXTS)


def test_exclude_exact_and_regex(small_bert: Path) -> None:
    names = weight_matmuls(onnx.load(str(small_bert / "model.onnx")))
    cfg = QuantizeConfig(exclude=[names[0], "re:layer\\.1/output/dense/MatMul$"], overwrite=True,
                         output_name="x.onnx")
    res = quantize_onnx(small_bert, cfg, calibration_texts=TEXTS)
    assert names[0] in res.kept_fp32 and len(res.kept_fp32) == 2
    assert res.quantized_nodes == _n_weight_matmuls(small_bert, "dynamic") - 2
    with pytest.raises(TargetNotFoundError, match="matches nothing; similar names"):
        quantize_onnx(small_bert, QuantizeConfig(exclude=["no_such_node"], output_name="y.onnx"))
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        quantize_onnx(small_bert, QuantizeConfig(exclude=["re:("], output_name="y.onnx"))


def test_auto_keeps_sensitive_matmuls(small_bert: Path) -> None:
    # int4 (weight-only, MatMul only): keeping every MatMul in fp32 reaches cosine 1, so the target is reachable
    base = quantize_onnx(small_bert, QuantizeConfig(mode="int4", block_size=16, overwrite=True, output_name="b.onnx"),
                         calibration_texts=TEXTS)
    target = base.cosine_mean + 0.5 * (1.0 - base.cosine_mean)
    res = quantize_onnx(small_bert, QuantizeConfig(mode="int4", block_size=16, auto_target_cosine=target,
                                                   auto_max_kept=12, overwrite=True, output_name="auto.onnx"),
                        calibration_texts=TEXTS)
    assert res.cosine_mean >= target > base.cosine_mean
    assert 1 <= len(res.kept_fp32) == len(res.auto_steps) - 1
    assert res.quantized_nodes == base.quantized_nodes - len(res.kept_fp32)
    with pytest.raises(QuantizationError, match="auto mode kept 1"):
        quantize_onnx(small_bert, QuantizeConfig(mode="int4", block_size=16, auto_target_cosine=1.0, auto_max_kept=1,
                                                 output_name="no.onnx"), calibration_texts=TEXTS)
    assert not (small_bert / "no.onnx").exists()


def test_failures_leave_no_file(small_bert: Path) -> None:
    names = weight_matmuls(onnx.load(str(small_bert / "model.onnx")))
    with pytest.raises(QuantizationError, match="quantized no MatMul") as info:
        quantize_onnx(small_bert, QuantizeConfig(exclude=names, mode="int4", output_name="none.onnx"))
    assert info.value.exit_code == 8
    with pytest.raises(QuantizationError, match="below min_cosine"):
        quantize_onnx(small_bert, QuantizeConfig(mode="int4", block_size=16, min_cosine=0.999999999,
                                                 output_name="low.onnx"), calibration_texts=TEXTS)
    with pytest.raises(QuantizationError, match="try --reduce-range"):  # AVX2 int16 saturation hint
        quantize_onnx(small_bert, QuantizeConfig(preset="avx2", reduce_range=False, min_cosine=0.999999999,
                                                 output_name="low8.onnx"),
                      calibration_texts=TEXTS)
    leftovers = {p.name for p in small_bert.iterdir()}
    assert not {"none.onnx", "low.onnx", "low8.onnx"} & leftovers
    assert not any(n.endswith(".partial.onnx") for n in leftovers)


def test_accuracy_on_labelled_data(small_bert: Path, tmp_path: Path) -> None:
    tsv = tmp_path / "val.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{t}\t{i % 2}\n" for i, t in enumerate(TEXTS)))
    res = quantize_onnx(small_bert, QuantizeConfig(eval_data=tsv, overwrite=True, output_name="acc.onnx"),
                        calibration_texts=TEXTS)
    assert res.accuracy is not None and res.accuracy_fp32 is not None
    assert round(res.accuracy * len(TEXTS)) == pytest.approx(res.accuracy * len(TEXTS))  # a share of 9 rows
    bad = tmp_path / "bad.tsv"
    bad.write_text("text\tgold\nx\t1\n")
    with pytest.raises(DataError, match="lacks column"):
        read_labelled(bad, None)
    with pytest.raises(TargetNotFoundError):
        read_texts(tmp_path / "missing.tsv", 4)


def test_without_data_calibration_reads_the_built_in_corpus(small_bert: Path, tmp_path: Path) -> None:
    # one source of built-in text (edgefuse/data/corpus.txt): calibration_samples lines of it to calibrate on
    # (16 fixed sentences were too few tokens for GPTQ on any SmolLM2 MatMul) and as many others to check on
    from edgefuse.quantize.evaluate import fit_and_check_texts
    from edgefuse.records import builtin_texts

    fit, check, held_out = fit_and_check_texts(40, None)
    assert held_out and len(fit) == len(check) == 40 and set(fit) | set(check) <= set(builtin_texts())
    assert not set(fit) & set(check)
    res = quantize_onnx(small_bert, QuantizeConfig(mode="int4", block_size=16, calibration_samples=40),
                        out_dir=tmp_path / "q")
    assert res.held_out and res.samples == 40  # a classifier compares one row per text
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert '"held_out": true' in json.dumps(manifest)


def test_the_check_is_held_out_only_when_the_data_allows(tmp_path: Path) -> None:
    from edgefuse.quantize.evaluate import fit_and_check_texts

    data = tmp_path / "d.csv"
    data.write_text("text\n" + "".join(f"t{i}\n" for i in range(10)))
    fit, check, held_out = fit_and_check_texts(5, data)
    assert held_out and fit == ["t0", "t2", "t4", "t6", "t8"] and check == ["t1", "t3", "t5", "t7", "t9"]
    fit, check, held_out = fit_and_check_texts(6, data)  # 10 < 2 x 6: both on the same texts, and said so
    assert not held_out and fit == check and len(fit) == 6
    assert fit_and_check_texts(3, data, ["x", "y"]) == (["x", "y"], ["x", "y"], False)  # the caller's texts


def test_calibration_texts_cover_the_whole_file(tmp_path: Path) -> None:
    # a sorted file's first rows are one kind of text (E2E: 64 rows, 7 restaurants); calibration spreads out
    data = tmp_path / "sorted.csv"
    data.write_text("mr,ref\n" + "".join(f"m{i // 10},r{i}\n" for i in range(100)))
    assert read_texts(data, 4) == ["r0", "r25", "r50", "r75"]
    assert read_texts(data, 1000) == [f"r{i}" for i in range(100)]


def test_causal_lm_int8_and_int4(tmp_path: Path) -> None:
    export_onnx(fused("llama", "lm"), ExportConfig(task="causal-lm", generate_tokens=0), tmp_path / "llama")
    for cfg in (QuantizeConfig(mode="dynamic"), QuantizeConfig(mode="int4", block_size=16),
                QuantizeConfig(mode="static")):
        res = quantize_onnx(tmp_path / "llama", cfg)
        assert res.quantized_nodes > 0 and res.cosine_mean >= QUANT_TINY_MIN_COSINE


def test_presets() -> None:
    assert preset_from_flags("aarch64", {"asimd", "asimddp"}) == "arm64"
    assert preset_from_flags("x86_64", {"avx2", "avx512f", "avx512bw", "avx512_vnni"}) == "avx512-vnni"
    assert preset_from_flags("x86_64", {"avx2", "avx512f", "avx512bw"}) == "avx512"
    assert preset_from_flags("x86_64", {"avx2"}) == "avx2"
    assert resolve_preset("auto").name in PRESETS
    assert all(p.weight == "QInt8" for p in PRESETS.values())
    # int16-accumulating x86 kernels get 7-bit weights by default; int32-accumulating ones keep 8 bits
    assert {k for k, p in PRESETS.items() if p.reduce_range} == {"avx2", "avx512"}
    with pytest.raises(ConfigError, match="unknown preset"):
        resolve_preset("sparc")


def test_config_errors() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="block_size 48"):
        QuantizeConfig(block_size=48)
    with pytest.raises(ValidationError, match="replace the fp32 graph"):
        QuantizeConfig(output_name="model.onnx")


def test_cli_quantize(small_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main

    assert main(["quantize", str(small_bert), "--mode", "int4", "--block-size", "16", "--overwrite", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["mode"] == "int4" and data["op_counts"]["MatMulNBits"] == data["quantized_nodes"]
    assert main(["quantize", str(small_bert), "--block-size", "48"]) == 2
    assert main(["quantize", str(tmp_path), "--mode", "dynamic"]) == 3  # not an export folder
    assert main(["quantize", str(small_bert), "--exclude", "nope", "--output-name", "z.onnx"]) == 3
    assert main(["quantize", str(small_bert), "--dry-run", "--preset", "avx512-vnni"]) == 0
    out = capsys.readouterr()
    # the default is a folder of its own, where the graph is model.onnx (what optimum's from_pretrained loads)
    assert '"output_name": "model.onnx"' in out.out and f'"out_dir": "{small_bert}-int8"' in out.out
    assert "block_size" in out.err
    assert (small_bert.parent / f"{small_bert.name}-int4-b16" / "model.onnx").is_file()
    assert main(["quantize", str(small_bert), "--exclude", "re:(", "--output-name", "z.onnx"]) == 2
    err = capsys.readouterr().err
    assert "not a valid regular expression" in err and "re:(" in err and "Traceback" not in err


def test_dynamic_int8_is_the_same_graph_for_every_preset(small_bert: Path, tmp_path: Path) -> None:
    """Dynamic int8 uses u8 activations and s8 weights on every CPU: with the same reduce_range the presets give
    one graph, one name; the avx2/avx512 presets' reduce_range default is part of the name."""
    from edgefuse.quantize.api import variant_name

    shas = set()
    for preset in ("arm64", "avx2", "avx512-vnni"):
        cfg = QuantizeConfig(preset=preset, reduce_range=False)  # the default int8 -> dynamic for an encoder
        res = quantize_onnx(small_bert, cfg, tmp_path / preset, calibration_texts=TEXTS)
        assert res.mode == "dynamic"
        cfg = cfg.model_copy(update={"mode": "dynamic"})
        assert res.onnx_path == tmp_path / preset / "model.onnx" and variant_name(cfg, preset) == "int8"
        manifest = read_manifest(tmp_path / preset)
        assert list(manifest["graphs"]) == ["model.onnx"] and manifest["graphs"]["model.onnx"]["kind"] == "dynamic"
        assert manifest["source_folder"] == str(small_bert)  # the manifest says where it came from
        shas.add(sha256_file(res.onnx_path))
    assert len(shas) == 1
    assert variant_name(QuantizeConfig(mode="static"), "avx2") == "qdq-int8-au8-reduce-range"
    dyn = QuantizeConfig(mode="dynamic")
    assert variant_name(dyn, "avx2") == variant_name(dyn, "avx512") == "int8-reduce-range"
    assert variant_name(dyn, "avx512-vnni") == variant_name(dyn, "arm64") == "int8"
    assert variant_name(QuantizeConfig(mode="dynamic", reduce_range=False), "avx2") == "int8"
    assert variant_name(QuantizeConfig(mode="static"), "arm64") == "qdq-int8-as8"
    per_tensor = QuantizeConfig(mode="dynamic", per_channel=False, reduce_range=True)
    assert variant_name(per_tensor, "arm64") == "int8-per-tensor-reduce-range"


def test_auto_ranking_sees_massive_activations() -> None:
    """One token ~1000x larger than the rest (SmolLM2's "massive activations") sets the per-tensor int8 scale and
    rounds every other token to zero: the per-token error must show it, though the whole-tensor norm would not."""
    import numpy as np

    from edgefuse.quantize.auto import relative_error

    rng = np.random.default_rng(0)
    w = rng.normal(size=(64, 16)).astype(np.float32)
    x = rng.normal(size=(32, 64)).astype(np.float32)
    kw = {"mode": "dynamic", "per_channel": True, "reduce_range": False, "block_size": 32}
    calm = relative_error(x, w, **kw)
    x[0] *= 3000.0  # the first token
    assert calm < QUANT_MODEL_CALM_MAX_ERROR
    assert relative_error(x, w, **kw) > QUANT_MODEL_OUTLIER_MIN_ERROR  # the 31 other tokens are lost


def _zero_output_copy(folder: Path, dst: Path) -> Path:
    """A copy of an export folder whose graph multiplies its logits by 0 (manifest re-recorded for the edit)."""
    import shutil

    from onnx import helper, numpy_helper

    from edgefuse.manifest import add_graph, write_manifest

    shutil.copytree(folder, dst, ignore=lambda _, names: [n for n in names if n.endswith(".onnx")])
    model = onnx.load(str(folder / "model.onnx"))
    out = model.graph.output[0].name
    for node in model.graph.node:
        node.output[:] = [f"{out}_before_zero" if o == out else o for o in node.output]
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((), dtype=np.float32), "zero"))
    model.graph.node.append(helper.make_node("Mul", [f"{out}_before_zero", "zero"], [out], name="times_zero"))
    onnx.save(model, str(dst / "model.onnx"))
    manifest = read_manifest(dst)
    entry = manifest["graphs"]["model.onnx"]
    manifest["graphs"] = {}  # the module's other tests quantized into the source folder; none was copied
    add_graph(manifest, dst, "model.onnx", kind=entry["kind"], settings=entry["settings"], checks=entry["checks"])
    write_manifest(dst, manifest)
    return dst


def test_zero_output_graph_fails_the_min_cosine_gate(small_bert: Path, tmp_path: Path, capsys) -> None:
    """All-zero outputs have no direction: cosine 0.0, so the gate fails (it passed with cosine 1.0 before)."""
    from edgefuse.cli import main
    from edgefuse.ort import make_session

    zero = _zero_output_copy(small_bert, tmp_path / "zero")
    session = make_session(zero / "model.onnx")
    feed = {i.name: np.ones((1, 4), dtype=np.int64) for i in session.get_inputs()}
    assert not session.run(None, feed)[0].any()  # the edit really zeroed the output
    with pytest.raises(QuantizationError, match=r"mean cosine 0\.00000 against fp32 is below min_cosine"):
        quantize_onnx(zero, QuantizeConfig(mode="dynamic", min_cosine=0.5), calibration_texts=TEXTS)
    assert main(["quantize", str(zero), "--mode", "dynamic", "--min-cosine", "0.5"]) == 8
    assert "below min_cosine" in capsys.readouterr().err
    assert sorted(p.name for p in zero.glob("*.onnx")) == ["model.onnx"]  # nothing written
