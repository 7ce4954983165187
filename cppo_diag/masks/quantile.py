"""The adaptive prefix budget delta_b per response (CPPO Eq. 22), without sorting most rows.

delta_b_seq = clamp(k * Quantile_q(D over the response's valid tokens), delta_b_min, cap * delta_b_min),
with Quantile_q the linear-interpolation quantile (``torch.quantile``/``numpy.quantile`` default):
h = q (n - 1), lo = floor(h), hi = min(lo + 1, n - 1), Quantile = lerp(x_(lo), x_(hi), h - lo).

Speed (SPEC speed note): because of the clamp, a row whose two order statistics x_(lo), x_(hi) both lie at or
below delta_b_min / k (counted, not sorted) gets delta_b_min, and a row whose x_(lo) is at or above
cap * delta_b_min / k gets the cap. Only the remaining rows need order statistics: their values inside the
band are gathered and sorted (``adaptive_delta_b``). ``masked_row_quantile`` is the plain per-row quantile.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cppo_diag.masks import shuffle

__all__ = ["adaptive_delta_b", "masked_row_quantile"]

_INT_VIEW = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
             torch.bfloat16: torch.int16}


def _sort_within_rows(vals: torch.Tensor, m_row: torch.Tensor) -> torch.Tensor:
    """(M,) positive finite values grouped by row (m_row (R,) values per row, rows back to back) -> each row's
    values sorted ascending, rows kept in order.

    Positive floats order like their bit patterns read as integers, so ``row << s | (bits - min bits)`` is an
    integer key ordering by (row, value); one 1-D sort of it (values only: equal keys are equal values) replaces
    a stable value sort plus a stable row sort. numpy's SIMD sort on CPU, ``torch.sort`` elsewhere. Falls back
    to the two stable sorts when the key needs more than 63 bits.
    """
    M, R = vals.numel(), m_row.numel()
    if M == 0:
        return vals
    dev = vals.device
    row_of = torch.repeat_interleave(torch.arange(R, device=dev), m_row, output_size=M)  # (M,)
    ity = _INT_VIEW.get(vals.dtype)
    if ity is not None:
        bits = vals.view(ity).to(torch.int64)  # (M,) monotone in the value (all values > 0)
        base = bits.amin()
        span = int(bits.amax() - base)  # host sync
        sbits = max(span, 1).bit_length()
        rbits = max(R - 1, 1).bit_length()
        if sbits + rbits <= shuffle.KEY_BITS:
            key = (row_of << sbits).bitwise_or_(bits - base)  # (M,) (bits may alias vals: not in place)
            if shuffle.host_paths(dev):
                key = torch.from_numpy(np.sort(key.numpy()))
            else:
                key = torch.sort(key).values
            key.bitwise_and_((1 << sbits) - 1).add_(base)
            return key.to(ity).view(vals.dtype)
    order = torch.sort(vals, stable=True).indices
    order = order[torch.sort(row_of[order], stable=True).indices]  # by row, then by value
    return vals[order]


def _count(flags: torch.Tensor) -> torch.Tensor:
    """(B,) int64 number of True per row (bool summed as uint8 into int32: no int64 copy of the batch)."""
    return flags.view(torch.uint8).sum(-1, dtype=torch.int32).to(torch.int64)


def _rank_terms(n: torch.Tensor, q: float):
    """(lo, hi, frac) per row for n valid values: h = q (n - 1)."""
    h = q * (n.clamp(min=1) - 1).to(torch.float64)  # (B,)
    lo = torch.floor(h)
    frac = h - lo
    lo = lo.to(torch.int64)
    hi = torch.minimum(lo + 1, (n - 1).clamp(min=0))
    return lo, hi, frac


def masked_row_quantile(d: torch.Tensor, valid: torch.Tensor, q: float, n: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) linear-interpolation quantile q of each row's valid values (0 for rows with none).

    Uses a partial ``topk`` of the upper (1 - q) tail: O(T) per row rather than a full sort.
    """
    B, T = d.shape
    if n is None:
        n = valid.sum(-1)
    if B == 0 or T == 0:
        return torch.zeros((B,), dtype=d.dtype, device=d.device)
    lo, hi, frac = _rank_terms(n, q)
    k = min(T, int(math.ceil((T - 1) * (1.0 - q))) + 3)
    neg_inf = torch.full((), float("-inf"), dtype=d.dtype, device=d.device)
    top = torch.topk(torch.where(valid, d, neg_inf), k, dim=-1, largest=True, sorted=True).values  # (B, k) desc
    r_lo = (n - 1 - lo).clamp(min=0, max=k - 1)  # descending index of x_(lo)
    r_hi = (n - 1 - hi).clamp(min=0, max=k - 1)
    x_lo = top.gather(1, r_lo[:, None])[:, 0]
    x_hi = top.gather(1, r_hi[:, None])[:, 0]
    out = torch.lerp(x_lo, x_hi, frac.to(d.dtype))
    return torch.where(n > 0, out, torch.zeros((), dtype=d.dtype, device=d.device))


def adaptive_delta_b(
    d: torch.Tensor,
    valid: torch.Tensor,
    n: torch.Tensor,
    *,
    q: float,
    scale: float,
    delta_b_min: float,
    cap: float,
) -> torch.Tensor:
    """(B,) delta_b_seq = clamp(scale * Quantile_q(D valid), delta_b_min, cap * delta_b_min) (CPPO Eq. 22).

    d (B, T) divergence, 0 on padding; valid (B, T) bool; n (B,) valid counts. Rows without valid tokens get
    delta_b_min (they have no token to mask).

    Exact for every row, sorting only what the clamp leaves open. With lo_b = delta_b_min, hi_b = cap * lo_b,
    x = scale * D and the counts c_le = #{x <= lo_b}, c_lt = #{x < hi_b} over valid tokens, the order
    statistics x_(lo), x_(hi) that the interpolation needs are: at most lo_b for ranks < c_le (then only the
    rank c_le - 1 can be needed: the largest such value), at least hi_b for ranks >= c_lt (only rank c_lt:
    the smallest such value), and the sorted "band" values lo_b < x < hi_b in between. A row with
    c_le >= hi + 1 is at the minimum, a row with c_lt <= lo at the cap; only the band values of the
    remaining rows are gathered (one host sync) and sorted.
    """
    B, T = d.shape
    dt, dev = d.dtype, d.device
    lo_b, hi_b = float(delta_b_min), float(cap) * float(delta_b_min)
    out = torch.full((B,), lo_b, dtype=dt, device=dev)
    if B == 0 or T == 0:
        return out
    x = d if scale == 1.0 else d * scale  # (B, T), 0 on padding
    n_pad = T - n  # (B,) padding entries hold x = 0
    lo, hi, frac = _rank_terms(n, q)
    c_le = _count(x <= lo_b) - n_pad  # (B,)  0 <= lo_b: padding counted, then removed
    c_lt = _count(x < hi_b) - (n_pad if hi_b > 0 else 0)  # (B,)
    at_min = (c_le >= hi + 1) | (n == 0)
    at_cap = (c_lt <= lo) & ~at_min
    out = torch.where(at_cap, torch.full((), hi_b, dtype=dt, device=dev), out)
    rows = (~(at_min | at_cap)).nonzero().squeeze(1)  # (R,) the undecided rows (one host sync)
    if rows.numel() == 0:
        return out
    xr, vr, dr = x.index_select(0, rows), valid.index_select(0, rows), d.index_select(0, rows)  # (R, T)
    band = (xr > lo_b) & (xr < hi_b)  # (R, T) excludes padding (x = 0 <= lo_b)
    vals = torch.masked_select(dr, band)  # (M,) row-major: rows in order
    m_row = _count(band)  # (R,)
    band_sorted = _sort_within_rows(vals, m_row)  # (M,) each row's band values ascending, rows in order
    offset = torch.cumsum(m_row, 0) - m_row  # (R,) start of each row's band values
    neg_inf = torch.full((), float("-inf"), dtype=dt, device=dev)
    pos_inf = torch.full((), float("inf"), dtype=dt, device=dev)
    cle, clt = c_le[rows], c_lt[rows]
    # The values just outside the band are read only by rows whose rank lo falls below it (lo < c_le) or whose
    # rank hi falls above it (hi >= c_lt); on the CPU (where a host sync is free) only those rows are scanned.
    sub = None
    if shuffle.host_paths(dev):
        sub = ((lo[rows] < cle) | (hi[rows] >= clt)).nonzero().squeeze(1)  # (R',)
    if sub is None or sub.numel() == rows.numel():
        low_max = torch.where(vr & (xr <= lo_b), dr, neg_inf).amax(-1)  # (R,) largest D with x <= lo_b
        high_min = torch.where(vr & (xr >= hi_b), dr, pos_inf).amin(-1)  # (R,) smallest D with x >= hi_b
    else:
        low_max = torch.full((rows.numel(),), float("-inf"), dtype=dt, device=dev)  # unread where not set
        high_min = torch.full((rows.numel(),), float("inf"), dtype=dt, device=dev)
        if sub.numel():
            xs, vs, ds = xr.index_select(0, sub), vr.index_select(0, sub), dr.index_select(0, sub)  # (R', T)
            low_max.index_copy_(0, sub, torch.where(vs & (xs <= lo_b), ds, neg_inf).amax(-1))
            high_min.index_copy_(0, sub, torch.where(vs & (xs >= hi_b), ds, pos_inf).amin(-1))

    def order_stat(r: torch.Tensor) -> torch.Tensor:  # (R,) value of rank r among the row's valid D
        idx = (offset + r - cle).clamp(min=0, max=max(band_sorted.numel() - 1, 0))
        in_band = band_sorted[idx] if band_sorted.numel() else torch.zeros_like(low_max)
        return torch.where(r < cle, low_max, torch.where(r >= clt, high_min, in_band))

    qv = torch.lerp(order_stat(lo[rows]), order_stat(hi[rows]), frac[rows].to(dt))  # (R,)
    return out.index_copy(0, rows, (scale * qv).clamp(min=lo_b, max=hi_b))
