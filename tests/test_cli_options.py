"""The conventions every subcommand shares: flags derived from the typed configs (choices from the Literal, help
from the field description), positionals anywhere among the options, the subcommand's own usage on an argument
error, -v/-q after the subcommand, optimum's task names, one spelling per objective and one table printer."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, get_args

import pytest
from tiny import tiny_model

from edgefuse.cli import build_parser, main
from edgefuse.cli.options import Flag, add_flags, config_from_args, fields_without_flag, flag_values, format_table
from edgefuse.config.export import ExportConfig
from edgefuse.config.finetune import OBJECTIVES, DataConfig, FinetuneConfig
from edgefuse.config.fusion import FusionConfig
from edgefuse.config.ntk import NtkConfig
from edgefuse.config.optimize import OptimizeConfig
from edgefuse.config.profile import ProfileConfig
from edgefuse.config.quantize import QuantizeConfig
from edgefuse.config.tune import TuneConfig


def _sub(name: str) -> argparse.ArgumentParser:
    parser = build_parser()
    return next(a for a in parser._actions if a.dest == "command").choices[name]


def _tables() -> list[tuple[str, type, tuple[Flag, ...]]]:
    from edgefuse.cli import export, finetune, fuse, ntk, optimize, profile, quantize, tune

    return [
        ("fuse", FusionConfig, fuse.WIDTH_FLAGS + fuse.FUSE_FLAGS),
        ("quantize", QuantizeConfig, quantize.QUANTIZE_FLAGS),
        ("export", ExportConfig, export.EXPORT_FLAGS),
        ("finetune", FinetuneConfig, finetune.FT_FLAGS + finetune.WEIGHT_FLAGS),
        ("finetune", DataConfig, finetune.DATA_FLAGS),
        ("profile", ProfileConfig, profile.PROFILE_FLAGS),
        ("ntk", NtkConfig, ntk.NTK_FLAGS),
        ("optimize", OptimizeConfig, optimize.OPTIMIZE_FLAGS),
        ("tune", TuneConfig, tune.TUNE_FLAGS),
    ]


@pytest.mark.parametrize("command,model,flags", _tables(), ids=lambda v: getattr(v, "__name__", None))
def test_every_flag_takes_its_choices_and_help_from_the_config(command: str, model: Any, flags: Any) -> None:
    sub = _sub(command)
    by_dest = {a.dest: a for a in sub._actions}
    for flag in flags:
        action = by_dest[flag.key]
        field = model.model_fields[flag.key]
        assert field.description and action.help.startswith(field.description.replace("%", "%%")), flag.key
        literal = [a for a in get_args(field.annotation) if getattr(a, "__origin__", None) is not None] or [
            field.annotation]
        choices = next((get_args(a) for a in literal if str(a).startswith("typing.Literal")), None)
        if choices is not None:
            assert tuple(action.choices) == choices, flag.key


def test_the_keys_left_to_yaml_are_deliberate() -> None:
    from edgefuse.cli import export, finetune, fuse, optimize, quantize, tune

    assert fields_without_flag(FusionConfig, fuse.WIDTH_FLAGS + fuse.FUSE_FLAGS) == []
    assert fields_without_flag(QuantizeConfig, quantize.QUANTIZE_FLAGS) == []
    # own options: --task (optimum aliases), --validate-shape (pairs), --format ort
    assert fields_without_flag(ExportConfig, export.EXPORT_FLAGS) == ["task", "validate_shapes", "ort"]
    assert set(fields_without_flag(FinetuneConfig, finetune.FT_FLAGS + finetune.WEIGHT_FLAGS)) == {
        "task", "no_decay_bias_and_norm", "adam_beta1", "adam_beta2", "adam_epsilon", "sample_max_new_tokens"}
    assert set(fields_without_flag(DataConfig, finetune.DATA_FLAGS)) == {"prompt_separator", "seed"}
    # own option: --fusions (a list of names or one keyword); validate_shapes (pairs) and seed: YAML only
    assert fields_without_flag(OptimizeConfig, optimize.OPTIMIZE_FLAGS) == ["fusions", "validate_shapes", "seed"]
    # own options: --candidates (names from the default set), --ssh-identity/--ssh-known-hosts (profile_settings)
    assert set(fields_without_flag(TuneConfig, tune.TUNE_FLAGS)) == {
        "candidates", "min_rounds", "warmup_runs", "calibration_samples", "max_sequence_length", "eval_samples",
        "profile_settings", "output_name", "seed"}


def test_config_from_args_file_then_flags_then_extra(tmp_path: Path) -> None:
    from edgefuse.cli import tune
    from edgefuse.errors import ConfigError

    yaml_file = tmp_path / "tune.yaml"
    yaml_file.write_text("budget_s: 5\nthreads: 2\nprofile_settings: {timeout_s: 30}\n")
    args = build_parser().parse_args(["tune", "x", "--config", str(yaml_file), "--threads", "3",
                                      "--ssh-known-hosts", "kh"])
    cfg = tune._config(args)
    assert (cfg.budget_s, cfg.threads) == (5.0, 3)  # the flag wins over the file, the file over the default
    assert cfg.profile_settings == {"timeout_s": 30, "ssh_known_hosts_file": "kh"}  # merged, not replaced
    yaml_file.write_text("budget_s: 5\nthreds: 2\n")
    with pytest.raises(ConfigError, match=r"^tune: unknown key 'threds' \(did you mean 'threads'\?\)") as info:
        config_from_args(args, tune.TuneConfig, tune.TUNE_FLAGS, section="tune")
    assert "\n" not in str(info.value)


def test_flag_values_are_config_keys_and_unset_flags_are_absent() -> None:
    parser = argparse.ArgumentParser()
    flags = (Flag("method"), Flag("layers"), Flag("include_shared_experts", "--no-shared", negate=True))
    add_flags(parser, FusionConfig, flags)
    assert flag_values(parser.parse_args([]), flags) == {}
    got = flag_values(parser.parse_args(["--layers", "1", "2", "--no-shared"]), flags)
    assert got == {"layers": [1, 2], "include_shared_experts": False}
    with pytest.raises(SystemExit):
        parser.parse_args(["--method", "kmeans"])  # not in FusionMethod
    with pytest.raises(KeyError):
        add_flags(parser, FusionConfig, (Flag("no_such_key"),))


def test_positionals_anywhere_among_the_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = build_parser().parse_args(["fuse", "minilm", "--keep-ratio", "0.5", "out/x", "--method", "prune"])
    assert (args.model, args.out_dir, args.keep_ratio, args.method) == ("minilm", "out/x", 0.5, "prune")
    args = build_parser().parse_args(["quantize", "--mode", "int4", "exported/", "--block-size", "64"])
    assert (args.export_dir, args.mode, args.block_size) == ("exported/", "int4", 64)
    # the command of the issue report, end to end
    model = tmp_path / "bert"
    tiny_model("bert").save_pretrained(model, safe_serialization=True)
    assert main(["fuse", str(model), "--keep-ratio", "0.5", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "config.json").is_file()


@pytest.mark.parametrize("argv,message", [
    (["fuse", "minilm"], "one of the arguments --keep-ratio --width is required"),
    (["fuse", "minilm", "out", "--keep-ratio", "0.5", "extra"], "unrecognized arguments: extra"),
    (["quantize", "x", "--mode", "int2"], "argument --mode: invalid choice: 'int2'"),
    (["export", "m", "o", "--task", "translation"], "argument --task: invalid choice: 'translation'"),
])
def test_an_argument_error_prints_the_subcommand_usage(argv: list[str], message: str,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    # one line that names the subcommand and its --help (not the top-level usage)
    assert err.startswith(f"edgefuse {argv[0]}: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert f"see edgefuse {argv[0]} --help" in err


def test_verbosity_after_the_subcommand() -> None:
    parse = build_parser().parse_args
    base = ["fuse", "m", "o", "--keep-ratio", "0.5"]
    assert (parse(base).verbose, parse(base).quiet) == (0, False)
    assert parse([*base, "-v"]).verbose == 1 and parse([*base, "-vv"]).verbose == 2
    assert parse(["-v", *base]).verbose == 1  # before the subcommand, as before
    assert parse([*base, "-q"]).quiet is True and parse(["run", "c.yaml", "--quiet"]).quiet is True


@pytest.mark.parametrize("alias,task,with_past", [
    ("text-classification", "sequence-classification", True),
    ("feature-extraction", "feature-extraction", True),
    ("text-generation", "causal-lm", False),
    ("text-generation-with-past", "causal-lm", True),
])
def test_optimum_task_names_are_accepted(alias: str, task: str, with_past: bool) -> None:
    from edgefuse.cli.export import _config

    args = build_parser().parse_args(["export", "m", "o", "--task", alias])
    cfg = _config(args)
    assert cfg.task == task and cfg.with_past is with_past
    assert build_parser().parse_args(["fuse", "m", "--keep-ratio", "0.5", "--task", alias]).task == task
    assert build_parser().parse_args(["ntk", "m", "--data", "d.tsv", "--task", alias]).task == task
    assert build_parser().parse_args(["finetune", "m", "o", "--task", alias]).task == task


def test_objectives_are_spelled_one_way(tmp_path: Path) -> None:
    from edgefuse.cli.finetune import build_configs

    parse = build_parser().parse_args
    base = ["finetune", "m", "o", "--train", "t.tsv", "--max-steps", "1"]
    ft, _ = build_configs(parse([*base, "--objective", "task", "--objective", "logits", "--teacher", "t"]))
    assert (ft.task_weight, ft.logits_weight, ft.hidden_weight) == (1.0, 1.0, 0.0)
    old, _ = build_configs(parse([*base, "--objective", "task", "--objective", "distill-logits", "--teacher", "t"]))
    assert old == ft  # edgefuse 0.1's spelling still reads the same
    ft, _ = build_configs(parse([*base, "--objective", "hidden", "--hidden-weight", "0.5", "--task-weight", "3"]))
    assert (ft.task_weight, ft.logits_weight, ft.hidden_weight) == (0.0, 0.0, 0.5)
    assert list(OBJECTIVES) == ["task", "logits", "hidden"]
    assert all(key in FinetuneConfig.model_fields for key in OBJECTIVES.values())


def test_one_table_printer() -> None:
    table = format_table([("a", "1"), ("bbb", "22"), ("total", "23")], header=("name", "n"), rules=(1,),
                         right=(1,))
    assert table.splitlines() == [
        "name    n",
        "-----  --",
        "a       1",
        "bbb    22",
        "-----  --",
        "total  23",
    ]
    assert format_table([]) == ""
