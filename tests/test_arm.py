"""The emulated arm64 target: the real sandbox (debootstrap + aarch64 wheels) under real qemu-user.

The sandbox is built once (about a minute) into the normal cache (~/.cache/edgefuse) and reused by every later
run; the tests themselves run tiny graphs with 1-2 timed runs, since qemu is 100-400x slower than native.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from test_profile_graphs import make_mlp_graph, pair  # noqa: F401  (pair is a fixture)
from tolerances import ARM_FP32_MIN_COSINE, INT8_TINY_MLP_MIN_COSINE

from edgefuse.cli import main
from edgefuse.config.profile import ProfileConfig
from edgefuse.errors import ConfigError, MissingDependencyError
from edgefuse.profile.api import profile_onnx
from edgefuse.profile.arm import CPU_MODELS, ArmSandbox, cpuinfo_text, ensure_sandbox, find_host_tools
from edgefuse.profile.runner import RUNNER_PATH

FAST = dict(threads=[1], sequence_lengths=[8], warmup_runs=1, runs=2, op_profile_runs=1, memory_runs=1)


def _can_build() -> str | None:
    try:
        find_host_tools()
    except MissingDependencyError as exc:
        return str(exc)
    return None if os.geteuid() == 0 or list(Path.home().glob(".cache/edgefuse/arm64-base-*")) else "needs root"


_WHY_NOT = _can_build()
needs_sandbox = pytest.mark.skipif(_WHY_NOT is not None, reason=f"arm64 sandbox: {_WHY_NOT}")


# ------------------------------------------------------------------------------------- no qemu needed


def test_missing_host_tools_say_how_to_install(tmp_path: Path) -> None:
    with pytest.raises(MissingDependencyError, match=r"qemu-user-static.*apt-get install"):
        find_host_tools(search_path=str(tmp_path))
    with pytest.raises(MissingDependencyError, match="debootstrap"):
        ensure_sandbox("neoverse-n1", cache_dir=tmp_path / "cache", search_path=str(tmp_path))
    assert not (tmp_path / "cache").exists()  # nothing half-built


def test_missing_qemu_from_the_cli_exits_10(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    g = make_mlp_graph(tmp_path / "m.onnx")
    monkeypatch.setenv("PATH", str(tmp_path))  # a host without qemu: the real lookup, on an empty PATH
    assert main(["profile", str(g), "--target", "arm64-emulated", "--runs", "1"]) == MissingDependencyError.exit_code
    assert "apt-get install -y --no-install-recommends qemu-user-static debootstrap" in capsys.readouterr().err


def test_cpuinfo_matches_the_cpu_model() -> None:
    n1, a72 = cpuinfo_text("neoverse-n1"), cpuinfo_text("cortex-a72")
    assert "CPU part\t: 0xd0c" in n1 and "asimddp" in n1  # dot product: ORT picks its SDOT/UDOT int8 kernels
    assert "CPU part\t: 0xd08" in a72 and "asimddp" not in a72  # a dotprod claim here would SIGILL under A72
    assert n1.count("processor\t:") == 2
    with pytest.raises(ConfigError, match="unknown emulated CPU 'max'"):
        cpuinfo_text("max")
    assert set(CPU_MODELS) == {"neoverse-n1", "cortex-a72"}


def test_qemu_command_never_uses_cpu_max() -> None:
    box = ArmSandbox(Path("/r"), Path("/s"), Path("/usr/bin/qemu-aarch64-static"), "cortex-a72", "3.11", "1.32.0")
    cmd = box.command("x.py")
    assert cmd[:5] == ["/usr/bin/qemu-aarch64-static", "-cpu", "cortex-a72", "-L", "/r"]
    assert "max" not in cmd and box.env()["PYTHONPATH"] == "/s" and "VIRTUAL_ENV" not in box.env()


# ------------------------------------------------------------------------------------- real qemu


@pytest.fixture(scope="session")
def sandbox() -> ArmSandbox:
    return ensure_sandbox("neoverse-n1")  # cached after the first build


@pytest.mark.arm
@needs_sandbox
def test_emulated_profile_checks_parity_and_labels_emulated(sandbox: ArmSandbox, pair: tuple[Path, Path],  # noqa: F811
                                                            tmp_path: Path) -> None:
    res = profile_onnx(list(pair), ProfileConfig(**FAST, target="arm64-emulated", cpu="neoverse-n1",
                                                 min_cosine=INT8_TINY_MLP_MIN_COSINE))
    env = res.environment
    assert env.emulated and env.machine == "aarch64" and env.emulated_cpu == "neoverse-n1"
    assert env.cpu_model == "ARM Neoverse-N1" and "asimddp" in env.isa_flags and env.host_cpu_model
    assert env.target == "arm64-emulated (neoverse-n1)"
    fp32, int8 = res.graphs
    assert fp32.parity is not None and fp32.parity.reference_machine != "aarch64"  # the x86 reference
    assert fp32.parity.min_cosine >= ARM_FP32_MIN_COSINE
    assert int8.parity is not None and int8.parity.passed and int8.parity.min_cosine >= INT8_TINY_MLP_MIN_COSINE
    assert int8.op_profile is not None and int8.op_profile.matmul_quantized_nodes == 2
    assert int8.memory is not None and int8.memory.model_peak_rss_mib > 0
    from edgefuse.report.api import write_report

    md = write_report([res], tmp_path, formats=("md",))["md"].read_text()
    assert "EMULATED under qemu" in md and "p50 emulated latency (ms)" in md
    assert "Latency (EMULATED)" in md


@pytest.mark.arm
@needs_sandbox
def test_cortex_a72_sandbox_reports_its_cpu(sandbox: ArmSandbox, tmp_path: Path) -> None:
    box = ensure_sandbox("cortex-a72")  # a hard-linked copy of the same base with its own cpuinfo
    assert box.site_packages == sandbox.site_packages and box.root != sandbox.root
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"mode": "env", "result_path": str(tmp_path / "env.json")}))
    subprocess.run(box.command(str(RUNNER_PATH), str(job)), env=box.env(), check=True, timeout=300)
    env = json.loads((tmp_path / "env.json").read_text())["environment"]
    assert env["machine"] == "aarch64" and env["cpu_model"] == "ARM Cortex-A72"
    assert "asimddp" not in env["isa_flags"] and env["onnxruntime_version"] == box.onnxruntime_version


def test_sandbox_tools_are_findable_when_installed() -> None:
    if shutil.which("qemu-aarch64-static") is None:
        pytest.skip("qemu-user-static not installed")
    assert find_host_tools()["qemu"].name.startswith("qemu-aarch64")
