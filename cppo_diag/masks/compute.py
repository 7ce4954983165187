"""``compute_mask``: the single entry point to every registered rule."""

from __future__ import annotations

import torch

from cppo_diag.masks.layout import build_input
from cppo_diag.masks.registry import COMMON_PARAMETERS, PARAMETERS, get_rule
from cppo_diag.masks.result import MaskResult

__all__ = ["compute_mask"]


def compute_mask(
    rule: str,
    *,
    logp,
    logp_rollout,
    advantages,
    response_mask=None,
    logp_old=None,
    topk=None,
    cu_seqlens=None,
    return_internals: bool = False,
    anchor: str = "rollout",
    check_finite: bool = True,
    seq_ids=None,
    step: int | None = None,
    **params,
) -> MaskResult:
    """Apply the trust-region rule ``rule`` to a batch of responses (SPEC.md "Rules").

    Layouts:
      padded  logp, logp_rollout (B, T) float; response_mask (B, T) bool (None: all valid); left, right or
              any padding; a token's position t is its rank among its row's valid tokens.
      packed  logp, logp_rollout (N,) float with cu_seqlens (B + 1,) int; response_mask (N,) optional.
    advantages   (B,) one per response, or the same shape as logp (per token).
    logp_old     pi_old's log-probs (same shape as logp); used as the anchor with ``anchor="old"``.
    topk         ``TopK`` (or dict) with mu's top-K ids / log-probs for divergence="topk_tv"/"topk_kl".
    seq_ids      (B,) int, one id per response (default: the row index), and ``step`` (int or None): the key
                 of per-response randomness. Only ``cppo_shuffled`` uses them: its permutation is seeded by
                 (seed, step, seq_id, valid length), so pass the ids and step you log and a recompute
                 reproduces it whatever the row order (``cppo_diag.masks.shuffle``).
    params       the rule's parameters (``cppo-diag rules`` lists them with defaults). Any name in
                 ``PARAMETERS`` is accepted by every rule (those a rule does not use are ignored and listed in
                 ``result.params["ignored"]``); any other name raises. A value of None means the
                 rule's default.

    Runs under ``torch.no_grad()``; inputs are detached, never modified. Float16/bfloat16 inputs are computed
    in float32, float64 stays float64. Returns a ``MaskResult`` in the caller's layout.
    """
    spec = get_rule(rule)
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise TypeError(
            f"compute_mask({rule!r}): unknown parameter(s) {unknown}; rule {rule!r} takes {sorted(spec.params)}; "
            f"every rule also accepts (and ignores if unused) {sorted(PARAMETERS)} plus {sorted(COMMON_PARAMETERS)}"
        )
    # None means "the rule's default" (so one config with unset fields can drive any rule).
    used = {k: (spec.params[k] if v is None else v) for k, v in params.items() if k in spec.params}
    ignored = sorted(k for k in params if k not in spec.params)
    with torch.no_grad():
        x = build_input(
            logp=logp,
            logp_rollout=logp_rollout,
            advantages=advantages,
            response_mask=response_mask,
            logp_old=logp_old,
            topk=topk,
            cu_seqlens=cu_seqlens,
            anchor=anchor,
            check_finite=check_finite,
            seq_ids=seq_ids,
            step=step,
        )
        out = spec.fn(x, **used)
        resolved = {**spec.params, **used, **getattr(out, "resolved", {}), "anchor": x.anchor}
        if ignored:
            resolved["ignored"] = ignored
        return MaskResult(spec.name, out, x, resolved, return_internals)
