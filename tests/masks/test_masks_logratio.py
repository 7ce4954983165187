"""The log-ratio formulas (``cppo_diag.masks.logratio``): one definition, the same values on torch, numpy and
polars, and the cancellation-free forms exact where the naive ones lose their digits."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch

from cppo_diag.masks import logratio as L

A = np.array([-0.1, -5.0, -1e-6, 0.0, -30.0, -2.0, -0.7], dtype=np.float64)
B = np.array([-0.1 - 1e-9, -1.0, -2e-6, -30.0, 0.0, -2.0, -0.69], dtype=np.float64)


def _exact_tv(a, b):  # |e^a - e^b| in higher precision, by math.fsum of the expm1 form per element
    return np.array([abs(math.exp(max(x, y)) * math.expm1(-abs(x - y))) for x, y in zip(a, b)])


def _engines(a, b):
    df = pl.DataFrame({"a": a, "b": b})
    yield "numpy", a, b, lambda r: np.asarray(r)
    yield "torch", torch.from_numpy(a), torch.from_numpy(b), lambda r: r.numpy()
    yield "series", df["a"], df["b"], lambda r: r.to_numpy()
    yield "expr", pl.col("a"), pl.col("b"), lambda r: df.select(r.alias("r"))["r"].to_numpy()


@pytest.mark.parametrize("fn", ["tv", "prob_diff", "log_ratio", "ratio"])
def test_same_values_on_every_engine(fn):
    ref = getattr(L, fn)(A, B)
    for name, a, b, back in _engines(A, B):
        np.testing.assert_allclose(back(getattr(L, fn)(a, b)), ref, rtol=1e-15, atol=0, err_msg=name)


def test_tv_is_cancellation_free():
    got = L.tv(A, B)
    np.testing.assert_allclose(got, _exact_tv(A, B), rtol=1e-14)
    assert got[0] > 0 and got[5] == 0.0
    np.testing.assert_allclose(L.prob_diff(A, B), np.sign(A - B) * got)
    # float32: the naive difference of exponentials keeps no digit of a 1e-7 gap; the stable form keeps ~7
    a32, b32 = np.float32([-0.1]), np.float32([-0.1]) - np.float32(1e-7)
    exact = _exact_tv(a32.astype(np.float64), b32.astype(np.float64))
    assert abs(L.tv(a32, b32)[0] / exact[0] - 1) < 1e-6


def test_clamp_and_kl_estimators():
    lr = L.log_ratio(np.array([-50.0, 0.0, 50.0]), np.zeros(3))
    assert lr.tolist() == [-L.LOG_RATIO_CLAMP, 0.0, L.LOG_RATIO_CLAMP]
    x = np.array([-1.0, -1e-9, 0.0, 1e-9, 2.0])
    np.testing.assert_allclose(L.kl_k1(x), -x)
    np.testing.assert_allclose(L.kl_k2(x), x * x / 2)
    np.testing.assert_allclose(L.kl_k3(x), [math.expm1(v) - v for v in x], rtol=1e-15)
    assert (L.kl_k3(x) >= 0).all() and L.kl_k3(x)[1] > 0  # exp(x) - 1 - x would round this to 0
    t = torch.tensor(x, requires_grad=True)
    L.kl_k3(L.log_ratio(t, torch.zeros(5))).sum().backward()  # differentiable through the clamp
    np.testing.assert_allclose(t.grad.numpy(), np.expm1(x), rtol=1e-12, atol=1e-15)


def test_attribution_terms_sum_to_the_total():
    rng = np.random.default_rng(0)
    cols = {c: -rng.random(8) for c in ("logp", "logp_rollout", "logp_old", "logp_behavior")}
    total = L.attribution_term("engine+lag+update", cols)
    parts = sum(L.attribution_term(t, cols) for t in ("engine", "lag", "update"))
    np.testing.assert_allclose(parts, total, rtol=1e-12)
    np.testing.assert_allclose(L.attribution_term("engine+lag", cols) + L.attribution_term("update", cols), total)
    with pytest.raises(ValueError, match="terms: expected names"):
        L.attribution_term("drift", cols)


def test_imports_without_torch():
    code = "import sys, cppo_diag.masks.logratio, cppo_diag.masks.params; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
