"""Lazy public names for packages (PEP 562): importing a stage package imports no heavy library.

Example:
    >>> getattr_, dir_ = lazy_exports("demo", {"sqrt": "math"})
    >>> getattr_("sqrt")(9.0)
    3.0
    >>> dir_()
    ['sqrt']
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, table: Mapping[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` that import ``table[name]`` (a module) on first use."""

    def __getattr__(name: str) -> Any:
        module = table.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(module), name)

    def __dir__() -> list[str]:
        # the lazy names plus ``__version__`` where the package has one (tab completion shows the public API)
        module = sys.modules.get(package)
        extra = ["__version__"] if module is not None and hasattr(module, "__version__") else []
        return sorted([*table, *extra])

    return __getattr__, __dir__
