"""The ssh target against a REAL sshd on 127.0.0.1 (a free port, a throwaway host key and client key in tmp_path,
host keys checked strictly through a known_hosts file written here)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_profile_graphs import pair  # noqa: F401  (fixture)
from tolerances import INT8_TINY_MLP_MIN_COSINE, SSH_LOOPBACK_SAME_GRAPH_MIN_COSINE

from edgefuse.config.profile import ProfileConfig
from edgefuse.errors import ProfileError
from edgefuse.profile.api import profile_onnx

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
pytestmark = [
    pytest.mark.ssh,
    pytest.mark.skipif(not (os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen")),
                       reason="needs openssh-server and openssh-client (.ci/system-deps.sh installs them)"),
]
FAST = dict(threads=[1], sequence_lengths=[8], warmup_runs=1, runs=2, op_profile_runs=1, memory_runs=1)


@dataclass(frozen=True)
class Sshd:
    port: int
    known_hosts: Path
    identity: Path
    remote_tmp: Path
    folder: Path

    def cfg(self, **kw: object) -> ProfileConfig:
        user = os.environ.get("USER") or __import__("getpass").getuser()
        base = dict(target=f"ssh://{user}@127.0.0.1:{self.port}", ssh_identity_file=self.identity,
                    ssh_known_hosts_file=self.known_hosts, ssh_python=sys.executable, ssh_connect_timeout_s=5)
        return ProfileConfig(**{**FAST, **base, **kw})


def _keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    d = tmp_path_factory.mktemp("sshd")
    host_key, client_key = _keygen(d / "host_ed25519"), _keygen(d / "client_ed25519")
    (d / "authorized_keys").write_text((d / "client_ed25519.pub").read_text())
    remote_tmp = d / "remote-tmp"
    remote_tmp.mkdir()
    port = _free_port()
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {d}/authorized_keys\n"
        f"PidFile {d}/sshd.pid\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        f"KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nSubsystem sftp internal-sftp\n"
        # The device's temporary folders land here, so the test can see that they are removed afterwards.
        f"SetEnv TMPDIR={remote_tmp}\n"
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation folder sshd insists on
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")], stdout=subprocess.DEVNULL,
                            stderr=open(d / "sshd.log", "w"))  # noqa: SIM115 (closed with the process)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if proc.poll() is not None:
                    pytest.fail(f"sshd exited: {(d / 'sshd.log').read_text()}")
                time.sleep(0.05)
        pub = (d / "host_ed25519.pub").read_text().split()
        (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {pub[0]} {pub[1]}\n")
        yield Sshd(port, d / "known_hosts", client_key, remote_tmp, d)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def _leftovers(sshd: Sshd) -> list[Path]:
    return [p for p in sshd.remote_tmp.iterdir() if p.name.startswith("edgefuse-")]


def test_profile_over_ssh_loopback(sshd: Sshd, pair: tuple[Path, Path],  # noqa: F811
                                   caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="edgefuse.profile.targets.ssh"):
        res = profile_onnx(list(pair), sshd.cfg(min_cosine=INT8_TINY_MLP_MIN_COSINE))
    assert f"working in {sshd.remote_tmp}/edgefuse-" in caplog.text  # the files really went to the device's tmp
    env = res.environment
    assert env.target == f"ssh://{sshd.cfg().ssh_parts()[0]}@127.0.0.1:{sshd.port}" and env.emulated is False
    assert env.onnxruntime_version and env.cpu_model
    fp32, int8 = res.graphs
    assert fp32.parity is not None and fp32.parity.min_cosine == pytest.approx(1.0)
    assert int8.parity is not None and int8.parity.passed
    assert int8.parity.min_cosine_vs_same_graph_here == pytest.approx(1.0)  # same machine, same kernels
    assert int8.memory is not None and int8.memory.model_peak_rss_mib > 0
    assert int8.op_profile is not None and int8.op_profile.matmul_quantized_nodes == 2
    assert int8.latency[0].latency_ms_p50 > 0
    assert _leftovers(sshd) == []  # the device's temporary folder was removed


def test_unknown_host_key_is_refused(sshd: Sshd, pair: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(ProfileError, match="host key is not in"):
        profile_onnx([pair[0]], sshd.cfg(ssh_known_hosts_file=empty))


def test_changed_host_key_is_refused(sshd: Sshd, pair: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    other = _keygen(tmp_path / "impostor")
    pub = Path(f"{other}.pub").read_text().split()
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {pub[0]} {pub[1]}\n")
    with pytest.raises(ProfileError, match="failed while trying to create a temporary folder"):
        profile_onnx([pair[0]], sshd.cfg(ssh_known_hosts_file=kh))


def test_unknown_client_key_is_refused(sshd: Sshd, pair: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    stranger = _keygen(tmp_path / "stranger")
    with pytest.raises(ProfileError, match="key was refused"):
        profile_onnx([pair[0]], sshd.cfg(ssh_identity_file=stranger))


def test_closed_port_is_a_profile_error(sshd: Sshd, pair: tuple[Path, Path]) -> None:  # noqa: F811
    cfg = sshd.cfg().model_copy(update={"target": f"ssh://{sshd.cfg().ssh_parts()[0]}@127.0.0.1:{_free_port()}"})
    with pytest.raises(ProfileError, match="is sshd running"):
        profile_onnx([pair[0]], cfg)


def test_remote_command_words_are_quoted(sshd: Sshd, pair: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    marker = tmp_path / "pwned"
    with pytest.raises(ProfileError, match="runner failed"):
        profile_onnx([pair[0]], sshd.cfg(ssh_python=f"python3; touch {marker}"))
    assert not marker.exists()  # the whole value reached the device as ONE word, never as shell syntax
    assert _leftovers(sshd) == []  # cleaned up after a failure too


def test_device_without_onnxruntime(sshd: Sshd, pair: tuple[Path, Path], tmp_path: Path) -> None:  # noqa: F811
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(tmp_path / "bare")], check=True)
    with pytest.raises(ProfileError, match="ModuleNotFoundError"):
        profile_onnx([pair[0]], sshd.cfg(ssh_python=str(tmp_path / "bare" / "bin" / "python")))
    assert _leftovers(sshd) == []


def test_cli_ssh_target(sshd: Sshd, pair: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:  # noqa: F811
    from edgefuse.cli import main

    cfg = sshd.cfg()
    code = main(["profile", str(pair[1]), "--target", cfg.target, "--ssh-identity", str(sshd.identity),
                 "--ssh-known-hosts", str(sshd.known_hosts), "--ssh-python", sys.executable, "--threads", "1",
                 "--seq-lens", "8", "--runs", "1", "--no-memory", "--no-op-profile"])
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{cfg.target} (") and "mlp_int8" in out and "EMULATED" not in out
    assert _leftovers(sshd) == []


def test_external_data_graph_over_ssh(sshd: Sshd, tmp_path: Path) -> None:
    from test_profile_graphs import make_mlp_graph

    g = make_mlp_graph(tmp_path / "ext.onnx", external_data=True)  # weights in ext.onnx.data beside it
    res = profile_onnx([g], sshd.cfg(memory=False, op_profile=False))
    assert res.graphs[0].file_size_bytes == g.stat().st_size + (tmp_path / "ext.onnx.data").stat().st_size
    assert res.graphs[0].parity is not None and res.graphs[0].parity.min_cosine == 1.0


def test_tune_over_ssh_loopback(sshd: Sshd, tmp_path: Path) -> None:
    """`edgefuse tune` times the candidates on the device; the device must agree with this machine's outputs."""
    from test_export import fused, tiny_tokenizer

    from edgefuse.config.export import ExportConfig
    from edgefuse.config.tune import CandidateConfig, TuneConfig
    from edgefuse.export.api import export_onnx
    from edgefuse.manifest import read_manifest
    from edgefuse.tune.api import tune_folder

    folder = tmp_path / "bert"
    export_onnx(fused("bert", "base"), ExportConfig(), folder, tokenizer=tiny_tokenizer(tmp_path / "tok"))
    base = sshd.cfg()
    settings = {"ssh_identity_file": str(base.ssh_identity_file), "ssh_python": base.ssh_python,
                "ssh_known_hosts_file": str(base.ssh_known_hosts_file), "ssh_connect_timeout_s": 5}
    cfg = TuneConfig(target=base.target, profile_settings=settings, budget_s=0.5, min_rounds=3, warmup_runs=1,
                     sequence_length=16, candidates=[CandidateConfig(name="int8"), CandidateConfig(name="fp32",
                                                                                                   quantize="fp32")])
    res = tune_folder(folder, cfg)
    assert res.target == base.target and res.environment["target"] == base.target
    timed = [r for r in res.candidates if r.passed]
    assert timed and all(r.target_cosine is not None and r.target_cosine > SSH_LOOPBACK_SAME_GRAPH_MIN_COSINE
                         for r in timed)
    assert read_manifest(folder)["tuned"]["target"] == base.target
