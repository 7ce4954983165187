"""The policy-gradient loss that applies a rule's result (SPEC "Loss").

Per token (rho_t = exp(clamp(log pi - log mu, -20, 20)), differentiable through ``logp``):

* loss form "ratio" (every masking rule):       l_t = -A_t * rho_t * keep_t * g_t
  or, with ``trunc_cap=C`` (truncated IS):        l_t = -A_t * sg(min(rho_t, C)) * log pi_t * keep_t * g_t
  (g_t = ``mask_result.weight``, e.g. the cppo_soft gate, else 1; both forms have the same gradient for C large)
* loss form "is_weight" (cispo):                l_t = -A_t * sg(w_t) * log pi_t, w_t = min(rho_t, 1 + eps_high)
* loss form "drpo":                             l_t = -(rho_t A_t - |A_t| / (2 delta) * mu_t * (rho_t - 1)^2)

Aggregation (``agg``), m_t the valid-token mask (masked tokens stay in every denominator):

* "token-mean":               sum(l m) / sum(m)
* "seq-mean-token-mean":      mean over responses with >= 1 valid token of sum_t(l m) / sum_t(m)
* "seq-mean-token-sum-norm":  sum(l m) / (N_seq * H), N_seq the number of responses, H = ``max_len`` if
                              given, else the longest valid response in the batch
"""

from __future__ import annotations

import torch

from cppo_diag.masks.reduce import masked_count, masked_mean, masked_sum, safe_div

__all__ = ["policy_loss", "applied_weight", "AGG_MODES"]

AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _rows(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Per-response sums of a per-token tensor: (B, T) -> (B,), packed (N,) -> (B,)."""
    if cu_seqlens is None:
        return x.sum(dim=-1)
    cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    row = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths, output_size=x.numel())
    return torch.zeros(lengths.numel(), dtype=x.dtype, device=x.device).index_add(0, row, x)


def applied_weight(mask_result, trunc_cap: float | None = None) -> torch.Tensor | None:
    """The detached per-token weight ``policy_loss`` multiplies a kept token's term by, or None when there is
    none (the loss then uses ``keep`` alone: every masking rule, and drpo's own functional form).

    Loss form "ratio": the rule's ``weight`` g_t (the cppo_soft gate). Loss form "is_weight" (cispo): the IS
    weight w_t = min(rho_t, 1 + eps_high), clamped at ``trunc_cap`` when given (as the loss does).
    Shape and layout of ``mask_result.keep``; 0 on padding.
    """
    if mask_result is None or mask_result.loss_form == "drpo" or mask_result.weight is None:
        return None
    w = mask_result.weight.detach()
    if mask_result.loss_form == "is_weight" and trunc_cap is not None:
        w = w.clamp(max=trunc_cap)
    return w


def policy_loss(
    logp: torch.Tensor,
    logp_rollout: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor | None,
    mask_result=None,
    *,
    agg: str = "token-mean",
    trunc_cap: float | None = None,
    max_len: int | None = None,
    rule: str | None = None,
    cu_seqlens: torch.Tensor | None = None,
    rule_params: dict | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar policy loss and its metrics.

    logp          (B, T) or packed (N,) with ``cu_seqlens``: pi's log-probs, carries the gradient
    logp_rollout  same shape: the anchor's log-probs (mu; pass pi_old here if the mask used anchor="old")
    advantages    (B,) or the same shape as logp
    response_mask same shape bool, or None (all valid; or ``mask_result.valid`` when given)
    mask_result   a ``MaskResult`` from ``compute_mask``; None: computed here from ``rule`` (and
                  ``rule_params``) on detached inputs, or keep everything when ``rule`` is None too
    agg           one of AGG_MODES;  trunc_cap  C of the truncated-IS form (None: the plain ratio form)
    max_len       H for "seq-mean-token-sum-norm"

    Metrics (floats, one host sync): loss/policy, loss/ratio_mean, loss/ratio_max, loss/kept_frac,
    loss/weight_mean, loss/kl_k3 (mean rho - 1 - log rho), loss/adv_mean, loss/trunc_frac (truncated-IS form).
    """
    if agg not in AGG_MODES:
        raise ValueError(f"agg: expected one of {list(AGG_MODES)}, found {agg!r}")
    if trunc_cap is not None and not trunc_cap > 0:
        raise ValueError(f"trunc_cap: expected > 0 or None, found {trunc_cap!r}")
    if tuple(logp_rollout.shape) != tuple(logp.shape):
        raise ValueError(f"logp_rollout: expected shape {tuple(logp.shape)} (same as logp), found {tuple(logp_rollout.shape)}")
    packed = cu_seqlens is not None
    if not packed and logp.dim() != 2:
        raise ValueError(f"logp: expected shape (B, T), or (N,) with cu_seqlens, found {tuple(logp.shape)}")
    n_seq = (cu_seqlens.numel() - 1) if packed else logp.shape[0]
    if mask_result is None and rule is not None:
        from cppo_diag.masks import compute_mask

        mask_result = compute_mask(rule, logp=logp.detach(), logp_rollout=logp_rollout, advantages=advantages,
                                   response_mask=response_mask, cu_seqlens=cu_seqlens, **(rule_params or {}))
    if response_mask is None:
        valid = mask_result.valid if mask_result is not None else torch.ones(logp.shape, dtype=torch.bool, device=logp.device)
    else:
        if tuple(response_mask.shape) != tuple(logp.shape):
            raise ValueError(f"response_mask: expected shape {tuple(logp.shape)} (same as logp), found {tuple(response_mask.shape)}")
        valid = response_mask.to(torch.bool)
    if mask_result is not None and tuple(mask_result.keep.shape) != tuple(logp.shape):
        raise ValueError(f"mask_result.keep: expected shape {tuple(logp.shape)} (same as logp), found {tuple(mask_result.keep.shape)}")

    dt = logp.dtype
    adv = advantages.to(device=logp.device, dtype=dt)
    if tuple(adv.shape) == (n_seq,) and tuple(adv.shape) != tuple(logp.shape):
        if packed:
            cu = cu_seqlens.to(device=logp.device, dtype=torch.int64)
            adv = torch.repeat_interleave(adv, cu[1:] - cu[:-1], output_size=logp.numel())  # (N,)
        else:
            adv = adv[:, None].expand_as(logp)  # (B, T)
    elif tuple(adv.shape) != tuple(logp.shape):
        raise ValueError(f"advantages: expected shape ({n_seq},) or {tuple(logp.shape)}, found {tuple(advantages.shape)}")

    lr = logp_rollout.detach().to(dt)
    log_ratio = (logp - lr).clamp(-20.0, 20.0)  # (B, T) differentiable
    rho = torch.exp(log_ratio)  # (B, T)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    keep = valid if mask_result is None else (mask_result.keep.to(torch.bool) & valid)
    form = "ratio" if mask_result is None else mask_result.loss_form
    weight = None if mask_result is None or mask_result.weight is None else mask_result.weight.detach().to(dt)

    trunc = None
    if form == "is_weight":  # CISPO: -A sg(w) log pi
        is_w = weight if weight is not None else rho.detach()
        if trunc_cap is not None:
            trunc = is_w > trunc_cap
            is_w = is_w.clamp(max=trunc_cap)
        per_tok = -adv * is_w * logp
    elif form == "drpo":
        delta = float(mask_result.loss_params["delta"])
        mu = torch.exp(lr)
        per_tok = -(rho * adv - adv.abs() / (2.0 * delta) * mu * (rho - 1.0) ** 2)
    elif form == "ratio":
        if trunc_cap is None:
            per_tok = -adv * rho
        else:
            trunc = rho.detach() > trunc_cap
            per_tok = -adv * rho.detach().clamp(max=trunc_cap) * logp
        if weight is not None:
            per_tok = per_tok * weight
    else:
        raise ValueError(f"mask_result.loss_form: unknown {form!r}; expected 'ratio', 'is_weight' or 'drpo'")
    per_tok = torch.where(keep, per_tok, zero)  # masked tokens contribute 0 but stay in the denominator

    if agg == "token-mean":
        loss = masked_sum(per_tok, valid) / masked_count(valid).clamp(min=1).to(dt)
    elif agg == "seq-mean-token-mean":
        seq_sum = _rows(torch.where(valid, per_tok, zero), cu_seqlens)  # (B,)
        seq_n = _rows(valid.to(dt), cu_seqlens)  # (B,)
        has = seq_n > 0
        loss = masked_mean(safe_div(seq_sum, seq_n), has)
    else:
        if max_len is not None:
            H = float(max_len)
        else:
            H = _rows(valid.to(dt), cu_seqlens).max() if n_seq else torch.ones((), dtype=dt)
        denom = torch.as_tensor(H, dtype=dt, device=logp.device).clamp(min=1) * max(n_seq, 1)
        loss = masked_sum(per_tok, valid) / denom

    with torch.no_grad():
        stats = {
            "loss/policy": loss.detach(),
            "loss/ratio_mean": masked_mean(rho.detach(), valid),
            "loss/ratio_max": torch.where(valid, rho.detach(), zero).amax() if rho.numel() else zero,
            "loss/kept_frac": masked_mean(keep.to(dt), valid),
            "loss/kl_k3": masked_mean(rho.detach() - 1.0 - log_ratio.detach(), valid),
            "loss/adv_mean": masked_mean(adv, valid),
        }
        if weight is not None:
            stats["loss/weight_mean"] = masked_mean(weight, valid)
        if trunc is not None:
            stats["loss/trunc_frac"] = masked_mean(trunc.to(dt), valid)
        names = list(stats)
        values = torch.stack([stats[k].to(torch.float64).reshape(()) for k in names]).cpu().tolist()
    return loss, dict(zip(names, values))
