"""Log-ratios and the per-token quantities made from them (SPEC "Notation", "Per-token divergence",
"Attribution"): the one definition of each, for torch tensors, numpy arrays and polars expressions.

    log_ratio  = clamp(log pi - log mu, -20, 20)                 rho's exponent (SPEC notation)
    rho        = exp(log_ratio)                                  the ratio anchored to mu (or pi_old)
    tv         = |pi - mu| = e^max(a, b) (1 - e^-|a - b|)        a = log pi, b = log mu, cancellation-free
    prob_diff  = pi - mu, the same with the sign of a - b
    kl_k1      = -log_ratio                                      Schulman's estimators of KL(mu || pi) from
    kl_k2      = log_ratio^2 / 2                                 samples of mu, on lr = log pi - log mu
    kl_k3      = rho - 1 - log rho = expm1(lr) - lr              (k3 >= 0)
    attribution terms (exact per token: engine + lag + update = log pi - log mu)
        engine = logp_behavior - logp_rollout, lag = logp_old - logp_behavior, update = logp - logp_old

Why the stable forms: ``exp(a) - exp(b)`` loses every digit of a small |pi - mu| to cancellation (in float32, a
difference below ~1e-7 of pi is noise), and ``exp(lr) - 1 - lr`` loses k3's for a small log-ratio; the forms
above keep a relative error of a few ulp whatever the size. The rules' own D_t (``masks.divergence``) stays
|p - q| on the probabilities the rule already holds, so that offline recomputes match the masks a trainer
applied bit for bit (``tests/reference_loop.py``).

The formulas are written once with operator arithmetic; only exp, expm1, abs, max, clip and sign are looked up
on the input's engine (the way ``masks.schedule`` serves several callers). Polars expressions evaluate expm1
through numpy's ufunc, element-wise, so they stay lazy and streaming. No torch import: the polars analyses use
this module without loading torch.
"""

from __future__ import annotations

from types import SimpleNamespace

__all__ = ["LOG_RATIO_CLAMP", "ATTRIBUTION_TERMS", "log_ratio", "ratio", "tv", "prob_diff", "kl_k1", "kl_k2",
           "kl_k3", "attribution_term"]

LOG_RATIO_CLAMP = 20.0  # |log pi - log mu| is clamped here before exp (SPEC notation: rho_t)

# term -> (minuend, subtrahend) log-prob columns (SPEC "Attribution"); a "+" joins the terms a run cannot separate
ATTRIBUTION_TERMS: dict[str, tuple[str, str]] = {
    "engine": ("logp_behavior", "logp_rollout"),
    "lag": ("logp_old", "logp_behavior"),
    "update": ("logp", "logp_old"),
    "engine+lag": ("logp_old", "logp_rollout"),
    "lag+update": ("logp", "logp_behavior"),
    "engine+lag+update": ("logp", "logp_rollout"),
}


def _engine(x) -> SimpleNamespace:
    """The element-wise functions of ``x``'s array library: torch, polars (expression or series) or numpy."""
    module = type(x).__module__
    if module.startswith("torch"):
        import torch

        return SimpleNamespace(name="torch", exp=torch.exp, expm1=torch.expm1, abs=torch.abs, maximum=torch.maximum,
                               sign=torch.sign, clip=lambda v, lo, hi: v.clamp(lo, hi))
    import numpy as np

    if module.startswith("polars"):
        import polars as pl

        def maximum(a, b):
            return pl.max_horizontal(a, b) if isinstance(a, pl.Expr) else pl.select(pl.max_horizontal(a, b)).to_series()

        return SimpleNamespace(name="polars", exp=lambda v: v.exp(), expm1=np.expm1, abs=lambda v: v.abs(),
                               maximum=maximum, sign=lambda v: v.sign(), clip=lambda v, lo, hi: v.clip(lo, hi))
    return SimpleNamespace(name="numpy", exp=np.exp, expm1=np.expm1, abs=np.abs, maximum=np.maximum, sign=np.sign,
                           clip=np.clip)


def log_ratio(logp, logp_anchor, *, diff=None):
    """clamp(log pi - log anchor, -20, 20), rho's exponent, in the inputs' dtype.

    ``diff`` (torch): ``logp - logp_anchor`` already computed by the caller (a buffer it no longer needs): it is
    clamped in place instead of allocating a new tensor. The torch result is differentiable through ``logp``.
    """
    d = logp - logp_anchor if diff is None else diff
    if type(d).__module__.startswith("torch"):
        return d.clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)  # d is a fresh buffer (or the caller's)
    return _engine(d).clip(d, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def ratio(logp, logp_anchor):
    """rho_t = exp(clamp(log pi - log anchor, -20, 20)) (SPEC notation)."""
    lr = log_ratio(logp, logp_anchor)
    return lr.exp_() if type(lr).__module__.startswith("torch") else _engine(lr).exp(lr)


def tv(logp, logp_anchor):
    """|pi - mu| of the sampled token from the two log-probs, without cancellation:
    exp(max(a, b)) * -expm1(-|a - b|) (SPEC binary_tv on log-probs; relative error a few ulp)."""
    xp = _engine(logp)
    if xp.name == "torch":  # in place on two fresh buffers: (B, T)
        m = xp.maximum(logp, logp_anchor).exp_()
        return m.mul_((logp - logp_anchor).abs_().neg_().expm1_().neg_())
    return xp.exp(xp.maximum(logp, logp_anchor)) * -xp.expm1(-xp.abs(logp - logp_anchor))


def prob_diff(logp, logp_anchor):
    """pi - mu (signed), the cancellation-free :func:`tv` with the sign of log pi - log mu."""
    return _engine(logp).sign(logp - logp_anchor) * tv(logp, logp_anchor)


def kl_k1(lr):
    """k1 = -lr: the plain estimator of KL(mu || pi) from lr = log pi - log mu on samples of mu."""
    return -lr


def kl_k2(lr):
    """k2 = lr^2 / 2 (low variance, biased)."""
    return 0.5 * lr * lr


def kl_k3(lr):
    """k3 = rho - 1 - log rho = expm1(lr) - lr (Schulman's unbiased, non-negative estimator of KL(mu || pi))."""
    return _engine(lr).expm1(lr) - lr


def attribution_term(name: str, columns):
    """One attribution term (SPEC "Attribution") as ``columns[minuend] - columns[subtrahend]``.

    ``columns``: a mapping from log-prob column name (``logp``, ``logp_rollout``, ``logp_old``,
    ``logp_behavior``) to a tensor, array or expression. Unclamped: the terms sum to log pi - log mu exactly."""
    pair = ATTRIBUTION_TERMS.get(name)
    if pair is None:
        raise ValueError(f"terms: expected names from {sorted(ATTRIBUTION_TERMS)}, found {[name]}")
    return columns[pair[0]] - columns[pair[1]]
