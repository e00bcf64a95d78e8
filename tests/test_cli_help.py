"""Every subcommand's --help works and exits 0; `edgefuse --help` is fast because it imports no heavy library."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgefuse.cli import SUBCOMMANDS, build_parser

HEAVY = ("torch", "transformers", "onnxruntime", "onnx", "optimum", "sklearn", "matplotlib", "numpy")


def _registered() -> list[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    return list(sub.choices)


def test_the_pipeline_commands_are_registered() -> None:
    names = _registered()
    for name in ("run", "check", "schema"):
        assert name in names
    assert names == list(SUBCOMMANDS)  # every documented subcommand, shown in the documented order


@pytest.mark.parametrize("command", [None, *SUBCOMMANDS])
def test_help_exits_zero(command: str | None, capsys: pytest.CaptureFixture[str]) -> None:
    from edgefuse.cli import main

    argv = ["--help"] if command is None else [command, "--help"]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: edgefuse")
    if command is None:
        assert "exit codes:" in out


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys\n"
        "from edgefuse.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "for cmd in ('run', 'check', 'schema'):\n"
        "    try:\n        main([cmd, '--help'])\n    except SystemExit:\n        pass\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout


def test_help_import_time_is_small() -> None:
    """`python -X importtime` lists every module imported by `edgefuse --help`: none of the heavy ones."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "edgefuse", "--help"], capture_output=True,
                          text=True)
    assert proc.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in proc.stderr.splitlines() if "|" in line}
    assert not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_cli_stage_list_matches_the_pipeline() -> None:
    from edgefuse.cli.run import STAGE_NAMES as CLI_STAGES
    from edgefuse.pipeline.api import STAGE_NAMES

    assert CLI_STAGES == STAGE_NAMES


def test_unknown_flag_is_a_usage_error() -> None:
    from edgefuse.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["run", "x.yaml", "--no-such-flag"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["run", "x.yaml", "--force", "fusion"])  # a config key, not a stage name
    assert exc.value.code == 2
