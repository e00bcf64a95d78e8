"""The run folder: one sub-folder per pipeline stage, each with a ``record.json`` that says what went in.

A stage folder is built in a temporary sibling and renamed into place with its record inside
(:func:`edgefuse.io_utils.atomic_dir`), so a folder that exists is complete: an interrupted run leaves
either the old folder or the new one, never half of one, and the next run resumes from the last complete
stage. A stage is skipped when its record's *input hash* (the hash of the stage's resolved config and of
the hashes of its input artifacts) equals the one just computed, and its files still hash to the recorded
output hash (an edited artifact is rebuilt, not trusted).

Example:
    >>> import tempfile, pathlib
    >>> store = RunStore(pathlib.Path(tempfile.mkdtemp()))
    >>> with store.build("demo") as tmp:
    ...     _ = (tmp / "a.txt").write_text("x")
    ...     rec = store.commit_record("demo", tmp, input_hash="h", inputs={}, config={}, result={}, seconds=0.0)
    >>> store.fresh_record("demo", "h") is not None
    True
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from edgefuse.errors import ConfigError, OutputExistsError
from edgefuse.io_utils import atomic_dir, write_json_atomic
from edgefuse.manifest import sha256_file

logger = logging.getLogger(__name__)

RECORD = "record.json"
RECORD_VERSION = 1


def hash_tree(folder: Path, *, exclude: tuple[str, ...] = (RECORD,)) -> str:
    """sha256 over every file under ``folder`` (relative path and content), in sorted order.

    Files named in ``exclude`` at the top level are left out (the record itself holds this hash).
    """
    folder = Path(folder)
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel in exclude:
            continue
        h.update(rel.encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return h.hexdigest()


def hash_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


@functools.lru_cache(maxsize=1)
def tool_hash() -> str:
    """Hash of what edgefuse itself is: its version, every ``.py`` file of the package, and the versions of the
    libraries that shape its outputs. A stage recorded under another hash runs again, so a change to edgefuse's
    code (a broken quantizer in a pull request) can never pass on a cached result.

    Example:
        >>> len(tool_hash())
        64
    """
    from importlib import metadata

    from edgefuse import __version__

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256(f"edgefuse {__version__}\n".encode())
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + sha256_file(path).encode() + b"\n")
    for name in ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "numpy"):
        try:
            h.update(f"{name} {metadata.version(name)}\n".encode())
        except metadata.PackageNotFoundError:
            h.update(f"{name} missing\n".encode())
    return h.hexdigest()


def host_description() -> dict[str, Any]:
    """The host that runs the stage: CPU model, the ISA flags that choose onnxruntime's kernels, cores, machine."""
    import platform

    from edgefuse.profile.runner.ort_runner import cpuinfo

    info = cpuinfo()
    return {"cpu_model": info.get("cpu_model"), "isa_flags": sorted(info.get("isa_flags") or []),
            "cores": info.get("cores_available", info.get("cores_logical")), "machine": platform.machine(),
            "system": platform.system()}


def host_hash() -> str:
    """Hash of :func:`host_description`: a cached ``profile`` stage never survives a change of host."""
    return hash_json(host_description())


def hash_path(path: Path) -> str:
    """Content hash of a file or folder (see :func:`edgefuse.manifest.sha256_file`, :func:`hash_tree`)."""
    return hash_tree(path, exclude=()) if Path(path).is_dir() else sha256_file(path)


@dataclass(frozen=True)
class StageRecord:
    """What one completed stage consumed and produced (``record.json`` in its folder)."""

    stage: str
    input_hash: str
    inputs: dict[str, str]
    config: dict[str, Any]
    output_hash: str
    result: dict[str, Any]
    seconds: float
    finished_at: str
    edgefuse_version: str
    record_version: int = RECORD_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageRecord:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class RunStore:
    """The stage folders of one run folder.

    Args:
        run_dir: the run folder (created when missing).
    """

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def stage_dir(self, stage: str) -> Path:
        return self.run_dir / stage

    def read_record(self, stage: str) -> StageRecord | None:
        """The stage's record, or None when the stage never completed (or its record is unreadable)."""
        path = self.stage_dir(stage) / RECORD
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            record = StageRecord.from_dict(data)
        except (ValueError, TypeError) as exc:
            logger.warning("ignoring unreadable %s (%s); the stage will run again", path, exc)
            return None
        return record if record.record_version == RECORD_VERSION else None

    def fresh_record(self, stage: str, input_hash: str) -> StageRecord | None:
        """The record if the stage can be skipped: same input hash and untouched output files."""
        record = self.read_record(stage)
        if record is None or record.input_hash != input_hash:
            return None
        actual = hash_tree(self.stage_dir(stage))
        if actual != record.output_hash:
            logger.warning("%s: its files changed since the run that wrote them; running the stage again", stage)
            return None
        return record

    @contextlib.contextmanager
    def build(self, stage: str) -> Iterator[Path]:
        """A temporary folder for the stage's outputs; renamed to the stage folder only on success.

        Call :meth:`commit_record` inside the ``with`` block so that the record is part of the rename.
        """
        with atomic_dir(self.stage_dir(stage), overwrite=True, require_marker=False) as tmp:
            yield tmp

    def commit_record(
        self,
        stage: str,
        tmp: Path,
        *,
        input_hash: str,
        inputs: Mapping[str, str],
        config: Mapping[str, Any],
        result: Mapping[str, Any],
        seconds: float,
        extra: Mapping[str, Any] | None = None,
    ) -> StageRecord:
        """Hash the finished outputs in ``tmp`` and write the record next to them."""
        from edgefuse import __version__

        record = StageRecord(
            stage=stage,
            input_hash=input_hash,
            inputs=dict(inputs),
            config=json.loads(json.dumps(dict(config), default=str)),
            output_hash=hash_tree(tmp),
            result=json.loads(json.dumps(dict(result), default=str)),  # exactly what a later run reads back
            seconds=round(float(seconds), 3),
            finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            edgefuse_version=__version__,
            extra=dict(extra or {}),
        )
        write_json_atomic(tmp / RECORD, record.to_dict())
        return record

    def clean_partials(self) -> list[Path]:
        """Remove temporary stage folders left by a run that was killed (``kill -9``, power loss)."""
        removed = []
        if self.run_dir.is_dir():
            for path in self.run_dir.glob(".*.partial"):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        for path in removed:
            logger.info("removed the leftover of an interrupted stage: %s", path)
        return removed

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold ``run_dir/.lock`` for the run, so two runs cannot write the same folder at once.

        A lock left by a process that no longer exists is taken over.

        Raises:
            OutputExistsError: another live process holds the lock.
        """
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / ".lock"
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(path.read_text().strip() or "0")
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and _alive(pid):
                    raise OutputExistsError(
                        f"run folder {str(self.run_dir)!r} is in use by process {pid}; wait for it or use another "
                        "run_dir (--run-dir)"
                    ) from None
                path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            break
        else:  # pragma: no cover - a race with another process taking over the same stale lock
            raise OutputExistsError(f"could not lock run folder {str(self.run_dir)!r}; try again")
        try:
            yield
        finally:
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ensure_run_dir_usable(run_dir: Path) -> None:
    """Refuse a run folder that is an existing file, or a non-empty folder that was not made by edgefuse.

    Raises:
        ConfigError: ``run_dir`` is a file, or a folder with other content and no run of edgefuse in it.
    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        raise ConfigError(f"run_dir {str(run_dir)!r} is a file; give a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()) and not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"run_dir {str(run_dir)!r} is a non-empty folder that holds no edgefuse run (no config.yaml); "
            "choose an empty or new folder"
        )
