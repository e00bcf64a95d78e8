"""A cache of trained teachers shared by every run folder beside it.

Training the teacher is the longest stage of a task recipe (one SST-2 epoch is about 10 minutes on 2 cores), and
two recipes that differ only after it (keep ratio 0.5 and 0.25, x86 and arm64) train the very same model. The
run folder alone cannot share it: every recipe has its own run folder, and a stage's record also hashes all of
edgefuse's code, so an edit to the exporter would retrain it. This cache keys a teacher by exactly what decides
its weights: the source model's files, the data files, the model/data/teacher config sections, the code that
trains (``edgefuse/finetune``, model loading and saving, data reading) and the versions of torch and
transformers. Anything else may change and the teacher is reused.

Layout: ``<cache>/<key>/model/`` (the saved teacher) and ``<cache>/<key>/result.json`` (its training result),
published in one rename, so an interrupted write leaves no entry. ``<cache>`` defaults to ``.teacher-cache``
beside the run folder (``runs/.teacher-cache`` for ``runs/<config name>``).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

from edgefuse.io_utils import atomic_dir, refuse_symlink
from edgefuse.manifest import sha256_file

logger = logging.getLogger(__name__)

CACHE_NAME = ".teacher-cache"
KEY_VERSION = 1
# the code that decides a teacher's weights, relative to the edgefuse package
TRAINING_CODE = ("finetune", "models.py", "records.py", "config/finetune.py", "fusion/persist.py")


def training_code_hash() -> str:
    """sha256 over the files in :data:`TRAINING_CODE` (names and contents).

    Example:
        >>> len(training_code_hash())
        64
    """
    import hashlib

    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for entry in TRAINING_CODE:
        path = root / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + sha256_file(f).encode() + b"\n")
    return h.hexdigest()


def teacher_key(cfg: Any, *, source: str, data: str) -> str:
    """The cache key of the teacher ``cfg`` trains from the source model (content hash ``source``) on the data
    files (content hash ``data``)."""
    from importlib import metadata

    from edgefuse.pipeline.store import hash_json

    libs = {}
    for name in ("torch", "transformers"):
        try:
            libs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            libs[name] = "missing"
    return hash_json({
        "version": KEY_VERSION, "model": cfg.model.model_dump(mode="json"),
        "teacher": cfg.teacher.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json") if cfg.data else None,
        "source": source, "data_files": data, "code": training_code_hash(), "libraries": libs,
    })


def cache_root(setting: bool | str, run_dir: Path) -> Path | None:
    """The cache folder for the config value ``teacher_cache`` (True: beside the run folder; False: none).

    Example:
        >>> cache_root(True, Path("runs/sst2")).as_posix()
        'runs/.teacher-cache'
        >>> cache_root(False, Path("runs/sst2")) is None
        True
    """
    if setting is False:
        return None
    if setting is True:
        return Path(run_dir).parent / CACHE_NAME
    return Path(setting).expanduser()


def lookup(root: Path | None, key: str) -> tuple[Path, dict[str, Any]] | None:
    """The cached teacher's model folder and training result, or None (no cache, no entry, or an unreadable
    entry: it is then trained again and the entry rewritten)."""
    if root is None:
        return None
    entry = root / key
    model, result = entry / "model", entry / "result.json"
    if entry.is_symlink() or model.is_symlink() or not (model / "config.json").is_file() or not result.is_file():
        return None
    try:
        return model, json.loads(result.read_text())
    except (OSError, ValueError):
        logger.warning("teacher cache entry %s is unreadable; training the teacher again", entry)
        return None


def copy_model(src: Path, dst: Path) -> None:
    """Copy a saved model folder (plain files only: a symlink in the cache is refused, never followed)."""
    dst.mkdir(parents=True, exist_ok=False)
    for f in sorted(src.iterdir()):
        if f.is_symlink() or not f.is_file():
            raise OSError(f"teacher cache entry {src} holds {f.name!r}, which is not a plain file")
        shutil.copyfile(f, dst / f.name)


def store(root: Path | None, key: str, model_dir: Path, result: dict[str, Any]) -> Path | None:
    """Publish a trained teacher under ``root/key`` (one rename). A cache that cannot be written costs only
    the reuse: it is logged, never raised."""
    if root is None:
        return None
    entry = root / key
    try:
        refuse_symlink(root, "teacher cache folder")
        with atomic_dir(entry, overwrite=entry.exists(), require_marker=False) as tmp:
            copy_model(model_dir, tmp / "model")
            (tmp / "result.json").write_text(json.dumps(result, indent=1, default=str))
    except Exception as exc:  # the run has its teacher; only the reuse is lost
        logger.warning("could not store the teacher in the cache %s (%s); later runs will train it again",
                       entry, exc)
        return None
    return entry
