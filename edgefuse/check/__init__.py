"""CI gate: run the pipeline, measure the candidate graph and judge every budget of the config.

Takes a pipeline config with a ``check`` section; gives budget verdicts, JUnit XML and an exit code
(0 all pass, 11 a budget failed).

Modules: ``api`` (:func:`run_check`), ``budgets`` (pure verdict logic), ``junit`` (the XML).

The public names load lazily (PEP 562), so importing the package imports no heavy library:

    >>> import edgefuse.check as stage
    >>> "CheckResult" in dir(stage)
    True
"""

from __future__ import annotations

from edgefuse.lazy import lazy_exports

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "CheckResult": "edgefuse.check.api",
    "measure": "edgefuse.check.api",
    "run_check": "edgefuse.check.api",
}

__all__ = sorted(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
