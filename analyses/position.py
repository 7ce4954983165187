"""Divergence by token position and its tails (reproduces CPPO paper Fig. 2).

Statistic definitions (tested against numpy in ``tests/analyses/test_analyses_position.py``), per (metric, bin),
over the n tokens D_1..D_n that fall in the bin:

* ``count`` = n; ``mean`` = arithmetic mean.
* ``p50``, ``p90``, ``p99``: quantiles with **linear interpolation between order statistics** (numpy's
  default ``method="linear"``: the q-quantile of sorted x_0..x_{n-1} is x_f + (h - f)(x_{f+1} - x_f) with
  h = q (n - 1), f = floor(h)).
* ``top10_mean``: mean of the tokens with D >= p90 (the "top decile" of the bin; with ties at p90 every
  tied token is included).
* ``surv_<x>`` = P(D > x) = fraction of the bin's tokens strictly above the threshold x.
* ``hill_alpha``: Hill tail-index estimate with the threshold at the bin's p90:
  u = p90, the k tokens with D > u, xi = (1/k) sum log(D_i / u), ``hill_alpha`` = 1 / xi (heavier tail ->
  smaller alpha). ``hill_k`` = k. Null when k < ``hill_min_k``, u <= 0 or xi == 0. A tail index describes a
  power-law tail, which a **bounded** metric cannot have: for |pi - mu| and |pi_old - mu| (both in [0, 1],
  ``BOUNDED_METRICS``) ``hill_alpha`` and ``hill_k`` are always null; they are reported for the unbounded
  log-ratio metrics only.
* ``threshold_mean`` (only when ``delta`` is given): mean over the bin's tokens of CPPO's per-token
  threshold on D, delta / w_t, w_t = 1 - (1 - w_min)(t - 1) / max(T - 1, 1) with t = pos + 1 and T the
  response's valid length (CPPO Eq. 9, "sequence" mode; ``cppo_diag.masks.threshold_schedule``): the paper's
  Fig. 2 overlay. ``w_min`` None means the cppo rule's default.

Updates: ``updates="all" | "first" | "after_first" | "lagged"`` pools every logged update, only the first of
each batch, only the later ones, or the tokens with recorded lag > 0 (``cppo_diag.analyses.updates``); lengths T
are taken per response, so the
filter never changes a response's t / T or delta / w_t.

Pooled frames of several runs (the study pools seeds) must carry a ``run`` column: responses are then keyed
by (run, step, update, rank, seq_id), so two runs' responses that share a sequence key keep their own T.

Binning: absolute position ``bin = pos // bin_width`` (``bin_start = bin * bin_width`` inclusive,
``bin_end`` exclusive, in 0-based positions), or relative position ``t / T`` in ``n_rel_bins`` equal bins
of (0, 1] when ``relative=True`` (``bin_start``/``bin_end`` are then fractions).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import polars as pl

from cppo_diag.analyses.tokens import divergence_exprs, filter_tokens, load_tokens, require_columns
from cppo_diag.analyses.updates import filter_updates, resolve_updates
from cppo_diag.masks.schedule import threshold_schedule  # noqa: F401  (re-exported: analyses.threshold_schedule)
from cppo_diag.storage.schema import SEQUENCE_KEY

RUN_KEY = "run"  # column that tells runs apart in a frame pooling several runs (see with_lengths)

METRICS = ("tv", "abs_logratio", "k3")
METRIC_LABELS = {
    "tv": "|π − μ| (probability)",
    "abs_logratio": "|log π − log μ| (nats)",
    "k3": "k3 = ρ − 1 − log ρ (nats)",
    "k1": "log π − log μ (nats)",
    "mismatch_tv": "|π_old − μ| (probability)",
    "mismatch_abs_logratio": "|log π_old − log μ| (nats)",
}
# Metrics bounded in [0, 1]: no power-law tail, so no Hill tail index (module docstring).
BOUNDED_METRICS = frozenset({"tv", "mismatch_tv"})
DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.5)
STAT_COLUMNS = ("count", "mean", "p50", "p90", "p99", "top10_mean", "hill_alpha", "hill_k")


def surv_name(x: float) -> str:
    return f"surv_{x:g}"


def _threshold_expr(delta: float, w_min: float | None) -> pl.Expr:
    """delta / w_t per token (CPPO Eq. 9 with t = pos + 1 and T = ``_T``), by the rule library's schedule;
    ``w_min`` None: the cppo rule's default."""
    if w_min is None:
        from cppo_diag.masks import rule_defaults

        w_min = rule_defaults("cppo")["w_min"]
    return threshold_schedule(pl.col("pos").cast(pl.Float64), delta=delta, w_min=w_min,
                              length=pl.col("_T").cast(pl.Float64))


def _bin_exprs(relative: bool, bin_width: int, n_rel_bins: int) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    if not relative:
        if bin_width < 1:
            raise ValueError(f"bin_width: expected an integer >= 1, found {bin_width}")
        b = (pl.col("pos") // bin_width).cast(pl.Int64)
        return b, (pl.col("bin") * bin_width), ((pl.col("bin") + 1) * bin_width)
    if n_rel_bins < 1:
        raise ValueError(f"n_rel_bins: expected an integer >= 1, found {n_rel_bins}")
    rel = (pl.col("pos") + 1) / pl.col("_T")  # t / T in (0, 1]
    b = (rel * n_rel_bins).ceil().cast(pl.Int64).clip(1, n_rel_bins) - 1
    return b, pl.col("bin") / n_rel_bins, (pl.col("bin") + 1) / n_rel_bins


def position_stats(
    source: Any,
    *,
    metrics: Sequence[str] = METRICS,
    bin_width: int = 64,
    relative: bool = False,
    n_rel_bins: int = 20,
    step_range: tuple[int | None, int | None] | None = None,
    adv_sign: str | None = None,
    updates: str | None = "all",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    delta: float | None = None,
    w_min: float | None = None,
    hill_min_k: int = 5,
    engine: str = "streaming",
    progress: bool = False,
) -> pl.DataFrame:
    """Per-position-bin statistics of per-token divergences (definitions in the module docstring).

    ``metrics`` from {"tv", "abs_logratio", "k3", "k1"} (SPEC "Per-token divergence"); ``step_range`` an
    inclusive (lo, hi) with None for open ends; ``adv_sign`` None/"all", "pos", "neg" or "zero";
    ``updates`` "all", "first", "after_first" (``cppo_diag.analyses.updates``) or None for the run's default.
    Returns a long table, one row per (metric, bin), sorted by metric then bin; empty (with the same
    columns) when no token passes the filters.
    """
    exprs = divergence_exprs()
    unknown = [m for m in metrics if m not in exprs]
    if unknown:
        raise ValueError(f"metrics: expected names from {sorted(exprs)}, found {unknown}")
    lf = load_tokens(source)
    require_columns(lf, ["step", "pos", "logp", "logp_rollout", "advantage"], "position_stats")
    updates = resolve_updates(source, updates)
    parts = None
    if relative or delta is not None:  # response lengths: one step at a time
        parts = [filter_updates(p, updates) for p in length_parts(source, step_range=step_range, adv_sign=adv_sign)]
    lf = filter_updates(filter_tokens(lf, step_range=step_range, adv_sign=adv_sign), updates)
    return aggregate_positions(
        lf, {m: exprs[m] for m in metrics}, bin_width=bin_width, relative=relative, n_rel_bins=n_rel_bins,
        thresholds=thresholds, delta=delta, w_min=w_min, hill_min_k=hill_min_k, engine=engine, progress=progress,
        parts=parts,
    )


# -- exact bounded-memory statistics: histogram pass + refinement pass ---------------------------------
# A monotone bucket key per float32 value from its IEEE-754 bit pattern: for D >= 0 the top 16 bits (sign,
# exponent, 7 mantissa bits: buckets 0.8% wide in relative terms; the pattern of a non-negative float is
# ordered like its value; 0 -> key 0, normal positives -> keys >= 128), for D < 0 the same of |D| negated
# (keys <= -129). Values with |D| below float32's smallest normal number (1.18e-38) are taken as 0 and NaN
# values are skipped, so key 0 holds only 0 and key +-_KEY_INF only +-inf ("single-valued" keys).
#
# Pass 1 counts and sums the values per (bin, bucket) (numpy bincounts on keys polars computes). Every order
# statistic a quantile needs then lies in a known bucket, every bucket wholly above a bin's p90 bucket is in
# its tail, and a survival threshold x splits at most one bucket (from the key's value range). What remains
# is (a) the values of the few buckets holding a needed order statistic or straddling a threshold and (b)
# per-bin sums of D and log D over the tail buckets (the top-decile mean and the Hill estimate): pass 1
# keeps them when a pilot guessed those buckets right, else pass 2 streams the run again for them (see
# ``aggregate_positions``). The results are the exact order statistics of the float32 divergences, as a
# full sort would give.
_KEY_SPAN = 1 << 16  # composite key ck = bin * _KEY_SPAN + key + _KEY_OFFSET, key in [-32767, 32767]
_KEY_OFFSET = 1 << 15
_KEY_INF = 0x7F80  # key of +inf; larger keys (and their negatives) are NaN
_FLT_MIN = 1.1754943508222875e-38
_DENSE_SLOTS = 8_000_000  # above this many (bin, bucket) slots per chunk, use np.unique instead of bincount
QUANTILES = {"p50": 0.5, "p90": 0.9, "p99": 0.99}


def _flush_tiny(d: pl.Expr) -> pl.Expr:
    """|D| < FLT_MIN -> 0 (before the float32 cast, so no subnormal float32 reaches the bucket keys)."""
    return pl.when(d.abs() < _FLT_MIN).then(0.0).otherwise(d)


def _np_keys(d: np.ndarray) -> np.ndarray:
    """Bucket key of each float32 value (see above); int32."""
    bits = np.ascontiguousarray(d, dtype=np.float32).view(np.int32)
    key = bits >> 16
    if len(key) and key.min() < 0:  # negative values: order by magnitude, reversed
        neg = bits < 0
        key[neg] = -((bits[neg] & 0x7FFFFFFF) >> 16)
    return key


def _key_bounds(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, single) per bucket key: every float32 of the bucket lies in [lo, hi] (float64); ``single``
    marks the keys holding one value only (0 and +-inf)."""
    k = np.asarray(keys, dtype=np.int64)
    a = np.minimum(np.abs(k), _KEY_INF)
    small = (a << 16).astype(np.uint32).view(np.float32).astype(np.float64)
    big = ((a << 16) | 0xFFFF).astype(np.uint32).view(np.float32).astype(np.float64)
    single = (a == 0) | (a == _KEY_INF)
    small[a == 0] = 0.0
    big[single] = small[single]
    lo = np.where(k >= 0, small, -big)
    hi = np.where(k >= 0, big, -small)
    return lo, hi, single


def _chunk_counts(ck: np.ndarray, d: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct ck, count, sum of d) of one chunk's composite keys (sums 0 without ``d``)."""
    lo_ck, hi_ck = int(ck.min()), int(ck.max())
    if hi_ck + 1 <= _DENSE_SLOTS:  # small keys: index directly
        idx, lo_ck = ck, 0
    elif hi_ck - lo_ck + 1 <= _DENSE_SLOTS:
        idx = ck - lo_ck
    else:
        uniq, idx = np.unique(ck, return_inverse=True)
        n = np.bincount(idx, minlength=len(uniq))
        return uniq, n, (np.bincount(idx, weights=d, minlength=len(uniq)) if d is not None else np.zeros(len(uniq)))
    n = np.bincount(idx)
    nz = np.flatnonzero(n)
    s = np.bincount(idx, weights=d)[nz] if d is not None else np.zeros(len(nz))
    return nz + lo_ck, n[nz], s


def _lerp(a: float, b: float, t: float) -> float:
    # numpy's linear interpolation (np.quantile method="linear"), including its t >= 0.5 form
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


class _BinHist:
    """Histogram of one (metric, bin): sorted composite keys ``cks`` with counts ``n``; bucket bounds."""

    def __init__(self, cks: np.ndarray, n: np.ndarray):
        self.cks, self.n = cks, n
        self.keys = (cks % _KEY_SPAN) - _KEY_OFFSET
        self.lo, self.hi, self.single = _key_bounds(self.keys)
        self.cum = np.cumsum(n)
        self.before = self.cum - n  # values in lower buckets
        self.total = int(self.cum[-1])

    def bucket_of_rank(self, r: int) -> int:
        return int(np.searchsorted(self.cum, r, side="right"))

    def quantile_ranks(self) -> dict[str, tuple[int, int, float]]:
        out = {}
        for name, q in QUANTILES.items():
            h = q * (self.total - 1)
            f = int(math.floor(h))
            out[name] = (f, min(f + 1, self.total - 1), h - f)
        return out

    def needed_buckets(self, thresholds: Sequence[float]) -> set[int]:
        """Buckets (indices) whose values pass 2 must fetch: multi-valued ones holding a quantile's order
        statistic or straddling a survival threshold."""
        js = set()
        for f, f1, _ in self.quantile_ranks().values():
            js.update((self.bucket_of_rank(f), self.bucket_of_rank(f1)))
        for x in thresholds:
            js.update(np.flatnonzero((self.lo <= x) & (self.hi > x)).tolist())
        return {j for j in js if not self.single[j]}

    def values(self, j: int, fetched: dict[int, np.ndarray]) -> np.ndarray:
        """Sorted values of bucket j (float32)."""
        if self.single[j]:
            return np.full(int(self.n[j]), self.lo[j], dtype=np.float32)
        return fetched[int(self.cks[j])]

    def order_stat(self, r: int, fetched: dict[int, np.ndarray]) -> float:
        j = self.bucket_of_rank(r)
        if self.single[j]:
            return float(self.lo[j])
        return float(fetched[int(self.cks[j])][r - int(self.before[j])])

    def tail_bucket(self) -> int:
        """Index of the highest bucket holding p90's order statistics: every bucket above holds only
        values > p90, every bucket below the lower one only values < p90."""
        f, f1, _ = self.quantile_ranks()["p90"]
        return self.bucket_of_rank(f1)


def _bin_stats(h: _BinHist, fetched: dict[int, np.ndarray], tail_s: float, tail_sl: float, total_s: float,
               thresholds: Sequence[float], hill_min_k: int) -> dict:
    n = h.total
    out: dict[str, Any] = {"count": n, "mean": total_s / n}
    for name, (f, f1, t) in h.quantile_ranks().items():
        out[name] = _lerp(h.order_stat(f, fetched), h.order_stat(f1, fetched), t)
    u = out["p90"]
    jt = h.tail_bucket()
    jf = h.bucket_of_rank(h.quantile_ranks()["p90"][0])
    # buckets jf..jt: explicit values (any bucket strictly between holds no value); above jt: the tail sums
    n_above = int(h.total - h.cum[jt])
    vals = np.concatenate([h.values(j, fetched) for j in range(jf, jt + 1) if h.n[j]]).astype(np.float64)
    ge, gt = vals[vals >= u], vals[vals > u]
    n_ge = n_above + len(ge)
    out["top10_mean"] = (tail_s + float(ge.sum())) / n_ge if n_ge else None
    k = n_above + len(gt)
    out["hill_k"] = k
    out["hill_alpha"] = None
    if k >= hill_min_k and u > 0:
        with np.errstate(divide="ignore"):
            logs = float(np.log(gt.astype(np.float32)).astype(np.float64).sum())
        xi = (tail_sl + logs) / k - math.log(u)
        out["hill_alpha"] = 1.0 / xi if xi > 0 else None
    for x in thresholds:
        above = int(h.n[h.lo > x].sum())
        for j in np.flatnonzero((h.lo <= x) & (h.hi > x)):
            above += int((h.values(j, fetched) > x).sum())
        out[surv_name(x)] = above / n
    return out


CHUNK_ROWS = 2_000_000  # rows per streamed chunk (bounds memory: ~ CHUNK_ROWS * 13 bytes per metric)


def sequence_key(lf: pl.LazyFrame) -> list[str]:
    """The columns that identify a response in ``lf``: ``SEQUENCE_KEY``, preceded by ``run`` when the frame
    pools several runs (two runs' responses may share a (step, update, rank, seq_id))."""
    return ([RUN_KEY] if RUN_KEY in lf.collect_schema().names() else []) + list(SEQUENCE_KEY)


def with_lengths(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Add ``_T``, the valid length of each token's response (max(pos) + 1 over the sequence key, with the
    run key when present). A window over the sequence key: apply it to one step at a time (sequences never
    span steps), see :func:`length_parts`."""
    return lf.with_columns(_T=(pl.col("pos").max().over(sequence_key(lf)) + 1).cast(pl.Float64))


def length_parts(source: Any, *, step_range=None, adv_sign: str | None = None, require=(),
                 analysis: str = "position_stats", extra_filter: pl.Expr | None = None) -> list[pl.LazyFrame]:
    """LazyFrames of consecutive whole steps (about 2 M rows each) with ``_T`` computed before the token
    filters (bounded memory: each part is collected on its own)."""
    from cppo_diag.analyses.tokens import step_group_lazyframes

    parts = []
    for part in step_group_lazyframes(source, step_range=step_range):
        part = filter_tokens(with_lengths(part), adv_sign=adv_sign)
        if extra_filter is not None:
            part = part.filter(extra_filter)
        parts.append(part)
    return parts


def _key_expr(d: pl.Expr) -> pl.Expr:
    """Bucket key of a float32 expression, computed by polars (the same integers as :func:`_np_keys`)."""
    bits = d.reinterpret(dtype=pl.Int32)
    mag = (bits & 0x7FFFFFFF) // _KEY_SPAN
    return pl.when(bits < 0).then(-mag).otherwise(mag)


def _merge_counts(pieces: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sorted distinct composite keys with their total counts and sums, NaN keys dropped."""
    if not pieces:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
    cks = np.concatenate([p[0] for p in pieces]).astype(np.int64)
    ns = np.concatenate([p[1] for p in pieces]).astype(np.int64)
    ss = np.concatenate([p[2] for p in pieces])
    real = np.abs(cks % _KEY_SPAN - _KEY_OFFSET) <= _KEY_INF  # drop the NaN keys (their sums are NaN)
    cks, ns, ss = cks[real], ns[real], ss[real]
    if len(cks) and np.any(cks[1:] <= cks[:-1]):  # several chunks: merge equal keys
        cks, inv = np.unique(cks, return_inverse=True)
        ns = np.bincount(inv, weights=ns, minlength=len(cks)).astype(np.int64)  # exact below 2**53
        ss = np.bincount(inv, weights=ss, minlength=len(cks))
    return cks, ns, ss


def _bin_hists(cks: np.ndarray, ns: np.ndarray) -> dict[int, _BinHist]:
    bin_of = cks // _KEY_SPAN
    edges = np.flatnonzero(np.r_[True, bin_of[1:] != bin_of[:-1], True]) if len(cks) else np.zeros(1, int)
    return {int(bin_of[edges[i]]): _BinHist(cks[edges[i]:edges[i + 1]], ns[edges[i]:edges[i + 1]])
            for i in range(len(edges) - 1)}


LAST_PASSES: dict[str, int] = {}  # metric -> passes over the data the last aggregate_positions call needed
PILOT_ROWS = 2_000_000  # rows read first to guess, per bin, the buckets the exact statistics will need
PILOT_MIN_BIN = 2_000  # bins with fewer pilot tokens (or absent from the pilot) keep all their values
_GUESS_EPS = 0.01  # keep the buckets within +-1 percentile point of each pilot quantile
_MAX_KEPT = 20_000_000  # per metric (160 MB): above this many kept values the guess is abandoned (pass 2 instead)


def _guess(pilot: dict[int, _BinHist], thresholds: Sequence[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """From the pilot's histograms: (composite keys to keep, per-bin lowest tail key, per-bin keep-all flag)."""
    n_b = (max(pilot) + 1) if pilot else 0
    keep_all = np.ones(n_b + 1, dtype=bool)  # last entry: bins beyond the pilot's
    tail_lo = np.zeros(n_b + 1, dtype=np.int64)
    thr_keys = set()
    for x in thresholds:  # buckets that may straddle x, in every bin
        k = int(_np_keys(np.array([x], dtype=np.float32))[0])
        thr_keys.update((k - 1, k, k + 1))
    want: list[np.ndarray] = []
    for bn, h in pilot.items():
        if h.total < PILOT_MIN_BIN:
            continue
        keep_all[bn] = False
        base = bn * _KEY_SPAN + _KEY_OFFSET
        for q in QUANTILES.values():
            lo = h.bucket_of_rank(int(math.floor(max(q - _GUESS_EPS, 0.0) * (h.total - 1))))
            hi = h.bucket_of_rank(int(math.ceil(min(q + _GUESS_EPS, 1.0) * (h.total - 1))))
            want.append(np.arange(int(h.cks[lo]) - 2, int(h.cks[hi]) + 3))
        want.append(np.array(sorted(base + k for k in thr_keys)))
        tail_lo[bn] = int(h.cks[h.bucket_of_rank(int(math.floor((0.9 - _GUESS_EPS) * (h.total - 1))))]) - 2
    keys = np.unique(np.concatenate(want)) if want else np.zeros(0, np.int64)
    return keys.astype(np.int64), tail_lo, keep_all


def _flag_table(keys: np.ndarray, tail_lo: np.ndarray, keep_all: np.ndarray) -> np.ndarray:
    """Per composite key below (bins of the pilot + 1) * _KEY_SPAN: 1 if its values are kept, + 2 if it is
    in the guessed tail; the last entry (every key beyond, i.e. bins the pilot did not see) is 3."""
    n_b = len(keep_all) - 1
    ck = np.arange((n_b + 1) * _KEY_SPAN, dtype=np.int64)
    table = (ck >= np.repeat(tail_lo, _KEY_SPAN)).astype(np.uint8) * 2
    table[keys[(keys >= 0) & (keys < len(table))]] |= 1
    table |= np.repeat(keep_all, _KEY_SPAN).astype(np.uint8) * 3
    table[np.abs(ck % _KEY_SPAN - _KEY_OFFSET) > _KEY_INF] = 0  # NaN keys: neither (their sums are NaN)
    table[-1] = 3
    return table


def _pack(ck: np.ndarray, d: np.ndarray) -> np.ndarray:
    """(ck, sortable float bits) packed in one int64: sorting it orders by bucket, then by value."""
    bits = d.view(np.int32)
    sortable = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits).astype(np.int64) + (1 << 31)
    return (ck.astype(np.int64) << 32) | sortable


def _unpack(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ck = packed >> 32
    d = ((packed & 0xFFFFFFFF) - (1 << 31)).astype(np.int32)
    return ck, np.where(d < 0, d ^ 0x7FFFFFFF, d).astype(np.int32).view(np.float32)


def aggregate_positions(
    lf: pl.LazyFrame, metric_exprs: dict[str, pl.Expr], *, bin_width: int = 64, relative: bool = False,
    n_rel_bins: int = 20, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, delta: float | None = None,
    w_min: float | None = None, hill_min_k: int = 5, engine: str = "streaming", chunk_rows: int = CHUNK_ROWS,
    progress: bool = False, parts: list[pl.LazyFrame] | None = None, pilot_rows: int = PILOT_ROWS,
) -> pl.DataFrame:
    """Exact per-bin statistics with bounded memory, reshaped to the long table of :func:`position_stats`
    (shared with mismatch).

    Pass 1 streams the run in chunks of ``chunk_rows`` rows; polars decodes only the needed columns and
    computes, in its multi-threaded engine, the bins, the divergences as float32 and each value's composite
    bucket key; numpy counts and sums the values of each (bin, bucket) with dense bincounts. Pass 2 streams
    it again keeping only the values of the buckets that hold a needed order statistic (or straddle a
    survival threshold) and the per-bin sums over the p90 tail (see the comment above ``_np_keys``).

    Usually pass 2 is not needed: a *pilot* (the first ``pilot_rows`` rows, read once more) gives per bin
    rough quantiles, and pass 1 already keeps the values of the buckets within +-``_GUESS_EPS`` of each
    pilot quantile (and of the buckets that may straddle a threshold) and per-bucket sums from a little
    below the pilot's p90 upwards. After pass 1 the exact histogram tells whether every needed bucket was
    kept and the kept tail reaches below the p90 bucket; the metrics for which it does not (the data drifted
    after the pilot rows, or more than ``_MAX_KEPT`` values would have been kept) get pass 2. Either way the
    results are the same exact statistics; ``LAST_PASSES`` records which path each metric took.

    Relative bins and the delta / w_t overlay need each response's length: then the data come from
    ``parts`` (one LazyFrame per group of steps with ``_T``, see :func:`length_parts`), each collected on its
    own, always in two passes; without ``parts``, ``lf`` is processed as one part.
    """
    per_part = relative or delta is not None
    if per_part and parts is None:
        parts = [with_lengths(lf)]
    b, _, _ = _bin_exprs(relative, bin_width, n_rel_bins)
    cols = [b.alias("bin"), *(_flush_tiny(e).cast(pl.Float32).alias(n) for n, e in metric_exprs.items())]
    if delta is not None:
        cols.append(_threshold_expr(delta, w_min).alias("_thr"))
    # composite key per metric, computed in the (multi-threaded) engine; NaN / null values get a key beyond
    # +-_KEY_INF (counted in the bin's token count, dropped from the metric's statistics)
    ck_exprs = [(pl.col("bin") * _KEY_SPAN + _KEY_OFFSET
                 + _key_expr(pl.col(n).fill_null(float("nan"))).cast(pl.Int64)).alias(f"ck|{n}") for n in metric_exprs]

    def chunks(post=None):
        """Frames with bin, the metrics, their ``ck|`` keys (and _thr); ``post`` maps the LazyFrame first."""
        if per_part:
            for part in parts:
                frame = part.select(cols).with_columns(ck_exprs)
                frame = (post(frame) if post else frame).collect(engine=engine)
                if frame.height:
                    yield frame
        else:
            frame = lf.select(cols).with_columns(ck_exprs)
            yield from (post(frame) if post else frame).collect_batches(
                chunk_size=chunk_rows, maintain_order=False, engine=engine)

    def binsum(acc: dict, name: str, bins: np.ndarray, weights: np.ndarray | None = None):
        arr = np.bincount(bins, weights=weights)
        cur = acc.get(name)
        if cur is None or len(cur) < len(arr):
            cur = np.pad(cur if cur is not None else np.zeros(0), (0, len(arr) - (0 if cur is None else len(cur))))
        cur[: len(arr)] += arr
        acc[name] = cur

    names = list(metric_exprs)
    # -- pilot: guess the buckets pass 2 would need, so that pass 1 can keep their values already ---------
    guess: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    spec_cols: list[pl.Expr] = []
    if not per_part and pilot_rows > 0:
        pilot = lf.select(cols).with_columns(ck_exprs).head(pilot_rows).collect(engine=engine)
        for m in names:
            ck = pilot[f"ck|{m}"].to_numpy()
            guess[m] = _guess(_bin_hists(*_merge_counts([_chunk_counts(ck)] if len(ck) else [])[:2]), thresholds)
            # one uint8 per composite key (bit 1: keep the value, bit 2: in the guessed tail), read by a gather
            table = _flag_table(*guess[m])
            ck_m = pl.col(f"ck|{m}")
            spec_cols.append(pl.lit(pl.Series(table)).gather(ck_m.clip(0, len(table) - 1)).alias(f"_flag|{m}"))
    kept: dict[str, list[np.ndarray]] = {m: [] for m in guess}
    n_kept: dict[str, int] = {m: 0 for m in guess}
    tail_pieces: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {m: [] for m in guess}
    # -- pass 1: (bin, bucket) counts and per-bin sums (and the guessed buckets' values, tail sums) -------
    pieces: dict[str, list[tuple[np.ndarray, np.ndarray, np.ndarray]]] = {m: [] for m in names}
    dense: dict[str, tuple[np.ndarray, np.ndarray]] = {m: (np.zeros(0, np.int64), np.zeros(0)) for m in names}
    per_bin: dict[str, np.ndarray] = {}
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="position stats (pass 1/2)", unit="tok", unit_scale=True)
    def first_pass(f: pl.LazyFrame) -> pl.LazyFrame:
        f = f.with_columns(spec_cols) if spec_cols else f
        return f if delta is not None else f.drop("bin")  # bins are in the composite keys

    for chunk in chunks(first_pass):
        if chunk.height == 0:
            continue
        if bar is not None:
            bar.update(chunk.height)
        if delta is not None:
            binsum(per_bin, "_thr", chunk["bin"].to_numpy(), chunk["_thr"].to_numpy())
        for m in names:
            ck = chunk[f"ck|{m}"].to_numpy()
            d = chunk[m].to_numpy()
            # counts and sums per composite key (NaN values have their own keys, dropped later)
            if m in dense and len(ck) and int(ck.max()) < _DENSE_SLOTS:  # dense accumulators
                n = np.bincount(ck)
                sm = np.bincount(ck, weights=d)
                acc_n, acc_s = dense[m]
                if len(acc_n) < len(n):
                    acc_n = np.pad(acc_n, (0, len(n) - len(acc_n)))
                    acc_s = np.pad(acc_s, (0, len(n) - len(acc_s)))
                acc_n[: len(n)] += n
                acc_s[: len(n)] += sm
                dense[m] = (acc_n, acc_s)
            elif len(ck):
                pieces[m].append(_chunk_counts(ck, d))
            if m in kept:
                flag = chunk[f"_flag|{m}"].to_numpy()
                rows = np.flatnonzero(flag != 0)  # the ~20% of rows kept or in the guessed tail
                flag, ck, d = flag[rows], ck[rows], d[rows]
                hit = (flag & 1).view(bool)
                n_kept[m] += int(np.count_nonzero(hit))
                if n_kept[m] > _MAX_KEPT:  # the pilot was a poor guess: give up, pass 2 will do it
                    del kept[m], tail_pieces[m]
                else:
                    kept[m].append(_pack(ck[hit], d[hit]))
                    tail = flag >= 2
                    ct, dt = ck[tail], d[tail]
                    if len(ct):
                        lo_ck = int(ct.min())
                        idx = ct - lo_ck
                        nt = np.bincount(idx)
                        nz = np.flatnonzero(nt)
                        with np.errstate(divide="ignore", invalid="ignore"):
                            sl_ = np.bincount(idx, weights=np.log(dt))[nz]  # float32 logs, summed in float64
                        tail_pieces[m].append((nz + lo_ck, np.bincount(idx, weights=dt)[nz], sl_))
    if bar is not None:
        bar.close()
    for m in names:  # dense accumulators -> one more piece
        acc_n, acc_s = dense.pop(m)
        nz = np.flatnonzero(acc_n)
        if len(nz):
            pieces[m].append((nz, acc_n[nz], acc_s[nz]))
    if pieces[names[0]]:  # tokens per bin (NaN keys included) from the first metric's counts
        ck0 = np.concatenate([p[0] for p in pieces[names[0]]])
        binsum(per_bin, "count", ck0 // _KEY_SPAN, np.concatenate([p[1] for p in pieces[names[0]]]).astype(np.float64))
    if "count" not in per_bin or per_bin["count"].sum() == 0:
        return _rows_to_long([], thresholds, relative, bin_width, n_rel_bins, delta is not None)
    n_bins = len(per_bin["count"])
    hist_by: dict[str, dict[int, _BinHist]] = {}
    wanted: dict[str, np.ndarray] = {}
    tail_ck: dict[str, np.ndarray] = {}  # per bin: composite keys above this are in the p90 tail
    for m in names:
        hist_by[m] = {}
        if not pieces[m] or not any(len(p[0]) for p in pieces[m]):
            wanted[m], tail_ck[m] = np.zeros(0, np.int64), np.full(n_bins, np.iinfo(np.int64).max)
            continue
        cks, ns, ss = _merge_counts(pieces[m])
        pieces[m] = []
        if not len(cks):  # every value NaN
            wanted[m], tail_ck[m] = np.zeros(0, np.int64), np.full(n_bins, np.iinfo(np.int64).max)
            continue
        binsum(per_bin, f"s|{m}", cks // _KEY_SPAN, ss)
        bin_of = cks // _KEY_SPAN
        edges = np.flatnonzero(np.r_[True, bin_of[1:] != bin_of[:-1], True])
        tk = np.full(n_bins, np.iinfo(np.int64).max)  # absent bins: no tail
        want: list[int] = []
        for i in range(len(edges) - 1):
            sl = slice(edges[i], edges[i + 1])
            h = _BinHist(cks[sl], ns[sl])
            bn = int(bin_of[edges[i]])
            hist_by[m][bn] = h
            want.extend(int(h.cks[j]) for j in h.needed_buckets(thresholds))
            tk[bn] = h.cks[h.tail_bucket()]
        wanted[m], tail_ck[m] = np.array(sorted(set(want)), dtype=np.int64), tk
    # -- did the pilot's guess cover every needed bucket and the whole p90 tail? ------------------------
    fetched: dict[str, dict[int, np.ndarray]] = {m: {} for m in names}
    tails: dict[str, np.ndarray] = {}
    found: dict[str, list[np.ndarray]] = {m: [] for m in names}
    done: set[str] = set()
    for m in kept:
        keys, tail_lo, keep_all = guess[m]
        last = len(keep_all) - 1
        ok = True
        for bn, h in hist_by[m].items():
            slot = min(bn, last)
            if keep_all[slot]:
                continue
            if tail_lo[slot] > tail_ck[m][bn] + 1 or not np.isin(
                    np.array([h.cks[j] for j in h.needed_buckets(thresholds)], dtype=np.int64), keys).all():
                ok = False
                break
        if not ok:
            continue
        found[m] = kept[m]
        tp = tail_pieces[m]
        if tp:
            ct = np.concatenate([t[0] for t in tp])
            above = (ct > tail_ck[m][ct // _KEY_SPAN]) & (np.abs(ct % _KEY_SPAN - _KEY_OFFSET) <= _KEY_INF)
            bt = ct[above] // _KEY_SPAN
            binsum(tails, f"s|{m}", bt, np.concatenate([t[1] for t in tp])[above])
            binsum(tails, f"sl|{m}", bt, np.concatenate([t[2] for t in tp])[above])
        done.add(m)
    kept.clear()
    tail_pieces.clear()
    LAST_PASSES.clear()
    LAST_PASSES.update({m: (1 if m in done else 2) for m in names if hist_by[m]})
    # -- pass 2 (metrics the guess missed): values of the needed buckets, tail sums -----------------------
    need = [m for m in names if hist_by[m] and m not in done]
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="position stats (pass 2/2)", unit="tok", unit_scale=True,
                   total=int(per_bin["count"].sum()) * len(need))
    for m in need:  # one streamed query per metric, which keeps only the rows pass 2 needs
        tk = pl.lit(pl.Series(np.r_[tail_ck[m], np.iinfo(np.int64).max])).gather(
            pl.col("bin").clip(0, n_bins))  # per row: its bin's tail key (never above an absent bin's)
        hit = pl.col(f"ck|{m}").is_in(pl.Series(wanted[m], dtype=pl.Int64).implode()) if len(wanted[m]) else pl.lit(False)
        ck_m = pl.col(f"ck|{m}")
        real = ((ck_m % _KEY_SPAN) - _KEY_OFFSET).abs() <= _KEY_INF

        def post(f: pl.LazyFrame, ck_m=ck_m, hit=hit, tk=tk, real=real, m=m) -> pl.LazyFrame:
            return (f.select("bin", m, ck_m, (ck_m > tk).alias("_tail"), hit.alias("_hit"))
                    .filter(real & (pl.col("_tail") | pl.col("_hit"))))

        for chunk in chunks(post):
            if bar is not None:
                bar.update(chunk.height)
            bins = chunk["bin"].to_numpy()
            d = chunk[m].to_numpy()
            tail = chunk["_tail"].to_numpy()
            hit = chunk["_hit"].to_numpy()
            if hit.any():
                found[m].append(_pack(chunk[f"ck|{m}"].to_numpy()[hit], d[hit]))
            dt, bt = d[tail], bins[tail]
            binsum(tails, f"s|{m}", bt, dt)
            with np.errstate(divide="ignore", invalid="ignore"):
                binsum(tails, f"sl|{m}", bt, np.log(dt))  # float32 logs, summed in float64
    if bar is not None:
        bar.close()
    for m in names:
        if not found[m]:
            continue
        ck, d = _unpack(np.sort(np.concatenate(found[m])))
        found[m] = []
        starts = np.searchsorted(ck, wanted[m], side="left")
        ends = np.searchsorted(ck, wanted[m], side="right")
        for c, a, e in zip(wanted[m].tolist(), starts.tolist(), ends.tolist()):
            fetched[m][c] = d[a:e]
    rows = []
    count = per_bin["count"]

    def at(acc: dict, name: str, bn: int) -> float:
        arr = acc.get(name)
        return float(arr[bn]) if arr is not None and bn < len(arr) else 0.0

    for m in names:
        for bn in np.flatnonzero(count):
            bn = int(bn)
            h = hist_by[m].get(bn)
            if h is None:  # every value of this metric in the bin was NaN
                continue
            st = _bin_stats(h, fetched[m], at(tails, f"s|{m}", bn), at(tails, f"sl|{m}", bn),
                            at(per_bin, f"s|{m}", bn), thresholds, hill_min_k)
            row = {"metric": m, "bin": bn, **st}
            if m in BOUNDED_METRICS:  # no tail index for a bounded metric
                row["hill_alpha"] = row["hill_k"] = None
            if delta is not None:
                row["threshold_mean"] = float(per_bin["_thr"][bn] / count[bn])
            rows.append(row)
    return _rows_to_long(rows, thresholds, relative, bin_width, n_rel_bins, delta is not None)


def _rows_to_long(rows, thresholds, relative, bin_width, n_rel_bins, with_thr) -> pl.DataFrame:
    _, start, end = _bin_exprs(relative, bin_width, n_rel_bins)
    schema = {"metric": pl.Utf8, "bin": pl.Int64, "bin_start": pl.Float64, "bin_end": pl.Float64,
              "count": pl.Int64, **{c: pl.Float64 for c in ("mean", "p50", "p90", "p99", "top10_mean", "hill_alpha")},
              "hill_k": pl.Int64, **{surv_name(x): pl.Float64 for x in thresholds}}
    if with_thr:
        schema["threshold_mean"] = pl.Float64
    if not rows:
        return pl.DataFrame(schema=schema)
    df = pl.DataFrame([{k: r.get(k) for k in schema if k not in ("bin_start", "bin_end")} for r in rows],
                      schema={k: v for k, v in schema.items() if k not in ("bin_start", "bin_end")})
    df = df.with_columns(bin_start=start.cast(pl.Float64), bin_end=end.cast(pl.Float64))
    return df.select(list(schema))

