"""``manifest.json`` of an export folder: every graph's sha256, size, settings and check figures, plus versions.

The manifest is the contract between ``edgefuse export``, ``edgefuse quantize`` and ``edgefuse profile``: a
graph listed there was validated (fp32 against PyTorch, quantized graphs against fp32). It is rewritten
atomically on every change.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "model.onnx").write_bytes(b"graph")
    >>> m = new_manifest(task="feature-extraction", model_type="bert", exporter="torch")
    >>> add_graph(m, folder, "model.onnx", kind="fp32", settings={}, checks={})["sha256"][:16]
    'eef93e1d14482804'
    >>> _ = write_manifest(folder, m)
    >>> read_manifest(folder)["graphs"]["model.onnx"]["size_bytes"]
    5
    >>> import shutil; shutil.rmtree(folder)
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib import metadata
from pathlib import Path
from typing import Any

from edgefuse.errors import ConfigError, TargetNotFoundError
from edgefuse.io_utils import write_json_atomic

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "edgefuse-export/1"
_PACKAGES = ("edgefuse", "torch", "transformers", "optimum", "optimum-onnx", "onnx", "onnxruntime", "onnxscript",
             "numpy")


def library_versions() -> dict[str, str]:
    """Installed versions of the packages that shape a graph (``"missing"`` for absent ones), plus Python."""
    versions = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "missing"
    return versions


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks (graphs are hundreds of MB); the one file hash of edgefuse (manifests,
    the pipeline's stage records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk_bytes):
            digest.update(block)
    return digest.hexdigest()


def new_manifest(*, task: str, model_type: str, exporter: str, **extra: Any) -> dict[str, Any]:
    """A fresh manifest with the environment recorded; ``extra`` keys go in at the top level."""
    return {
        "format": MANIFEST_FORMAT,
        "task": task,
        "model_type": model_type,
        "exporter": exporter,
        **extra,
        "machine": platform.machine(),
        "library_versions": library_versions(),
        "graphs": {},
    }


def add_graph(
    manifest: dict[str, Any], folder: Path, name: str, *, kind: str, settings: dict[str, Any], checks: dict[str, Any]
) -> dict[str, Any]:
    """Record graph ``folder/name`` (with its external-data files, if any) in ``manifest``; return the entry."""
    path = Path(folder) / name
    external = sorted(p.name for p in Path(folder).glob(f"{name}_data*")) + sorted(
        p.name for p in Path(folder).glob(f"{name}.data*")
    )
    size = path.stat().st_size + sum((Path(folder) / e).stat().st_size for e in external)
    entry = {
        "kind": kind,
        "sha256": sha256_file(path),
        "size_bytes": size,
        "external_data": {e: sha256_file(Path(folder) / e) for e in external},
        "settings": settings,
        "checks": checks,
    }
    manifest.setdefault("graphs", {})[name] = entry
    return entry


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    """Write ``folder/manifest.json`` atomically."""
    path = Path(folder) / MANIFEST_NAME
    write_json_atomic(path, manifest)
    return path


def read_manifest(folder: Path) -> dict[str, Any]:
    """Read and sanity-check ``folder/manifest.json``.

    Raises:
        TargetNotFoundError: the folder has no manifest (it was not written by ``edgefuse export``).
        ConfigError: the manifest is not valid JSON or not of this format.
    """
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise TargetNotFoundError(
            f"{str(folder)!r} has no {MANIFEST_NAME}; export it with `edgefuse export` first (or pass a .onnx file)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{str(path)!r} is not valid JSON ({exc}); re-export the folder") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ConfigError(f"{str(path)!r} has format {found!r}, expected {MANIFEST_FORMAT!r}; re-export the folder")
    return manifest


def verify_graph(folder: Path, name: str, manifest: dict[str, Any]) -> None:
    """Check that ``folder/name`` still has the sha256 the manifest recorded.

    Raises:
        TargetNotFoundError: the graph is not listed, missing, or changed since it was validated (exit 3, like
            every damaged graph: the folder no longer holds the graph the manifest vouches for).
    """
    entry = manifest.get("graphs", {}).get(name)
    path = Path(folder) / name
    if entry is None or not path.is_file():
        listed = ", ".join(manifest.get("graphs", {})) or "none"
        raise TargetNotFoundError(f"graph {name!r} is not in {str(folder)!r} (listed: {listed})")
    if sha256_file(path) != entry["sha256"]:
        raise TargetNotFoundError(
            f"{str(path)!r} changed since it was validated (sha256 differs from manifest.json); re-export the folder"
        )
