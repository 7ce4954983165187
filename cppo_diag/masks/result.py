"""The object every rule returns through ``compute_mask``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from cppo_diag.masks.layout import RuleInput

__all__ = ["MaskResult", "RuleOutput"]


@dataclass
class RuleOutput:
    """What a registered rule function returns, on the canonical (B, T) batch.

    keep      (B, T) bool, False on padding
    reason    (B, T) uint8 ``Reason`` code (``cppo_diag.masks.reasons``), KEPT on kept tokens and padding
    weight    (B, T) float or None: per-token multiplier for the loss (soft gate, IS weight)
    metrics   callable returning {name: 0-d tensor}; evaluated lazily on first access of ``.metrics``
    internals {name: tensor} on the (B, T) batch ((B,) for per-sequence values)
    loss_form how ``policy_loss`` uses the result: "ratio" (-A rho keep [weight]), "is_weight"
              (-A sg(weight) log pi, CISPO), "drpo" (-(rho A - |A| / (2 delta) mu (rho - 1)^2))
    """

    keep: torch.Tensor
    reason: torch.Tensor
    weight: torch.Tensor | None = None
    metrics: Callable[[], dict[str, torch.Tensor]] | None = None
    internals: dict[str, torch.Tensor] = field(default_factory=dict)
    loss_form: str = "ratio"
    loss_params: dict[str, Any] = field(default_factory=dict)
    resolved: dict[str, Any] = field(default_factory=dict)  # parameters whose None default the rule resolved


class MaskResult:
    """Result of ``compute_mask`` in the caller's layout ((B, T) padded or (N,) packed).

    keep       bool, same shape as logp; padding is False and is NOT masked (masked = valid & ~keep)
    reason     uint8, same shape; ``Reason`` codes (``cppo_diag.masks.reasons``; KEPT on kept and padding)
    valid      bool, same shape; the response mask the rule used
    weight     float tensor or None: extra per-token loss multiplier (cppo_soft gate, cispo IS weight)
    metrics    dict[str, float], slash-namespaced; computed on first access (one host sync), then cached
    internals  dict[str, Tensor] when requested (per-token ones in the caller's layout, per-sequence (B,))
    params     the resolved parameters (defaults filled in, plus ``anchor``)
    rule, anchor, loss_form, loss_params
    """

    def __init__(self, rule: str, out: RuleOutput, x: RuleInput, params: dict[str, Any], return_internals: bool):
        lay = x.layout
        self.rule = rule
        self.anchor = x.anchor
        self.params = params
        self.keep = lay.to_caller(out.keep)
        self.reason = lay.to_caller(out.reason)
        self.valid = lay.to_caller(x.valid)
        self.weight = None if out.weight is None else lay.to_caller(out.weight)
        self.loss_form = out.loss_form
        self.loss_params = dict(out.loss_params)
        self._metrics_fn = out.metrics
        self._metrics: dict[str, float] | None = None
        self.internals: dict[str, torch.Tensor] = {}
        if return_internals:
            batch_shape = x.shape
            for name, t in out.internals.items():
                per_token = tuple(t.shape[:2]) == batch_shape and t.dim() >= 2
                self.internals[name] = lay.to_caller(t) if per_token else t

    @property
    def masked(self) -> torch.Tensor:
        """bool, valid tokens the rule rejects (same shape as keep)."""
        return self.valid & ~self.keep

    @property
    def metrics(self) -> dict[str, float]:
        if self._metrics is None:
            raw = self._metrics_fn() if self._metrics_fn is not None else {}
            names = list(raw)
            if names:
                dev = next((v.device for v in raw.values() if isinstance(v, torch.Tensor)), torch.device("cpu"))
                vals = torch.stack([torch.as_tensor(raw[n], device=dev).detach().to(torch.float64).reshape(()) for n in names])
                self._metrics = dict(zip(names, vals.cpu().tolist()))  # one device -> host copy
            else:
                self._metrics = {}
        return self._metrics

    def __repr__(self) -> str:
        return (
            f"MaskResult(rule={self.rule!r}, anchor={self.anchor!r}, shape={tuple(self.keep.shape)}, "
            f"weight={'None' if self.weight is None else 'tensor'}, internals={sorted(self.internals)})"
        )
