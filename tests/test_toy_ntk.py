"""The toy check of method.md 1.6, with closed-form gradients in numpy and every variant built by the shipped
``edgefuse.fusion.methods.compress_mlp``.

One hidden layer, d = 8, 5 distinct sub-MLPs duplicated with counts {1, 2, 3, 4, 6} (p = 16), scalar output
``f(x) = sum_i w2_i act(w1_i . x + b1_i) + b2``, 20 random inputs. Errors are relative Frobenius errors against
the original model; "noise" adds N(0, 0.05^2) to every copy.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.special import erf
from tolerances import (
    FLOAT64_ATOL,
    FLOAT64_RTOL,
    TOY_CENTROID_MIN_ERROR,
    TOY_EXACT_ATOL,
    TOY_FP32_ROUNDING_ATOL,
    TOY_FUSION_GD_MIN_ERROR,
    TOY_FUSION_NOISY_SIGN_MAX,
    TOY_MERGE_SIGN_MIN_ERROR,
    TOY_NOISY_OUTPUT_MAX,
    TOY_SQRT_GELU_OUTPUT_MIN_ERROR,
    TOY_SQRT_SIGN_MIN_ERROR,
)

from edgefuse.fusion.clustering import MlpWeights
from edgefuse.fusion.methods import compress_mlp

D, COUNTS, N_INPUTS, NOISE = 8, (1, 2, 3, 4, 6), 20, 0.05
METHODS = ("fusion", "merge", "cluster", "centroid")


def act(z: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """The activation and its derivative (exact-erf GELU, as BERT's)."""
    if kind == "relu":
        return np.maximum(z, 0.0), (z > 0).astype(np.float64)
    cdf = 0.5 * (1.0 + erf(z / math.sqrt(2.0)))
    pdf = np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    return z * cdf, cdf + z * pdf


def forward_and_grads(w: MlpWeights, scale: np.ndarray, x: np.ndarray, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """f(x) and the per-example gradient rows G over [W1, b1, w2, b2] (the scale is frozen: no gradient)."""
    w1, b1, w2 = (t.double().numpy() for t in (w.up, w.up_bias, w.down[0]))
    a, da = act(x @ w1.T + b1, kind)  # (n, k)
    f = a @ (scale * w2)
    g_b1 = da * (scale * w2)  # (n, k)
    g_w1 = (g_b1[:, :, None] * x[:, None, :]).reshape(len(x), -1)  # (n, k * d)
    g_w2 = a * scale
    return f, np.concatenate([g_w1, g_b1, g_w2, np.ones((len(x), 1))], axis=1)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def toy_errors(kind: str, noise: float, seed: int = 0) -> dict[str, dict[str, float]]:
    """{method: {output, gd, sign}} relative errors of every variant against the duplicated original."""
    rng = np.random.default_rng(seed)
    idx = np.repeat(np.arange(len(COUNTS)), COUNTS)
    base = rng.normal(size=(len(COUNTS), D + 2))  # [w1 | b1 | w2] of the distinct sub-MLPs
    theta = base[idx] + noise * rng.normal(size=(len(idx), D + 2))
    theta = theta.astype(np.float32)  # the weights a model would hold; everything after is float64
    x = rng.normal(size=(N_INPUTS, D))
    orig = MlpWeights(  # canonical layout: up [p, d], up_bias [p], down [d_out=1, p]
        up=torch.from_numpy(theta[:, :D]),
        up_bias=torch.from_numpy(theta[:, D]),
        down=torch.from_numpy(theta[:, D + 1]).reshape(1, -1),
    )
    f0, g0 = forward_and_grads(orig, np.ones(len(idx)), x, kind)
    out = {}
    for method in METHODS:
        comp = compress_mlp(orig, method, len(COUNTS), seed=0)
        scale = np.ones(len(COUNTS)) if comp.scale is None else comp.scale.double().numpy()
        f, g = forward_and_grads(comp.weights, scale, x, kind)
        out[method] = {
            "output": rel(f, f0),
            "gd": rel(g @ g.T, g0 @ g0.T),
            "sign": rel(g @ np.sign(g).T, g0 @ np.sign(g0).T),
        }
    return out


def test_closed_form_gradients_match_autograd() -> None:
    """Guard the numpy gradients (the rest of the file relies on them) against torch autograd."""
    rng = np.random.default_rng(1)
    w = MlpWeights(up=torch.randn(4, D), up_bias=torch.randn(4), down=torch.randn(1, 4))
    scale = np.array([1.0, 2.0, 3.0, 4.0])
    x = rng.normal(size=(3, D))
    for kind, fn in (("relu", torch.relu), ("gelu", torch.nn.functional.gelu)):
        _, g = forward_and_grads(w, scale, x, kind)
        params = [t.double().clone().requires_grad_(True) for t in (w.up, w.up_bias, w.down[0])]
        b2 = torch.zeros((), dtype=torch.float64, requires_grad=True)
        for i in range(len(x)):
            f = (torch.tensor(scale) * params[2] * fn(torch.from_numpy(x[i]) @ params[0].T + params[1])).sum() + b2
            auto = torch.cat([t.reshape(-1) for t in torch.autograd.grad(f, [*params, b2])]).numpy()
            np.testing.assert_allclose(g[i], auto, rtol=FLOAT64_RTOL, atol=FLOAT64_ATOL)


@pytest.mark.parametrize("kind", ["relu", "gelu"])
def test_exact_duplicates(kind: str) -> None:
    """method.md 1.6, noise 0: fusion reproduces the output and the sign kernel exactly, merge the output but not
    the sign kernel, sqrt(D) the GD kernel for ReLU only, plain centroids nothing."""
    err = toy_errors(kind, 0.0)
    assert err["fusion"]["output"] < TOY_EXACT_ATOL
    assert err["fusion"]["sign"] < TOY_EXACT_ATOL
    assert err["fusion"]["gd"] > TOY_FUSION_GD_MIN_ERROR  # the GD kernel is scaled by n_j^2: fusion does not target it
    assert err["merge"]["output"] < TOY_FP32_ROUNDING_ATOL
    assert err["merge"]["sign"] > TOY_MERGE_SIGN_MIN_ERROR
    assert err["centroid"]["output"] > TOY_CENTROID_MIN_ERROR and err["centroid"]["sign"] > TOY_CENTROID_MIN_ERROR
    if kind == "relu":  # relu(sqrt(n) z) = sqrt(n) relu(z): same forward, and the GD kernel is matched
        assert err["cluster"]["output"] < TOY_FP32_ROUNDING_ATOL
        assert err["cluster"]["gd"] < TOY_FP32_ROUNDING_ATOL
    else:
        assert err["cluster"]["output"] > TOY_SQRT_GELU_OUTPUT_MIN_ERROR
    assert err["cluster"]["sign"] > TOY_SQRT_SIGN_MIN_ERROR


@pytest.mark.parametrize("kind", ["relu", "gelu"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_noisy_duplicates_sign_kernel_order(kind: str, seed: int) -> None:
    """With N(0, 0.05^2) noise the sign-kernel error orders fusion < merge < cluster(sqrt D) < centroid.

    method.md 6.1 expects "fusion < sqrt(D)-cluster < merge"; its own toy table (1.6) and this test find merge
    below sqrt(D): merge keeps the W1/b1 part of the sign kernel exact and only under-weights the W2 part by
    1/n_j, while sqrt(D) under-weights every part by 1/sqrt(n_j).
    """
    err = toy_errors(kind, NOISE, seed)
    sign = [err[m]["sign"] for m in METHODS]
    assert sign == sorted(sign), dict(zip(METHODS, sign, strict=True))
    assert err["fusion"]["sign"] < TOY_FUSION_NOISY_SIGN_MAX
    assert err["fusion"]["output"] < TOY_NOISY_OUTPUT_MAX
