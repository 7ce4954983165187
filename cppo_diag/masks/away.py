"""The ratio rho_t and the away test (SPEC.md "Notation" and "Away test"): the one definition of both.

    rho_t  = exp(clamp(log pi - log mu, -20, 20))        (anchored to mu, or to pi_old with anchor="old")
    away_t = A_t * (rho_t - 1) > 0                        (the update moves pi further from mu)

Every rule evaluates these in the batch's compute dtype (float32 for float32/16 inputs, ``compute_mask``); the
offline analyses call :func:`direction_array` on the logged float32 columns, so a token with a tiny
log-ratio, whose rho rounds to exactly 1, is "not away" everywhere (a float64 ``A * log-ratio > 0`` would
call it away). The functions take torch tensors; importing this module does not load torch.
"""

from __future__ import annotations

__all__ = ["LOG_RATIO_CLAMP", "log_ratio", "ratio", "drift", "away_test", "direction_array"]

LOG_RATIO_CLAMP = 20.0  # |log pi - log mu| is clamped here before exp (SPEC notation: rho_t)


def log_ratio(logp, logp_anchor, *, diff=None):
    """(B, T) clamp(log pi - log anchor, -20, 20), rho's exponent (torch tensors).

    ``diff``: ``logp - logp_anchor`` already computed by the caller (a buffer it no longer needs): it is
    clamped in place instead of allocating a new tensor.
    """
    d = logp - logp_anchor if diff is None else diff  # (B, T)
    return d.clamp_(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def ratio(logp, logp_anchor):
    """(B, T) rho_t = exp(clamp(log pi - log anchor, -20, 20)) (SPEC notation)."""
    return log_ratio(logp, logp_anchor).exp_()


def drift(advantages, rho, *, overwrite: bool = False):
    """(B, T) A_t * (rho_t - 1): > 0 moves pi away from mu, < 0 back toward it (SPEC "Away test").

    advantages (B, T), (B, 1) or anything that broadcasts against ``rho`` (B, T).
    ``overwrite=True``: ``rho`` is a buffer the caller no longer needs; the result is computed in it.
    """
    if overwrite:
        return rho.sub_(1.0).mul_(advantages)
    return (rho - 1.0) * advantages  # x * A == A * x exactly


def away_test(advantages, rho, valid=None, *, overwrite: bool = False):
    """(B, T) bool: A_t * (rho_t - 1) > 0 (SPEC "Away test"), False where ``valid`` (B, T) bool is False.

    ``overwrite``: as :func:`drift`."""
    away = drift(advantages, rho, overwrite=overwrite) > 0
    if valid is not None:
        away &= valid
    return away


def direction_array(advantages, logp, logp_anchor):
    """(N,) int8 numpy sign of A_t * (rho_t - 1) on logged columns: 1 away from mu, -1 toward it, 0 neither
    (rho rounds to 1, A = 0, or a NaN/null input).

    ``advantages``, ``logp``, ``logp_anchor``: array-likes of equal length, cast to float32 and evaluated by
    :func:`ratio` and :func:`drift`, exactly as the rules evaluate float32 inputs."""
    import numpy as np
    import torch

    def f32(x):  # a writable C-contiguous float32 array (copied only when it is not one already)
        return torch.from_numpy(np.require(np.asarray(x, dtype=np.float32), requirements=("C", "W")))

    d = drift(f32(advantages), ratio(f32(logp), f32(logp_anchor)), overwrite=True)  # (N,)
    return torch.sign(d).nan_to_num_(0.0).to(torch.int8).numpy()
