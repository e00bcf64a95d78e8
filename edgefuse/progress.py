"""Progress of long work: a tqdm bar on a terminal, a one-line heartbeat at most every 30 s anywhere else.

CI logs and ``nohup`` files do not render tqdm's carriage returns (one endless line, or thousands), and a silent
job looks hung. When stderr is not a terminal, :func:`progress_bar` prints instead, at most every
:data:`HEARTBEAT_S` seconds, one line with the step, the figures given to :meth:`Heartbeat.update`, the
elapsed time and the estimated time left.

Example:
    >>> import io
    >>> hb = Heartbeat(total=4, desc="finetune", unit="step", stream=io.StringIO(), every_s=0.0)
    >>> hb.update(1, loss="0.5000"); hb.stream.getvalue().split(", elapsed")[0]
    'finetune: step 1/4 (25%), loss 0.5000'
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

HEARTBEAT_S = 30.0
"""Most one heartbeat line per this many seconds."""

_last_line = [time.monotonic()]  # when any heartbeat line was last written: keep_alive stays quiet meanwhile


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Heartbeat:
    """A progress reporter for logs: ``update`` counts; a line is printed when ``every_s`` has passed."""

    def __init__(self, total: int | None, *, desc: str, unit: str = "step", initial: int = 0,
                 stream: IO[str] | None = None, every_s: float = HEARTBEAT_S) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream if stream is not None else sys.stderr
        self.every_s = every_s
        self._start_n = initial
        self._t0 = self._last = time.monotonic()
        self._postfix: dict[str, Any] = {}

    def set_postfix(self, **figures: Any) -> None:
        """Figures shown in the next line (``loss=...``), as tqdm's ``set_postfix``."""
        self._postfix = figures

    def update(self, n: int = 1, **figures: Any) -> None:
        """Count ``n`` more units; print a line when the interval has passed."""
        self.n += n
        if figures:
            self._postfix = figures
        now = time.monotonic()
        if now - self._last >= self.every_s:
            self._last = _last_line[0] = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def line(self, now: float | None = None) -> str:
        """The heartbeat line for the current count."""
        elapsed = (now if now is not None else time.monotonic()) - self._t0
        done = self.n - self._start_n
        parts = [f"{self.desc}: {self.unit} {self.n}" + (f"/{self.total}" if self.total else "")
                 + (f" ({100 * self.n / self.total:.0f}%)" if self.total else "")]
        parts += [f"{k} {v}" for k, v in self._postfix.items()]
        parts.append(f"elapsed {_clock(elapsed)}")
        if self.total and done > 0:
            parts.append(f"ETA {_clock(elapsed / done * (self.total - self.n))}")
        return ", ".join(parts)

    def close(self) -> None:
        """Nothing to clean up (a heartbeat leaves no bar behind)."""


def progress_bar(total: int | None, *, desc: str, unit: str = "step", initial: int = 0) -> Any:
    """tqdm on a terminal, else a :class:`Heartbeat`; both have ``update``, ``set_postfix`` and ``close``."""
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
    return Heartbeat(total, desc=desc, unit=unit, initial=initial)


@contextlib.contextmanager
def keep_alive(what: str, *, enabled: bool = True, stream: IO[str] | None = None,
               every_s: float = HEARTBEAT_S) -> Iterator[None]:
    """While the block runs, print ``<what>: still working, elapsed ...`` whenever ``every_s`` seconds passed
    without any heartbeat line, so that no long command (an export, a quantization, a profile) is silent in a
    CI log. A daemon thread; it stops when the block ends, however it ends.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with keep_alive("edgefuse export", stream=out, every_s=0.05):
        ...     time.sleep(0.2)
        >>> out.getvalue().splitlines()[0].startswith("edgefuse export: still working, elapsed 0m00s")
        True
    """
    if not enabled:
        yield
        return
    out = stream if stream is not None else sys.stderr
    stop = threading.Event()
    t0 = _last_line[0] = time.monotonic()

    def beat() -> None:
        while not stop.wait(min(every_s, 1.0)):
            now = time.monotonic()
            if now - _last_line[0] >= every_s:
                _last_line[0] = now
                out.write(f"{what}: still working, elapsed {_clock(now - t0)}\n")
                out.flush()

    thread = threading.Thread(target=beat, name="edgefuse-keep-alive", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=2.0)
