"""Per-token divergences D_t between the current policy pi and the anchor mu (SPEC "Per-token divergence").

All are computed detached on the canonical (B, T) batch; values on padding are meaningless (callers mask).

* ``binary_tv`` (default): D = |p - q|, p = pi(y_t), q = mu(y_t)
* ``binary_kl``: D = q log(q/p) + (1-q) log((1-q+1e-8)/(1-p+1e-8))
* ``topk_tv`` / ``topk_kl``: buckets A' = TopK(mu) U {y_t} plus one "other" bucket 1 - sum over A';
  TV = 1/2 sum |p_a - q_a|, KL = sum q_a log(q_a/p_a), every mass clamped at 1e-12.
* diagnostics (not used by the rules): ``k1`` = log pi - log mu, ``k3`` = rho - 1 - log rho.

The log-ratio formulas (rho, k1/k2/k3, a cancellation-free |pi - mu| from log-probs) live in
``masks.logratio`` for every array type; this module applies them to a rule's batch. The rules' D_t stays
|p - q| on the probabilities they hold, so offline recomputes match the trainer's masks bit for bit.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from cppo_diag.masks.logratio import kl_k3

if TYPE_CHECKING:
    from cppo_diag.masks.layout import RuleInput

__all__ = ["DIVERGENCES", "RULE_DIVERGENCES", "divergence", "binary_tv", "binary_kl", "topk_masses", "k1", "k3"]

MASS_FLOOR = 1e-12
BINARY_KL_EPS = 1e-8


def binary_tv(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """|p - q| (SPEC binary_tv)."""
    return (p - q).abs()


def binary_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(mu || pi) of the two-outcome distributions {y_t, not y_t} (SPEC binary_kl).

    Evaluates ``q * log(q / p) + (1 - q) * log((1 - q + eps) / (1 - p + eps))`` with the same operations in
    the same order (so the same roundings), in place on four temporaries instead of eleven (p, q untouched).
    """
    a = torch.div(q, p).log_().mul_(q)  # q log(q/p)   (x * q == q * x exactly)
    u = torch.rsub(q, 1.0)  # 1 - q
    num = torch.add(u, BINARY_KL_EPS)  # 1 - q + eps
    den = torch.rsub(p, 1.0).add_(BINARY_KL_EPS)  # 1 - p + eps
    return a.add_(num.div_(den).log_().mul_(u))


def topk_masses(x: "RuleInput") -> tuple[torch.Tensor, torch.Tensor]:
    """Bucket masses (B, T, K + 2): K listed entries, the sampled token if it is not listed, and "other".

    Returns (p_buckets, q_buckets), each clamped at 1e-12. A listed entry with id < 0 is absent (mass 0);
    a sampled token found among the ids (plain layout, or vLLM's replaced K-th entry) gets no extra bucket.
    """
    tk = x.topk
    if tk is None:
        raise ValueError("divergence 'topk_tv'/'topk_kl' needs topk=TopK(ids, logp_rollout, logp, token_ids), found None")
    if x.anchor != "rollout":
        raise ValueError(
            "divergence 'topk_tv'/'topk_kl' is defined against mu's top-K list; anchor='old' has no top-K of pi_old "
            "(use anchor='rollout' or a binary divergence)"
        )
    present = tk.ids >= 0  # (B, T, K)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    q_list = torch.where(present, torch.exp(tk.logp_rollout), zero)  # (B, T, K)
    p_list = torch.where(present, torch.exp(tk.logp), zero)  # (B, T, K)
    listed = ((tk.ids == tk.token_ids[..., None]) & present).any(dim=-1)  # (B, T) y_t among the ids
    q_tok = torch.where(listed, zero, x.q)  # (B, T) extra bucket only when y_t is not listed
    p_tok = torch.where(listed, zero, x.p)
    q_other = 1.0 - (q_list.sum(-1) + q_tok)  # (B, T)
    p_other = 1.0 - (p_list.sum(-1) + p_tok)
    q_all = torch.cat([q_list, q_tok[..., None], q_other[..., None]], dim=-1).clamp_min(MASS_FLOOR)  # (B, T, K+2)
    p_all = torch.cat([p_list, p_tok[..., None], p_other[..., None]], dim=-1).clamp_min(MASS_FLOOR)
    # Absent buckets (id < 0, or y_t already listed) have both masses at the floor: they add 0 to TV and KL.
    return p_all, q_all


def _topk_tv(x: "RuleInput") -> torch.Tensor:
    p, q = topk_masses(x)
    return 0.5 * (p - q).abs().sum(-1)


def _topk_kl(x: "RuleInput") -> torch.Tensor:
    p, q = topk_masses(x)
    return (q * torch.log(q / p)).sum(-1)


def k1(x: "RuleInput") -> torch.Tensor:
    """log pi - log mu (clamped to [-20, 20] like rho)."""
    return x.log_ratio.clone()


def k3(x: "RuleInput") -> torch.Tensor:
    """rho - 1 - log rho (Schulman's k3 estimator of KL(mu || pi)), >= 0 (``logratio.kl_k3``)."""
    return kl_k3(x.log_ratio)


def _binary_tv(x: "RuleInput") -> torch.Tensor:
    if "p" in x.__dict__ and "q" in x.__dict__:
        return binary_tv(x.p, x.q)
    d = torch.exp(x.logp)  # (B, T) p, then p - q in place (two passes fewer than binary_tv(p, q))
    d -= torch.exp(x.logp_anchor)
    return d.abs_()


DIVERGENCES: dict[str, Callable[["RuleInput"], torch.Tensor]] = {
    "binary_tv": _binary_tv,
    "binary_kl": lambda x: binary_kl(x.p, x.q),  # noqa: E731
    "topk_tv": _topk_tv,
    "topk_kl": _topk_kl,
    "k1": k1,
    "k3": k3,
}

# The divergences a rule's ``divergence=`` parameter may name.
RULE_DIVERGENCES = ("binary_tv", "binary_kl", "topk_tv", "topk_kl")
KL_DIVERGENCES = ("binary_kl", "topk_kl")


def divergence(name: str, x: "RuleInput") -> torch.Tensor:
    """(B, T) D_t of the named divergence on the canonical batch."""
    fn = DIVERGENCES.get(name)
    if fn is None:
        raise ValueError(f"divergence: unknown name {name!r}; known: {sorted(DIVERGENCES)}")
    return fn(x)
