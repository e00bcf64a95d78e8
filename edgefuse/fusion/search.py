"""The smallest ``keep_ratio`` that still meets a quality budget, by bisection, with every point reported.

The search assumes quality grows with the kept width (monotone), which holds for fusion up to k-means noise:
it first checks that ``high`` passes (otherwise no ratio in the range can be trusted to), then that ``low``
fails, then halves the bracket ``[failing, passing]`` until it is narrower than ``resolution`` or
``max_points`` points were measured. Ratios are snapped to the widths they really produce, so two ratios that
round to the same width are measured once.

Example:
    >>> from edgefuse.config.search import SearchConfig
    >>> cfg = SearchConfig(min_cosine=0.9, low=0.1, high=1.0, resolution=0.05)
    >>> result = bisect_keep_ratio(lambda r: r, lambda v: v >= 0.42, cfg)  # quality == ratio, for the example
    >>> round(result.keep_ratio, 3), len(result.points)
    (0.438, 7)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from edgefuse.config.search import SearchConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchPoint:
    """One measured keep_ratio, in the order it was tried."""

    keep_ratio: float
    value: float
    passed: bool
    seconds: float


@dataclass(frozen=True)
class SearchResult:
    """The outcome: ``keep_ratio`` is the smallest passing ratio found (None when even ``high`` failed)."""

    metric: str
    budget: float
    reference_value: float | None
    keep_ratio: float | None
    points: tuple[SearchPoint, ...]
    stopped_by: str  # "resolution", "max_points", "low-passes", "high-fails", "width-granularity"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bisect_keep_ratio(
    measure: Callable[[float], float],
    passes: Callable[[float], bool],
    cfg: SearchConfig,
    *,
    snap: Callable[[float], float] = lambda r: r,
    reference_value: float | None = None,
) -> SearchResult:
    """Bisection over keep_ratio in ``[cfg.low, cfg.high]``.

    Args:
        measure: keep_ratio -> the quality value (cosine, or accuracy).
        passes: value -> whether it meets the budget.
        cfg: bounds, resolution and point limit.
        snap: keep_ratio -> the ratio actually realised (width / original width); points are cached by it.
        reference_value: the unfused model's value, recorded for the report.

    Returns:
        Every point tried and the smallest passing ratio.
    """
    budget = cfg.min_cosine if cfg.min_cosine is not None else float(cfg.max_accuracy_drop or 0.0)
    points: list[SearchPoint] = []
    cache: dict[float, SearchPoint] = {}

    def point(ratio: float) -> SearchPoint:
        r = round(snap(ratio), 6)
        if r not in cache:
            start = time.perf_counter()
            value = float(measure(r))
            cache[r] = SearchPoint(r, value, bool(passes(value)), time.perf_counter() - start)
            points.append(cache[r])
            logger.info("search: keep_ratio %.4f -> %s %.4f (%s)", r, cfg.metric, value,
                        "pass" if cache[r].passed else "fail")
        return cache[r]

    def done(keep: float | None, why: str) -> SearchResult:
        return SearchResult(cfg.metric, budget, reference_value, keep, tuple(points), why)

    hi = point(cfg.high)
    if not hi.passed:
        return done(None, "high-fails")
    lo = point(cfg.low)
    if lo.passed:
        return done(lo.keep_ratio, "low-passes")
    good, bad = hi.keep_ratio, lo.keep_ratio
    while good - bad > cfg.resolution:
        if len(points) >= cfg.max_points:
            return done(good, "max_points")
        mid = round(snap((good + bad) / 2), 6)
        if mid in (good, bad):
            return done(good, "width-granularity")
        p = point(mid)
        if p.passed:
            good = p.keep_ratio
        else:
            bad = p.keep_ratio
    return done(good, "resolution")


def width_snapper(widths: list[int], round_to: int = 1) -> Callable[[float], float]:
    """A ``snap`` for :func:`bisect_keep_ratio`: the ratio that the first MLP's width really gets.

    Example:
        >>> width_snapper([1536], round_to=32)(0.3)
        0.3125
    """
    from edgefuse.config.fusion import FusionConfig

    original = widths[0]

    def snap(ratio: float) -> float:
        k = FusionConfig(keep_ratio=min(max(ratio, 1e-6), 1.0), round_to=round_to).target_width(original)
        return k / original

    return snap
