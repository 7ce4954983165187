"""Step scalars under the names the host trainers' dashboards use, computed from what the plug-ins record.

The TRL and verl plug-ins log cppo-diag's own metrics (``mask/<rule>/frac``, ...) and, beside them, the
trainer's own names where the trainer defines that quantity, so a user can lay our numbers next to the
dashboard they already watch and see that they agree:

* TRL (``GRPOTrainer``, token-level clipped losses): ``clip_ratio/low_mean``, ``clip_ratio/high_mean`` and
  ``clip_ratio/region_mean`` - the share of valid tokens whose ratio left the clip range below with A < 0,
  above with A > 0, and either. They exist when the applied mask is a ratio clip (TRL's own clip, or the
  ``grpo_clip`` rule), where clipped on the advantage's side == masked (SPEC "Rules", GRPO clip).
* verl: ``actor/pg_clipfrac`` (share of valid tokens whose gradient the policy loss zeroed) and, when the
  ratio is taken against the rollout log-probs (bypass mode), the off-policy diagnostics verl's rollout
  correction reports under ``rollout_corr/``: with ``log_ratio = logp - logp_rollout`` over valid tokens,
  ``kl`` = mean(-log_ratio), ``k3_kl`` = mean(exp(log_ratio) - log_ratio - 1), ``training_ppl`` /
  ``rollout_ppl`` = batch mean of exp(-per-response mean log-prob), ``log_ppl_diff`` = batch mean of the
  per-response (mean logp_rollout - mean logp), ``chi2_token`` = mean(rho^2) - 1 with rho =
  exp(clamp(log_ratio, +-20)).

verl's ``rollout_corr/*`` names map both ways onto cppo-diag's divergence names where they are the same quantity
(SPEC "Per-token divergence": k1 = log pi - log mu, k3 = rho - 1 - log rho, over the valid tokens against mu):
``rollout_corr/k3_kl`` = ``div/k3/mean`` and ``rollout_corr/kl`` = -``div/k1/mean`` (``VERL_ROLLOUT_CORR``;
``rollout_corr_to_ours`` / ``ours_to_rollout_corr``). The others (ppl, chi2) have no cppo-diag twin and keep
verl's name.

Pure functions of detached tensors (no TRL or verl import), so they are unit-tested without either.
"""

from __future__ import annotations

import torch

from cppo_diag import metric_names as M
from cppo_diag.masks.logratio import LOG_RATIO_CLAMP, kl_k1, kl_k3, ratio
from cppo_diag.masks.reduce import masked_mean

__all__ = ["clip_ratio_scalars", "verl_rollout_corr_scalars", "SAFETY_BOUND", "VERL_ROLLOUT_CORR",
           "rollout_corr_to_ours", "ours_to_rollout_corr"]

# verl name -> (cppo-diag name, factor): verl's value = factor * ours
VERL_ROLLOUT_CORR: dict[str, tuple[str, float]] = {
    "rollout_corr/k3_kl": (M.div_name("k3", "mean"), 1.0),
    "rollout_corr/kl": (M.div_name("k1", "mean"), -1.0),
}


def rollout_corr_to_ours(values: dict[str, float]) -> dict[str, float]:
    """verl's ``rollout_corr/*`` scalars under cppo-diag's names (those with a twin; others dropped)."""
    return {ours: f * float(values[v]) for v, (ours, f) in VERL_ROLLOUT_CORR.items() if v in values}


def ours_to_rollout_corr(values: dict[str, float]) -> dict[str, float]:
    """cppo-diag's ``div/k3/mean`` / ``div/k1/mean`` (against mu) under verl's ``rollout_corr/*`` names."""
    return {v: f * float(values[ours]) for v, (ours, f) in VERL_ROLLOUT_CORR.items() if ours in values}

SAFETY_BOUND = LOG_RATIO_CLAMP  # |log ratio| clamp before exponentiating, as verl's rollout correction does


def _adv_2d(advantages: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    adv = advantages.to(like.device)
    return adv.unsqueeze(1).expand_as(like) if adv.dim() == 1 else adv  # (B, T)


@torch.no_grad()
def clip_ratio_scalars(keep: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor) -> dict[str, float]:
    """TRL's ``clip_ratio/{low,high,region}_mean`` of one micro-batch from a ratio-clip mask.

    keep: (B, T) bool, False where the clip zeroed the gradient; advantages: (B,) or (B, T);
    response_mask: (B, T) bool. Shares are over valid tokens, like TRL's masked means.
    """
    mask = response_mask.bool()
    clipped = ~keep.bool() & mask  # (B, T)
    adv = _adv_2d(advantages, clipped)
    return {
        "clip_ratio/low_mean": float(masked_mean((clipped & (adv < 0)).float(), mask)),
        "clip_ratio/high_mean": float(masked_mean((clipped & (adv > 0)).float(), mask)),
        "clip_ratio/region_mean": float(masked_mean(clipped.float(), mask)),
    }


@torch.no_grad()
def verl_rollout_corr_scalars(logp: torch.Tensor, logp_rollout: torch.Tensor,
                              response_mask: torch.Tensor) -> dict[str, float]:
    """verl's ``rollout_corr/*`` off-policy diagnostics of one loss call (formulas in the module docstring).

    logp: (B, T) log-probs of the policy being trained; logp_rollout: (B, T) the sampler's; response_mask:
    (B, T). Responses without a valid token are left out of the per-response means.
    """
    mask = response_mask.bool()
    zero = torch.zeros((), dtype=torch.float32, device=logp.device)
    logp = torch.where(mask, logp.float(), zero)  # (B, T); padding may hold anything (NaN included)
    mu = torch.where(mask, logp_rollout.float(), zero)  # (B, T)
    log_ratio = logp - mu  # (B, T), 0 on padding
    rho = ratio(logp, mu)  # (B, T) exp(clamp(log ratio, +-SAFETY_BOUND))
    has = mask.any(dim=-1)  # (B,)
    n = mask.sum(dim=-1).clamp(min=1).float()  # (B,)
    mean_logp = (logp.sum(dim=-1) / n)[has]  # (B',) per-response mean log-prob
    mean_mu = (mu.sum(dim=-1) / n)[has]  # (B',)
    return {
        "rollout_corr/kl": float(masked_mean(kl_k1(log_ratio), mask)),
        "rollout_corr/k3_kl": float(masked_mean(kl_k3(log_ratio), mask)),
        "rollout_corr/training_ppl": float(torch.exp(-mean_logp).mean()),
        "rollout_corr/rollout_ppl": float(torch.exp(-mean_mu).mean()),
        "rollout_corr/log_ppl_diff": float((mean_mu - mean_logp).mean()),
        "rollout_corr/chi2_token": float(masked_mean(rho.square(), mask) - 1.0),
    }
