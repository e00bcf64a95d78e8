"""Where the profiler's runner runs: a table from target scheme to session class, and :func:`open_target`.

A target session makes host files visible to the runner (``stage``), runs one job per runner process (``run``: a
fresh process every time, which the memory measurement needs) and brings files back (``fetch``). The same
``ort_runner.py`` serves every target. Adding a target is one entry in :data:`TARGETS` plus its tests
(``docs/contributing.md``).

Example:
    >>> sorted(TARGETS)
    ['arm64-emulated', 'local', 'ssh']
    >>> target_scheme("ssh://pi@board:2222")
    'ssh'
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from edgefuse.config.profile import ProfileConfig

if TYPE_CHECKING:
    from edgefuse.profile.targets.local import TargetSession

# scheme -> "module:Class"; imported on use so that ``edgefuse --help`` stays light
TARGETS: dict[str, str] = {
    "local": "edgefuse.profile.targets.local:TargetSession",
    "arm64-emulated": "edgefuse.profile.targets.emulated:EmulatedArmSession",
    "ssh": "edgefuse.profile.targets.ssh:SshSession",
}


def target_scheme(target: str) -> str:
    """The :data:`TARGETS` key of a target string (``local``, ``arm64-emulated`` or ``ssh://...``)."""
    return target.split("://", 1)[0] if "://" in target else target


def target_class(target: str) -> type[TargetSession]:
    """The session class that runs ``target``."""
    module, cls = TARGETS[target_scheme(target)].split(":")
    return getattr(importlib.import_module(module), cls)


@contextlib.contextmanager
def open_target(cfg: ProfileConfig, workdir: Path) -> Iterator[TargetSession]:
    """Open the session for ``cfg.target``; an ssh session removes its remote folder on exit."""
    cls = target_class(cfg.target)
    with cls.open(cfg, workdir) as session:
        yield session
