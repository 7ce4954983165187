"""The away test (SPEC.md "Away test"), on the ratio rho_t (SPEC.md "Notation", defined in ``masks.logratio``).

    rho_t  = exp(clamp(log pi - log mu, -20, 20))        (anchored to mu, or to pi_old with anchor="old")
    away_t = A_t * (rho_t - 1) > 0                        (the update moves pi further from mu)

Every rule evaluates these in the batch's compute dtype (float32 for float32/16 inputs, ``compute_mask``); the
offline analyses call :func:`direction_array` on the logged float32 columns, so a token with a tiny
log-ratio, whose rho rounds to exactly 1, is "not away" everywhere (a float64 ``A * log-ratio > 0`` would
call it away). The functions take torch tensors; importing this module does not load torch. rho and its clamp
are written in ``masks.logratio`` (with the other log-ratios, for every array type) and re-exported here.
"""

from __future__ import annotations

from cppo_diag.masks.logratio import LOG_RATIO_CLAMP, log_ratio, ratio

__all__ = ["LOG_RATIO_CLAMP", "log_ratio", "ratio", "drift", "away_test", "direction_array"]


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
