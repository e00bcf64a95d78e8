"""Safe reads and atomic writes: nothing edgefuse did not write is deleted, nothing half-written looks complete.

One implementation for every command:

- :func:`atomic_dir` builds an output folder in a temporary sibling that carries the :data:`MARKER` file and
  renames it into place in one step. The rename never replaces a folder that appeared meanwhile, and
  ``overwrite`` replaces only a folder that carries the marker (:func:`check_replaceable`): never one edgefuse
  did not write, one that holds an input, ``.``, ``..``, ``/`` or the home folder. A killed run's temporary
  folder is removed by the next run that writes the same output (it carries the marker and its pid is gone).
- :func:`write_text_atomic` writes a file through ``mkstemp`` (``O_EXCL``) in the target folder and refuses a
  symlink as its destination; files get the user's umask (0644 under 022), not mkstemp's 0600.
- :func:`read_yaml` reads a config file with a size cap and a limit on alias expansion (no YAML bomb), as UTF-8.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from edgefuse.errors import ConfigError, OutputExistsError, OutputWriteError, TargetNotFoundError

MARKER = ".edgefuse"
"""File in every output folder edgefuse creates; ``--overwrite`` replaces only folders that carry it."""

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (1 MiB); a real config is a few KiB."""

MAX_YAML_ALIASES = 100
"""Most alias references (``*name``) one YAML config may hold: a real config has none, a bomb has thousands."""

MAX_YAML_NODES = 100_000
"""Most values a YAML config may hold once its aliases are expanded (a real config: a few hundred)."""

_PARTIAL = ".partial"


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows (0o022 on most systems)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def refuse_symlink(path: Path, what: str = "output") -> None:
    """Raise when ``path`` is a symlink: edgefuse never writes through one (it could point anywhere).

    Raises:
        OutputExistsError: ``path`` is a symlink.
    """
    if Path(path).is_symlink():
        raise OutputExistsError(
            f"{what} {str(path)!r} is a symlink (to {os.readlink(path)!r}); edgefuse does not write through "
            "symlinks: remove it or give the real path"
        )


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder and ``os.replace``.

    The temporary file is made with ``mkstemp`` (``O_EXCL``, so a planted file or symlink is never followed),
    and gets the permissions of a normal file under the user's umask.

    Raises:
        OutputExistsError: ``path`` is a symlink.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.txt"
        >>> write_text_atomic(p, "hi"); p.read_text(), oct(p.stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
        ('hi', True)
    """
    path = Path(path)
    refuse_symlink(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def temp_file(folder: Path, name: str) -> Path:
    """A new, empty file for ``name`` in ``folder``, made with ``O_EXCL`` (never a planted file or symlink).

    The caller writes it and renames it into place (:func:`publish_file`) or deletes it.

    Example:
        >>> import tempfile, pathlib
        >>> t = temp_file(pathlib.Path(tempfile.mkdtemp()), "model.onnx")
        >>> t.name.startswith(".model.onnx.") and t.name.endswith(".partial.onnx") and t.stat().st_size == 0
        True
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f"{_PARTIAL}{Path(name).suffix}", dir=folder)
    os.fchmod(fd, 0o666 & ~current_umask())
    os.close(fd)
    return Path(tmp)


def publish_file(tmp: Path, final: Path, *, overwrite: bool) -> None:
    """Rename ``tmp`` to ``final``; without ``overwrite`` it fails when ``final`` appeared meanwhile.

    Raises:
        OutputExistsError: ``final`` exists (and ``overwrite`` is False) or is a symlink.
    """
    refuse_symlink(final)
    if overwrite:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)  # atomic, and fails when final exists: no replace-by-rename race
    except FileExistsError:
        raise OutputExistsError(
            f"{str(final)!r} appeared while edgefuse was writing it; nothing was replaced"
        ) from None
    except OSError:  # a file system without hard links: check, then rename
        if final.exists():
            raise OutputExistsError(f"{str(final)!r} already exists; pass --overwrite to replace it") from None
        os.replace(tmp, final)
        return
    os.unlink(tmp)


def _rename_noreplace(src: Path, dst: Path) -> None:
    """``rename(src, dst)`` that fails with ``FileExistsError`` when ``dst`` exists (Linux ``renameat2``)."""
    libc_name = ctypes.util.find_library("c")
    func = getattr(ctypes.CDLL(libc_name, use_errno=True), "renameat2", None) if libc_name else None
    if func is not None:
        at_fdcwd, rename_noreplace = -100, 1
        if func(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), rename_noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    # no renameat2 (or a file system without it): an empty folder would be replaced by os.rename, so check first
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, "exists", str(dst))
    os.rename(src, dst)


def is_marked(folder: Path) -> bool:
    """True when ``folder`` carries edgefuse's :data:`MARKER` (a folder edgefuse wrote)."""
    marker = Path(folder) / MARKER
    return marker.is_file() and not marker.is_symlink()


def write_marker(folder: Path, kind: str = "output") -> None:
    """Mark ``folder`` as written by edgefuse (see :data:`MARKER`)."""
    from importlib import metadata

    try:
        version = metadata.version("edgefuse")
    except metadata.PackageNotFoundError:  # a source checkout that was never installed
        version = "unknown"
    write_json_atomic(Path(folder) / MARKER, {"written_by": "edgefuse", "version": version, "kind": kind,
                                              "pid": os.getpid()})


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_replaceable(final: Path, *, inputs: Iterable[str | Path] = (), require_marker: bool = True) -> None:
    """Refuse to replace ``final`` unless edgefuse wrote it and it holds none of the command's inputs.

    Raises:
        OutputExistsError: ``final`` is ``.``, ``..``, ``/``, the home folder, the current folder or one above it,
            a symlink, a file, a folder that contains or equals an input, or a non-empty folder without
            :data:`MARKER` (an empty folder holds nothing to lose).

    Example:
        >>> check_replaceable(Path("/"))
        Traceback (most recent call last):
        edgefuse.errors.OutputExistsError: refusing to replace '/' with --overwrite: it is the root folder; ...
    """
    final = Path(final)

    def refuse(why: str) -> OutputExistsError:
        return OutputExistsError(
            f"refusing to replace {str(final)!r} with --overwrite: {why}; give a new output folder"
        )

    if final.name in ("", ".", ".."):
        raise refuse("it is the root folder" if str(final) == os.sep else "'.' and '..' are never replaced")
    refuse_symlink(final)
    resolved = final.resolve()
    if resolved == Path(resolved.anchor):
        raise refuse("it is the root folder")
    if resolved == Path.home().resolve():
        raise refuse("it is your home folder")
    if _contains(resolved, Path.cwd().resolve()):
        raise refuse("it is the current folder or holds it")
    for item in inputs:
        if item is None:
            continue
        src = Path(item).expanduser()
        if src.exists() and _contains(resolved, src.resolve()):
            raise refuse(f"it holds the input {str(item)!r}")
    if final.exists() and not final.is_dir():
        raise refuse("it is a file, not an output folder of edgefuse")
    if require_marker and final.is_dir() and not is_marked(final) and any(final.iterdir()):
        raise refuse(f"edgefuse did not write it (no {MARKER} file in it; a folder from an edgefuse older than "
                     "the marker must be deleted by hand)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def clean_stale_partials(final: Path) -> list[Path]:
    """Remove temporary siblings of ``final`` left by a killed edgefuse (marked, and their process is gone)."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for path in final.parent.glob(f".{final.name}.*{_PARTIAL}"):
        if path.is_symlink() or not path.is_dir() or not is_marked(path):
            continue
        try:
            pid = int(json.loads((path / MARKER).read_text(encoding="utf-8")).get("pid", 0))
        except (OSError, ValueError, TypeError, AttributeError):
            continue
        if pid and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def refuse_dot_outputs(final: Path) -> None:
    """Refuse ``.``, ``..`` and ``/`` as an output folder: they always exist and are never edgefuse's to replace.

    Raises:
        OutputExistsError: ``final`` is one of them.
    """
    if Path(final).name in ("", ".", ".."):
        raise OutputExistsError(
            f"output folder {str(final)!r} is not a new folder; name one that does not exist, e.g. out/model"
        )


def check_output_dir(
    final: Path, *, overwrite: bool, inputs: Iterable[str | Path] = (), require_marker: bool = True
) -> None:
    """Fail fast, before any work: the checks :func:`atomic_dir` makes, run up front by the commands.

    Raises:
        OutputExistsError: ``final`` exists without ``overwrite``, or may not be replaced (:func:`check_replaceable`).
    """
    final = Path(final)
    refuse_dot_outputs(final)
    refuse_symlink(final, "output folder")
    if final.exists():
        if not overwrite:
            raise OutputExistsError(f"output folder {str(final)!r} already exists; pass --overwrite to replace it")
        check_replaceable(final, inputs=inputs, require_marker=require_marker)


@contextlib.contextmanager
def atomic_dir(
    final: Path,
    *,
    overwrite: bool = False,
    inputs: Iterable[str | Path] = (),
    require_marker: bool = True,
    user_modes: bool = True,
) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it is renamed to ``final`` in one step.

    The temporary folder carries :data:`MARKER` (so ``final`` does too). On any exception (or Ctrl-C) it is
    removed and ``final`` is left as it was.

    Args:
        final: the output folder.
        overwrite: replace ``final`` if it exists (only when :func:`check_replaceable` allows it).
        inputs: the command's inputs; a folder holding one of them is never replaced.
        require_marker: False only for folders whose name edgefuse chose inside a folder it owns (stage folders
            of a locked run folder, checkpoints, its cache).
        user_modes: give files written private (0600, as safetensors and mkstemp make them) the user's umask
            before the rename; False for a tree whose modes matter as they are (the ARM sandbox's root).

    Raises:
        OutputExistsError: ``final`` exists and ``overwrite`` is False, or it appeared while we worked, or it may
            not be replaced.

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "export"
        >>> with atomic_dir(out) as tmp:
        ...     _ = (tmp / "model.onnx").write_bytes(b"x")
        >>> sorted(p.name for p in out.iterdir())
        ['.edgefuse', 'model.onnx']
    """
    final = Path(final)
    inputs = list(inputs)
    check_output_dir(final, overwrite=overwrite, inputs=inputs, require_marker=require_marker)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_partials(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=_PARTIAL, dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; the final folder gets the usual permissions
        write_marker(tmp)
        yield tmp
        if user_modes:
            apply_umask(tmp)
        _publish_dir(tmp, final, overwrite=overwrite, inputs=inputs, require_marker=require_marker)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def apply_umask(folder: Path) -> None:
    """Give every file under ``folder`` that was created private (mode 0600) the mode of a normal file under the
    user's umask (0644 under 022): libraries such as safetensors create files 0600, which another user or a
    non-root container could not read. Other modes (executables, anything deliberate) are left alone."""
    mode = 0o666 & ~current_umask()
    for path in Path(folder).rglob("*"):
        if path.is_symlink() or not path.is_file():
            continue
        if path.stat().st_mode & 0o777 == 0o600 and mode != 0o600:
            os.chmod(path, mode)


def _publish_dir(tmp: Path, final: Path, *, overwrite: bool, inputs: list, require_marker: bool) -> None:
    try:
        _rename_noreplace(tmp, final)
        return
    except FileExistsError:
        if not overwrite:
            raise OutputExistsError(
                f"output folder {str(final)!r} appeared while edgefuse was writing it (another run?); nothing was "
                "replaced: pass --overwrite or choose another folder"
            ) from None
    # overwrite: check again what is there now, move it aside, rename ours in, then delete the old one
    check_replaceable(final, inputs=inputs, require_marker=require_marker)
    trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".old", dir=final.parent))
    os.rmdir(trash)
    os.rename(final, trash)
    try:
        _rename_noreplace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            _rename_noreplace(trash, final)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def read_text_file(path: Path, what: str, *, error: type = ConfigError, max_bytes: int | None = None) -> str:
    """The UTF-8 text of ``path``, with one-line errors for a missing, oversized or non-UTF-8 file.

    Raises:
        TargetNotFoundError: ``path`` is not a file.
        ``error``: the file is larger than ``max_bytes`` or not UTF-8 text.
    """
    path = Path(path)
    if not path.is_file():
        raise TargetNotFoundError(f"{what} {str(path)!r} does not exist")
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise error(f"{what} {str(path)!r} is {path.stat().st_size:,} bytes, over the {max_bytes:,}-byte limit; "
                    "is it the right file?")
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{what} {str(path)!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def parse_yaml(text: str, source: str) -> Any:
    """``yaml.safe_load`` with a cap on alias references, so a "billion laughs" file is refused at once.

    Raises:
        ConfigError: invalid YAML, or more than :data:`MAX_YAML_ALIASES` aliases.

    Example:
        >>> parse_yaml("a: &x [1, 2]\\nb: *x", "demo")
        {'a': [1, 2], 'b': [1, 2]}
    """
    import yaml

    try:
        aliases = sum(1 for ev in yaml.parse(text, Loader=yaml.SafeLoader) if isinstance(ev, yaml.AliasEvent))
        expanded = _expanded_nodes(yaml.compose(text, Loader=yaml.SafeLoader)) if aliases else 0
        if aliases > MAX_YAML_ALIASES or expanded > MAX_YAML_NODES:
            raise ConfigError(
                f"{source} uses {aliases} YAML aliases that expand to {expanded:,} values "
                f"(limits {MAX_YAML_ALIASES} aliases, {MAX_YAML_NODES:,} values); refusing what looks like an alias "
                "bomb: write the values out"
            )
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or exc.__class__.__name__
        raise ConfigError(f"{source} is not valid YAML{where}: {problem}") from None


def _expanded_nodes(root: Any) -> int:
    """How many values the composed YAML graph ``root`` holds with every alias expanded (shared nodes memoised,
    so this is linear in the file, not in the expansion)."""
    import yaml

    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        sizes[key] = 1  # a recursive alias counts once instead of looping
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        sizes[key] = total
        return total

    return 0 if root is None else size(root)


def read_yaml(path: Path, what: str = "config file") -> Any:
    """A YAML file read safely: at most :data:`MAX_CONFIG_BYTES`, UTF-8, limited aliases, ``safe_load``.

    Raises:
        TargetNotFoundError: the file does not exist.
        ConfigError: too large, not UTF-8, not valid YAML, or an alias bomb.
    """
    text = read_text_file(path, what, max_bytes=MAX_CONFIG_BYTES)
    return parse_yaml(text, f"{what} {str(path)!r}")


def read_yaml_mapping(path: Path, what: str = "config file") -> dict[str, Any]:
    """:func:`read_yaml` of a file that must hold a mapping (empty file: ``{}``).

    Raises:
        ConfigError: see :func:`read_yaml`, or the file holds something other than a mapping.
    """
    data = read_yaml(path, what)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {str(path)!r} must hold a mapping of settings, not {type(data).__name__}")
    return data


def describe_os_error(exc: OSError) -> str | None:
    """One line for an I/O failure the user can fix (full disk, read-only or forbidden folder), else None."""
    where = exc.filename or exc.filename2
    path = f" {str(where)!r}" if where else ""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device while writing{path}; free space or write elsewhere (nothing complete " \
               "was left behind)"
    if exc.errno == errno.EROFS:
        return f"cannot write{path}: the file system is read-only; choose an output folder you can write"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write{path}: permission denied (read-only or immutable folder); choose a writable output folder"
    return None


__all__ = [
    "MARKER", "MAX_CONFIG_BYTES", "MAX_YAML_ALIASES", "MAX_YAML_NODES", "OutputWriteError", "apply_umask",
    "atomic_dir", "check_output_dir",
    "check_replaceable", "clean_stale_partials", "current_umask", "describe_os_error", "is_marked", "parse_yaml",
    "publish_file", "read_text_file", "read_yaml", "read_yaml_mapping", "refuse_dot_outputs", "refuse_symlink",
    "temp_file", "write_json_atomic", "write_marker", "write_text_atomic",
]
