"""The policy-gradient loss that applies a rule's result (SPEC "Loss"): a per-token **loss form** chosen by
the rule, reduced by one **aggregation** function.

Both are registries, like the rules (``cppo_diag.masks``): a form or a mode is one decorated function, looked
up by name; an unknown name raises and lists the known ones (``get_loss_form``, ``get_aggregation``).

Loss forms (``LOSS_FORMS``; ``MaskResult.loss_form`` names one), per token with
rho_t = exp(clamp(log pi - log mu, -20, 20)), differentiable through ``logp``:

* "ratio" (every masking rule):                 l_t = -A_t * rho_t * g_t
  or, with ``trunc_cap=C`` (truncated IS):       l_t = -A_t * sg(min(rho_t, C)) * log pi_t * g_t
  (g_t = ``mask_result.weight``, e.g. the cppo_soft gate, else 1; both forms have the same gradient for C large)
* "is_weight" (cispo):                          l_t = -A_t * sg(w_t) * log pi_t, w_t = min(rho_t, 1 + eps_high)
* "drpo":                                       l_t = -(rho_t A_t - |A_t| / (2 delta) * mu_t * (rho_t - 1)^2)

``policy_loss`` then zeroes the tokens the rule masked (keep_t = 0); they stay in every denominator.

Aggregations (``agg_loss``, the way verl's ``agg_loss`` works), m_t the valid-token mask, S = sum(l m),
N_has the responses with >= 1 valid token, N_seq all responses:

* "token-mean":               S / n_tok, n_tok = ``batch_num_tokens`` if given, else sum(m) (at least 1)
* "token-sum":                S
* "seq-mean-token-sum":       S / N, N = ``global_batch_size`` if given, else N_has (at least 1)
* "seq-mean-token-mean":      sum over responses with >= 1 valid token of sum_t(l m) / sum_t(m), / N (as above)
* "seq-mean-token-sum-norm":  S / (N * H), N = ``global_batch_size`` if given, else N_seq (at least 1);
                              H = ``max_len`` if given, else the longest valid response in the batch (at least 1)

Every mode is then multiplied by ``dp_size`` (1 by default): with global denominators (verl's
``global_batch_info``) the data-parallel mean of the ranks' losses is the loss of the global batch.
"""

from __future__ import annotations

from typing import Callable

import torch

from cppo_diag import metric_names as M
from cppo_diag.masks.logratio import kl_k3, log_ratio
from cppo_diag.masks.reduce import masked_count, masked_mean, masked_sum, safe_div

__all__ = ["policy_loss", "applied_weight", "agg_loss", "AGG_MODES", "LOSS_FORMS", "AGGREGATIONS",
           "register_loss_form", "register_aggregation", "get_loss_form", "get_aggregation"]

LOSS_FORMS: dict[str, Callable] = {}
AGGREGATIONS: dict[str, Callable] = {}


def register_loss_form(name: str):
    """Register ``fn(*, adv, rho, logp, logp_rollout, weight, trunc_cap, params) -> (l_t, truncated or None)``.

    adv, rho, logp, logp_rollout: same shape as logp (rho and logp carry the gradient; logp_rollout detached);
    weight: the rule's detached per-token weight or None; params: ``mask_result.loss_params``.
    """
    def deco(fn):
        LOSS_FORMS[name] = fn
        return fn

    return deco


def register_aggregation(name: str):
    """Register ``fn(per_tok, valid, *, rows, max_len, batch_num_tokens, global_batch_size) -> 0-d loss``.

    per_tok is 0 wherever ``valid`` is False; ``rows(x)`` sums a per-token tensor per response, (B,).
    """
    def deco(fn):
        AGGREGATIONS[name] = fn
        return fn

    return deco


def get_loss_form(name: str) -> Callable:
    if name not in LOSS_FORMS:
        raise ValueError(f"loss form: expected one of {sorted(LOSS_FORMS)}, found {name!r}")
    return LOSS_FORMS[name]


def get_aggregation(name: str) -> Callable:
    if name not in AGGREGATIONS:
        raise ValueError(f"agg: expected one of {list(AGGREGATIONS)}, found {name!r}")
    return AGGREGATIONS[name]


# -- loss forms ----------------------------------------------------------------------------------------------
@register_loss_form("ratio")
def _ratio(*, adv, rho, logp, logp_rollout, weight, trunc_cap, params):
    """Every masking rule: -A rho g, or the truncated-IS form -A sg(min(rho, C)) log pi g."""
    trunc = None
    if trunc_cap is None:
        per_tok = -adv * rho
    else:
        trunc = rho.detach() > trunc_cap
        per_tok = -adv * rho.detach().clamp(max=trunc_cap) * logp
    if weight is not None:
        per_tok = per_tok * weight
    return per_tok, trunc


@register_loss_form("is_weight")
def _is_weight(*, adv, rho, logp, logp_rollout, weight, trunc_cap, params):
    """CISPO: -A sg(w) log pi, w the rule's IS weight (rho when it gave none), clamped at C when given."""
    trunc = None
    is_w = weight if weight is not None else rho.detach()
    if trunc_cap is not None:
        trunc = is_w > trunc_cap
        is_w = is_w.clamp(max=trunc_cap)
    return -adv * is_w * logp, trunc


@register_loss_form("drpo")
def _drpo(*, adv, rho, logp, logp_rollout, weight, trunc_cap, params):
    """DRPO: -(rho A - |A| / (2 delta) mu (rho - 1)^2), delta from the rule's ``loss_params``."""
    delta = float(params["delta"])
    mu = torch.exp(logp_rollout)
    return -(rho * adv - adv.abs() / (2.0 * delta) * mu * (rho - 1.0) ** 2), None


# -- aggregations --------------------------------------------------------------------------------------------
def _count(valid: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return masked_count(valid).clamp(min=1).to(like.dtype)


@register_aggregation("token-mean")
def _token_mean(per_tok, valid, *, rows, max_len, batch_num_tokens, global_batch_size):
    n_tok = _count(valid, per_tok) if batch_num_tokens is None else batch_num_tokens
    return masked_sum(per_tok, valid) / n_tok


@register_aggregation("token-sum")
def _token_sum(per_tok, valid, *, rows, max_len, batch_num_tokens, global_batch_size):
    return masked_sum(per_tok, valid)


def _n_responses(valid, rows, global_batch_size, like):
    """N of the seq-mean modes: the given global batch size, else the responses with a valid token (>= 1)."""
    if global_batch_size is not None:
        return global_batch_size
    return (rows(valid.to(like.dtype)) > 0).sum().clamp(min=1).to(like.dtype)


@register_aggregation("seq-mean-token-sum")
def _seq_mean_token_sum(per_tok, valid, *, rows, max_len, batch_num_tokens, global_batch_size):
    return masked_sum(per_tok, valid) / _n_responses(valid, rows, global_batch_size, per_tok)


@register_aggregation("seq-mean-token-mean")
def _seq_mean_token_mean(per_tok, valid, *, rows, max_len, batch_num_tokens, global_batch_size):
    zero = torch.zeros((), dtype=per_tok.dtype, device=per_tok.device)
    seq_sum = rows(torch.where(valid, per_tok, zero))  # (B,)
    seq_n = rows(valid.to(per_tok.dtype))  # (B,)
    has = seq_n > 0
    if global_batch_size is None:
        return masked_mean(safe_div(seq_sum, seq_n), has)
    return masked_sum(safe_div(seq_sum, seq_n), has) / global_batch_size


@register_aggregation("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(per_tok, valid, *, rows, max_len, batch_num_tokens, global_batch_size):
    dt, dev = per_tok.dtype, per_tok.device
    n_seq = rows.n_seq
    if max_len is not None:
        H = float(max_len)
    else:
        H = rows(valid.to(dt)).max() if n_seq else torch.ones((), dtype=dt)
    n = max(n_seq, 1) if global_batch_size is None else global_batch_size
    return masked_sum(per_tok, valid) / (torch.as_tensor(H, dtype=dt, device=dev).clamp(min=1) * n)


AGG_MODES = tuple(AGGREGATIONS)


class _Rows:
    """Per-response sums of a per-token tensor: (B, T) -> (B,), packed (N,) with ``cu_seqlens`` -> (B,)."""

    def __init__(self, cu_seqlens: torch.Tensor | None, n_seq: int):
        self.cu_seqlens, self.n_seq = cu_seqlens, n_seq

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.cu_seqlens is None:
            return x.sum(dim=-1)
        cu = self.cu_seqlens.to(device=x.device, dtype=torch.int64)
        lengths = cu[1:] - cu[:-1]
        row = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths, output_size=x.numel())
        return torch.zeros(lengths.numel(), dtype=x.dtype, device=x.device).index_add(0, row, x)


def agg_loss(per_tok: torch.Tensor, valid: torch.Tensor, agg: str = "token-mean", *,
             cu_seqlens: torch.Tensor | None = None, max_len: int | float | None = None, dp_size: int = 1,
             batch_num_tokens=None, global_batch_size=None) -> torch.Tensor:
    """Reduce per-token losses to the scalar loss (modes in the module docstring).

    per_tok  (B, T), or packed (N,) with ``cu_seqlens`` (B + 1,): l_t (values on invalid tokens are ignored)
    valid    same shape, bool: the tokens that count in the denominators
    batch_num_tokens, global_batch_size: global denominators (verl's ``global_batch_info``); None = local ones
    max_len  H of "seq-mean-token-sum-norm";  dp_size  the data-parallel world size the result is scaled by
    """
    fn = get_aggregation(agg)
    n_seq = (cu_seqlens.numel() - 1) if cu_seqlens is not None else (per_tok.shape[0] if per_tok.dim() == 2 else 1)
    valid = valid.to(torch.bool)
    zero = torch.zeros((), dtype=per_tok.dtype, device=per_tok.device)
    per_tok = torch.where(valid, per_tok, zero)
    loss = fn(per_tok, valid, rows=_Rows(cu_seqlens, n_seq), max_len=max_len, batch_num_tokens=batch_num_tokens,
              global_batch_size=global_batch_size)
    return loss if dp_size == 1 else loss * dp_size


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
    dp_size: int = 1,
    batch_num_tokens=None,
    global_batch_size=None,
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
    dp_size, batch_num_tokens, global_batch_size: global denominators for ``agg_loss`` (verl's
                  ``global_batch_info``); the defaults normalise over this batch alone

    Metrics (floats, one host sync): loss/policy, loss/ratio_mean, loss/ratio_max, loss/kept_frac,
    loss/weight_mean, loss/kl_k3 (mean rho - 1 - log rho), loss/adv_mean, loss/trunc_frac (truncated-IS form).
    """
    get_aggregation(agg)  # unknown modes raise before any work, listing the known ones
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
    lr_clamped = log_ratio(logp, lr)  # (B, T) clamp(log pi - log mu, -20, 20), differentiable
    rho = torch.exp(lr_clamped)  # (B, T)
    zero = torch.zeros((), dtype=dt, device=logp.device)
    keep = valid if mask_result is None else (mask_result.keep.to(torch.bool) & valid)
    form = "ratio" if mask_result is None else mask_result.loss_form
    weight = None if mask_result is None or mask_result.weight is None else mask_result.weight.detach().to(dt)

    per_tok, trunc = get_loss_form(form)(adv=adv, rho=rho, logp=logp, logp_rollout=lr, weight=weight,
                                         trunc_cap=trunc_cap, params={} if mask_result is None else mask_result.loss_params)
    per_tok = torch.where(keep, per_tok, zero)  # masked tokens contribute 0 but stay in the denominator
    loss = agg_loss(per_tok, valid, agg, cu_seqlens=cu_seqlens, max_len=max_len, dp_size=dp_size,
                    batch_num_tokens=batch_num_tokens, global_batch_size=global_batch_size)

    with torch.no_grad():
        stats = {
            M.LOSS_POLICY: loss.detach(),
            M.LOSS_RATIO_MEAN: masked_mean(rho.detach(), valid),
            M.LOSS_RATIO_MAX: torch.where(valid, rho.detach(), zero).amax() if rho.numel() else zero,
            M.LOSS_KEPT_FRAC: masked_mean(keep.to(dt), valid),
            M.LOSS_KL_K3: masked_mean(kl_k3(lr_clamped.detach()), valid),
            M.LOSS_ADV_MEAN: masked_mean(adv, valid),
        }
        if weight is not None:
            stats[M.LOSS_WEIGHT_MEAN] = masked_mean(weight, valid)
        if trunc is not None:
            stats[M.LOSS_TRUNC_FRAC] = masked_mean(trunc.to(dt), valid)
        names = list(stats)
        values = torch.stack([stats[k].to(torch.float64).reshape(()) for k in names]).cpu().tolist()
    return loss, dict(zip(names, values))
