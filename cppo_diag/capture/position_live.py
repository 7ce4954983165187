"""Per-position metrics, live: the step scalars ``pos/*`` and the divergence-by-position figure of one step.

Every trainer averages its mismatch and mask metrics over all tokens; where in the response they sit is lost.
These scalars keep it, at the cost of one sort of the step's valid tokens (``benchmarks/bench_position_live.py``
measures it against step time). Definitions, over the valid tokens of the step (all its updates pooled):

* D_t = |pi_t - mu_t| = |exp(logp) - exp(logp_rollout)| of the sampled token (SPEC "Per-token divergence", tv);
* relative position t / T with t = pos + 1 (pos: 0-based index among the response's valid tokens) and T the
  response's valid length, in thirds of (0, 1]: ``first`` (0, 1/3], ``middle`` (1/3, 2/3], ``last`` (2/3, 1]
  (the binning of ``cppo_diag.analyses.position`` with ``relative=True, n_rel_bins=3``);
* ``pos/tv_top10/<third>``: mean of the third's D_t >= its p90 (linear-interpolation quantile): the
  ``top10_mean`` of the offline position analysis, so the live value equals
  ``position_stats(run, metrics=["tv"], relative=True, n_rel_bins=3)`` on the same tokens;
* ``pos/masked_frac/<third>``: tokens the applied mask zeroed / valid tokens in the third;
* ``pos/<stat>/last_over_first``: the last third's value / the first's (NaN, stored as null, when the first is 0).

The figure (``position_figure``): |pi - mu| by relative position in 20 bins (bin mean and top-10% mean) with
CPPO's threshold delta / w_t (Eq. 9, ``cppo_diag.masks.schedule``), drawn by ``analyses.plots_mpl``'s
``fig_position_divergence`` from ``analyses.position.position_stats``: the offline Fig. 2 of the same tokens.
Callers hand ``recorder.log_figure`` a ``PositionFigure``; it is built and drawn on the recorder's writer
thread, and only when a sink is open.

``PositionWindow`` pools the tokens of several micro-batches (of different padded lengths) for the plug-ins.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from cppo_diag import metric_names as M
from cppo_diag.masks.logratio import tv
from cppo_diag.masks.quantile import masked_row_quantile
from cppo_diag.masks.reduce import masked_sum

__all__ = ["PositionTokens", "PositionWindow", "PositionFigure", "position_tokens", "position_scalars",
           "position_figure", "FIGURE_BINS"]

FIGURE_BINS = 20  # relative-position bins of the figure


@dataclass
class PositionTokens:
    """The valid tokens of a batch, flattened (N,): 0-based position, response length, log-probs, masked flag."""

    pos: torch.Tensor  # (N,) int64
    length: torch.Tensor  # (N,) int64, T of the token's response
    logp: torch.Tensor  # (N,) float
    logp_rollout: torch.Tensor  # (N,) float
    masked: torch.Tensor | None  # (N,) bool, or None without an applied mask

    def tv(self) -> torch.Tensor:
        return tv(self.logp.double(), self.logp_rollout.double())  # (N,) |pi - mu|

    def third(self) -> torch.Tensor:
        """(N,) 0, 1, 2: the third of (0, 1] that t / T falls in (ceil(3 t / T) - 1, as the offline binning)."""
        rel = (self.pos + 1).double() / self.length.double()  # (N,) in (0, 1]
        return (rel * 3).ceil().long().clamp(1, 3) - 1

    @staticmethod
    def cat(parts: list["PositionTokens"]) -> "PositionTokens":
        masked = None if any(p.masked is None for p in parts) else torch.cat([p.masked for p in parts])
        return PositionTokens(*(torch.cat([getattr(p, f) for p in parts]) for f in ("pos", "length", "logp",
                                                                                        "logp_rollout")), masked)


@torch.no_grad()
def position_tokens(logp: torch.Tensor, logp_rollout: torch.Tensor, response_mask: torch.Tensor | None,
                    keep: torch.Tensor | None = None) -> PositionTokens:
    """The valid tokens of (B, T) tensors, detached, on their device. ``keep`` (B, T) bool: the applied mask
    (False = gradient zeroed); positions count valid tokens only, so left padding and holes are handled."""
    mask = torch.ones_like(logp, dtype=torch.bool) if response_mask is None else response_mask.bool()  # (B, T)
    rank = mask.long().cumsum(1) - 1  # (B, T) 0-based position among valid tokens
    length = mask.sum(1, keepdim=True).expand_as(rank)  # (B, T)
    return PositionTokens(rank[mask], length[mask], logp.detach()[mask], logp_rollout.detach().to(logp.device)[mask],
                          None if keep is None else ~keep.bool().to(mask.device)[mask])


def _top10_means(d: torch.Tensor, third: torch.Tensor) -> list[float]:
    """Per third: mean of its values >= its p90 (the project's quantile, ``masked_row_quantile``: linear
    interpolation between order statistics); NaN for a third without tokens."""
    rows = third[None, :] == torch.arange(3, device=third.device)[:, None]  # (3, N)
    p90 = masked_row_quantile(d[None, :].expand(3, -1), rows, 0.9)  # (3,)
    top = rows & (d[None, :] >= p90[:, None])  # (3, N)
    out = masked_sum(d[None, :].expand(3, -1), top, dim=-1) / top.sum(-1).clamp(min=1)  # (3,)
    return [float(v) if bool(r.any()) else math.nan for v, r in zip(out, rows)]


def _ratio(last: float, first: float) -> float:
    return last / first if first > 0 and math.isfinite(last) else math.nan


@torch.no_grad()
def position_scalars(tokens: PositionTokens) -> dict[str, float]:
    """The ``pos/*`` step scalars (module docstring) of the pooled tokens; {} without a valid token."""
    if tokens.pos.numel() == 0:
        return {}
    d, third = tokens.tv(), tokens.third()  # (N,), (N,)
    out: dict[str, float] = {}
    top = _top10_means(d, third)
    for name, v in zip(M.POS_TV_TOP10, top):
        out[name] = v
    out[M.POS_TV_TOP10_LAST_OVER_FIRST] = _ratio(top[2], top[0])
    if tokens.masked is not None:
        m = tokens.masked.double()  # (N,)
        n = torch.bincount(third, minlength=3).double()  # (3,)
        frac = (torch.bincount(third, weights=m, minlength=3) / n.clamp(min=1)).tolist()
        frac = [f if c > 0 else math.nan for f, c in zip(frac, n.tolist())]
        for name, v in zip(M.POS_MASKED_FRAC, frac):
            out[name] = v
        out[M.POS_MASKED_FRAC_LAST_OVER_FIRST] = _ratio(frac[2], frac[0])
    return out


class PositionWindow:
    """Collects the valid tokens of one step's micro-batches (any padded lengths); ``scalars()`` pools them."""

    def __init__(self):
        self.parts: list[PositionTokens] = []

    def add(self, logp, logp_rollout, response_mask, keep=None) -> None:
        self.parts.append(position_tokens(logp, logp_rollout, response_mask, keep))

    def tokens(self) -> PositionTokens | None:
        return PositionTokens.cat(self.parts) if self.parts else None

    def scalars(self) -> dict[str, float]:
        tok = self.tokens()
        return {} if tok is None else position_scalars(tok)

    def clear(self) -> None:
        self.parts = []


@dataclass
class PositionFigure:
    """What the divergence-by-position figure of one step needs, as numpy arrays (cheap to make on the training
    thread); ``render()`` draws it with ``renderer`` (on the recorder's writer thread). The renderer lives above
    this layer (``cppo_diag.analyses.plots_mpl.fig_live_position``): capture imports no analysis."""

    pos: np.ndarray  # (N,) int64
    length: np.ndarray  # (N,) int64
    logp: np.ndarray  # (N,) float64
    logp_rollout: np.ndarray  # (N,) float64
    step: int
    delta: float
    w_min: float
    title: str | None = None
    renderer: Callable[[PositionFigure], Any] | None = None

    def render(self):
        if self.renderer is None:
            raise RuntimeError("PositionFigure.render: no renderer (pass renderer= to position_figure)")
        return self.renderer(self)


def cppo_schedule(rule: str | None, rule_params: dict | None) -> tuple[float, float]:
    """(delta, w_min) of the threshold drawn: the rule's own when it takes them (CPPO family), else cppo's
    defaults (a reference line)."""
    from cppo_diag.masks import rule_defaults

    params = rule_defaults("cppo")
    if rule:
        try:
            own = rule_defaults(rule)
        except Exception:  # noqa: BLE001 - an unknown rule name (a plug-in's own loss): the reference line
            own = {}
        params.update({k: v for k, v in own.items() if k in ("delta", "w_min") and v is not None})
    params.update({k: v for k, v in (rule_params or {}).items() if k in ("delta", "w_min") and v is not None})
    return float(params["delta"]), float(params["w_min"])


def position_figure(tokens: PositionTokens, *, step: int, rule: str | None = None,
                    rule_params: dict | None = None, renderer: Callable | None = None) -> PositionFigure:
    """The figure of ``tokens`` (responses must be contiguous, in position order: as ``position_tokens`` makes),
    drawn by ``renderer`` (``cppo_diag.analyses.plots_mpl.fig_live_position``)."""
    delta, w_min = cppo_schedule(rule, rule_params)
    cpu = lambda t: t.detach().cpu().numpy()  # noqa: E731
    return PositionFigure(cpu(tokens.pos), cpu(tokens.length), cpu(tokens.logp.double()),
                          cpu(tokens.logp_rollout.double()), int(step), delta, w_min, renderer=renderer)


def figure_due(step: int, every: int) -> bool:
    """Whether step ``step`` logs the figure (every ``every`` steps from step 0; 0 = never)."""
    return bool(every) and int(step) % int(every) == 0
