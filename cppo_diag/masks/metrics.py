"""Metric builders shared by the rules (names are slash-namespaced and fixed, see docs/rules.md)."""

from __future__ import annotations

import torch

from cppo_diag import metric_names as M
from cppo_diag.masks.layout import RuleInput
from cppo_diag.masks.quantile import masked_row_quantile
from cppo_diag.masks.reduce import masked_count, masked_fraction, masked_max, masked_mean, safe_div
from cppo_diag.masks.reasons import BUDGET, TOKEN

__all__ = ["mask_metrics", "divergence_metrics", "DIV_SHORT"]

DIV_SHORT = {"binary_tv": "tv", "binary_kl": "kl", "topk_tv": "topk_tv", "topk_kl": "topk_kl"}


def mask_metrics(name: str, x: RuleInput, keep: torch.Tensor, reason: torch.Tensor) -> dict[str, torch.Tensor]:
    """mask/<rule>/{frac, frac_pos_adv, frac_neg_adv, away_frac, budget_share, token_share, seq_frac,
    n_valid, n_masked}: fractions of valid tokens (``frac_pos_adv``: of the A>0 tokens, ``seq_frac``: of
    the responses with at least one masked token)."""
    v = x.valid
    masked = v & ~keep  # (B, T)
    n_masked = masked_count(masked)
    return {
        M.mask_name(name, "frac"): masked_fraction(masked, v),
        M.mask_name(name, "frac_pos_adv"): masked_fraction(masked, v & (x.advantages > 0)),
        M.mask_name(name, "frac_neg_adv"): masked_fraction(masked, v & (x.advantages < 0)),
        M.mask_name(name, "away_frac"): masked_fraction(x.away, v),
        M.mask_name(name, "budget_share"): safe_div(masked_count(reason == BUDGET).to(torch.float64), n_masked),
        M.mask_name(name, "token_share"): safe_div(masked_count(reason == TOKEN).to(torch.float64), n_masked),
        M.mask_name(name, "seq_frac"): masked_fraction(masked.any(dim=-1), v.any(dim=-1)),
        M.mask_name(name, "n_valid"): masked_count(v),
        M.mask_name(name, "n_masked"): n_masked,
    }


def divergence_metrics(name: str, d: torch.Tensor, valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """div/<short>/{mean, p90, max} over valid tokens.

    p90 is the project's one quantile estimator: linear interpolation between order statistics (numpy's and
    ``torch.quantile``'s default; h = 0.9 (n - 1), lerp(x_(floor h), x_(floor h + 1), h - floor h)), the same
    as the adaptive budget's Quantile_q (Eq. 22) and the analyses' ``p90`` column. 0 without valid tokens.
    """
    short = DIV_SHORT.get(name, name)
    vals = d[valid]  # (n,)
    p90 = masked_row_quantile(vals[None, :], torch.ones_like(vals, dtype=torch.bool)[None, :], 0.9)[0]  # ()
    return {
        M.div_name(short, "mean"): masked_mean(d, valid),
        M.div_name(short, "p90"): p90,
        M.div_name(short, "max"): masked_max(d, valid),
    }

