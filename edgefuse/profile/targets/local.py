"""The local target, and the base class of every target: ``python ort_runner.py JOB`` in a subprocess.

A target session makes host files visible to the runner (:meth:`TargetSession.stage`), runs one job per
runner process (:meth:`TargetSession.run`: a fresh process every time, which the memory measurement needs)
and brings files back (:meth:`TargetSession.fetch`). The same ``ort_runner.py`` serves all three.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from edgefuse.config.profile import ProfileConfig
from edgefuse.errors import ProfileError
from edgefuse.profile.runner import RUNNER_PATH

logger = logging.getLogger(__name__)


class TargetSession:
    """A local runner: ``python ort_runner.py JOB`` in a subprocess. Subclasses change the command or transport."""

    name = "local"
    emulated = False
    emulated_cpu: str | None = None

    def __init__(self, workdir: Path, timeout_s: float) -> None:
        self.workdir = Path(workdir)
        self.timeout_s = timeout_s
        self._n = 0

    @classmethod
    @contextlib.contextmanager
    def open(cls, cfg: ProfileConfig, workdir: Path) -> Iterator[TargetSession]:
        """The session for ``cfg`` (a context manager, so that remote targets can clean up)."""
        yield cls(workdir, cfg.timeout_s)

    def stage(self, host_path: Path) -> str:
        """Make ``host_path`` readable by the runner; return the path the runner must use."""
        return str(Path(host_path).resolve())

    def stage_group(self, paths: Sequence[Path], subdir: str) -> list[str]:
        """Stage files that must sit in one folder (a graph and its external data) under ``subdir``."""
        return [self.stage(p) for p in paths]

    def remote_path(self, name: str) -> str:
        """Path (as the runner sees it) of a new file called ``name`` in the session's work folder."""
        return str((self.workdir / name).resolve())

    def fetch(self, target_path: str, host_path: Path) -> None:
        """Copy a file the runner wrote back to ``host_path``."""
        if Path(target_path).resolve() != Path(host_path).resolve():
            shutil.copyfile(target_path, host_path)

    def command(self, job_path: str) -> list[str]:
        return [sys.executable, str(RUNNER_PATH), job_path]

    def env(self) -> dict[str, str] | None:
        return None

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job in a fresh runner process and return its JSON result.

        Raises:
            ProfileError: the runner crashed, timed out or wrote no result.
        """
        self._n += 1
        job = dict(job, result_path=self.remote_path(f"result-{self._n}.json"))
        host_job = self.workdir / f"job-{self._n}.json"
        host_job.write_text(json.dumps(job))
        target_job = self._put_job(host_job)
        try:
            proc = subprocess.run(self.command(target_job), env=self.env(), capture_output=True, text=True,
                                  timeout=self.timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise ProfileError(
                f"the {job['mode']} runner on target {self.name!r} ran past timeout_s={self.timeout_s:g} s; raise "
                f"timeout_s or lower runs/sequence lengths"
            ) from exc
        if proc.returncode != 0:
            raise ProfileError(self._failure(job, proc))
        host_result = self.workdir / f"result-{self._n}.json"
        self.fetch(job["result_path"], host_result)
        try:
            return json.loads(host_result.read_text())
        except (OSError, ValueError) as exc:
            raise ProfileError(f"the runner on target {self.name!r} wrote no readable result ({exc})") from exc

    def _put_job(self, host_job: Path) -> str:
        return str(host_job.resolve())

    def _failure(self, job: dict[str, Any], proc: subprocess.CompletedProcess) -> str:
        tail = " | ".join(proc.stderr.strip().splitlines()[-6:])
        sig = f" (signal {-proc.returncode})" if proc.returncode < 0 else ""
        return f"the {job['mode']} runner failed on target {self.name!r} with exit {proc.returncode}{sig}: {tail}"
