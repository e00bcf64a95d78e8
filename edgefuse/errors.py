"""The edgefuse error hierarchy and the exit-code table.

Every error a user can cause is an :class:`EdgefuseError` subclass. The CLI turns it into one line
on stderr (``edgefuse: error: <message>``) and the exit code of its class, never a traceback.

Exit codes (also in the README):

====  ==============================  ===============================================
code  error                           meaning
====  ==============================  ===============================================
0     -                               success
1     (unexpected exception)          a bug in edgefuse: please report it
2     ConfigError                     bad argument, config key or value
3     TargetNotFoundError             a model path, file, column or layer pattern matched nothing
4     UnsupportedArchitectureError    the model type has no fusion adapter
5     FusionError                     fusion could not be applied (e.g. empty cluster, shape mismatch)
6     DataError                       a data file is unreadable or lacks a column
7     ExportValidationError           the ONNX graph disagrees with PyTorch beyond tolerance
8     QuantizationError               quantization failed or missed its accuracy target
9     ProfileError                    profiling failed (runner crashed, target unreachable)
10    MissingDependencyError          an optional tool or package is not installed
11    BudgetExceededError             ``edgefuse check``: at least one budget failed
12    OutputExistsError               the output exists (pass --overwrite), or may not be replaced (not
                                      written by edgefuse, holds an input, ``.``/``/``/home, a symlink)
13    OutputWriteError                the output could not be written: full disk, read-only or forbidden
                                      folder (the message names the path); nothing complete was left behind
130   (KeyboardInterrupt)             interrupted; no partial artifact was left behind
====  ==============================  ===============================================
"""

from __future__ import annotations


class EdgefuseError(Exception):
    """Base class of every error a user can cause. ``exit_code`` is the CLI's exit status."""

    exit_code: int = 1


class ConfigError(EdgefuseError, ValueError):
    """A bad argument, config key or value."""

    exit_code = 2


class TargetNotFoundError(EdgefuseError, LookupError):
    """A model path, file, column or layer pattern that matched nothing."""

    exit_code = 3


class UnsupportedArchitectureError(EdgefuseError):
    """The model type has no entry in :data:`edgefuse.fusion.archs.MLP_SPECS`."""

    exit_code = 4


class FusionError(EdgefuseError):
    """Fusion could not be applied to a module."""

    exit_code = 5


class DataError(EdgefuseError):
    """A data file is unreadable or lacks a required column."""

    exit_code = 6


class ExportValidationError(EdgefuseError):
    """An exported graph disagrees with PyTorch beyond the tolerance."""

    exit_code = 7


class QuantizationError(EdgefuseError):
    """Quantization failed, did nothing, or missed its accuracy target."""

    exit_code = 8


class ProfileError(EdgefuseError):
    """Profiling failed: the runner crashed or the target is unreachable."""

    exit_code = 9


class MissingDependencyError(EdgefuseError):
    """An optional package or host tool is missing; the message says how to install it."""

    exit_code = 10


class BudgetExceededError(EdgefuseError):
    """At least one budget of ``edgefuse check`` failed."""

    exit_code = 11


class OutputExistsError(EdgefuseError, FileExistsError):
    """The output exists and ``overwrite`` was not given, or it is not edgefuse's to replace."""

    exit_code = 12


class OutputWriteError(EdgefuseError, OSError):
    """The output could not be written: no space left, a read-only file system, or permission denied."""

    exit_code = 13


EXIT_CODES: dict[str, int] = {
    cls.__name__: cls.exit_code
    for cls in (
        ConfigError,
        TargetNotFoundError,
        UnsupportedArchitectureError,
        FusionError,
        DataError,
        ExportValidationError,
        QuantizationError,
        ProfileError,
        MissingDependencyError,
        BudgetExceededError,
        OutputExistsError,
        OutputWriteError,
    )
}
