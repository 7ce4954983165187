"""Small helpers shared by rule modules: parameter checks and per-token outputs."""

from __future__ import annotations

import math

import torch

from cppo_diag.masks.reasons import KEPT, TOKEN

__all__ = ["check_choice", "check_positive", "check_nonneg", "check_range", "token_reason", "no_reason"]


def check_choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name}: expected one of {list(options)}, found {value!r}")


def _num(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(float(value)):
        raise ValueError(f"{name}: expected a number, found {value!r}")
    return float(value)


def check_positive(name: str, value) -> float:
    v = _num(name, value)
    if not v > 0:
        raise ValueError(f"{name}: expected > 0, found {value!r}")
    return v


def check_nonneg(name: str, value) -> float:
    v = _num(name, value)
    if not v >= 0:
        raise ValueError(f"{name}: expected >= 0, found {value!r}")
    return v


def check_range(name: str, value, lo: float, hi: float) -> float:
    v = _num(name, value)
    if not lo <= v <= hi:
        raise ValueError(f"{name}: expected a value in [{lo}, {hi}], found {value!r}")
    return v


def token_reason(masked: torch.Tensor) -> torch.Tensor:
    """(B, T) uint8: TOKEN where masked, KEPT elsewhere."""
    return torch.where(masked, TOKEN, KEPT).to(torch.uint8)


def no_reason(valid: torch.Tensor) -> torch.Tensor:
    return torch.zeros(valid.shape, dtype=torch.uint8, device=valid.device)
