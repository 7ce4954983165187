"""Input layouts, validation and the canonical batch every rule sees.

Two layouts are accepted (``compute_mask`` docstring):

* **padded**: ``logp`` and ``logp_rollout`` of shape ``(B, T)`` with an optional bool ``response_mask``
  ``(B, T)``. Padding may sit left, right or anywhere; a token's position ``t`` is its rank among the
  *valid* tokens of its row, so results never depend on how much padding a batch has or on which side.
* **packed**: 1-D ``(N,)`` tensors holding the B responses back to back, with ``cu_seqlens`` ``(B + 1,)``
  (``cu_seqlens[0] == 0``, ``cu_seqlens[-1] == N``). An optional ``response_mask`` ``(N,)`` further marks
  which packed tokens are valid (e.g. prompt tokens packed with their responses).

Packed input is scattered to a right-padded ``(B, T_max)`` batch (one host sync to read ``T_max``), the rule
runs there, and its per-token outputs are gathered back to ``(N,)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping

import torch

from cppo_diag.masks.away import away_test
from cppo_diag.masks.logratio import log_ratio

__all__ = ["TopK", "RuleInput", "build_input", "InputError"]


class InputError(ValueError):
    """Raised when the tensors given to a rule have the wrong shape, dtype or non-finite values."""


@dataclass
class TopK:
    """Top-K log-probabilities of the rollout policy mu at every position (for ``topk_tv`` / ``topk_kl``).

    ids           (B, T, K) int   vocabulary ids of mu's top-K tokens (entries < 0 are treated as absent)
    logp_rollout  (B, T, K) float mu's log-probs at ``ids``
    logp          (B, T, K) float pi's (current policy's) log-probs at ``ids``
    token_ids     (B, T)    int   the sampled token ids y_t

    Packed layout: ``(N, K)`` and ``(N,)``. Both top-K layouts are handled: the plain one (y_t may be
    missing from ``ids``; it is then added as its own bucket) and vLLM's, where the K-th entry was replaced
    by y_t when y_t was outside the top-K (y_t is then found in ``ids`` and never counted twice).
    """

    ids: torch.Tensor
    logp_rollout: torch.Tensor
    logp: torch.Tensor
    token_ids: torch.Tensor

    _ALIASES = {
        "ids": ("ids", "topk_ids"),
        "logp_rollout": ("logp_rollout", "topk_logp_rollout"),
        "logp": ("logp", "topk_logp"),
        "token_ids": ("token_ids", "token_id", "sampled_ids"),
    }

    @classmethod
    def coerce(cls, value: Any) -> "TopK":
        """Accept a ``TopK`` or a mapping with keys ids/logp_rollout/logp/token_ids (or the run-format names
        topk_ids/topk_logp_rollout/topk_logp/token_id)."""
        if isinstance(value, TopK):
            return value
        if not isinstance(value, Mapping):
            raise InputError(f"topk: expected a TopK or a dict, found {type(value).__name__}")
        kwargs = {}
        for name, keys in cls._ALIASES.items():
            found = [k for k in keys if k in value]
            if not found:
                raise InputError(
                    f"topk: missing key {name!r} (accepted spellings {list(keys)}); found keys {sorted(value)}"
                )
            kwargs[name] = value[found[0]]
        return cls(**kwargs)


def _shape(t) -> str:
    return "None" if t is None else str(tuple(t.shape))


def _as_tensor(name: str, value, device=None) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value if device is None else value.to(device)
    try:
        return torch.as_tensor(value, device=device)
    except Exception as exc:  # noqa: BLE001 - re-raised with the field name
        raise InputError(f"{name}: expected a tensor, found {type(value).__name__} ({exc})") from exc


def _first_bad(name: str, values: torch.Tensor, valid: torch.Tensor, layout: "_Layout") -> str | None:
    """Message naming the first non-finite valid entry of ``values`` ((B,T) or (B,T,K)), or None."""
    v_ok = torch.isfinite(values)
    if values.dim() == 3:
        v_ok = v_ok.all(dim=-1)
    bad = valid & ~v_ok
    if not bool(bad.any()):
        return None
    count = int(bad.sum())
    idx = bad.nonzero()[0]
    row, col = int(idx[0]), int(idx[1])
    value = values[row, col].tolist()
    where = layout.describe(row, col)
    return f"{name} has {count} non-finite (NaN/Inf) value(s) at valid positions; first at {where} (value {value})"


@dataclass
class _Layout:
    """How the caller's tensors map to the internal (B, T) batch."""

    packed: bool
    shape: tuple  # the caller's token shape: (B, T) or (N,)
    row: torch.Tensor | None = None  # packed only: (N,) row of each packed token
    col: torch.Tensor | None = None  # packed only: (N,) column of each packed token in the padded batch
    cu_seqlens: torch.Tensor | None = None

    def to_padded(self, x: torch.Tensor, batch_shape: tuple, fill=0) -> torch.Tensor:
        """(N, ...) packed -> (B, T_max, ...) right-padded; identity for padded input."""
        if not self.packed:
            return x
        out = torch.full(batch_shape + tuple(x.shape[1:]), fill, dtype=x.dtype, device=x.device)
        out[self.row, self.col] = x
        return out

    def to_caller(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T_max, ...) -> the caller's token layout."""
        if not self.packed:
            return x
        return x[self.row, self.col]

    def describe(self, row: int, col: int) -> str:
        if not self.packed:
            return f"(row {row}, pos {col})"
        start = int(self.cu_seqlens[row])
        return f"(row {row}, pos {col}; packed index {start + col})"


@dataclass
class RuleInput:
    """The canonical batch a rule sees: everything (B, T), padding marked by ``valid``.

    logp         (B, T) pi's log-prob of the sampled token (detached, compute dtype)
    logp_anchor  (B, T) the anchor's log-prob: mu (``anchor="rollout"``, default) or pi_old (``"old"``)
    advantages   (B, T) A_t per token, or (B, 1) when given per sequence (broadcasts)
    valid        (B, T) bool, m_t
    topk         TopK in (B, T, K) layout, or None
    seq_ids      (B,) int64 id of each response, or None (= the row index); keys per-response randomness
    step         training step, or None; mixed into per-response randomness when given (cppo_shuffled)
    """

    logp: torch.Tensor
    logp_anchor: torch.Tensor
    advantages: torch.Tensor
    valid: torch.Tensor
    topk: TopK | None
    anchor: str
    layout: _Layout = field(repr=False)
    seq_ids: torch.Tensor | None = None
    step: int | None = None

    @property
    def shape(self) -> tuple:
        return tuple(self.valid.shape)

    @property
    def dtype(self) -> torch.dtype:
        return self.logp.dtype

    @property
    def device(self) -> torch.device:
        return self.logp.device

    @cached_property
    def lengths(self) -> torch.Tensor:
        """(B,) int64 number of valid tokens per response (T in SPEC)."""
        return torch.count_nonzero(self.valid, dim=-1)

    @cached_property
    def invalid(self) -> torch.Tensor:
        """(B, T) bool, ~valid."""
        return ~self.valid

    @cached_property
    def rank(self) -> torch.Tensor:
        """(B, T) int64, 0-based position t - 1 of each token among its row's valid tokens (-1 before the first)."""
        return torch.cumsum(self.valid, dim=-1) - 1

    @cached_property
    def log_ratio(self) -> torch.Tensor:
        """(B, T) clamp(log pi - log mu, -20, 20)."""
        # the finiteness check leaves logp - logp_anchor behind: clamp that buffer instead of a new one
        return log_ratio(self.logp, self.logp_anchor, diff=self.__dict__.pop("_diff", None))

    @cached_property
    def rho(self) -> torch.Tensor:
        """(B, T) rho_t = exp(clamp(log pi - log mu, -20, 20)) (SPEC notation)."""
        return torch.exp(self.log_ratio)

    @cached_property
    def away(self) -> torch.Tensor:
        """(B, T) bool, valid tokens with A_t * (rho_t - 1) > 0 (SPEC "Away test", ``away.away_test``)."""
        if "rho" in self.__dict__:
            return away_test(self.advantages, self.rho, self.valid)
        # rho not cached: a fresh exp buffer becomes rho - 1 (rho is recomputed if asked for)
        return away_test(self.advantages, torch.exp(self.log_ratio), self.valid, overwrite=True)

    @cached_property
    def p(self) -> torch.Tensor:
        """(B, T) pi(y_t)."""
        return torch.exp(self.logp)

    @cached_property
    def q(self) -> torch.Tensor:
        """(B, T) mu(y_t) (or pi_old(y_t) under ``anchor="old"``)."""
        return torch.exp(self.logp_anchor)

    def divergence(self, name: str) -> torch.Tensor:
        """(B, T) per-token divergence D_t (SPEC "Per-token divergence"), 0 on padding."""
        cache = self.__dict__.setdefault("_div_cache", {})
        if name not in cache:
            from cppo_diag.masks.divergence import divergence

            d = divergence(name, self)  # a fresh tensor: masked in place
            cache[name] = d.masked_fill_(self.invalid, 0.0)
        return cache[name]


def _check_same_shape(name: str, t: torch.Tensor | None, ref_shape: tuple, ref_name: str = "logp"):
    if t is not None and tuple(t.shape) != tuple(ref_shape):
        raise InputError(f"{name}: expected shape {tuple(ref_shape)} (same as {ref_name}), found {_shape(t)}")


def build_input(
    *,
    logp,
    logp_rollout,
    advantages,
    response_mask=None,
    logp_old=None,
    topk=None,
    cu_seqlens=None,
    anchor: str = "rollout",
    check_finite: bool = True,
    seq_ids=None,
    step: int | None = None,
) -> RuleInput:
    """Validate the caller's tensors and build the canonical (B, T) ``RuleInput``."""
    if logp is None:
        raise InputError("logp: required, found None")
    if logp_rollout is None:
        raise InputError("logp_rollout: required, found None")
    if advantages is None:
        raise InputError("advantages: required, found None")
    logp = _as_tensor("logp", logp)
    device = logp.device
    logp_rollout = _as_tensor("logp_rollout", logp_rollout, device)
    advantages = _as_tensor("advantages", advantages, device)
    response_mask = None if response_mask is None else _as_tensor("response_mask", response_mask, device)
    logp_old = None if logp_old is None else _as_tensor("logp_old", logp_old, device)
    if anchor not in ("rollout", "old"):
        raise InputError(f"anchor: expected 'rollout' or 'old', found {anchor!r}")
    if anchor == "old" and logp_old is None:
        raise InputError("anchor='old' needs logp_old (pi_old's log-probs, same shape as logp), found None")

    for name, t in (("logp", logp), ("logp_rollout", logp_rollout), ("advantages", advantages), ("logp_old", logp_old)):
        if t is not None and not (t.is_floating_point() or name == "advantages"):
            raise InputError(f"{name}: expected a floating-point tensor, found dtype {t.dtype}")
    floats = [t.dtype for t in (logp, logp_rollout, logp_old) if t is not None]
    if advantages.is_floating_point():
        floats.append(advantages.dtype)
    dtype = torch.float32
    for d in floats:
        dtype = torch.promote_types(dtype, d)

    packed = cu_seqlens is not None
    if packed:
        if logp.dim() != 1:
            raise InputError(f"logp: packed layout (cu_seqlens given) expects shape (N,), found {_shape(logp)}")
        cu = _as_tensor("cu_seqlens", cu_seqlens, device)
        if cu.dim() != 1 or cu.numel() < 1 or cu.is_floating_point() or cu.dtype == torch.bool:
            raise InputError(f"cu_seqlens: expected a 1-D integer tensor (B + 1,), found shape {_shape(cu)} dtype {cu.dtype}")
        cu = cu.to(torch.int64)
        n_tok = logp.shape[0]
        lengths = cu[1:] - cu[:-1]
        if int(cu[0]) != 0 or int(cu[-1]) != n_tok or bool((lengths < 0).any()):
            raise InputError(
                f"cu_seqlens: expected non-decreasing offsets from 0 to N={n_tok} (len(logp)), "
                f"found {cu.tolist() if cu.numel() <= 12 else cu[:6].tolist() + ['...'] + cu[-6:].tolist()}"
            )
        B = lengths.shape[0]
        t_max = int(lengths.max()) if B else 0
        row = torch.repeat_interleave(torch.arange(B, device=device), lengths, output_size=n_tok)
        col = torch.arange(n_tok, device=device) - cu[:-1][row]
        layout = _Layout(True, (n_tok,), row, col, cu)
        batch_shape = (B, t_max)
    else:
        if logp.dim() != 2:
            raise InputError(
                f"logp: expected shape (B, T) (padded) or (N,) with cu_seqlens (packed), found {_shape(logp)}"
            )
        layout = _Layout(False, tuple(logp.shape))
        batch_shape = tuple(logp.shape)
    tok_shape = layout.shape
    B = batch_shape[0]

    _check_same_shape("logp_rollout", logp_rollout, tok_shape)
    _check_same_shape("logp_old", logp_old, tok_shape)
    _check_same_shape("response_mask", response_mask, tok_shape)
    if not packed and tuple(advantages.shape) == (B, 1) and tok_shape[1] != 1:
        advantages = advantages[:, 0]  # (B, 1) -> (B,)
    per_seq_adv = tuple(advantages.shape) == (B,) and tuple(advantages.shape) != tok_shape
    if not per_seq_adv and tuple(advantages.shape) != tok_shape:
        raise InputError(
            f"advantages: expected shape ({B},) (one per sequence) or {tok_shape} (same as logp), "
            f"found {_shape(advantages)}"
        )
    if response_mask is not None and response_mask.dtype != torch.bool:
        response_mask = response_mask != 0

    anchor_src = logp_rollout if anchor == "rollout" else logp_old
    lp = layout.to_padded(logp.detach().to(dtype), batch_shape)
    la = layout.to_padded(anchor_src.detach().to(dtype), batch_shape)
    if per_seq_adv:
        adv = advantages.detach().to(dtype)[:, None]  # (B, 1), broadcasts against (B, T)
    else:
        adv = layout.to_padded(advantages.detach().to(dtype), batch_shape)
    if packed:
        valid = layout.to_padded(
            response_mask if response_mask is not None else torch.ones(tok_shape, dtype=torch.bool, device=device),
            batch_shape,
            fill=False,
        )
    else:
        valid = response_mask if response_mask is not None else torch.ones(batch_shape, dtype=torch.bool, device=device)

    tk = None
    if topk is not None:
        tk = TopK.coerce(topk)
        ids = _as_tensor("topk.ids", tk.ids, device)
        k_lr = _as_tensor("topk.logp_rollout", tk.logp_rollout, device)
        k_lp = _as_tensor("topk.logp", tk.logp, device)
        tok_ids = _as_tensor("topk.token_ids", tk.token_ids, device)
        if ids.dim() != len(tok_shape) + 1 or tuple(ids.shape[:-1]) != tok_shape:
            raise InputError(f"topk.ids: expected shape {tok_shape + ('K',)} (logp's shape plus K), found {_shape(ids)}")
        for name, t in (("topk.logp_rollout", k_lr), ("topk.logp", k_lp)):
            _check_same_shape(name, t, tuple(ids.shape), "topk.ids")
        _check_same_shape("topk.token_ids", tok_ids, tok_shape)
        tk = TopK(
            ids=layout.to_padded(ids.to(torch.int64), batch_shape, fill=-1),
            logp_rollout=layout.to_padded(k_lr.detach().to(dtype), batch_shape),
            logp=layout.to_padded(k_lp.detach().to(dtype), batch_shape),
            token_ids=layout.to_padded(tok_ids.to(torch.int64), batch_shape, fill=-1),
        )

    ids = None
    if seq_ids is not None:
        ids = _as_tensor("seq_ids", seq_ids, device)
        if ids.is_floating_point() or ids.dtype == torch.bool or tuple(ids.shape) != (B,):
            raise InputError(f"seq_ids: expected an integer tensor of shape ({B},) (one id per response), "
                             f"found shape {_shape(ids)} dtype {ids.dtype}")
        ids = ids.to(torch.int64)
    if step is not None and (isinstance(step, bool) or int(step) != step):
        raise InputError(f"step: expected an integer or None, found {step!r}")
    x = RuleInput(lp, la, adv, valid, tk, anchor, layout, seq_ids=ids, step=None if step is None else int(step))
    if check_finite:
        _check_finite(x, per_seq_adv, advantages, anchor)
    return x


def _check_finite(x: RuleInput, per_seq_adv: bool, advantages: torch.Tensor, anchor: str) -> None:
    """One cheap reduction decides the common all-finite case (one host sync); errors name the first bad entry.

    The sum of log pi - log mu over the whole batch (padding included) is finite iff every entry is; the
    difference is kept and becomes the log-ratio, so the check costs one read pass.
    """
    diff = x.logp - x.logp_anchor  # (B, T)
    total = diff.sum() + x.advantages.sum()
    if x.topk is not None:
        total = total + (x.topk.logp.sum() + x.topk.logp_rollout.sum())
    if bool(torch.isfinite(total)):
        x.__dict__["_diff"] = diff
        return
    anchor_name = "logp_rollout" if anchor == "rollout" else "logp_old"
    checks = [("logp", x.logp), (anchor_name, x.logp_anchor)]
    if per_seq_adv:
        bad = x.valid.any(dim=-1) & ~torch.isfinite(x.advantages[:, 0])
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise InputError(
                f"advantages has {int(bad.sum())} non-finite (NaN/Inf) value(s) for sequences with valid tokens; "
                f"first at row {row} (value {advantages[row].item()})"
            )
    else:
        checks.append(("advantages", x.advantages))
    if x.topk is not None:
        checks += [("topk.logp", x.topk.logp), ("topk.logp_rollout", x.topk.logp_rollout)]
    for name, t in checks:
        msg = _first_bad(name, t, x.valid, x.layout)
        if msg:
            raise InputError(msg)
    # Non-finite values only in padding (or a finite batch whose sum overflowed): the inputs are fine.
