"""Optimize stage: every fusion subset validates against the fp32 graph (and so against PyTorch) on BERT, RoBERTa,
GPT-2 and Llama with KV cache; fused operators are counted; failures and config errors; CLI; pipeline stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_export import fused, tiny_tokenizer
from tiny import tiny_model
from tolerances import APPROXIMATION_CATCHING_ATOL

from edgefuse.config.export import ExportConfig
from edgefuse.config.optimize import DEFAULT_FUSIONS, FUSIONS, OptimizeConfig
from edgefuse.errors import ConfigError, OutputExistsError, TargetNotFoundError, UnsupportedArchitectureError
from edgefuse.export.api import export_onnx
from edgefuse.manifest import read_manifest, sha256_file
from edgefuse.optimize.api import optimize_onnx
from edgefuse.optimize.fusions import ort_model_type

# Each fusion alone, each left out of the default set, none and all: every subset a user can reach in one switch.
SUBSETS = [[f] for f in DEFAULT_FUSIONS] + [[g for g in DEFAULT_FUSIONS if g != f] for f in DEFAULT_FUSIONS]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("opt")
    tok = tiny_tokenizer(tmp / "tok")
    out = {}
    out["bert"] = tmp / "bert"
    export_onnx(fused("bert", "base"), ExportConfig(), out["bert"], tokenizer=tok)
    out["roberta"] = tmp / "roberta"
    export_onnx(tiny_model("roberta"), ExportConfig(), out["roberta"])
    for arch in ("gpt2", "llama"):
        out[arch] = tmp / arch
        export_onnx(fused(arch, "lm"), ExportConfig(task="causal-lm", generate_tokens=0), out[arch])
    return out


@pytest.mark.parametrize("subset", SUBSETS, ids=["+" + s[0] for s in SUBSETS[: len(DEFAULT_FUSIONS)]]
                         + ["-" + f for f in DEFAULT_FUSIONS])
def test_every_fusion_subset_validates_on_bert(exports: dict[str, Path], subset: list[str]) -> None:
    res = optimize_onnx(exports["bert"], OptimizeConfig(fusions=subset, output_name="s.onnx", overwrite=True))
    assert res.cases and all(c.passed for c in res.cases)
    assert any(c.label.startswith("real text") for c in res.cases)
    assert res.fusions == tuple(f for f in FUSIONS if f in subset)


@pytest.mark.parametrize("arch", ["bert", "roberta", "gpt2", "llama"])
@pytest.mark.parametrize("fusions", ["default", "none", "all"])
def test_default_none_and_all_validate_per_architecture(exports: dict[str, Path], arch: str, fusions: str) -> None:
    chosen = list(FUSIONS) if fusions == "all" else fusions
    res = optimize_onnx(exports[arch], OptimizeConfig(fusions=chosen, output_name=f"{fusions}.onnx", overwrite=True))
    assert all(c.passed for c in res.cases)
    if arch in ("gpt2", "llama"):
        assert any(c.label.startswith("decode step") for c in res.cases)  # the KV cache is checked too
    entry = read_manifest(exports[arch])["graphs"][f"{fusions}.onnx"]
    assert entry["kind"] == "optimized" and entry["settings"]["fusions"] == list(res.fusions)
    assert entry["sha256"] == sha256_file(res.onnx_path)


def test_fusions_change_the_graph_as_named(exports: dict[str, Path]) -> None:
    full = optimize_onnx(exports["bert"], OptimizeConfig(output_name="full.onnx", overwrite=True))
    assert {"Attention", "SkipLayerNormalization", "EmbedLayerNormalization", "BiasGelu"} <= set(full.fused_ops)
    assert sum(full.op_counts.values()) < sum(full.op_counts_fp32.values())
    noskip = optimize_onnx(exports["bert"], OptimizeConfig(disable=["skip_layer_norm"], output_name="n.onnx",
                                                           overwrite=True))
    assert "SkipLayerNormalization" not in noskip.op_counts and noskip.op_counts.get("Attention", 0) == 3
    none = optimize_onnx(exports["bert"], OptimizeConfig(fusions="none", output_name="none.onnx", overwrite=True))
    assert "Attention" not in none.op_counts and "MatMul" in none.op_counts
    llama = optimize_onnx(exports["llama"], OptimizeConfig(output_name="full.onnx", overwrite=True))
    assert {"RotaryEmbedding", "SkipSimplifiedLayerNormalization"} <= set(llama.fused_ops)


def test_errors(exports: dict[str, Path], tmp_path: Path) -> None:
    optimize_onnx(exports["bert"], OptimizeConfig(output_name="e.onnx", overwrite=True))
    with pytest.raises(OutputExistsError):
        optimize_onnx(exports["bert"], OptimizeConfig(output_name="e.onnx"))
    with pytest.raises(TargetNotFoundError):
        optimize_onnx(tmp_path, OptimizeConfig())
    with pytest.raises(UnsupportedArchitectureError, match="mixtral"):
        ort_model_type("mixtral")
    assert ort_model_type("mixtral", "gpt2") == "gpt2"
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="replace the fp32 graph"):
        OptimizeConfig(output_name="model.onnx")
    with pytest.raises(ValidationError):
        OptimizeConfig(fusions=["attention", "nope"])


def test_a_disagreeing_graph_fails_and_leaves_nothing(exports: dict[str, Path]) -> None:
    from edgefuse.errors import ExportValidationError

    # the tanh approximation of GELU changes the function: a zero tolerance must catch it
    cfg = OptimizeConfig(fusions=["gelu", "gelu_approximation"], atol=APPROXIMATION_CATCHING_ATOL, rtol=0.0,
                         output_name="bad.onnx")
    with pytest.raises(ExportValidationError, match="disagrees"):
        optimize_onnx(exports["bert"], cfg)
    assert not (exports["bert"] / "bad.onnx").exists()
    assert not list(exports["bert"].glob(".*partial*"))


def test_cli_optimize(exports: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main

    assert main(["optimize", str(exports["bert"]), "--disable", "skip_layer_norm", "--output-name", "c.onnx",
                 "--overwrite", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "skip_layer_norm" not in data["fusions"] and data["fused_ops"]["Attention"] == 3
    assert main(["optimize", str(exports["bert"]), "--fusions", "attention", "nope"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'nope' is not allowed" in err
    assert main(["optimize", str(exports["bert"]), "--output-name", "model.onnx"]) == 2


def test_config_error_is_one_line() -> None:
    from edgefuse.cli import build_parser
    from edgefuse.cli.optimize import _config

    args = build_parser().parse_args(["optimize", "x", "--fusions", "bogus"])
    with pytest.raises(ConfigError) as info:
        _config(args)
    assert "\n" not in str(info.value)


def test_pipeline_stage_between_export_and_quantize(tmp_path: Path) -> None:
    from pipeline_tiny import base_config, save_tiny_bert

    from edgefuse.config.pipeline import config_from_dict
    from edgefuse.pipeline.api import run_pipeline

    model_dir = save_tiny_bert(tmp_path / "bert")
    cfg = config_from_dict(base_config(model_dir, export={}, optimize={"disable": ["skip_layer_norm"]},
                                       quantize={"mode": "dynamic", "op_types": ["MatMul", "Attention"]},
                                       reference=False))
    run = run_pipeline(cfg, tmp_path / "run")
    assert {"export", "optimize", "quantize", "evaluate"} <= set(run.ran)
    opt = run.stage("optimize").result
    assert opt["graph"] == "optimized/model_opt.onnx" and "Attention" in opt["optimize"]["fused_ops"]
    quant = run.stage("quantize").result["quantize"]
    assert quant["src_path"].endswith("model_opt.onnx") and quant["op_counts"].get("QAttention", 0) == 3
    assert set(run.stage("evaluate").result["graphs"]) == {"fp32", "optimized", "quantized"}
    with pytest.raises(ConfigError, match="optimize needs an export section"):
        config_from_dict(base_config(model_dir, optimize={}))
