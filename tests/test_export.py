"""Export stage: every task, the fold choices, the exporters, validation failure, manifest, CLI (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import VOCAB, tiny_model
from tolerances import EXPORT_ATOL, MIN_CHANGE

from edgefuse.config.export import ExportConfig
from edgefuse.config.fusion import FusionConfig
from edgefuse.errors import ConfigError, ExportValidationError, OutputExistsError
from edgefuse.export.api import export_onnx, resolve_fold
from edgefuse.fusion.api import fuse_mlps_
from edgefuse.fusion.scale import detach_scale_, iter_scaled
from edgefuse.manifest import read_manifest, sha256_file
from edgefuse.ort import build_feed, make_session, past_inputs, random_batch


def tiny_tokenizer(folder: Path):
    """A real BERT WordPiece tokenizer over a 64-entry vocabulary (fits the tiny models' VOCAB)."""
    from transformers import BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "is", "man", "eating", "food", "dog", "fox",
             "quick", "brown", "lazy", "over", "jumps", "edge", "run", "small", "models", "good", "bad", "movie"]
    words += [f"w{i}" for i in range(VOCAB - len(words))]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(words) + "\n")
    return BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))


def fused(arch: str, head: str, layers: list[int] | None = (0,)) -> torch.nn.Module:
    model = tiny_model(arch, head=head)
    fuse_mlps_(model, FusionConfig(keep_ratio=0.5, layers=None if layers is None else list(layers)))
    return model


def _ort_first_output(path: Path, arch_vocab: int = VOCAB) -> tuple[np.ndarray, dict]:
    session = make_session(path)
    ids, mask = random_batch(arch_vocab, 2, 9, seed=5)
    feed = build_feed(session, ids, mask)
    return session.run(None, feed)[0], feed


def test_feature_extraction_partial_fusion_keep_scale(tmp_path: Path) -> None:
    model = fused("bert", "base", layers=[1])  # per-layer widths differ: layer 0 keeps 32, layer 1 has 16
    res = export_onnx(model, ExportConfig(fold_scales="keep"), tmp_path / "out",
                      tokenizer=tiny_tokenizer(tmp_path / "tok"))
    assert res.fold_scales == "keep" and res.fused_mlps == 1
    assert res.exporter.startswith("optimum-onnx")
    assert res.max_abs_diff <= EXPORT_ATOL
    labels = [c.label for c in res.cases]
    assert len(labels) == 3 and "real text, padded" in labels and any("padded" in lab for lab in labels[:2])
    # the separate scale is in the graph: the graph matches the fused model, and not the model without scale
    got, feed = _ort_first_output(res.onnx_path)
    torch_in = {k: torch.from_numpy(v) for k, v in feed.items()}
    with torch.no_grad():
        want = model(**torch_in).last_hidden_state.numpy()
        for _, module in list(iter_scaled(model)):
            detach_scale_(module)
        unscaled = model(**torch_in).last_hidden_state.numpy()
    assert np.abs(got - want).max() <= EXPORT_ATOL
    assert np.abs(got - unscaled).max() > MIN_CHANGE


def test_manifest_records_graph(tmp_path: Path) -> None:
    res = export_onnx(fused("bert", "base"), ExportConfig(), tmp_path / "out")
    manifest = read_manifest(tmp_path / "out")
    entry = manifest["graphs"]["model.onnx"]
    assert entry["sha256"] == sha256_file(res.onnx_path) == res.sha256
    assert entry["size_bytes"] == res.onnx_path.stat().st_size
    assert manifest["task"] == "feature-extraction" and manifest["fold_scales"] == "down"
    assert manifest["library_versions"]["onnxruntime"] != "missing"
    assert manifest["fusion"]["widths"] == {"encoder.layer.0": 16}
    assert entry["checks"]["max_abs_diff"] <= EXPORT_ATOL and len(entry["checks"]["cases"]) == 2
    assert (tmp_path / "out" / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama"])
def test_sequence_classification(tmp_path: Path, arch: str) -> None:
    model = fused(arch, "cls")
    if model.config.pad_token_id is None:
        model.config.pad_token_id = 0  # decoders classify the last non-pad token
    res = export_onnx(model, ExportConfig(task="sequence-classification"), tmp_path / arch)
    assert res.max_abs_diff <= EXPORT_ATOL
    assert res.cases[0].outputs[0].name == "logits"


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral", "qwen2"])
def test_causal_lm_with_past_greedy(tmp_path: Path, arch: str) -> None:
    model = fused(arch, "lm")
    res = export_onnx(model, ExportConfig(task="causal-lm", generate_tokens=6), tmp_path / arch)
    assert res.greedy is not None and res.greedy.match and res.greedy.tokens_compared == 6
    assert any(c.label.startswith("decode step") for c in res.cases)  # a step with a non-empty past
    session = make_session(res.onnx_path)
    assert len(past_inputs(session)) == 2 * model.config.num_hidden_layers  # (key, value) per layer
    assert res.max_abs_diff <= EXPORT_ATOL


def test_optimum_loads_causal_folder(tmp_path: Path) -> None:
    from optimum.onnxruntime import ORTModelForCausalLM

    model = fused("llama", "lm")
    res = export_onnx(model, ExportConfig(task="causal-lm", generate_tokens=5), tmp_path / "llama")
    ort_model = ORTModelForCausalLM.from_pretrained(tmp_path / "llama")
    ids = torch.tensor([[5, 9, 13, 22, 7, 30]])
    out = ort_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                             do_sample=False)
    with torch.no_grad():
        want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, min_new_tokens=5,
                              do_sample=False)
    assert out.tolist() == want.tolist()
    assert res.onnx_path.name == "model.onnx"


def test_fold_auto_and_up(tmp_path: Path) -> None:
    llama, bert = fused("llama", "lm"), fused("bert", "base")
    assert resolve_fold(llama, "auto") == "up"  # gated: the sizes go into the linear up branch, exactly
    assert resolve_fold(bert, "auto") == "down"
    assert resolve_fold(tiny_model("bert"), "auto") == "none"
    with pytest.raises(ConfigError, match="exact only for gated MLPs"):
        resolve_fold(bert, "up")
    res = export_onnx(llama, ExportConfig(task="causal-lm", fold_scales="up", generate_tokens=4), tmp_path / "up")
    assert res.fold_scales == "up" and res.greedy.match
    assert sum(1 for _ in iter_scaled(llama)) == 1  # the caller's model keeps its scale


def test_torch_exporter(tmp_path: Path) -> None:
    res = export_onnx(fused("bert", "base"), ExportConfig(exporter="torch"), tmp_path / "bert")
    assert res.exporter.startswith("torch.onnx") and res.max_abs_diff <= EXPORT_ATOL
    res = export_onnx(fused("llama", "lm"), ExportConfig(task="causal-lm", with_past=False, generate_tokens=4),
                      tmp_path / "llama")  # optimum's text-generation: no KV cache, greedy re-runs the sequence
    assert res.greedy.match and not past_inputs(make_session(res.onnx_path))
    with pytest.raises(ConfigError, match="cannot build a KV-cache graph"):
        export_onnx(fused("llama", "lm"), ExportConfig(task="causal-lm", exporter="torch"), tmp_path / "x")
    with pytest.raises(ConfigError, match="optimum-onnx cannot export"):
        export_onnx(tiny_model("switch_transformers"), ExportConfig(exporter="optimum"), tmp_path / "y")


def test_validation_failure_leaves_nothing(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(ExportValidationError, match="disagrees with PyTorch") as info:
        export_onnx(fused("bert", "base"), ExportConfig(atol=1e-12, rtol=0.0), out)
    assert info.value.exit_code == 7
    assert "max|diff|" in str(info.value)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary sibling


def test_moe_frozen_routing_is_caught(tmp_path: Path) -> None:
    # A plain TorchScript trace freezes Mixtral's data-dependent expert routing (the loop over the experts hit by
    # the dummy batch): the graph breaks on other shapes, and validation reports it instead of passing it.
    # export_onnx traces the sparse blocks with an equivalent gather-compute-scatter forward instead (dense as the
    # fallback; tests/test_export_moe.py).
    from edgefuse.export.backends import export_graph
    from edgefuse.export.validate import validate_export

    model, cfg = fused("mixtral", "lm"), ExportConfig(task="causal-lm")
    export_graph(model, cfg, tmp_path)
    _, _, problems = validate_export(model, tmp_path / "model.onnx", cfg)
    assert problems and "could not run the graph" in problems[0]
    res = export_onnx(model, cfg, tmp_path / "sparse")
    assert res.greedy.match and "sparse MoE routing" in res.exporter


def test_existing_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        export_onnx(fused("bert", "base"), ExportConfig(), out)
    assert (out / "keep.txt").is_file()
    with pytest.raises(OutputExistsError, match="edgefuse did not write it"):  # never delete a folder not ours
        export_onnx(fused("bert", "base"), ExportConfig(), out, overwrite=True)
    assert (out / "keep.txt").is_file()
    (out / "keep.txt").unlink()
    out.rmdir()
    export_onnx(fused("bert", "base"), ExportConfig(), out)
    (out / "extra.txt").write_text("x")
    export_onnx(fused("bert", "base"), ExportConfig(), out, overwrite=True)  # ours (marked): replaced whole
    assert (out / "model.onnx").is_file() and not (out / "extra.txt").exists()


def test_config_errors() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="at least two validation shapes"):
        ExportConfig(validate_shapes=[(1, 8)])
    with pytest.raises(ValidationError, match="traced shape"):
        ExportConfig(validate_shapes=[(1, 8), (2, 16)])
    with pytest.raises(ValidationError, match=r"unknown key .atoll. \(did you mean .atol.\?\)"):
        ExportConfig(atoll=1e-3)


def test_cli_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main
    from edgefuse.fusion.persist import save_fused

    src = save_fused(fused("bert", "base"), tmp_path / "fused")
    assert main(["export", str(src), str(tmp_path / "onnx"), "--json", "--validate-shape", "1", "7",
                 "--validate-shape", "2", "11"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fold_scales"] == "down" and data["cases"][0]["label"] == "batch 1 x seq 7"
    assert main(["export", str(src), str(tmp_path / "onnx")]) == 12  # exists
    assert main(["export", str(src), str(tmp_path / "bad"), "--atol", "1e-12", "--rtol", "0"]) == 7
    assert not (tmp_path / "bad").exists()
    assert main(["export", str(src), str(tmp_path / "bad"), "--validate-shape", "2", "16"]) == 2
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "bad")]) == 3
    err = capsys.readouterr().err
    assert "validate_shapes" in err and "does not exist" in err
