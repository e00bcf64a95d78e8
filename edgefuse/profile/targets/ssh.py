"""The ssh target: run the profiler's runner on a real device (``--target ssh://user@host[:port]``).

The graphs and the one self-contained runner (standard library + numpy + onnxruntime) are copied with scp to a
fresh ``mktemp -d`` folder on the device, each job runs there in a fresh Python process, the JSON results are
fetched back, and the folder is removed afterwards, also when a job fails.

Security: host keys are always checked (``StrictHostKeyChecking=yes`` against a known_hosts file; an unknown
host fails instead of being trusted on first use); ``BatchMode=yes`` never prompts. Local commands are argument
lists (no local shell). The remote side always goes through the login shell, so every word of a remote command
is quoted with :func:`shlex.quote` and remote paths are checked against a strict pattern.

Example:
    >>> from edgefuse.config.profile import ProfileConfig
    >>> cfg = ProfileConfig(target="ssh://pi@10.0.0.7:2222", ssh_known_hosts_file="/k", ssh_identity_file="/i")
    >>> ssh_command(cfg, "echo hi")[-2:]
    ['pi@10.0.0.7', 'echo hi']
"""

from __future__ import annotations

import contextlib
import logging
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

from edgefuse.config.profile import ProfileConfig
from edgefuse.errors import ConfigError, MissingDependencyError, ProfileError
from edgefuse.profile.runner import RUNNER_PATH
from edgefuse.profile.targets.local import TargetSession

logger = logging.getLogger(__name__)

SAFE_REMOTE_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")


def _ssh_options(cfg: ProfileConfig) -> list[str]:
    known = cfg.ssh_known_hosts_file or Path.home() / ".ssh" / "known_hosts"
    opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f'UserKnownHostsFile="{known}"',
            "-o", f"ConnectTimeout={cfg.ssh_connect_timeout_s}", "-o", "LogLevel=ERROR"]
    if cfg.ssh_identity_file is not None:
        opts += ["-o", "IdentitiesOnly=yes", "-i", str(cfg.ssh_identity_file)]
    return opts


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise MissingDependencyError(f"--target ssh:// needs {name!r}; install OpenSSH's client: "
                                     f"apt-get install -y openssh-client")
    return found


def ssh_command(cfg: ProfileConfig, remote_command: str) -> list[str]:
    """argv of ``ssh`` running ``remote_command`` (already quoted) on the target of ``cfg``."""
    user, host, port = cfg.ssh_parts()
    return [_tool("ssh"), *_ssh_options(cfg), *(["-p", str(port)] if port else []), "--", f"{user}@{host}",
            remote_command]


def scp_command(cfg: ProfileConfig, sources: Sequence[str], dest: str) -> list[str]:
    """argv of ``scp`` (``-B`` batch mode, same options and host-key checks as :func:`ssh_command`)."""
    _, _, port = cfg.ssh_parts()
    return [_tool("scp"), "-q", "-B", *_ssh_options(cfg), *(["-P", str(port)] if port else []), "--",
            *sources, dest]


class SshSession(TargetSession):
    """Runner jobs on a device over ssh, in a temporary folder that :meth:`open` removes at the end."""

    name = "ssh"
    runner = ""  # path of ort_runner.py on the device, set by open()

    def __init__(self, cfg: ProfileConfig, workdir: Path, remote_dir: str) -> None:
        super().__init__(workdir, cfg.timeout_s)
        self.cfg = cfg
        self.remote_dir = remote_dir
        user, host, port = cfg.ssh_parts()
        self.name = f"ssh://{user}@{host}" + (f":{port}" if port else "")
        self.dest = f"{user}@{host}"

    @classmethod
    @contextlib.contextmanager
    def open(cls, cfg: ProfileConfig, workdir: Path) -> Iterator[SshSession]:
        """Create the remote folder, upload the runner, yield the session, always remove the folder.

        Raises:
            ProfileError: the device is unreachable, its host key is unknown or wrong, or it lacks a POSIX shell.
        """
        if not cfg.target.startswith("ssh://"):
            raise ConfigError(f"not an ssh target: {cfg.target!r}")
        probe = cls._ssh(cfg, shlex.join(["mktemp", "-d", "-t", "edgefuse-XXXXXXXX"]), what="create a temporary folder")
        remote_dir = probe.stdout.strip().splitlines()[-1] if probe.stdout.strip() else ""
        if not SAFE_REMOTE_PATH.match(remote_dir):
            raise ProfileError(f"the device answered mktemp with {remote_dir!r}, not an absolute plain path")
        session = cls(cfg, workdir, remote_dir)
        logger.info("working in %s on %s", remote_dir, cfg.target)
        try:
            session.runner = session.stage_group([RUNNER_PATH], "")[0]
            yield session
        finally:
            try:
                cls._ssh(cfg, shlex.join(["rm", "-rf", "--", remote_dir]), what=f"remove {remote_dir}")
            except ProfileError as exc:  # do not hide the original failure behind a cleanup failure
                logger.warning("could not remove %s on the device: %s", remote_dir, exc)

    @staticmethod
    def _ssh(cfg: ProfileConfig, remote_command: str, *, what: str,
             timeout_s: float | None = None) -> subprocess.CompletedProcess:
        cmd = ssh_command(cfg, remote_command)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL,
                                  timeout=timeout_s or cfg.ssh_connect_timeout_s + 60)
        except subprocess.TimeoutExpired as exc:
            raise ProfileError(f"ssh to {cfg.target} timed out while trying to {what}") from exc
        if proc.returncode == 255:  # ssh's own failure: connection, authentication, host key
            raise ProfileError(_explain(cfg, proc.stderr, what))
        if proc.returncode != 0:
            err = proc.stderr.strip()[-400:]
            raise ProfileError(f"could not {what} on {cfg.target} (exit {proc.returncode}): {err}")
        return proc

    def _scp(self, sources: Sequence[str], dest: str, what: str) -> None:
        proc = subprocess.run(scp_command(self.cfg, sources, dest), capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=self.timeout_s)
        if proc.returncode != 0:
            raise ProfileError(_explain(self.cfg, proc.stderr, what))

    def stage_group(self, paths: Sequence[Path], subdir: str) -> list[str]:
        folder = f"{self.remote_dir}/{subdir}" if subdir else self.remote_dir
        if subdir:
            self._ssh(self.cfg, shlex.join(["mkdir", "-p", "--", folder]), what=f"create {folder}")
        self._scp([str(p) for p in paths], f"{self.dest}:{folder}/", f"copy {len(paths)} file(s) to the device")
        return [f"{folder}/{Path(p).name}" for p in paths]

    def stage(self, host_path: Path) -> str:
        return self.stage_group([host_path], "")[0]

    def remote_path(self, name: str) -> str:
        return f"{self.remote_dir}/{name}"

    def fetch(self, target_path: str, host_path: Path) -> None:
        self._scp([f"{self.dest}:{target_path}"], str(host_path), f"fetch {target_path} from the device")

    def _put_job(self, host_job: Path) -> str:
        return self.stage(host_job)

    def command(self, job_path: str) -> list[str]:
        return ssh_command(self.cfg, shlex.join([self.cfg.ssh_python, self.runner, job_path]))


def _explain(cfg: ProfileConfig, stderr: str, what: str) -> str:
    err = " | ".join(stderr.strip().splitlines()[-3:])
    hint = ""
    if "Host key verification failed" in stderr or "REMOTE HOST IDENTIFICATION HAS CHANGED" in stderr:
        known = cfg.ssh_known_hosts_file or "~/.ssh/known_hosts"
        hint = (f"; the device's host key is not in {known} (or changed): verify its fingerprint, then add it with "
                f"ssh-keyscan, or pass --ssh-known-hosts FILE")
    elif "Permission denied" in stderr:
        hint = "; the key was refused: pass --ssh-identity FILE with a key in the device's authorized_keys"
    elif "Connection refused" in stderr or "timed out" in stderr:
        hint = "; is sshd running on the device and the port right?"
    return f"ssh to {cfg.target} failed while trying to {what}: {err}{hint}"
