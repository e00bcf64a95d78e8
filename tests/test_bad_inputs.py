"""Bad inputs and faults a user can cause: each gives one stderr line, its documented exit code, no traceback,
and leaves the file system as it was (nothing edgefuse did not write is deleted, nothing half-written remains).

Calls go through ``edgefuse.cli.main([...])`` in-process; models are the tiny BERT of ``pipeline_tiny``.
"""

from __future__ import annotations

import errno
import json
import os
import struct
import time
from pathlib import Path

import pytest
import yaml
from pipeline_tiny import FAST_PROFILE, base_config, save_tiny_bert, write_tsv
from tolerances import FILES_TEST_MIN_COSINE, QUANT_TINY_MIN_COSINE

from edgefuse.cli import main
from edgefuse.errors import EXIT_CODES, OutputExistsError
from edgefuse.io_utils import MARKER, atomic_dir, read_yaml, write_json_atomic, write_text_atomic

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest.one_thread

CONFIG, NOT_FOUND, UNSUPPORTED, DATA = 2, 3, 4, 6
QUANT, PROFILE, EXISTS, WRITE = 8, 9, 12, 13
SHAPES = ("--validate-shape", "1", "5", "--validate-shape", "2", "7")
DISTILL = {"task_weight": 0.0, "hidden_weight": 1.0, "max_steps": 1}
BOMB = 'a: &a ["x","x","x","x","x","x","x","x","x"]\n' + "".join(
    f"{c}: &{c} [" + ",".join([f"*{p}"] * 9) + "]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


def call(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str]:
    """Run the CLI; return (exit code, the stderr line), asserting stderr is exactly one line, no traceback."""
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("edgefuse"), err
    return code, lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (what must be unchanged after a refused call)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".partial" in p.name]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("m") / "bert")


@pytest.fixture(scope="module")
def export_dir(bert: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("e") / "onnx"
    assert main(["export", str(bert), str(out), *SHAPES]) == 0
    return out


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    """A folder edgefuse did not write, with a file a user cares about."""
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    return folder


# ------------------------------------------------------------------------ data loss: --overwrite (exit 12)
@pytest.mark.parametrize("command", ["fuse", "export"])
def test_overwrite_refuses_a_folder_edgefuse_did_not_write(command, bert, project, capsys) -> None:
    before = snapshot(project)
    extra = ["--keep-ratio", "0.5"] if command == "fuse" else []
    code, line = call(capsys, command, bert, project, *extra, "--overwrite")
    assert code == EXISTS and "did not write it" in line and MARKER in line
    assert snapshot(project) == before


def test_report_overwrite_refuses_unmarked(tmp_path, project, capsys) -> None:
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"graphs": []}))
    before = snapshot(project)
    code, line = call(capsys, "report", result, "--out", project, "--overwrite")
    assert code == EXISTS and "did not write it" in line
    assert snapshot(project) == before


def test_profile_overwrite_refuses_unmarked_before_timing(export_dir, project, capsys) -> None:
    before = snapshot(project)
    t0 = time.perf_counter()
    code, line = call(capsys, "profile", export_dir / "model.onnx", "--out", project, "--overwrite")
    assert code == EXISTS and "did not write it" in line
    assert time.perf_counter() - t0 < 5  # refused before any graph was timed
    assert snapshot(project) == before


def test_overwrite_refuses_the_input_folder_itself(bert, capsys) -> None:
    before = snapshot(bert)
    code, line = call(capsys, "fuse", bert, bert, "--keep-ratio", "0.5", "--overwrite")
    assert code == EXISTS and "holds the input" in line
    assert snapshot(bert) == before


def test_overwrite_refuses_a_folder_that_contains_the_input(bert, capsys) -> None:
    parent = bert.parent
    (parent / MARKER).write_text("{}")  # even a marked folder is refused when it holds the input
    try:
        before = snapshot(parent)
        code, line = call(capsys, "export", bert, parent, "--overwrite")
        assert code == EXISTS and "holds the input" in line
        assert snapshot(parent) == before
    finally:
        (parent / MARKER).unlink()


@pytest.mark.parametrize("out", [".", ".."])
@pytest.mark.parametrize("overwrite", [False, True])
def test_dot_and_dotdot_are_never_outputs(out, overwrite, bert, tmp_path, monkeypatch, capsys) -> None:
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / "keep.txt").write_text("x")
    monkeypatch.chdir(work)
    code, line = call(capsys, "export", bert, out, *(["--overwrite"] if overwrite else []))
    assert code == EXISTS and "not a new folder" in line
    assert (work / "keep.txt").read_text() == "x"


def test_root_is_never_replaced(bert, capsys) -> None:
    code, _ = call(capsys, "export", bert, "/", "--overwrite")
    assert code == EXISTS
    assert Path("/").is_dir()


def test_home_is_never_replaced(bert, tmp_path, monkeypatch, capsys) -> None:
    home = tmp_path / "home"
    home.mkdir()
    (home / MARKER).write_text("{}")  # even a home folder that looks like an output
    (home / ".bashrc").write_text("x")
    monkeypatch.setenv("HOME", str(home))
    code, line = call(capsys, "export", bert, home, "--overwrite")
    assert code == EXISTS and "home folder" in line
    assert (home / ".bashrc").is_file()


def test_current_folder_is_never_replaced(bert, tmp_path, monkeypatch, capsys) -> None:
    work = tmp_path / "w"
    work.mkdir()
    (work / MARKER).write_text("{}")
    monkeypatch.chdir(work)
    code, line = call(capsys, "export", bert, str(work), "--overwrite")
    assert code == EXISTS and "current folder" in line


def test_symlinked_output_folder_is_refused(bert, tmp_path, project, capsys) -> None:
    link = tmp_path / "link"
    link.symlink_to(project)
    before = snapshot(project)
    code, line = call(capsys, "fuse", bert, link, "--keep-ratio", "0.5", "--overwrite")
    assert code == EXISTS and "symlink" in line
    assert snapshot(project) == before and link.is_symlink()


def test_existing_output_is_reported_before_the_model_loads(bert, project, monkeypatch, capsys) -> None:
    import edgefuse.models

    def boom(*a, **k):
        raise AssertionError("the model was loaded before the output check")

    monkeypatch.setattr(edgefuse.models, "load_model", boom)
    code, line = call(capsys, "export", bert, project)
    assert code == EXISTS and "--overwrite" in line


def test_a_marked_output_is_replaced_whole(bert, tmp_path, capsys) -> None:
    out = tmp_path / "fused"
    assert main(["fuse", str(bert), str(out), "--keep-ratio", "0.5"]) == 0
    assert (out / MARKER).is_file()
    (out / "stale.txt").write_text("old")
    assert main(["fuse", str(bert), str(out), "--keep-ratio", "0.25", "--overwrite"]) == 0
    capsys.readouterr()
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert no_partials(tmp_path)


# ------------------------------------------------------------------------------- atomic folders and files
def test_rename_fails_when_the_target_appeared_meanwhile(tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while edgefuse was writing"), atomic_dir(out) as tmp:
        (tmp / "mine.txt").write_text("mine")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    assert sorted(p.name for p in out.iterdir()) == ["theirs.txt"]
    assert no_partials(tmp_path)


def test_rename_does_not_replace_an_empty_folder_that_appeared(tmp_path) -> None:
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError), atomic_dir(out) as tmp:
        (tmp / "mine.txt").write_text("mine")
        out.mkdir()  # os.rename would silently replace an empty folder
    assert list(out.iterdir()) == [] and no_partials(tmp_path)


def test_a_killed_runs_partial_folder_is_cleaned_by_the_next_run(tmp_path) -> None:
    out = tmp_path / "out"
    stale = tmp_path / ".out.abc123.partial"
    stale.mkdir()
    write_json_atomic(stale / MARKER, {"written_by": "edgefuse", "pid": 2**22 + 12345})  # no such process
    foreign = tmp_path / ".out.zzz.partial"  # same pattern, not ours: never deleted
    foreign.mkdir()
    with atomic_dir(out) as tmp:
        (tmp / "a").write_text("x")
    assert not stale.exists() and foreign.is_dir() and (out / "a").is_file()


def test_a_failure_leaves_neither_output_nor_partial(tmp_path) -> None:
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "half.onnx").write_bytes(b"x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_symlink_is_never_written_through(tmp_path) -> None:
    outside = tmp_path / "outside.txt"
    outside.write_text("precious")
    link = tmp_path / "folder" / "report.json"
    link.parent.mkdir()
    link.symlink_to(outside)
    with pytest.raises(OutputExistsError, match="symlink"):
        write_text_atomic(link, "overwritten")
    assert outside.read_text() == "precious"


def test_outputs_follow_the_umask_not_0600(bert, tmp_path) -> None:
    old = os.umask(0o022)
    try:
        out = tmp_path / "fused"
        assert main(["fuse", str(bert), str(out), "--keep-ratio", "0.5"]) == 0
        write_json_atomic(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    for path in (out / "model.safetensors", out / "config.json", out / MARKER, tmp_path / "r.json"):
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert out.stat().st_mode & 0o777 == 0o755


# ------------------------------------------------------------------------------------ quantize outputs
def test_quantize_out_dir_failure_leaves_nothing(export_dir, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    before = snapshot(export_dir)
    code, _ = call(capsys, "quantize", export_dir, "--out-dir", out, "--exclude", "re:.", "--preset", "arm64")
    assert code in (NOT_FOUND, QUANT)  # every node excluded: nothing to quantize
    assert not out.exists() and no_partials(tmp_path)
    assert snapshot(export_dir) == before


def test_quantize_out_dir_must_be_an_edgefuse_folder(export_dir, project, capsys) -> None:
    before = snapshot(project)
    code, line = call(capsys, "quantize", export_dir, "--out-dir", project, "--preset", "arm64")
    assert code == EXISTS and "did not write it" in line
    assert snapshot(project) == before


def test_quantize_existing_graph_is_refused_before_work(export_dir, tmp_path, capsys) -> None:
    out = tmp_path / "q"
    assert main(["quantize", str(export_dir), "--out-dir", str(out), "--preset", "arm64"]) == 0
    capsys.readouterr()
    assert (out / MARKER).is_file() and (out / "model.onnx").is_file()
    code, line = call(capsys, "quantize", export_dir, "--out-dir", out, "--preset", "arm64")
    assert code == EXISTS and "--overwrite" in line


def test_static_quantize_never_writes_into_the_export_folder(export_dir, tmp_path, capsys) -> None:
    """onnxruntime writes <graph>-inferred.onnx beside its input: a planted symlink there must stay untouched,
    and a read-only export folder works because nothing is written into it."""
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    planted = export_dir / "model-inferred.onnx"
    planted.symlink_to(victim)
    try:
        before = snapshot(export_dir)
        out = tmp_path / "q"
        assert main(["quantize", str(export_dir), "--mode", "static", "--out-dir", str(out), "--preset", "arm64",
                     "--min-cosine", str(FILES_TEST_MIN_COSINE)]) == 0
        capsys.readouterr()
        assert victim.read_text() == "precious"
        assert snapshot(export_dir) == before  # not one byte written into the export folder
        assert (out / "model.onnx").is_file() and no_partials(out)
    finally:
        planted.unlink()


def test_quantize_missing_calibration_data_fails_before_work(export_dir, tmp_path, capsys) -> None:
    code, line = call(capsys, "quantize", export_dir, "--out-dir", tmp_path / "q", "--calibration-data",
                      tmp_path / "nope.tsv", "--preset", "arm64")
    assert code == NOT_FOUND and "nope.tsv" in line
    assert not (tmp_path / "q").exists()


def test_quantize_non_utf8_calibration_data(export_dir, tmp_path, capsys) -> None:
    data = tmp_path / "latin1.tsv"
    data.write_bytes("sentence\ncaf\xe9 cr\xe8me\n".encode("latin-1"))
    code, line = call(capsys, "quantize", export_dir, "--out-dir", tmp_path / "q", "--calibration-data", data,
                      "--preset", "arm64")
    assert code == DATA and "not UTF-8" in line
    assert not (tmp_path / "q").exists()


# ---------------------------------------------------------------------------------- the last line of defence
def test_an_unexpected_exception_is_one_line_and_exit_1(monkeypatch, tmp_path, capsys) -> None:
    import edgefuse.cli.report as report

    def bug(args):
        raise ZeroDivisionError("division by zero\nsecond line")

    monkeypatch.setattr(report, "run", bug)
    code, line = call(capsys, "report", tmp_path / "x.json", "--out", tmp_path / "o")
    assert code == 1 and "ZeroDivisionError" in line and "run with -vv for the traceback" in line


def test_vv_shows_the_traceback(monkeypatch, tmp_path, capsys) -> None:
    import edgefuse.cli.report as report

    monkeypatch.setattr(report, "run", lambda args: 1 / 0)
    assert main(["-vv", "report", str(tmp_path / "x.json"), "--out", str(tmp_path / "o")]) == 1
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(("err", "needle"), [(errno.ENOSPC, "no space left"), (errno.EROFS, "read-only"),
                                             (errno.EACCES, "permission denied")])
def test_io_failures_are_exit_13_with_the_path(err, needle, monkeypatch, tmp_path, capsys) -> None:
    import edgefuse.io_utils as io_utils

    def fail(fd):
        raise OSError(err, os.strerror(err), str(tmp_path / "o" / "report.json"))

    monkeypatch.setattr(io_utils.os, "fsync", fail)
    result = tmp_path / "r.json"
    result.write_text(json.dumps({"graphs": []}))
    code, line = call(capsys, "report", result, "--out", tmp_path / "o", "--formats", "json")
    assert code == WRITE == EXIT_CODES["OutputWriteError"] and needle in line and "report.json" in line
    assert not (tmp_path / "o").exists() and no_partials(tmp_path)


def test_ctrl_c_is_130_and_one_line(monkeypatch, tmp_path, capsys) -> None:
    import edgefuse.cli.report as report

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(report, "run", interrupted)
    code, line = call(capsys, "report", tmp_path / "x.json", "--out", tmp_path / "o")
    assert code == 130 and "interrupted" in line


def test_argument_errors_are_exit_2_without_traceback(capsys) -> None:
    """A command-line mistake: the subcommand's usage (tests/test_cli_options.py), then one error line; exit 2."""
    with pytest.raises(SystemExit) as info:
        main(["fuse", "minilm", "out", "--keep-ratio", "half"])
    err = capsys.readouterr().err
    assert info.value.code == CONFIG and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("edgefuse fuse: error: argument --keep-ratio")


def test_an_unknown_command_is_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as info:
        main(["fusee", "minilm"])
    err = capsys.readouterr().err
    assert info.value.code == CONFIG and len(err.strip().splitlines()) == 1 and "fusee" in err


def _check_config(tmp_path: Path, bert: Path) -> Path:
    raw = base_config(bert, run_dir=str(tmp_path / "run"), export={"validate_shapes": [[1, 5], [2, 7]]},
                      profile=FAST_PROFILE, check={"candidate": "fp32", "budgets": {"max_size_mib": 5}})
    path = tmp_path / "check.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path


def test_check_junit_on_an_unexpected_exception(bert, tmp_path, monkeypatch, capsys) -> None:
    import xml.etree.ElementTree as ET

    import edgefuse.check.api

    def bug(*a, **k):
        raise KeyError("internal")

    monkeypatch.setattr(edgefuse.check.api, "run_check", bug)
    junit = tmp_path / "j.xml"
    code, line = call(capsys, "check", _check_config(tmp_path, bert), "--junit", junit)
    assert code == 1 and "-vv" in line
    error = ET.parse(junit).getroot().find("testsuite/testcase/error")
    assert error is not None and error.get("type") == "KeyError"


def test_check_junit_on_a_config_error(tmp_path, capsys) -> None:
    import xml.etree.ElementTree as ET

    bad = tmp_path / "bomb.yaml"
    bad.write_text(BOMB)
    junit = tmp_path / "j.xml"
    code, line = call(capsys, "check", bad, "--junit", junit)
    assert code == CONFIG and "alias bomb" in line
    assert ET.parse(junit).getroot().find("testsuite/testcase/error").get("type") == "ConfigError"


# ------------------------------------------------------------------------------------------ models (3/4)
def test_unknown_model_name_suggests_the_alias(tmp_path, capsys) -> None:
    code, line = call(capsys, "fuse", "minilmm", tmp_path / "o", "--keep-ratio", "0.5")
    assert code == NOT_FOUND and "did you mean 'minilm'" in line and "offline" in line
    assert not (tmp_path / "o").exists()


def test_unreachable_hub_id_is_one_line(tmp_path, capsys) -> None:
    code, line = call(capsys, "export", "nobody/no-such-model", tmp_path / "o")
    assert code == NOT_FOUND and "nobody/no-such-model" in line


def _model_copy(bert: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for f in bert.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.mark.parametrize(
    ("damage", "code", "needle"),
    [
        ("no_config", NOT_FOUND, "has no config.json"),
        ("config_not_json", NOT_FOUND, "not valid JSON"),
        ("config_not_utf8", NOT_FOUND, "not valid JSON"),
        ("config_a_list", NOT_FOUND, "model_type"),
        ("unknown_type", UNSUPPORTED, "'bertt'"),
        ("empty_safetensors", NOT_FOUND, "truncated or damaged"),
        ("truncated_safetensors", NOT_FOUND, "truncated or damaged"),
        ("garbage_safetensors", NOT_FOUND, "truncated or damaged"),
        ("bin_only", NOT_FOUND, "never unpickles"),
        ("no_weights", NOT_FOUND, "no *.safetensors"),
        ("remote_code", UNSUPPORTED, "--trust-remote-code"),
    ],
)
def test_damaged_model_folders(damage, code, needle, bert, tmp_path, monkeypatch, capsys) -> None:
    import torch

    folder = _model_copy(bert, tmp_path)
    cfg_path, weights = folder / "config.json", folder / "model.safetensors"
    config = json.loads(cfg_path.read_text())
    if damage == "no_config":
        cfg_path.unlink()
    elif damage == "config_not_json":
        cfg_path.write_text("{model_type: bert")
    elif damage == "config_not_utf8":
        cfg_path.write_bytes(b'{"model_type": "b\xe9rt"}')
    elif damage == "config_a_list":
        cfg_path.write_text("[1, 2]")
    elif damage == "unknown_type":
        cfg_path.write_text(json.dumps({**config, "model_type": "bertt"}))
    elif damage == "empty_safetensors":
        weights.write_bytes(b"")
    elif damage == "truncated_safetensors":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "garbage_safetensors":
        weights.write_bytes(struct.pack("<Q", 20) + b"not json at all....." + b"\0" * 10)
    elif damage == "bin_only":
        weights.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"\x80\x04pickle that must never be loaded")

        def never(*a, **k):
            raise AssertionError("torch.load was called")

        monkeypatch.setattr(torch, "load", never)
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "remote_code":
        cfg_path.write_text(json.dumps({**config, "model_type": "my-custom",
                                        "auto_map": {"AutoModel": "modeling_custom.CustomModel"}}))
        (folder / "modeling_custom.py").write_text("raise SystemExit('remote code ran')\n")
    got, line = call(capsys, "fuse", folder, tmp_path / "o", "--keep-ratio", "0.5")
    assert got == code and needle in line
    assert not (tmp_path / "o").exists()


def test_model_path_that_is_a_file(bert, capsys, tmp_path) -> None:
    code, line = call(capsys, "fuse", bert / "config.json", tmp_path / "o", "--keep-ratio", "0.5")
    assert code == NOT_FOUND and "is a file" in line


def test_width_larger_than_the_mlp_is_a_config_error(bert, tmp_path, capsys) -> None:
    code, line = call(capsys, "fuse", bert, tmp_path / "o", "--width", "100000")
    assert code == CONFIG and "100000" in line and "nothing would be compressed" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------- configs (2)
@pytest.mark.parametrize("command", ["run", "check", "quantize", "finetune", "profile"])
def test_alias_bomb_is_refused_fast(command, export_dir, bert, tmp_path, capsys) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    args = {"run": ["run", bomb], "check": ["check", bomb],
            "quantize": ["quantize", export_dir, "--config", bomb],
            "finetune": ["finetune", bert, tmp_path / "ft", "--config", bomb],
            "profile": ["profile", export_dir / "model.onnx", "--config", bomb]}[command]
    t0 = time.perf_counter()
    code, line = call(capsys, *args)
    assert time.perf_counter() - t0 < 1.0
    assert code == CONFIG and "alias bomb" in line


def test_oversized_config_is_refused_fast(tmp_path, capsys) -> None:
    big = tmp_path / "big.yaml"
    big.write_text("a: [" + ",".join(["1"] * 600_000) + "]\n")
    t0 = time.perf_counter()
    code, line = call(capsys, "run", big)
    assert time.perf_counter() - t0 < 1.0 and code == CONFIG and "limit" in line


def test_non_utf8_config(tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes("model:\n  name_or_path: caf\xe9\n".encode("latin-1"))
    code, line = call(capsys, "run", path)
    assert code == CONFIG and "not UTF-8" in line


def test_invalid_yaml_names_the_line(tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  name_or_path: [unclosed\n")
    code, line = call(capsys, "run", path)
    assert code == CONFIG and "not valid YAML at line" in line


def test_keep_ratio_true_is_a_config_error(bert, tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(base_config(bert, fusion={"keep_ratio": True})))
    code, line = call(capsys, "run", path, "--dry-run")
    assert code == CONFIG and "keep_ratio" in line and "boolean" in line


def test_dry_run_checks_that_data_files_exist(bert, tmp_path, capsys) -> None:
    path = tmp_path / "c.yaml"
    raw = base_config(bert, data={"train": str(tmp_path / "missing.tsv")}, finetune=DISTILL)
    path.write_text(yaml.safe_dump(raw))
    code, line = call(capsys, "run", path, "--dry-run")
    assert code == NOT_FOUND and "data.train" in line and "missing.tsv" in line


def test_read_yaml_still_reads_small_anchors(tmp_path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("base: &b {lr: 0.1}\nphase1: *b\nphase2: *b\n")
    assert read_yaml(path)["phase2"] == {"lr": 0.1}


# ---------------------------------------------------------------------------------------------- data (6)
def test_non_utf8_training_data(tmp_path) -> None:
    from edgefuse.errors import DataError
    from edgefuse.records import read_records

    path = tmp_path / "train.tsv"
    path.write_bytes("sentence\tlabel\ncaf\xe9\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_records(str(path))


def test_eval_labels_that_do_not_fit_the_head(bert, tmp_path, capsys) -> None:
    cls = tmp_path / "cls"
    assert main(["export", str(bert), str(cls), "--task", "sequence-classification", *SHAPES]) == 0
    capsys.readouterr()
    data = tmp_path / "eval.tsv"
    data.write_text("sentence\tlabel\nw1 w2\t0\nw3 w4\t7\n")
    code, line = call(capsys, "quantize", cls, "--out-dir", tmp_path / "q", "--eval-data", data, "--preset", "arm64",
                      "--min-cosine", str(FILES_TEST_MIN_COSINE))
    assert code == DATA and "[7]" in line and "2 classes" in line
    assert not (tmp_path / "q").exists()


def test_a_damaged_checkpoint_on_resume(bert, tmp_path) -> None:
    import torch

    from edgefuse.errors import TargetNotFoundError
    from edgefuse.finetune.checkpoint import STATE_FILE, load_checkpoint

    folder = tmp_path / "step-00000010"
    folder.mkdir()
    (folder / STATE_FILE).write_text('{"step": 10, "optimizer_param_groups": [')
    model = torch.nn.Linear(2, 2)
    with pytest.raises(TargetNotFoundError, match="is damaged; delete that folder"):
        load_checkpoint(folder, model, torch.optim.SGD(model.parameters(), lr=0.1), None)
    (folder / STATE_FILE).write_text('{"step": 10, "optimizer_param_groups": []}')
    (folder / "model.safetensors").write_bytes(b"\x01\x02")
    with pytest.raises(TargetNotFoundError, match="truncated or damaged"):
        load_checkpoint(folder, model, torch.optim.SGD(model.parameters(), lr=0.1), None)


# --------------------------------------------------------------------------------------------- graphs (3)
@pytest.mark.parametrize(("content", "needle"), [(b"", "is empty"), (b'{"graph": 1}', "is text"),
                                                  (b"ir_version: 8\ngraph {", "is text"),
                                                  (b"\x08\x07\x12\xff\xff\xff", "not a valid ONNX graph"),
                                                  (os.urandom(4096), "ONNX graph")])
@pytest.mark.parametrize("command", ["quantize", "profile"])
def test_corrupt_graphs(command, content, needle, tmp_path, capsys) -> None:
    graph = tmp_path / "model.onnx"
    graph.write_bytes(content)
    extra = ["--preset", "arm64"] if command == "quantize" else ["--runs", "1", "--no-memory"]
    code, line = call(capsys, command, graph, *extra)
    assert code == NOT_FOUND and str(graph) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_truncated_graph_of_an_export(export_dir, tmp_path, capsys) -> None:
    graph = tmp_path / "model.onnx"
    graph.write_bytes((export_dir / "model.onnx").read_bytes()[:3000])
    code, line = call(capsys, "profile", graph, "--runs", "1", "--no-memory")
    assert code == NOT_FOUND and "ONNX graph" in line


@pytest.mark.parametrize("command", ["quantize", "profile"])
def test_manifest_and_graph_disagree(command, export_dir, tmp_path, capsys) -> None:
    folder = _model_copy(export_dir, tmp_path)
    with open(folder / "model.onnx", "ab") as fh:
        fh.write(b"\0")
    target = folder if command == "quantize" else folder / "model.onnx"
    code, line = call(capsys, command, target, *(["--preset", "arm64"] if command == "quantize" else ["--runs", "1"]))
    assert code == NOT_FOUND and "sha256 differs" in line


@pytest.mark.parametrize("content", ["[1, 2]", '{"graphs": "nope", "environment": {}}', '"text"', "{not json",
                                     '{"kind": "profile"}', '{"kind": "variants", "rows": 5}'])
def test_report_on_json_of_the_wrong_shape(content, tmp_path, capsys) -> None:
    result = tmp_path / "r.json"
    result.write_text(content)
    code, line = call(capsys, "report", result, "--out", tmp_path / "o")
    assert code == DATA and "r.json" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------ silent passes
def _bare_copy(graph: Path, folder: Path) -> Path:
    """The graph alone (no manifest: its lineage is unknown)."""
    folder.mkdir()
    (folder / "model.onnx").write_bytes(graph.read_bytes())
    return folder / "model.onnx"


def test_profile_fails_when_nothing_could_be_compared(export_dir, bert, tmp_path, capsys) -> None:
    cls = tmp_path / "cls"
    assert main(["export", str(bert), str(cls), "--task", "sequence-classification", *SHAPES]) == 0
    capsys.readouterr()
    a = _bare_copy(export_dir / "model.onnx", tmp_path / "a")  # outputs last_hidden_state
    b = _bare_copy(cls / "model.onnx", tmp_path / "b")  # outputs logits: nothing in common
    code = main(["profile", str(a), str(b), "--runs", "1", "--warmup-runs", "0", "--threads", "1", "--seq-lens", "8",
                 "--no-memory", "--no-op-profile"])
    err = capsys.readouterr().err
    assert code == PROFILE and "nothing could be compared" in err and "Traceback" not in err


def test_profile_compares_each_graph_with_its_own_lineage(export_dir, bert, tmp_path, capsys) -> None:
    from edgefuse.config.profile import ProfileConfig
    from edgefuse.profile.api import profile_onnx

    other = tmp_path / "other"
    assert main(["fuse", str(bert), str(tmp_path / "f"), "--keep-ratio", "0.25"]) == 0
    assert main(["export", str(tmp_path / "f"), str(other), *SHAPES]) == 0
    q = tmp_path / "q"
    assert main(["quantize", str(export_dir), "--out-dir", str(q), "--preset", "arm64"]) == 0
    capsys.readouterr()
    cfg = ProfileConfig(threads=[1], sequence_lengths=[8], runs=1, warmup_runs=0, memory=False, op_profile=False,
                        min_cosine=QUANT_TINY_MIN_COSINE)
    res = profile_onnx([other / "model.onnx", export_dir / "model.onnx", q / "model.onnx"], cfg)
    rel = {g.label: (g.parity.relation, g.parity.reference_label, g.parity.passed) for g in res.graphs}
    labels = [g.label for g in res.graphs]
    assert rel[labels[1]][0] == "own fp32"
    assert rel[labels[2]][:2] == ("own fp32", labels[1])  # int8 against the fp32 it came from, not the first graph
    assert all(g.parity.min_cosine == g.parity.min_cosine for g in res.graphs)  # every graph measured


# -------------------------------------------------------------------------------------------- stale gates
def test_stage_hashes_cover_edgefuse_the_host_and_the_preset(bert, monkeypatch) -> None:
    import edgefuse.pipeline.stages as stages
    import edgefuse.pipeline.store as store
    from edgefuse.config.pipeline import config_from_dict

    cfg = config_from_dict(base_config(bert, export={}, quantize={"mode": "dynamic", "preset": "auto"},
                                       profile=FAST_PROFILE))
    by_name = {s.name: s for s in stages.STAGES}
    records = {n: store.StageRecord(n, "h", {}, {}, f"out-{n}", {}, 0.0, "", "0")
               for n in ("export", "quantize", "reference")}
    profile_inputs = stages.input_hashes(by_name["profile"], cfg, records, {})
    quant_inputs = stages.input_hashes(by_name["quantize"], cfg, records, {"data": "d"})
    assert {"edgefuse", "host"} <= set(profile_inputs) and "preset" in quant_inputs
    assert quant_inputs["preset"] != "auto"  # the preset auto resolves to on this host
    monkeypatch.setattr(store, "host_description", lambda: {"cpu_model": "Neoverse-N1", "isa_flags": ["asimddp"]})
    assert stages.input_hashes(by_name["profile"], cfg, records, {})["host"] != profile_inputs["host"]


def test_tool_hash_changes_with_the_code(monkeypatch, tmp_path) -> None:
    import edgefuse.pipeline.store as store

    before = store.tool_hash()
    fake = tmp_path / "edgefuse"
    (fake / "pipeline").mkdir(parents=True)
    (fake / "pipeline" / "store.py").write_text("x = 1\n")
    monkeypatch.setattr(store, "__file__", str(fake / "pipeline" / "store.py"))
    store.tool_hash.cache_clear()
    try:
        first = store.tool_hash()
        (fake / "quantize.py").write_text("def quantize_onnx(): return 'broken'\n")
        store.tool_hash.cache_clear()
        assert store.tool_hash() != first != before
    finally:
        store.tool_hash.cache_clear()


def test_example_workflow_has_permissions_and_uploads_real_outputs() -> None:
    text = (Path(__file__).parents[1] / "examples" / "github-actions-edgefuse-check.yml").read_text()
    flow = yaml.safe_load(text)
    assert flow["permissions"]["checks"] == "write"
    upload = next(s for s in flow["jobs"]["check"]["steps"] if s.get("uses", "").startswith("actions/upload"))
    assert "runs/ci-check/report/" not in upload["with"]["path"]
    assert "runs/ci-check/pipeline.json" in upload["with"]["path"]


# -------------------------------------------------------------------------------------- security (static)
def _package_sources() -> list[tuple[Path, str]]:
    root = Path(__file__).parents[1] / "edgefuse"
    return [(p, p.read_text(encoding="utf-8")) for p in sorted(root.rglob("*.py"))]


@pytest.mark.parametrize("pattern", [r"shell\s*=\s*True", r"os\.system\(", r"os\.popen\(", r"yaml\.load\(",
                                     r"yaml\.unsafe_load", r"pickle\.loads?\(", r"torch\.load\(",
                                     r"allow_pickle\s*=\s*True", r"(?<![.\w])eval\(", r"(?<![.\w])exec\("])
def test_no_unsafe_call_in_the_package(pattern) -> None:
    import re

    hits = [str(p) for p, text in _package_sources() if re.search(pattern, text)]
    assert hits == [], f"{pattern} in {hits}"


def test_weights_are_loaded_with_safetensors_only_and_no_remote_code_by_default() -> None:
    import inspect

    import edgefuse.models as models

    source = inspect.getsource(models.load_model)
    assert "use_safetensors=True" in source
    assert inspect.signature(models.load_model).parameters["trust_remote_code"].default is False


def test_heartbeat_instead_of_carriage_returns(monkeypatch) -> None:
    import io

    from edgefuse.progress import Heartbeat, progress_bar

    monkeypatch.setattr("sys.stderr", io.StringIO())
    bar = progress_bar(10, desc="finetune")
    assert isinstance(bar, Heartbeat)
    bar.every_s = 0.0
    bar.update(5, loss="0.1234")
    line = bar.stream.getvalue()
    assert "\r" not in line and "step 5/10 (50%)" in line and "loss 0.1234" in line and "ETA" in line


def test_keep_alive_speaks_in_logs_and_defers_to_heartbeats() -> None:
    """A long command without its own progress (export, quantize, profile) says it is alive in a CI log; a
    command whose heartbeat just printed is not doubled."""
    import io
    import time

    from edgefuse.progress import Heartbeat, keep_alive

    out = io.StringIO()
    with keep_alive("edgefuse export", stream=out, every_s=0.05):
        time.sleep(0.3)
    lines = out.getvalue().splitlines()
    assert lines and all(ln.startswith("edgefuse export: still working, elapsed ") for ln in lines)
    time.sleep(0.1)
    assert out.getvalue().splitlines() == lines  # the thread stopped with the block
    quiet = io.StringIO()
    with keep_alive("edgefuse finetune", stream=quiet, every_s=0.3):
        hb = Heartbeat(100, desc="finetune", stream=io.StringIO(), every_s=0.0)
        for _ in range(10):  # a heartbeat line every 0.05 s keeps the keep-alive quiet
            hb.update(1)
            time.sleep(0.05)
    assert quiet.getvalue() == ""
    silent = io.StringIO()
    with keep_alive("edgefuse profile", stream=silent, every_s=0.01, enabled=False):  # a terminal: tqdm's job
        time.sleep(0.05)
    assert silent.getvalue() == ""


def test_training_data_fixture_roundtrip(tmp_path) -> None:
    """The data-file check of `run` accepts a file that exists (the counterpart of the missing-file case)."""
    from edgefuse.config.pipeline import config_from_dict
    from edgefuse.pipeline.api import check_input_files

    data = write_tsv(tmp_path / "t.tsv", 4)
    check_input_files(config_from_dict(base_config(tmp_path, data={"train": str(data)}, finetune=DISTILL)))


@pytest.mark.parametrize("doc", ["README.md", "docs/cli.md"])
def test_every_exit_code_is_documented(doc) -> None:
    import re

    text = (Path(__file__).parents[1] / doc).read_text(encoding="utf-8")
    table = {int(m) for m in re.findall(r"^\| (\d+) \|", text, flags=re.MULTILINE)}
    assert set(EXIT_CODES.values()) | {0, 1, 130} <= table
    assert "OutputWriteError" in text


def test_finetune_overwrite_never_deletes_foreign_checkpoints(bert, tmp_path, capsys) -> None:
    out = tmp_path / "ft"
    (out / "checkpoints" / "my-notes").mkdir(parents=True)
    (out / "checkpoints" / "my-notes" / "n.txt").write_text("mine")
    data = write_tsv(tmp_path / "t.tsv", 8)
    code, line = call(capsys, "finetune", bert, out, "--train", data, "--task", "sequence-classification",
                      "--overwrite", "--max-steps", "1")
    assert code == EXISTS and "my-notes" in line
    assert (out / "checkpoints" / "my-notes" / "n.txt").read_text() == "mine"


def test_profile_output_check_runs_on_real_text(export_dir, capsys) -> None:
    """Graphs whose folders share a tokenizer are compared on tokenized sentences, not random ids."""
    from edgefuse.config.profile import ProfileConfig
    from edgefuse.profile.api import profile_onnx
    from edgefuse.profile.graphs import inspect_graph, real_text_feeds

    info = inspect_graph(export_dir / "model.onnx", "fp32")
    feeds = real_text_feeds([info], [(2, 16)])[(2, 16)]
    assert feeds["input_ids"].shape == (2, 16) and feeds["attention_mask"].sum() < 32  # padded real sentences
    cfg = ProfileConfig(threads=[1], sequence_lengths=[16], runs=1, warmup_runs=0, memory=False, op_profile=False)
    res = profile_onnx([export_dir / "model.onnx"], cfg)
    assert res.graphs[0].parity.inputs == "text"


def test_a_full_disk_during_quantize_is_exit_13_not_a_protobuf_error(export_dir, tmp_path, monkeypatch, capsys):
    """onnxruntime's write cut short by a full disk leaves a graph that does not parse: one line, exit 13."""
    import shutil
    from collections import namedtuple

    import edgefuse.ort

    real = edgefuse.ort.load_graph

    def cut_short(path, **kwargs):
        if path.parent.name == "out":  # the quantizer's output in its private workspace
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        return real(path, **kwargs)

    monkeypatch.setattr(edgefuse.ort, "load_graph", cut_short)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("U", "total used free")(10, 10, 4096))
    code, line = call(capsys, "quantize", export_dir, "--out-dir", tmp_path / "q", "--preset", "arm64")
    assert code == WRITE and "no space left" in line and "DecodeError" not in line
    assert not (tmp_path / "q").exists() and no_partials(tmp_path)


def test_one_line_in_a_real_process(export_dir, tmp_path) -> None:
    """In a real process, libraries' own warnings (onnxruntime logs advice on every quantize) must not add lines
    to a failure: in-process calls above do not see the root logger's console output, this does."""
    import subprocess
    import sys

    args = ["quantize", str(export_dir), "--out-dir", str(tmp_path / "q"), "--exclude", "re:.", "--preset", "arm64"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.run([sys.executable, "-m", "edgefuse", *args], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == QUANT and len(lines) == 1, proc.stderr
    assert lines[0].startswith("edgefuse: error:") and not (tmp_path / "q").exists()
