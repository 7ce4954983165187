"""Divergence by token position and its tails (reproduces CPPO paper Fig. 2).

Statistic definitions (tested against numpy in ``tests/test_analyses_position.py``), per (metric, bin),
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
  smaller alpha). ``hill_k`` = k. Null when k < ``hill_min_k``, u <= 0 or xi == 0.
* ``threshold_mean`` (only when ``delta`` is given): mean over the bin's tokens of CPPO's per-token
  threshold on D, delta / w_t, w_t = 1 - (1 - w_min)(t - 1) / max(T - 1, 1) with t = pos + 1 and T the
  response's valid length (SPEC CPPO step 1, "sequence" mode): the paper's Fig. 2 overlay.

Binning: absolute position ``bin = pos // bin_width`` (``bin_start = bin * bin_width`` inclusive,
``bin_end`` exclusive, in 0-based positions), or relative position ``t / T`` in ``n_rel_bins`` equal bins
of (0, 1] when ``relative=True`` (``bin_start``/``bin_end`` are then fractions).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import polars as pl

from analyses.tokens import divergence_exprs, filter_tokens, load_tokens, require_columns
from cppo_diag.storage.schema import SEQUENCE_KEY

METRICS = ("tv", "abs_logratio", "k3")
METRIC_LABELS = {
    "tv": "|π − μ| (probability)",
    "abs_logratio": "|log π − log μ| (nats)",
    "k3": "k3 = ρ − 1 − log ρ (nats)",
    "k1": "log π − log μ (nats)",
    "mismatch_tv": "|π_old − μ| (probability)",
    "mismatch_abs_logratio": "|log π_old − log μ| (nats)",
}
DEFAULT_THRESHOLDS = (0.05, 0.1, 0.2, 0.5)
STAT_COLUMNS = ("count", "mean", "p50", "p90", "p99", "top10_mean", "hill_alpha", "hill_k")


def surv_name(x: float) -> str:
    return f"surv_{x:g}"


def threshold_schedule(positions, *, delta: float, w_min: float, length: int) -> np.ndarray:
    """delta / w_t for 0-based ``positions`` of a response of valid length ``length`` (SPEC CPPO step 1)."""
    t = np.asarray(positions, dtype=np.float64) + 1.0
    w = 1.0 - (1.0 - w_min) * (t - 1.0) / max(length - 1, 1)
    return delta / w


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


def _aggs(name: str, d: pl.Expr, thresholds: Sequence[float], hill_min_k: int) -> list[pl.Expr]:
    p90 = d.quantile(0.9, interpolation="linear")
    tail = d.filter(d > p90)
    hill_k = tail.len()
    xi = tail.log().mean() - p90.log()
    aggs = [
        d.len().alias(f"{name}|count"),
        d.mean().alias(f"{name}|mean"),
        d.quantile(0.5, interpolation="linear").alias(f"{name}|p50"),
        p90.alias(f"{name}|p90"),
        d.quantile(0.99, interpolation="linear").alias(f"{name}|p99"),
        d.filter(d >= p90).mean().alias(f"{name}|top10_mean"),
        pl.when((hill_k >= hill_min_k) & (p90 > 0) & (xi > 0)).then(1.0 / xi).otherwise(None).alias(f"{name}|hill_alpha"),
        hill_k.alias(f"{name}|hill_k"),
    ]
    aggs += [(d > x).mean().alias(f"{name}|{surv_name(x)}") for x in thresholds]
    return aggs


def position_stats_lazy(
    lf: pl.LazyFrame,
    *,
    metric_exprs: dict[str, pl.Expr],
    bin_width: int = 64,
    relative: bool = False,
    n_rel_bins: int = 20,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    delta: float | None = None,
    w_min: float = 0.8,
    hill_min_k: int = 5,
) -> pl.LazyFrame:
    """The same statistics as one lazy polars ``group_by`` (one row per bin, ``metric|stat`` columns).

    Simple, but its quantiles hold and sort every value of the run: use it on small frames or inside a
    larger lazy query; :func:`position_stats` computes the same numbers in two bounded-memory streaming
    passes (``tests/test_analyses_position.py`` checks that they agree).
    """
    if relative or delta is not None:
        lf = with_lengths(lf)
    b, _, _ = _bin_exprs(relative, bin_width, n_rel_bins)
    cols = [b.alias("bin"), *(e.cast(pl.Float64).alias(n) for n, e in metric_exprs.items())]
    if delta is not None:
        t = pl.col("pos").cast(pl.Float64) + 1.0
        w = 1.0 - (1.0 - w_min) * (t - 1.0) / (pl.col("_T") - 1.0).clip(lower_bound=1.0)
        cols.append((delta / w).alias("_thr"))
    lf = lf.select(cols)
    aggs = []
    for name in metric_exprs:
        aggs += _aggs(name, pl.col(name), thresholds, hill_min_k)
    if delta is not None:
        aggs.append(pl.col("_thr").mean().alias("_thr"))
    return lf.group_by("bin").agg(aggs).sort("bin")


def _to_long(
    wide: pl.DataFrame, metrics: Sequence[str], thresholds: Sequence[float], relative: bool, bin_width: int,
    n_rel_bins: int, with_thr: bool,
) -> pl.DataFrame:
    _, start, end = _bin_exprs(relative, bin_width, n_rel_bins)
    stats = [*STAT_COLUMNS, *(surv_name(x) for x in thresholds)]
    frames = []
    for m in metrics:
        sel = [pl.lit(m).alias("metric"), pl.col("bin"), start.cast(pl.Float64).alias("bin_start"),
               end.cast(pl.Float64).alias("bin_end")]
        sel += [pl.col(f"{m}|{s}").alias(s) for s in stats]
        if with_thr:
            sel.append(pl.col("_thr").alias("threshold_mean"))
        frames.append(wide.select(sel))
    out = pl.concat(frames, how="vertical_relaxed")
    casts = {"count": pl.Int64, "hill_k": pl.Int64}
    floats = [c for c in out.columns if c not in ("metric", "bin", *casts)]
    return out.with_columns(
        *(pl.col(c).cast(t) for c, t in casts.items()), *(pl.col(c).cast(pl.Float64) for c in floats)
    )


def position_stats(
    source: Any,
    *,
    metrics: Sequence[str] = METRICS,
    bin_width: int = 64,
    relative: bool = False,
    n_rel_bins: int = 20,
    step_range: tuple[int | None, int | None] | None = None,
    adv_sign: str | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    delta: float | None = None,
    w_min: float = 0.8,
    hill_min_k: int = 5,
    engine: str = "streaming",
    progress: bool = False,
) -> pl.DataFrame:
    """Per-position-bin statistics of per-token divergences (definitions in the module docstring).

    ``metrics`` from {"tv", "abs_logratio", "k3", "k1"} (SPEC "Per-token divergence"); ``step_range`` an
    inclusive (lo, hi) with None for open ends; ``adv_sign`` None/"all", "pos", "neg" or "zero".
    Returns a long table, one row per (metric, bin), sorted by metric then bin; empty (with the same
    columns) when no token passes the filters.
    """
    exprs = divergence_exprs()
    unknown = [m for m in metrics if m not in exprs]
    if unknown:
        raise ValueError(f"metrics: expected names from {sorted(exprs)}, found {unknown}")
    lf = load_tokens(source)
    require_columns(lf, ["step", "pos", "logp", "logp_rollout", "advantage"], "position_stats")
    parts = None
    if relative or delta is not None:  # response lengths: one step at a time
        parts = length_parts(source, step_range=step_range, adv_sign=adv_sign)
    lf = filter_tokens(lf, step_range=step_range, adv_sign=adv_sign)
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
# values are skipped. Pass 1 counts n, sum, sum of logs, min and max per (bin, bucket) with numpy bincounts
# over streamed chunks; every order statistic a quantile needs (and every bucket straddling a survival
# threshold) then lies in a known bucket, and pass 2 streams the run again keeping only the values of those
# buckets (only when a bucket holds more than one distinct value) to select exactly. The results are the
# exact order statistics of the float32 divergences, as a full sort would give.
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


def _chunk_hist(bs: np.ndarray, d: np.ndarray) -> pl.DataFrame:
    """(ck, n, s, sl, lo, hi) of one chunk; ``bs`` = bin * _KEY_SPAN + _KEY_OFFSET per value."""
    key = _np_keys(d)
    if len(key) and (key.max() > _KEY_INF or key.min() < -_KEY_INF):  # NaN present: skip those values
        ok = ~np.isnan(d)
        bs, d, key = bs[ok], d[ok], key[ok]
    if len(d) == 0:
        return pl.DataFrame(schema={"ck": pl.Int64, "n": pl.Int64, "s": pl.Float64, "sl": pl.Float64,
                                    "lo": pl.Float32, "hi": pl.Float32})
    idx = bs + key  # (N,) int64 ck
    lo_ck, hi_ck = int(idx.min()), int(idx.max())
    with np.errstate(divide="ignore", invalid="ignore"):
        logd = np.log(d)  # float32; summed in float64 by bincount
    if hi_ck - lo_ck + 1 <= _DENSE_SLOTS:
        idx -= lo_ck
        size = hi_ck - lo_ck + 1
        uniq = None
    else:
        uniq, idx = np.unique(idx, return_inverse=True)
        size = len(uniq)
    n = np.bincount(idx, minlength=size)
    s = np.bincount(idx, weights=d, minlength=size)
    with np.errstate(invalid="ignore"):
        sl = np.bincount(idx, weights=logd, minlength=size)
    lo = np.full(size, np.inf, dtype=np.float32)
    hi = np.full(size, -np.inf, dtype=np.float32)
    np.minimum.at(lo, idx, d)
    np.maximum.at(hi, idx, d)
    nz = np.nonzero(n)[0]
    cks = (nz + lo_ck) if uniq is None else uniq[nz]
    return pl.DataFrame({"ck": cks.astype(np.int64), "n": n[nz].astype(np.int64), "s": s[nz], "sl": sl[nz],
                         "lo": lo[nz], "hi": hi[nz]})


class _BinHist:
    """Histogram of one (metric, bin): sorted bucket keys with n, sum, sum of logs, min, max."""

    def __init__(self, keys, n, s, sl, lo, hi):
        self.keys, self.n, self.s, self.sl, self.lo, self.hi = keys, n, s, sl, lo, hi
        self.before = np.concatenate([[0], np.cumsum(n)[:-1]])  # values in lower buckets
        self.total = int(n.sum())

    def bucket_of_rank(self, r: int) -> int:
        return int(np.searchsorted(self.before, r, side="right") - 1)


def _quantile_ranks(n: int) -> set[int]:
    out = set()
    for q in QUANTILES.values():
        h = q * (n - 1)
        f = int(math.floor(h))
        out.update({f, min(f + 1, n - 1)})
    return out


def _lerp(a: float, b: float, t: float) -> float:
    # numpy's linear interpolation (np.quantile method="linear"), including its t >= 0.5 form
    return b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t


def _stats_from_hist(h: _BinHist, values: dict[int, np.ndarray], hill_min_k: int) -> dict:
    n = h.total

    def order_stat(r: int) -> float:
        j = h.bucket_of_rank(r)
        if h.lo[j] == h.hi[j]:
            return float(h.lo[j])
        return float(values[int(h.keys[j])][r - int(h.before[j])])

    out = {"count": n, "mean": float(h.s.sum()) / n}
    for name, q in QUANTILES.items():
        x = q * (n - 1)
        f = int(math.floor(x))
        out[name] = _lerp(order_stat(f), order_stat(min(f + 1, n - 1)), x - f)
    u = out["p90"]
    # bucket holding u: every bucket above holds only values > u, every bucket below only values < u
    j = int(np.searchsorted(h.hi, u, side="left"))  # first bucket whose max >= u
    j = min(j, len(h.keys) - 1)
    above = slice(j + 1, None)
    if h.lo[j] == h.hi[j]:
        vals = np.full(int(h.n[j]), h.lo[j], dtype=np.float64)
    else:
        vals = values[int(h.keys[j])].astype(np.float64)
    ge, gt = vals[vals >= u], vals[vals > u]
    n_ge = int(h.n[above].sum()) + len(ge)
    out["top10_mean"] = (float(h.s[above].sum()) + float(ge.sum())) / n_ge if n_ge else None
    k = int(h.n[above].sum()) + len(gt)
    out["hill_k"] = k
    out["hill_alpha"] = None
    if k >= hill_min_k and u > 0:
        xi = (float(h.sl[above].sum()) + float(np.log(gt).sum())) / k - math.log(u)
        out["hill_alpha"] = 1.0 / xi if xi > 0 else None
    return out


CHUNK_ROWS = 4_000_000  # rows per streamed chunk (bounds memory: ~ CHUNK_ROWS * (8 + 4 * n_metrics) bytes)


def with_lengths(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Add ``_T``, the valid length of each token's response (max(pos) + 1 over the sequence key). A window
    over the sequence key: apply it to one step at a time (sequences never span steps), see
    :func:`length_parts`."""
    return lf.with_columns(_T=(pl.col("pos").max().over(list(SEQUENCE_KEY)) + 1).cast(pl.Float64))


def length_parts(source: Any, *, step_range=None, adv_sign: str | None = None, require=(),
                 analysis: str = "position_stats", extra_filter: pl.Expr | None = None) -> list[pl.LazyFrame]:
    """LazyFrames of consecutive whole steps (about 2 M rows each) with ``_T`` computed before the token
    filters (bounded memory: each part is collected on its own)."""
    from analyses.tokens import step_group_lazyframes

    parts = []
    for part in step_group_lazyframes(source, step_range=step_range):
        part = filter_tokens(with_lengths(part), adv_sign=adv_sign)
        if extra_filter is not None:
            part = part.filter(extra_filter)
        parts.append(part)
    return parts


def _isin(ck: np.ndarray, wanted: list[int]) -> np.ndarray:
    """ck in wanted, by a lookup table over wanted's range with False sentinels at both ends."""
    lo, hi = wanted[0], wanted[-1]
    if hi - lo < 50_000_000:
        table = np.zeros(hi - lo + 3, dtype=bool)
        table[np.asarray(wanted) - lo + 1] = True
        return np.take(table, ck - (lo - 1), mode="clip")
    return np.isin(ck, wanted)


def _exceed_count(h: "_BinHist", values: dict[int, np.ndarray], x: float) -> int:
    """#values > x in one bin: whole buckets above x plus the straddling buckets' values."""
    n = int(h.n[h.lo > x].sum())
    for j in np.flatnonzero((h.lo <= x) & (h.hi > x)):
        n += int((values[int(h.keys[j])] > x).sum())
    return n


def aggregate_positions(
    lf: pl.LazyFrame, metric_exprs: dict[str, pl.Expr], *, bin_width: int = 64, relative: bool = False,
    n_rel_bins: int = 20, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, delta: float | None = None,
    w_min: float = 0.8, hill_min_k: int = 5, engine: str = "streaming", chunk_rows: int = CHUNK_ROWS,
    progress: bool = False, parts: list[pl.LazyFrame] | None = None,
) -> pl.DataFrame:
    """Exact per-bin statistics with bounded memory, reshaped to the long table of :func:`position_stats`
    (shared with mismatch).

    Pass 1 streams the run in chunks of ``chunk_rows`` rows (polars computes the bins and divergences) and
    builds, per metric, the (bin, bucket) histogram and the per-bin survival counts (numpy bincounts); pass 2
    streams it again keeping only the values of the buckets that hold a needed order statistic (see the
    comment above ``_np_keys``). Relative bins and the delta / w_t overlay need each response's length:
    then the data come from ``parts`` (one LazyFrame per step with ``_T``, see :func:`length_parts`), each
    collected on its own; without ``parts``, ``lf`` is processed as one part.
    """
    per_part = relative or delta is not None
    if per_part and parts is None:
        parts = [with_lengths(lf)]
    b, _, _ = _bin_exprs(relative, bin_width, n_rel_bins)
    cols = [b.alias("bin"), *(_flush_tiny(e).cast(pl.Float32).alias(n) for n, e in metric_exprs.items())]
    if delta is not None:
        t = pl.col("pos").cast(pl.Float64) + 1.0
        w = 1.0 - (1.0 - w_min) * (t - 1.0) / (pl.col("_T") - 1.0).clip(lower_bound=1.0)
        cols.append((delta / w).alias("_thr"))
    bs_expr = (pl.col("bin") * _KEY_SPAN + _KEY_OFFSET).alias("_bs")

    def chunks(keep: list[str] | None = None):
        """Frames with bin, _bs, the metrics (and _thr); ``keep`` selects columns."""
        if per_part:
            for part in parts:
                frame = part.select(cols).with_columns(bs_expr)
                frame = (frame.select(keep) if keep else frame).collect(engine=engine)
                if frame.height:
                    yield frame
        else:
            frame = lf.select(cols).with_columns(bs_expr)
            yield from (frame.select(keep) if keep else frame).collect_batches(
                chunk_size=chunk_rows, maintain_order=False, engine=engine)

    names = list(metric_exprs)
    # -- pass 1 ---------------------------------------------------------------------------------------
    hist_parts: dict[str, list[pl.DataFrame]] = {m: [] for m in names}
    per_bin: dict[str, np.ndarray] = {}

    def add(name: str, arr: np.ndarray):
        cur = per_bin.get(name)
        if cur is None or len(cur) < len(arr):
            cur = np.pad(cur if cur is not None else np.zeros(0), (0, len(arr) - (0 if cur is None else len(cur))))
        cur[: len(arr)] += arr
        per_bin[name] = cur

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="position stats (pass 1/2)", unit="tok", unit_scale=True)
    for chunk in chunks():
        if chunk.height == 0:
            continue
        if bar is not None:
            bar.update(chunk.height)
        bins = chunk["bin"].to_numpy()
        bs = chunk["_bs"].to_numpy()
        add("count", np.bincount(bins).astype(np.float64))
        if delta is not None:
            add("_thr", np.bincount(bins, weights=chunk["_thr"].to_numpy()))
        for m in names:
            hist_parts[m].append(_chunk_hist(bs, chunk[m].to_numpy()))
    if bar is not None:
        bar.close()
    if "count" not in per_bin:
        return _rows_to_long([], thresholds, relative, bin_width, n_rel_bins, delta is not None)
    hist_by: dict[str, dict[int, _BinHist]] = {}
    wanted: dict[str, list[int]] = {}
    for m in names:
        hdf = (pl.concat(hist_parts[m]).group_by("ck")
               .agg(pl.col("n", "s", "sl").sum(), pl.col("lo").min(), pl.col("hi").max()).sort("ck")
               .with_columns(bin=pl.col("ck") // _KEY_SPAN))
        hist_by[m], want = {}, set()
        for (bn,), part in hdf.group_by(["bin"], maintain_order=True):
            h = _BinHist(part["ck"].to_numpy(), part["n"].to_numpy(), part["s"].to_numpy(), part["sl"].to_numpy(),
                         part["lo"].to_numpy().astype(np.float64), part["hi"].to_numpy().astype(np.float64))
            hist_by[m][int(bn)] = h
            js = {h.bucket_of_rank(r) for r in _quantile_ranks(h.total)}
            for x in thresholds:  # P(D > x): only a bucket straddling x needs its values
                js.update(np.flatnonzero((h.lo <= x) & (h.hi > x)).tolist())
            for j in js:
                if h.lo[j] != h.hi[j]:
                    want.add(int(h.keys[j]))
        wanted[m] = sorted(want)
    # -- pass 2: values of the multi-valued buckets holding a needed order statistic --------------------
    values: dict[str, dict[int, np.ndarray]] = {m: {} for m in names}
    need = [m for m in names if wanted[m]]
    if need:
        found: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {m: [] for m in need}
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(desc="position stats (pass 2/2)", unit="tok", unit_scale=True,
                       total=int(per_bin["count"].sum()))
        for chunk in chunks(["_bs", *need]):
            if chunk.height == 0:
                continue
            if bar is not None:
                bar.update(chunk.height)
            bs = chunk["_bs"].to_numpy()
            for m in need:
                d = chunk[m].to_numpy()
                ck = bs + _np_keys(d)
                hit = _isin(ck, wanted[m])
                if hit.any():
                    found[m].append((ck[hit], d[hit]))
        if bar is not None:
            bar.close()
        for m in need:
            if not found[m]:
                continue
            ck = np.concatenate([f[0] for f in found[m]])
            d = np.concatenate([f[1] for f in found[m]])
            order = np.lexsort((d, ck))
            ck, d = ck[order], d[order]
            starts = np.flatnonzero(np.r_[True, ck[1:] != ck[:-1]])
            for i, st in enumerate(starts):
                end = starts[i + 1] if i + 1 < len(starts) else len(ck)
                values[m][int(ck[st])] = d[st:end]
    rows = []
    count = per_bin["count"]
    for m in names:
        for bn in np.flatnonzero(count):
            bn = int(bn)
            h = hist_by[m].get(bn)
            if h is None:  # every value of this metric in the bin was NaN
                continue
            st = _stats_from_hist(h, values[m], hill_min_k)
            row = {"metric": m, "bin": bn, **st}
            for x in thresholds:
                row[surv_name(x)] = _exceed_count(h, values[m], x) / h.total
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
