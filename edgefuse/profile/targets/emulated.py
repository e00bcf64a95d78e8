"""The emulated arm64 target: the runner under qemu-user in the cached arm64 sandbox (:mod:`edgefuse.profile.arm`).

Its latencies are emulated, never device latency; its numerics are real aarch64 onnxruntime kernels.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgefuse.config.profile import ProfileConfig
from edgefuse.profile.runner import RUNNER_PATH
from edgefuse.profile.targets.local import TargetSession


class EmulatedArmSession(TargetSession):
    """The runner under qemu-user in the cached arm64 sandbox. Paths are the host's (qemu ``-L`` falls back)."""

    name = "arm64-emulated"
    emulated = True

    def __init__(self, workdir: Path, timeout_s: float, cfg: ProfileConfig) -> None:
        from edgefuse.profile.arm import ensure_sandbox

        super().__init__(workdir, timeout_s)
        self.box = ensure_sandbox(cfg.cpu, cache_dir=cfg.arm_cache_dir, onnxruntime_version=cfg.arm_onnxruntime_version,
                                  suite=cfg.arm_debian_suite)
        self.emulated_cpu = cfg.cpu
        self.name = f"arm64-emulated ({cfg.cpu})"

    @classmethod
    @contextlib.contextmanager
    def open(cls, cfg: ProfileConfig, workdir: Path) -> Iterator[EmulatedArmSession]:  # type: ignore[override]
        """Build (once, cached) or reuse the arm64 sandbox for ``cfg.cpu`` and return its session."""
        yield cls(workdir, cfg.timeout_s, cfg)

    def command(self, job_path: str) -> list[str]:
        return self.box.command(str(RUNNER_PATH), job_path)

    def env(self) -> dict[str, str]:
        return self.box.env()

    def _failure(self, job: dict[str, Any], proc: subprocess.CompletedProcess) -> str:
        msg = super()._failure(job, proc)
        if proc.returncode in (-4, -11):  # SIGILL / SIGSEGV: the classic qemu-user cpuinfo traps
            msg += (f"; the arm64 sandbox's fake /proc/cpuinfo may not match -cpu {self.box.cpu}: delete "
                    f"{self.box.root.parent} to rebuild it")
        return msg
