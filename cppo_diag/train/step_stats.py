"""Per-step scalars pooled over every update of the step (docs/trainer.md "Scalars logged per step").

A step runs ``epochs * updates_per_batch`` minibatch updates. A fraction, a share, a mean or a quantile of the
step is taken over the **pooled** tokens (or responses) of all those updates and divided once; averaging the
per-update ratios instead would weigh a small update like a large one, and count a first update with little
to mask (with on-policy sampling pi differs from mu there only by the engine mismatch) as a share of 0.

``StepPool`` keeps, per update, the (detached) tensors the rule saw. At the end of the step the rule is run
once more through the public ``compute_mask`` on the pooled batch (all updates' rows stacked; every rule works
per response and ``cppo_shuffled`` is keyed on (step, seq_id), so each row gets exactly the mask it got in its
update, which is checked) and its own ``metrics`` become the step's: one definition per quantity, shared with
the offline recompute. The loss metrics come from ``policy_loss`` on the same pooled batch.

``pos/*`` (``cppo_diag.capture.position_live``): the top-decile |pi - mu| and the masked fraction in the first,
middle and last third of the relative position t / T, over the same pooled tokens; every
``log.position_figure_every`` steps the divergence-by-position figure goes to the recorder's sinks
(``log_position_figure``).

Scalars prefixed ``after_first/`` are the same fractions, shares and divergences over the updates after the
first (pi has left mu there); they are logged when a step has more than one update.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from cppo_diag import metric_names as M
from cppo_diag.capture.position_live import PositionTokens, figure_due, position_figure, position_scalars, position_tokens
from cppo_diag.loss import policy_loss
from cppo_diag.masks import compute_mask, logratio
from cppo_diag.masks.metrics import divergence_metrics
from cppo_diag.masks.reduce import masked_mean

__all__ = ["StepPool", "AFTER_FIRST"]

AFTER_FIRST = M.AFTER_FIRST


@dataclass
class _Update:
    update: int
    logp: torch.Tensor  # (b, T) pi at loss time
    logp_rollout: torch.Tensor  # (b, T) mu
    logp_old: torch.Tensor | None  # (b, T) pi_old (anchor "old")
    advantages: torch.Tensor  # (b,)
    mask: torch.Tensor  # (b, T) valid
    seq_ids: torch.Tensor  # (b,)
    keep: torch.Tensor  # (b, T) what the rule gave in that update
    entropy: torch.Tensor  # (b, T)
    loss: float
    grad_norm: float


class StepPool:
    """Collects one step's updates; ``scalars()`` gives the pooled step scalars."""

    def __init__(self, rule: str, rule_params: dict, *, anchor: str, step: int, agg: str,
                 trunc_cap: float | None, max_len: int | None):
        self.rule, self.rule_params, self.anchor, self.step = rule, dict(rule_params), anchor, int(step)
        self.loss_kwargs = dict(agg=agg, trunc_cap=trunc_cap, max_len=max_len, rule=rule)
        self.updates: list[_Update] = []

    def add(self, *, update: int, logp, logp_rollout, logp_old, advantages, mask, seq_ids, keep, entropy,
            loss: float, grad_norm: float) -> None:
        """Record one update (tensors are detached; the caller does not modify them afterwards)."""
        self.updates.append(_Update(int(update), logp.detach(), logp_rollout, None if logp_old is None else logp_old,
                                    advantages, mask, seq_ids, keep, entropy, float(loss), float(grad_norm)))

    def _pooled(self, parts: list[_Update]) -> dict[str, float]:
        cat = lambda name: torch.cat([getattr(u, name) for u in parts])  # noqa: E731  rows of all updates
        logp, lr, adv, mask, ids = cat("logp"), cat("logp_rollout"), cat("advantages"), cat("mask"), cat("seq_ids")
        lo = cat("logp_old") if parts[0].logp_old is not None else None
        res = compute_mask(self.rule, logp=logp, logp_rollout=lr, advantages=adv, response_mask=mask, logp_old=lo,
                           anchor=self.anchor, seq_ids=ids, step=self.step, **self.rule_params)
        if not torch.equal(res.keep, cat("keep")):
            raise RuntimeError(f"rule {self.rule!r} at step {self.step}: the pooled batch's mask differs from the "
                               "masks of the updates; the step scalars assume a rule that works per response")
        anchor_lp = lr if lo is None else lo
        _, loss_metrics = policy_loss(logp, anchor_lp, adv, mask, res, **self.loss_kwargs)
        with torch.no_grad():
            tv = logratio.tv(logp, lr)  # (N_rows, T) |pi - mu| of the sampled tokens
            out = {k: float(v) for k, v in divergence_metrics("binary_tv", tv, mask).items()}
            out[M.POLICY_ENTROPY] = float(masked_mean(cat("entropy"), mask))
        out.update(loss_metrics)
        out.update(res.metrics)  # the rule's own names win (its div/* are over the rule's anchor)
        return out

    def scalars(self) -> dict[str, float]:
        """Step scalars: the rule's metrics, div/tv/*, policy/entropy and loss/* over the pooled updates; loss/policy
        and grad/norm (one value per optimiser update) averaged over updates, grad/norm_max their maximum; and
        ``after_first/`` fractions, shares and divergences when there is more than one update."""
        parts = [u for u in self.updates if bool(u.mask.any())]
        if not parts:
            return {}
        out = self._pooled(parts)
        out.update(position_scalars(self._position_tokens(parts)))
        out[M.LOSS_POLICY] = float(np.mean([u.loss for u in parts]))
        out[M.GRAD_NORM] = float(np.mean([u.grad_norm for u in parts]))
        out[M.GRAD_NORM_MAX] = float(np.max([u.grad_norm for u in parts]))
        later = [u for u in parts if u.update > 0]
        if later and len(later) < len(parts):
            for k, v in self._pooled(later).items():
                if M.is_after_first_kind(k):
                    out[M.after_first(k)] = v
        return out


    @staticmethod
    def _position_tokens(parts: list[_Update]) -> PositionTokens:
        return PositionTokens.cat([position_tokens(u.logp, u.logp_rollout, u.mask, u.keep) for u in parts])

    def log_position_figure(self, log, every: int) -> None:
        """Every ``every`` steps (0: never), the divergence-by-position figure of the step's pooled tokens, with
        the rule's delta / w_t, to ``log``'s sinks (made only when a sink is open)."""
        parts = [u for u in self.updates if bool(u.mask.any())]
        if not (parts and figure_due(self.step, every) and getattr(log, "has_sinks", False)):
            return
        figure = position_figure(self._position_tokens(parts), step=self.step, rule=self.rule,
                                 rule_params=self.rule_params, renderer=_live_renderer())
        log.log_figure(self.step, M.POS_FIGURE, figure)


def _live_renderer():
    """The live figure's renderer (analyses sit above capture, which only holds the figure's data)."""
    from cppo_diag.analyses.plots_mpl import fig_live_position

    return fig_live_position
