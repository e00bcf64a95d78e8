"""Automatic fp32 fallback: rank MatMuls by their simulated quantization error, then keep the worst ones in
fp32, one at a time, until the measured end-to-end cosine reaches the target.

The ranking is cheap (one fp32 run that also returns every MatMul input, then numpy): for each weight
MatMul ``Y = X W`` it simulates the mode's arithmetic as its entry in :data:`edgefuse.quantize.modes.MODES`
says (int8: per-tensor uint8 activations x per-channel int8 weights, as MatMulInteger does; int4: symmetric
blocks along the reduction axis) and measures the mean over
tokens (rows) of ``||y - q(x) Q(W)|| / ||y||``. Per token, not over the whole tensor: decoders such as SmolLM2
have "massive activations" (one token, e.g. the first, with a down-projection input ~1000x the others); a
per-tensor int8 scale then rounds every other token's input to zero, yet that token dominates a whole-tensor
norm and hid the damage (measured on SmolLM2-135M, benchmarks/results/export.md). The decision is made on the
real quantized graph, never on the estimate. (int4 with ``int4_8bit_rank: output``, the default, ranks its
fallbacks by the measured KL of each MatMul's 4-bit error instead: :func:`edgefuse.quantize.modes.int4_ranking`.)

Example:
    >>> import numpy as np
    >>> w = np.random.default_rng(0).normal(size=(64, 8)).astype(np.float32)
    >>> 0 < relative_error(np.ones((4, 64), np.float32), w, mode="int4", per_channel=True, reduce_range=False,
    ...                    block_size=32) < 0.2
    True
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from edgefuse.errors import QuantizationError
from edgefuse.quantize.modes import (  # noqa: F401 - the ranking lives beside the mode table; re-exported here
    MAX_TOKENS,
    rank_matmuls,
    relative_error,
    sensitive_matmuls,
)

logger = logging.getLogger(__name__)

def auto_keep(
    ranked: Sequence[tuple[str, float]], base_exclude: list[str], target: float, max_kept: int,
    attempt: Callable[[list[str]], float], first_cosine: float,
) -> tuple[list[str], list[dict[str, Any]]]:
    """Keep ranked MatMuls in fp32 one by one until ``attempt(exclude) >= target``; return (kept, steps).

    Raises:
        QuantizationError: the target was not reached with ``max_kept`` MatMuls in fp32.
    """
    steps: list[dict[str, Any]] = [{"kept": 0, "node": None, "estimated_error": None, "cosine": first_cosine}]
    kept: list[str] = []
    cos = first_cosine
    for name, err in ranked[:max_kept]:
        if cos >= target:
            break
        kept.append(name)
        cos = attempt(base_exclude + kept)
        steps.append({"kept": len(kept), "node": name, "estimated_error": err, "cosine": cos})
        logger.info("auto: kept %d in fp32 (latest %s, rank score %.3g): cosine %.5f", len(kept), name, err, cos)
    if cos < target:
        raise QuantizationError(
            f"auto mode kept {len(kept)} MatMul(s) in fp32 and reached cosine {cos:.5f}, below the target "
            f"{target}; raise --auto-max-kept (now {max_kept}) or lower --auto-target-cosine"
        )
    return kept, steps
