"""Pure numeric helpers of the profile stage: latency statistics, interleaved ratios, output parity.

Example:
    >>> p = latency_point([2.0, 1.0, 3.0], [1.0, 1.0, 1.0], threads=1, batch=4, seq=8, warmup=0)
    >>> (p.latency_ms_p50, p.ratio_vs_reference_p50, round(p.throughput_samples_per_s))
    (2.0, 2.0, 2000)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from edgefuse.metrics import cosine
from edgefuse.profile.results import LatencyPoint, OutputParity


def latency_point(
    samples_ms: Sequence[float],
    reference_ms: Sequence[float],
    *,
    threads: int,
    batch: int,
    seq: int,
    warmup: int,
) -> LatencyPoint:
    """Statistics of one graph's timed runs, and its per-round ratio to the reference graph's runs.

    ``samples_ms[i]`` and ``reference_ms[i]`` come from the same interleaved round, so their ratio cancels most
    of the drift of a shared machine; the spread of the ratios (p10..p90) is the honest error bar.
    """
    x = np.asarray(samples_ms, dtype=np.float64)
    r = x / np.asarray(reference_ms, dtype=np.float64)
    mean = float(x.mean())
    return LatencyPoint(
        threads=threads,
        batch_size=batch,
        sequence_length=seq,
        timed_runs=int(x.size),
        warmup_runs=warmup,
        latency_ms_mean=mean,
        latency_ms_std=float(x.std(ddof=1)) if x.size > 1 else 0.0,
        latency_ms_min=float(x.min()),
        latency_ms_p50=float(np.percentile(x, 50)),
        latency_ms_p90=float(np.percentile(x, 90)),
        latency_ms_p99=float(np.percentile(x, 99)),
        latency_ms_max=float(x.max()),
        throughput_samples_per_s=batch * 1e3 / mean,
        samples_ms=tuple(float(v) for v in x),
        ratio_vs_reference_p50=float(np.percentile(r, 50)),
        ratio_vs_reference_mean=float(r.mean()),
        ratio_vs_reference_std=float(r.std(ddof=1)) if r.size > 1 else 0.0,
        ratio_vs_reference_p10=float(np.percentile(r, 10)),
        ratio_vs_reference_p90=float(np.percentile(r, 90)),
    )


def compare_outputs(got: Mapping[str, np.ndarray], ref: Mapping[str, np.ndarray]) -> tuple[OutputParity, ...]:
    """Cosine and max |diff| of every output of ``got`` against ``ref`` (matched by name, else by position).

    For outputs of rank >= 3 (batch, seq, hidden) the cosine of the sequence-mean is reported too
    (``cosine_mean_pooled``): that is what a mean-pooled sentence embedding sees.

    Outputs whose shapes differ are skipped: a fused graph can drop an auxiliary output, and there is nothing to
    compare then.
    """
    pairs = [(n, got[n], ref[n]) for n in got if n in ref]
    if not pairs and len(got) == len(ref):
        pairs = [(n, g, r) for (n, g), r in zip(got.items(), ref.values(), strict=True)]
    out = []
    for name, g, r in pairs:
        if np.shape(g) != np.shape(r):
            continue
        diff = float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(r, np.float64)))) if np.size(g) else 0.0
        pooled = None
        if np.ndim(g) >= 3:
            pooled = cosine(np.asarray(g, np.float64).mean(axis=1), np.asarray(r, np.float64).mean(axis=1))
        out.append(OutputParity(output=name, cosine=cosine(g, r), max_abs_diff=diff, cosine_mean_pooled=pooled))
    return tuple(out)
