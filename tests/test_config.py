"""Pipeline configs: every recipe validates, the committed schema is current, and every user mistake gives one
ConfigError line that names the key path, the bad value and what is allowed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from edgefuse.config.pipeline import (
    SCHEMA_COMMENT,
    PipelineConfig,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
    parse_override,
)
from edgefuse.errors import ConfigError, TargetNotFoundError

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "export_configs").glob("*.yaml"))


def _write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------ recipes, schema
def test_recipes_exist() -> None:
    names = {p.name for p in RECIPES}
    for required in ("default.yaml", "minilm-sst2-x86_64-int8.yaml", "minilm-sst2-arm64-int8.yaml",
                     "minilm-sst2-x86_64-int8-k025.yaml",
                     "smollm2-e2e-int4.yaml", "ci-check.yaml"):
        assert required in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates_and_names_its_schema(path: Path) -> None:
    assert path.read_text(encoding="utf-8").splitlines()[0] == SCHEMA_COMMENT
    cfg = load_config(path)
    assert cfg.schema_version == 1
    assert cfg.export is not None  # every recipe ships a graph


def test_committed_schema_is_current() -> None:
    from edgefuse.cli.schema import schema_text

    committed = (ROOT / "export_configs" / "schema.json").read_text(encoding="utf-8")
    assert committed == schema_text(), (
        "export_configs/schema.json is stale: edgefuse schema -o export_configs/schema.json")


def test_committed_config_reference_is_current() -> None:
    from edgefuse.cli.schema import reference_markdown

    committed = (ROOT / "docs" / "config-reference.md").read_text(encoding="utf-8")
    assert committed == reference_markdown(), (
        "docs/config-reference.md is stale: edgefuse schema --markdown -o docs/config-reference.md")


def test_schema_check_command_detects_a_stale_file(tmp_path: Path) -> None:
    from edgefuse.cli import main
    from edgefuse.cli.schema import schema_text

    good = _write(tmp_path, schema_text(), "schema.json")
    assert main(["schema", "--check", str(good)]) == 0
    stale = _write(tmp_path, schema_text().replace('"keep_ratio"', '"keep_fraction"'), "stale.json")
    assert main(["schema", "--check", str(stale)]) == 2
    out = tmp_path / "written.json"
    assert main(["schema", "--output", str(out)]) == 0
    assert out.read_text() == schema_text()


def test_schema_forbids_unknown_keys_everywhere() -> None:
    from edgefuse.config.pipeline import json_schema

    schema = json_schema()
    assert schema["additionalProperties"] is False
    for name, sub in schema["$defs"].items():
        if sub.get("type") == "object" and "properties" in sub:
            assert sub.get("additionalProperties") is False, name


def test_dump_round_trips(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "export_configs" / "default.yaml", ["fusion.keep_ratio=0.25"])
    text = dump_config(cfg)
    assert text.startswith(SCHEMA_COMMENT)
    again = load_config(_write(tmp_path, text))
    assert again == cfg


# ------------------------------------------------------------------------------------------------ error messages
def test_unknown_key_names_the_path_the_allowed_keys_and_a_suggestion() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"schema_version": 1, "fusion": {"keep_ratoi": 0.5}})
    msg = str(exc.value)
    assert "unknown key 'fusion.keep_ratoi'" in msg
    assert "did you mean 'keep_ratio'" in msg
    assert "allowed keys in fusion: method, keep_ratio" in msg
    assert "\n" not in msg


def test_unknown_top_level_key() -> None:
    with pytest.raises(ConfigError,
                       match=r"unknown key 'quantise' \(did you mean 'quantize'\?\); allowed keys in the top level"):
        config_from_dict({"schema_version": 1, "quantise": {}})


def test_wrong_type_names_path_and_value() -> None:
    with pytest.raises(ConfigError, match=r"fusion.keep_ratio: 'half' is not allowed: Input should be a valid number"):
        config_from_dict({"schema_version": 1, "fusion": {"keep_ratio": "half"}})
    with pytest.raises(ConfigError, match=r"fusion: expected a section \(a mapping of keys\), got 0.5"):
        config_from_dict({"schema_version": 1, "fusion": 0.5})


def test_bad_value_names_the_allowed_values() -> None:
    with pytest.raises(ConfigError,
                       match=r"fusion.keep_ratio: 1.5 is not allowed: Input should be less than or equal to 1"):
        config_from_dict({"schema_version": 1, "fusion": {"keep_ratio": 1.5}})
    with pytest.raises(ConfigError,
                       match=r"model.task: 'embedding' is not allowed; allowed values: 'feature-extraction'"):
        config_from_dict({"schema_version": 1, "model": {"task": "embedding"}})
    with pytest.raises(ConfigError,
                       match=r"quantize.mode: 'int3' is not allowed; allowed values: 'int8', 'dynamic', 'static', "
                             r"'int8-blocks' or 'int4'"):
        config_from_dict({"schema_version": 1, "export": {}, "quantize": {"mode": "int3"}})


def test_several_errors_in_one_line() -> None:
    with pytest.raises(ConfigError) as exc:
        config_from_dict({"schema_version": 1, "fusion": {"keep_ratio": 2, "seed": "x"}, "bogus": 1})
    msg = str(exc.value)
    assert "fusion.keep_ratio" in msg and "fusion.seed" in msg and "'bogus'" in msg and "\n" not in msg


def test_schema_version_missing_or_unknown() -> None:
    with pytest.raises(ConfigError, match=r"schema_version is missing; add `schema_version: 1`"):
        config_from_dict({"fusion": {"keep_ratio": 0.5}})
    with pytest.raises(ConfigError, match=r"schema_version 2 is not supported; this edgefuse reads schema_version 1"):
        config_from_dict({"schema_version": 2})


def test_not_a_mapping_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="the top level must be a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"not valid YAML at line 3, column 1: expected the node content"):
        load_config(_write(tmp_path, "schema_version: 1\nfusion: {keep_ratio: [\n"))
    with pytest.raises(TargetNotFoundError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="schema_version is missing"):
        load_config(_write(tmp_path, "# empty\n"))


def test_yaml_is_read_safely(tmp_path: Path) -> None:
    # a Python object tag is refused by yaml.safe_load (never instantiated)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path, "schema_version: 1\nrun_dir: !!python/object/apply:os.getcwd []\n"))


def test_cross_section_checks() -> None:
    with pytest.raises(ConfigError, match="search needs a fusion section"):
        config_from_dict({"schema_version": 1, "search": {"min_cosine": 0.9}})
    with pytest.raises(ConfigError, match="quantize needs an export section"):
        config_from_dict({"schema_version": 1, "quantize": {}})
    with pytest.raises(ConfigError, match="finetune needs a data section"):
        config_from_dict({"schema_version": 1, "finetune": {"max_steps": 2, "task_weight": 0, "hidden_weight": 1}})
    with pytest.raises(ConfigError, match="max_latency_ratio need a profile section"):
        config_from_dict({"schema_version": 1, "export": {}, "check": {"candidate": "fp32",
                                                                        "budgets": {"max_latency_ratio": 0.5}}})
    with pytest.raises(ConfigError, match=r"an accuracy budget needs model\.task 'sequence-classification'"):
        config_from_dict({"schema_version": 1, "export": {}, "check": {"candidate": "fp32",
                                                                        "budgets": {"max_accuracy_drop": 0.01}}})
    with pytest.raises(ConfigError, match="budgets sets no limit; set at least one of: max_size_mib"):
        config_from_dict({"schema_version": 1, "export": {}, "check": {"budgets": {}}})
    with pytest.raises(ConfigError, match=r"export\.task 'causal-lm' differs from model\.task 'feature-extraction'"):
        config_from_dict({"schema_version": 1, "export": {"task": "causal-lm"}})


def test_stage_tasks_default_to_the_model_task() -> None:
    cfg = config_from_dict({"schema_version": 1, "model": {"name_or_path": "smollm2", "task": "causal-lm"},
                            "export": {}, "data": {"train": "x.csv", "text_column": "ref"},
                            "finetune": {"max_steps": 1}})
    assert cfg.export.task == "causal-lm" and cfg.finetune.task == "causal-lm"


def test_recovery_phases_are_a_list_with_indexed_error_paths() -> None:
    base = {"schema_version": 1, "data": {"train": "x.tsv"}}
    cfg = config_from_dict({**base, "finetune": [
        {"max_steps": 2, "task_weight": 0, "hidden_weight": 1, "trainable": "fused-mlps"},
        {"max_steps": 3, "task_weight": 0, "hidden_weight": 1}]})
    assert [p.max_steps for p in cfg.finetune_phases] == [2, 3]
    assert config_from_dict({**base, "finetune": {"max_steps": 1, "task_weight": 0, "hidden_weight": 1}}
                            ).finetune_phases[0].max_steps == 1
    with pytest.raises(ConfigError, match=r"unknown key 'finetune\[1\]\.max_stepz' \(did you mean 'max_steps'\?\)"):
        config_from_dict({**base, "finetune": [{"max_steps": 1, "task_weight": 0, "hidden_weight": 1},
                                               {"max_stepz": 2}]})
    with pytest.raises(ConfigError, match=r"unknown key 'finetune\.max_stepz'"):  # a single section: no index
        config_from_dict({**base, "finetune": {"max_stepz": 2}})
    with pytest.raises(ConfigError, match=r"finetune: expected a section \(a mapping of keys\) or a list of sections"):
        config_from_dict({**base, "finetune": 3})
    with pytest.raises(ConfigError, match="finetune is an empty list"):
        config_from_dict({**base, "finetune": []})


# ------------------------------------------------------------------------------------------------ --set overrides
def test_override_values_are_typed_yaml() -> None:
    assert parse_override("fusion.keep_ratio=0.25") == (["fusion", "keep_ratio"], 0.25)
    assert parse_override("fusion.layers=[1, 2]") == (["fusion", "layers"], [1, 2])
    assert parse_override("quantize=null") == (["quantize"], None)
    assert parse_override("model.name_or_path=./m") == (["model", "name_or_path"], "./m")
    assert parse_override("export.with_past=false") == (["export", "with_past"], False)


def test_overrides_create_sections_and_apply(tmp_path: Path) -> None:
    path = _write(tmp_path, "schema_version: 1\nfusion: {keep_ratio: 0.5}\n")
    cfg = load_config(path, ["fusion.keep_ratio=0.25", "fusion.layers=[0, 1]", "export.opset=17"])
    assert cfg.fusion.keep_ratio == 0.25 and cfg.fusion.layers == [0, 1] and cfg.export.opset == 17
    assert load_config(path, ["fusion=null"]).fusion is None


def test_bad_overrides() -> None:
    with pytest.raises(ConfigError, match=r"is not of the form dotted\.key=value"):
        parse_override("fusion.keep_ratio")
    with pytest.raises(ConfigError, match="is not of the form"):
        parse_override("fusion..keep_ratio=1")
    with pytest.raises(ConfigError, match="the value is not valid YAML"):
        parse_override("fusion.layers=[1, 2")
    with pytest.raises(ConfigError, match=r"'fusion\.keep_ratio' is 0\.5, not a section with keys"):
        apply_overrides({"fusion": {"keep_ratio": 0.5}}, ["fusion.keep_ratio.x=1"])


def test_override_with_an_unknown_key_names_it(tmp_path: Path) -> None:
    path = _write(tmp_path, "schema_version: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'fusion.keepratio' \(did you mean 'keep_ratio'\?\)"):
        load_config(path, ["fusion.keepratio=0.3"])


def test_cli_reports_config_errors_with_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main

    path = _write(tmp_path, "schema_version: 1\nfusion: {keep_ratio: 0.5, bogus: 1}\n")
    assert main(["run", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("edgefuse: error: ") and "unknown key 'fusion.bogus'" in err
    assert main(["run", str(tmp_path / "missing.yaml")]) == 3
    assert main(["run", str(path), "--set", "nonsense"]) == 2


def test_resolved_config_has_every_section() -> None:
    data = yaml.safe_load(dump_config(PipelineConfig(schema_version=1)))
    assert set(data) == set(PipelineConfig.model_fields)


def test_data_sources_fall_back_to_the_bundled_sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A list of data sources: the first readable one; offline, an hf: source is skipped; the SST-2 recipes end
    with the sample that ships with edgefuse, so they run from a clone without any data."""
    from edgefuse.config.finetune import DataConfig
    from edgefuse.finetune.data import read_records

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mine = tmp_path / "mine.tsv"
    sample = "edgefuse/data/sst2-sample/train.tsv"
    assert DataConfig(train=[str(mine), "hf:glue:sst2@train", sample]).train == sample
    mine.write_text("sentence\tlabel\ngood\t1\n")
    assert DataConfig(train=[str(mine), "hf:glue:sst2@train", sample]).train == str(mine)
    rows = read_records(sample)
    assert len(rows) >= 40 and {str(r["label"]) for r in rows} == {"0", "1"}
    with pytest.raises(ValueError, match="list of data sources"):
        DataConfig(train=[])


def test_bad_config_values_raise_edgefusess_config_error_everywhere(tmp_path: Path) -> None:
    """Constructing a config, or passing a mapping to any API function, fails with ConfigError (exit code 2, one
    line naming the key and the value), which is still a pydantic ValidationError for code that expects one."""
    from pydantic import ValidationError

    import edgefuse
    from edgefuse.config.export import ExportConfig
    from edgefuse.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        ExportConfig(opset="x")
    assert isinstance(exc.value, ValidationError) and exc.value.exit_code == 2
    assert str(exc.value) == ("ExportConfig: opset: 'x' is not allowed: Input should be a valid integer, unable to "
                              "parse string as an integer")
    # the API functions take their config the same way: an instance, a mapping of its keys, or None
    with pytest.raises(ConfigError, match="runs"):
        edgefuse.profile_onnx([tmp_path / "none.onnx"], {"runs": 0})
    with pytest.raises(ConfigError, match="mode"):
        edgefuse.quantize_onnx(tmp_path, {"mode": "int9"})
    with pytest.raises(ConfigError, match="task"):
        edgefuse.export_onnx(object(), {"task": "translation"}, tmp_path / "out")
    with pytest.raises(ConfigError, match="expected a ProfileConfig"):
        edgefuse.profile_onnx([tmp_path / "none.onnx"], 42)  # type: ignore[arg-type]
    assert not (tmp_path / "out").exists()
    assert {"export_onnx", "profile_onnx", "quantize_onnx", "ConfigError", "convert_to_ort"} <= set(dir(edgefuse))
