"""``manifest.json`` of an export folder: every graph's sha256, size, settings and check figures, plus versions.

The manifest is the contract between ``edgefuse export``, ``edgefuse quantize`` and ``edgefuse profile``: a
graph listed there was validated (fp32 against PyTorch, quantized graphs against fp32). It is rewritten
atomically on every change.

Example:
    >>> import tempfile, pathlib
    >>> folder = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (folder / "model.onnx").write_bytes(b"graph")
    >>> m = new_manifest(task="feature-extraction", model_type="bert", exporter="torch")
    >>> _ = add_graph(m, folder, "model.onnx", kind="fp32", settings={}, checks={})
    >>> _ = write_manifest(folder, m)
    >>> read_manifest(folder)["graphs"]["model.onnx"]["size_bytes"]
    5
    >>> import shutil; shutil.rmtree(folder)
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import platform
import shutil
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

from edgefuse.errors import ConfigError, OutputExistsError, TargetNotFoundError
from edgefuse.io_utils import (
    MARKER,
    atomic_dir,
    is_marked,
    refuse_dot_outputs,
    refuse_symlink,
    write_json_atomic,
)

MANIFEST_NAME = "manifest.json"
FP32_GRAPH = "model.onnx"  # the validated fp32 graph of an export folder: what every later stage starts from
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


def locate_graph(src: Path, *, require_manifest: bool = True) -> tuple[Path, str, dict[str, Any] | None]:
    """(folder, graph file name, manifest) of an export folder (its fp32 ``model.onnx``) or of a ``.onnx`` file.

    The graph must be listed in the folder's manifest. With ``require_manifest=False`` a bare ``.onnx`` file in a
    folder without a manifest is accepted too, and its manifest is None.

    Raises:
        TargetNotFoundError: neither an export folder nor an existing ``.onnx`` file, no manifest where one is
            required, or a graph the manifest does not list.
    """
    src = Path(src)
    if src.is_dir():
        folder, name = src, FP32_GRAPH
    elif src.suffix == ".onnx" and src.is_file():
        folder, name = src.parent, src.name
    else:
        raise TargetNotFoundError(f"{str(src)!r} is neither an export folder nor an existing .onnx file")
    if not require_manifest and folder != src and not (folder / MANIFEST_NAME).is_file():
        return folder, name, None
    manifest = read_manifest(folder)
    if name not in manifest.get("graphs", {}):
        raise TargetNotFoundError(f"{name!r} is not listed in {str(folder / MANIFEST_NAME)!r}; re-export the folder "
                                  "with `edgefuse export`")
    return folder, name, manifest


def tuned_session_options(graph: Path) -> dict[str, Any] | None:
    """The session options ``edgefuse tune`` recorded for ``graph`` when it is its folder's tuned graph, else None.

    Example:
        >>> tuned_session_options(Path("/nonexistent/model.onnx")) is None
        True
    """
    graph = Path(graph)
    path = graph.parent / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        tuned = json.loads(path.read_text()).get("tuned") or {}
    except (OSError, ValueError, AttributeError):
        return None
    return dict(tuned.get("session_options") or {}) if tuned.get("graph") == graph.name else None


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


@contextlib.contextmanager
def derived_folder(folder: Path, out_dir: Path | None, overwrite: bool) -> Iterator[tuple[Path, Path]]:
    """(folder to build in, folder the result ends up in) of a graph derived from an export folder.

    In place: both are the export folder. A new ``out_dir`` is built whole in a temporary sibling (config,
    tokenizer, graph, manifest) and appears only when complete; an existing one must be an edgefuse output.
    """
    if out_dir is None or Path(out_dir).resolve() == folder.resolve():
        yield folder, folder
        return
    out = Path(out_dir)
    refuse_dot_outputs(out)
    refuse_symlink(out, "--out-dir")
    if out.exists():
        if not is_marked(out):
            raise OutputExistsError(
                f"--out-dir {str(out)!r} exists and edgefuse did not write it (no {MARKER} file); give a new folder"
            )
        yield out, out
        return
    with atomic_dir(out, inputs=[folder]) as tmp:
        for f in folder.iterdir():
            if f.is_file() and not f.is_symlink() and f.suffix != ".onnx" and f.name != MANIFEST_NAME \
                    and not f.name.startswith("."):
                shutil.copy2(f, tmp / f.name)
        yield tmp, out


def record_derived(
    manifest: dict[str, Any] | None, folder: Path, out: Path, work: Path, name: str, *, kind: str,
    settings: dict[str, Any], checks: dict[str, Any],
) -> dict[str, Any] | None:
    """Add a derived graph (optimized, quantized) to the manifest of the folder it is built in (``work``): the
    export folder's own, an earlier run's in the same ``out_dir``, or a copy of the source's manifest without its
    graphs. Returns the new graph entry (None: a bare ``.onnx`` with no manifest, written beside itself)."""
    if manifest is None and out == folder:
        return None
    if out == folder and manifest is not None:
        target = manifest
    elif (work / MANIFEST_NAME).is_file():
        target = read_manifest(work)
    else:
        target = {**(manifest or {}), "graphs": {}, "source_folder": str(folder)}
    entry = add_graph(target, work, name, kind=kind, settings=settings, checks=checks)
    write_manifest(work, target)
    return entry
