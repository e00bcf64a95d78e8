"""JUnit XML for ``edgefuse check --junit PATH``: one test case per budget, so CI systems (GitHub Actions test
reporters, GitLab, Jenkins) show each budget as a passed or failed test.

The layout follows the common JUnit schema (``testsuites > testsuite > testcase`` with ``failure`` /
``error`` children and ``properties``); ElementTree escapes every value.

Example:
    >>> from edgefuse.check.budgets import BudgetVerdict
    >>> v = BudgetVerdict("max_size_mib", "size_mib", "<=", 30.0, 31.5, "MiB", False, "size on disk")
    >>> xml = junit_xml([v], suite="edgefuse.check", properties={"config": "ci.yaml"})
    >>> '<failure message="max_size_mib: measured 31.5 MiB, limit &lt;= 30 MiB"' in xml
    True
"""

from __future__ import annotations

import socket
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

from edgefuse.check.budgets import BudgetVerdict
from edgefuse.io_utils import write_text_atomic


def junit_xml(
    verdicts: Sequence[BudgetVerdict],
    *,
    suite: str = "edgefuse.check",
    classname: str = "edgefuse.check",
    properties: Mapping[str, str] | None = None,
    error: str | None = None,
    seconds: float = 0.0,
    system_out: str = "",
) -> str:
    """The JUnit XML document for ``verdicts``.

    Args:
        verdicts: one test case each; a failed one gets a ``<failure>``.
        suite: the test suite name.
        classname: the test cases' class name (CI tools group by it; use the config's name).
        properties: extra ``<property>`` entries (config path, candidate graph, run folder...).
        error: when the pipeline itself failed before any budget could be judged: one test case ``pipeline``
            with an ``<error>`` carrying this message.
        seconds: the suite's duration.
        system_out: text attached as ``<system-out>`` (the printed table).
    """
    failures = sum(1 for v in verdicts if not v.passed)
    errors = 1 if error else 0
    tests = len(verdicts) + errors
    root = ET.Element("testsuites", name=suite, tests=str(tests), failures=str(failures), errors=str(errors),
                      time=f"{seconds:.3f}")
    ts = ET.SubElement(
        root, "testsuite", name=suite, tests=str(tests), failures=str(failures), errors=str(errors), skipped="0",
        time=f"{seconds:.3f}", timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        hostname=socket.gethostname(),
    )
    if properties:
        props = ET.SubElement(ts, "properties")
        for key, value in properties.items():
            ET.SubElement(props, "property", name=str(key), value=str(value))
    if error:
        case = ET.SubElement(ts, "testcase", classname=classname, name="pipeline", time="0")
        ET.SubElement(case, "error", message=error.splitlines()[0], type=error.split(":", 1)[0]).text = error
    for v in verdicts:
        case = ET.SubElement(ts, "testcase", classname=classname, name=v.budget, time="0")
        if not v.passed:
            failure = ET.SubElement(case, "failure", message=v.message, type="BudgetExceeded")
            failure.text = f"{v.message}\n{v.detail}"
    if system_out:
        ET.SubElement(ts, "system-out").text = system_out
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(path: str | Path, verdicts: Sequence[BudgetVerdict], **kwargs: object) -> Path:
    """Write :func:`junit_xml` to ``path`` atomically; return the path."""
    path = Path(path)
    write_text_atomic(path, junit_xml(verdicts, **kwargs))  # type: ignore[arg-type]
    return path
