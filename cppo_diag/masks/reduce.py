"""Masked reductions: the one place where ``sum(x * m) / sum(m)`` is written.

Every rule, metric and the policy loss (``cppo_diag.loss``) reduce through these helpers, so padding and
masked tokens are handled the same way everywhere. All helpers are NaN-safe in the verl sense: values at
positions where ``mask`` is False are replaced through ``torch.where`` (so a NaN/Inf in padding never leaks
into a result) and an empty mask gives 0, not NaN.
"""

from __future__ import annotations

import torch

__all__ = [
    "masked_sum",
    "masked_mean",
    "masked_count",
    "masked_max",
    "masked_fraction",
    "safe_div",
]


def _zeros_where_not(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mask = mask.to(torch.bool)
    if values.dtype == torch.bool:
        return values & mask
    return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))


def masked_sum(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Sum of ``values`` over positions where ``mask`` is True (along ``dim``, or everything)."""
    v = _zeros_where_not(values, mask)
    if v.dtype == torch.bool:
        v = v.to(torch.int64)
    return v.sum() if dim is None else v.sum(dim=dim)


def masked_count(mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Number of True entries of ``mask`` (int64)."""
    m = mask.to(torch.bool)
    return m.sum() if dim is None else m.sum(dim=dim)


def safe_div(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """``num / den`` with 0 where ``den == 0`` (no NaN, no host sync)."""
    num = num if num.is_floating_point() else num.to(torch.float64)
    den = den.to(num.dtype)
    ok = den != 0
    return torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))


def masked_mean(values: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Mean of ``values`` over ``mask``; 0 where the mask is empty."""
    return safe_div(masked_sum(values, mask, dim), masked_count(mask, dim))


def masked_fraction(flags: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    """Fraction of ``mask`` positions where the bool ``flags`` is True; 0 for an empty mask (float64)."""
    return safe_div(masked_count(flags.to(torch.bool) & mask.to(torch.bool), dim).to(torch.float64),
                    masked_count(mask, dim))


def masked_max(values: torch.Tensor, mask: torch.Tensor, dim=None, empty: float = 0.0) -> torch.Tensor:
    """Maximum of ``values`` over ``mask``; ``empty`` where the mask has no True entry."""
    mask = mask.to(torch.bool)
    low = torch.full((), float("-inf"), dtype=values.dtype, device=values.device)
    v = torch.where(mask, values, low)
    if dim is None:
        out, any_ = v.max() if v.numel() else low, mask.any()
    else:
        out, any_ = (v.amax(dim=dim) if v.shape[dim] else low.expand(mask.any(dim=dim).shape)), mask.any(dim=dim)
    return torch.where(any_, out, torch.full((), empty, dtype=values.dtype, device=values.device))
