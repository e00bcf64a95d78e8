"""The paper's NTK protocol: a named-module parameter set, the upper-two-thirds layer selection, n_init 30 and
the class-0 probability; and what it can see (fusion and merge have the same kernel on an unfused layer)."""

from __future__ import annotations

import copy
import json
import math

import pytest
from test_ntk import model_dir  # noqa: F401  (the CLI fixture: a tiny BERT folder + a labelled TSV)
from tiny import tiny_inputs, tiny_model
from tolerances import FP32_EXACT_ATOL, MIN_CHANGE

from edgefuse.cli import main
from edgefuse.config.fusion import FusionConfig
from edgefuse.config.ntk import NtkConfig, paper_layers
from edgefuse.errors import ConfigError, TargetNotFoundError
from edgefuse.fusion.api import fuse_mlps_
from edgefuse.ntk.api import measure_ntk
from edgefuse.ntk.params import module_entries
from edgefuse.ntk.protocol import paper_defaults

LAYER0 = ["bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread


def test_paper_defaults() -> None:
    assert paper_layers(12) == list(range(4, 12)) and paper_layers(3) == [1, 2]
    d = paper_defaults(tiny_model("bert", head="cls"))
    assert d == {"layers": [1, 2], "modules": LAYER0, "n_init": 30, "output": "class0-prob"}
    gated = paper_defaults(tiny_model("llama"))
    assert gated["modules"] == [f"model.layers.0.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    one = tiny_model("gpt2")
    one.transformer.h = one.transformer.h[:1]
    with pytest.raises(ConfigError, match="at least 2 MLP layers"):
        paper_defaults(one)


def test_module_entries_and_config_errors() -> None:
    model = tiny_model("bert", head="cls")
    entries = module_entries(model, ["re:layer\\.0\\.(intermediate|output)\\.dense$"])
    assert [n for _, n, _ in entries] == [f"{m}.{p}" for m in LAYER0 for p in ("weight", "bias")]
    with pytest.raises(TargetNotFoundError, match="NTK module"):
        module_entries(model, ["bert.encoder.layer.9.output.dense"])
    with pytest.raises(ValueError, match="modules"):
        NtkConfig(params="modules")
    with pytest.raises(ValueError, match="modules"):
        NtkConfig(params="all", modules=LAYER0)


def _measure(method: str) -> object:
    model = tiny_model("bert", head="cls", seed=3)
    comp = copy.deepcopy(model)
    fuse_mlps_(comp, FusionConfig(method=method, keep_ratio=0.5, layers=[1, 2], seed=0))
    cfg = NtkConfig(params="modules", modules=LAYER0, output="class0-prob", n_examples=5)
    return measure_ntk(model, comp, tiny_inputs("bert", batch=5), cfg)


def test_unfused_layer_kernel_cannot_tell_fusion_from_merge() -> None:
    # a lower layer's gradient sees only the function above it, and fusion and merge compute the same function
    fusion, merge = _measure("fusion"), _measure("merge")
    assert fusion.per_layer == () and fusion.fused_mlp is None
    assert fusion.kernel.params_original == fusion.kernel.params_compressed == 2 * (32 * 16) + 32 + 16
    assert fusion.kernel.sign_rel_error > MIN_CHANGE
    assert math.isclose(fusion.kernel.sign_rel_error, merge.kernel.sign_rel_error, abs_tol=FP32_EXACT_ATOL)
    assert math.isclose(fusion.kernel.gd_rel_error, merge.kernel.gd_rel_error, abs_tol=FP32_EXACT_ATOL)
    assert fusion.final_hidden_rel_error > MIN_CHANGE  # the upper layers did change


def test_cli_paper_protocol(model_dir, capsys) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    folder, data = model_dir
    # the fixture's MLPs hold 7 distinct sub-MLPs: fuse to width 7
    rc = main(["-q", "ntk", str(folder), "--protocol", "paper", "--width", "7", "--data", str(data),
               "--n", "6", "--json"])
    assert rc == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["protocol"] == "paper"
    assert payload["fusion"]["layers"] == [1, 2] and payload["fusion"]["n_init"] == 30
    assert payload["ntk"]["params"] == "modules" and payload["ntk"]["output"] == "class0-prob"
    assert payload["ntk"]["modules"] == LAYER0
    assert 0.0 <= payload["result"]["kernel"]["sign_rel_error"] < math.inf
    # flags override the protocol; the text table shows the module set's kernel
    rc = main(["-q", "ntk", str(folder), "--protocol", "paper", "--width", "7", "--data", str(data),
               "--n", "6", "--layers", "2", "--n-init", "1", "--modules", "re:layer\\.1\\.output\\.dense$"])
    assert rc == 0 and "modules" in capsys.readouterr().out


def test_cli_protocol_errors(model_dir, capsys) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    folder, data = model_dir
    base = ["-q", "ntk", str(folder), "--width", "7", "--data", str(data), "--n", "6"]
    assert main([*base, "--protocol", "paper", "--task", "feature-extraction"]) == 2
    assert "--protocol paper" in capsys.readouterr().err
    assert main([*base, "--params", "all", "--modules", "x"]) == 2
    assert "--params modules" in capsys.readouterr().err
    assert main([*base, "--params", "modules"]) == 2
    assert main([*base, "--modules", "encoder.layer.7.output.dense"]) != 0
    assert "matches nothing" in capsys.readouterr().err
