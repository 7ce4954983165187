"""Position statistics as mergeable partial aggregates: one pass per shard group, merged by addition.

A :class:`Partial` summarises the tokens of any subset of a run's shards. It is keyed by
(metric, position bin, advantage sign, update class) and covers a set of steps (the "step range" of the
shards it read). Per key it holds:

* ``tokens``: how many tokens fell in it (NaN divergences included, as ``position_stats``' ``count``);
* ``sum``: the sum of the metric's non-NaN values (float64), so the mean is exact;
* a log-bucket histogram of the non-NaN values, DDSketch style (Masson, Rim, Lee, "DDSketch: a fast and
  fully-mergeable quantile sketch with relative-error guarantees", VLDB 2019), with the bucket read off the
  float32 bit pattern of |D| (sign, exponent and the top ``m`` mantissa bits: the bitwise, linearly
  interpolated variant of the paper's log mapping). A bucket [lo, hi) has hi / lo <= 1 + 2^-m; returning
  2 lo hi / (lo + hi) for every value in it is off by at most alpha = 2^-m / (2 + 2^-m) relative
  (:func:`relative_accuracy_of`). ``m`` is the smallest with alpha <= the requested ``relative_accuracy``
  (default 0.01 -> m = 6, alpha = 0.78 %). |D| below ``X_MIN`` = 2^-40 counts as 0, |D| above 2^40 goes
  to the top bucket.

Sums and histogram counts add, so partials of any split of the shards (files, ranks, nodes) merge by
addition (:meth:`Partial.merge`) into exactly the counts of one pass, and the other columns up to
floating-point summation order (``tests/analyses/test_aggregate.py``).

From a merged histogram (:func:`stats_table`, the same columns as ``cppo_diag.analyses.position.position_stats``):

* ``count``, ``mean``: exact (count of tokens; sum / count of non-NaN values);
* ``p50``, ``p90``, ``p99``: numpy's linear interpolation between order statistics x_f and x_{f+1}
  (h = q (n - 1), f = floor(h)), each order statistic replaced by its bucket's value: within alpha relative;
* ``top10_mean``: mean of the order statistics from the first one >= p90 to the maximum, each replaced by
  its bucket's value: within alpha relative;
* ``surv_<x>`` = P(D > x): buckets wholly above x plus the straddling bucket's share by linear
  interpolation (error at most the mass of that one bucket);
* ``hill_alpha``: Hill estimate over the order statistics above p90, from bucket values (log error <= alpha
  per value); null for the bounded metrics, as in ``cppo_diag.analyses.position``;
* ``threshold_mean`` (with ``delta``): exact, from per-key sums of delta / w_t.

``exact=True`` in :func:`position_summary` runs ``cppo_diag.analyses.position.position_stats`` (exact order statistics,
two streaming passes) instead. Engines, the cache beside the run and incremental aggregation:
:func:`aggregate_run`, ``docs/analyses.md`` ("Scale: partial aggregates").
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import polars as pl

from cppo_diag.analyses.position import BOUNDED_METRICS, DEFAULT_THRESHOLDS, _bin_exprs, _rows_to_long
from cppo_diag.analyses.updates import check_updates
from cppo_diag.masks import logratio
from cppo_diag.masks.away import direction_array
from cppo_diag.masks.reasons import Reason
from cppo_diag.masks.schedule import threshold_schedule

X_MIN_EXP = -40  # |D| < 2^-40 counts as 0
X_MAX_EXP = 40  # |D| >= 2^40 goes to the top bucket
SIGNS = ("neg", "zero", "pos", "nan")  # advantage sign codes 0..3 (NaN / null advantage: code 3)
N_SIGNS, N_UCLS = len(SIGNS), 2  # update class 0: update == 0 (first of its batch), 1: update > 0
SKETCH_METRICS = ("tv", "abs_logratio", "k3", "k1")
NONNEG_METRICS = frozenset({"tv", "abs_logratio"})  # never negative (k3 >= 0 mathematically, but rounding)
ENGINES = ("local", "ray")
CACHE_DIR = "_cache/aggregates"  # inside the run directory (storage.layout.AGGREGATES_DIR)
# What the recorder's writer aggregates per completed step (RunRecorder(aggregates=True)): the default metrics
# at 32-token bins; any query for a subset of these metrics at a multiple of 32 is merged from it (derive).
# 32, not 64: the app's automatic width (analyses.binning, <= 40 bins) is 32 for responses of 641-1,280
# tokens and 64 or more above; shorter runs are small and scan fast.
WRITE_SPEC_ARGS = dict(metrics=("tv", "abs_logratio", "k3"), bin_width=32)
FORMAT_VERSION = 1
AUTO_BYTES_PER_WORKER = 256 << 20  # engine "local", workers=None: one process per this many bytes of shards


def mantissa_bits_for(relative_accuracy: float) -> int:
    """Smallest number of mantissa bits m (1..16) whose buckets meet ``relative_accuracy``."""
    if not (0 < relative_accuracy < 1):
        raise ValueError(f"relative_accuracy: expected a number in (0, 1), found {relative_accuracy!r}")
    for m in range(1, 17):
        if relative_accuracy_of(m) <= relative_accuracy:
            return m
    raise ValueError(f"relative_accuracy: expected >= {relative_accuracy_of(16):.2e}, found {relative_accuracy!r}")


def relative_accuracy_of(mantissa_bits: int) -> float:
    """alpha = 2^-m / (2 + 2^-m): the largest relative error of a bucket's value for any value in it."""
    e = 2.0 ** -mantissa_bits
    return e / (2.0 + e)


@dataclass(frozen=True)
class AggSpec:
    """What a partial is keyed by; partials merge only under equal specs (the cache key hashes it)."""

    metrics: tuple[str, ...] = ("tv", "abs_logratio", "k3")
    bin_width: int = 64
    relative: bool = False
    n_rel_bins: int = 20
    mantissa_bits: int = 6
    delta: float | None = None  # threshold overlay delta / w_t (needs each response's length)
    w_min: float | None = None  # w_min of the overlay; None: the cppo rule's default (unused without delta)

    def __post_init__(self):
        if self.delta is None:
            object.__setattr__(self, "w_min", None)  # irrelevant without an overlay: one cache key
        elif self.w_min is None:
            from cppo_diag.masks import rule_defaults

            object.__setattr__(self, "w_min", rule_defaults("cppo")["w_min"])
        unknown = [m for m in self.metrics if m not in SKETCH_METRICS]
        if unknown or not self.metrics:
            raise ValueError(f"metrics: expected names from {list(SKETCH_METRICS)}, found {list(self.metrics)}")
        if not self.relative and self.bin_width < 1:
            raise ValueError(f"bin_width: expected an integer >= 1, found {self.bin_width}")
        if self.relative and self.n_rel_bins < 1:
            raise ValueError(f"n_rel_bins: expected an integer >= 1, found {self.n_rel_bins}")

    @property
    def needs_lengths(self) -> bool:
        return self.relative or self.delta is not None

    @property
    def half(self) -> int:  # buckets per sign
        return (X_MAX_EXP - X_MIN_EXP) << self.mantissa_bits

    @property
    def n_slots(self) -> int:  # negative buckets, the zero bucket, positive buckets
        return 2 * self.half + 1

    def key(self) -> str:
        """A short hash naming this spec in cache file names."""
        blob = json.dumps({**asdict(self), "v": FORMAT_VERSION}, sort_keys=True)
        return hashlib.sha1(blob.encode()).hexdigest()[:12]


def slot_bounds(spec: AggSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lo, hi, value) of every histogram slot, ascending in value; the zero slot is (0, 0, 0)."""
    m, half = spec.mantissa_bits, spec.half
    base = (127 + X_MIN_EXP) << m  # bucket key of 2^X_MIN_EXP
    k = np.arange(half, dtype=np.int64) + base
    lo = (k << (23 - m)).astype(np.uint32).view(np.float32).astype(np.float64)
    hi = ((k + 1) << (23 - m)).astype(np.uint32).view(np.float32).astype(np.float64)
    val = 2.0 * lo * hi / (lo + hi)
    z = np.zeros(1)
    return (np.r_[-hi[::-1], z, lo], np.r_[-lo[::-1], z, hi], np.r_[-val[::-1], z, val])


def _slots(d: np.ndarray, spec: AggSpec, nonneg: bool = False) -> np.ndarray:
    """Histogram slot (int32, 0..n_slots-1) of each non-NaN value of ``d`` (``nonneg``: ``d`` is known to
    hold no negative value, which skips the sign passes)."""
    m, half = spec.mantissa_bits, spec.half
    if nonneg and d.dtype == np.float32:
        off = np.right_shift(d.view(np.int32), 23 - m)
    else:
        off = np.abs(d, dtype=np.float32).view(np.int32)
        np.right_shift(off, 23 - m, out=off)
    off -= ((127 + X_MIN_EXP) << m) - 1  # <= 0: below X_MIN (0 included); 1.. the buckets
    np.maximum(off, 0, out=off)
    np.minimum(off, half, out=off)
    if not nonneg:
        neg = d < 0
        if neg.any():
            np.negative(off, out=off, where=neg)
    off += half
    return off


def _metric_values(name: str, lp: np.ndarray, lr: np.ndarray) -> np.ndarray:
    """Per-token divergence (SPEC "Per-token divergence") from float32 log-probs, by the cancellation-free
    forms of ``cppo_diag.masks.logratio``: |pi - mu| (float32, ~1e-7 relative), k1 in float32, k3 in float64."""
    if name == "tv":
        return logratio.tv(lp, lr)
    if name == "k3":
        return logratio.kl_k3(logratio.log_ratio(lp.astype(np.float64), lr))  # rho - 1 - log rho
    k1 = logratio.log_ratio(lp, lr, diff=np.subtract(lp, lr, dtype=np.float32))
    return np.abs(k1) if name == "abs_logratio" else k1


def _grow_add(acc: np.ndarray | None, add: np.ndarray) -> np.ndarray:
    if acc is None:
        return add.copy()
    if len(acc) < len(add):
        acc = np.pad(acc, (0, len(add) - len(acc)))
    acc[: len(add)] += add
    return acc


def _sum_by_key(keys: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique ``keys`` with the summed ``counts`` of each (duplicates allowed)."""
    if not len(keys):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    top = int(keys.max()) + 1
    if top <= max(1 << 20, 8 * len(keys)) and top <= 1 << 24:  # dense: bincount is linear
        acc = np.bincount(keys, weights=counts, minlength=top)  # float64: exact below 2^53
        nz = np.flatnonzero(acc)
        return nz.astype(np.int64), acc[nz].astype(np.int64)
    uniq, inv = np.unique(keys, return_inverse=True)
    return uniq.astype(np.int64), np.bincount(inv, weights=counts, minlength=len(uniq)).astype(np.int64)


def _merge_sparse(pieces: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Sum sparse pieces (each sorted, unique keys with counts) into one."""
    pieces = [p for p in pieces if len(p[0])]
    if not pieces:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if len(pieces) == 1:
        return pieces[0]
    return _sum_by_key(np.concatenate([p[0] for p in pieces]), np.concatenate([p[1] for p in pieces]))


def _narrow(a: np.ndarray) -> np.ndarray:
    """Non-negative integers in the narrowest unsigned dtype that holds them."""
    top = int(a.max()) if len(a) else 0
    for t in (np.uint8, np.uint16, np.uint32):
        if top <= np.iinfo(t).max:
            return a.astype(t)
    return a.astype(np.uint64)


@dataclass
class Partial:
    """Mergeable aggregate of some tokens of a run (see the module docstring).

    Key index g = (bin * 4 + sign) * 2 + update_class. ``tokens``, ``sums[metric]`` and ``thr_sum`` are
    dense over g; ``sketch[metric]`` is sparse: sorted keys g * n_slots + slot with their counts.

    When the shards logged the trainer's mask (``keep_applied``, ``reason_applied``), ``mask`` holds dense
    counts over g: ``n`` (tokens with a logged mask), ``masked``, ``budget`` (reason "budget") and ``away``
    (A (rho - 1) > 0, SPEC away test, by the rule library on the float32 columns); ``mask_steps`` the same
    ``n``, ``masked``, ``budget`` over step * 2 + update class. Empty when no mask was logged.
    """

    spec: AggSpec
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    sums: dict = field(default_factory=dict)
    sketch: dict = field(default_factory=dict)
    thr_sum: np.ndarray = field(default_factory=lambda: np.zeros(0))
    steps: frozenset = frozenset()
    mask: dict = field(default_factory=dict)
    mask_steps: dict = field(default_factory=dict)
    # responses by valid length T and class (sign * 2 + update class): key T * 8 + class. Kept by the
    # recorder's writer, which sees whole responses; ``lengths_ok`` only when every step of the partial had
    # whole responses of one advantage sign each: then the delta / w_t overlay derives exactly (derive)
    lengths: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    lengths_ok: bool = False

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.sum())

    def merge(self, *others: "Partial") -> "Partial":
        """The partial of the union of the (disjoint) token sets: every array added."""
        parts = [self, *others]
        for o in others:
            if o.spec != self.spec:
                raise ValueError(f"Partial.merge: expected partials of the same spec, found {self.spec} and {o.spec}")
        out = Partial(self.spec)
        for p in parts:
            out.tokens = _grow_add(out.tokens, p.tokens)
            out.thr_sum = _grow_add(out.thr_sum, p.thr_sum)
        for m in self.spec.metrics:
            acc = None
            for p in parts:
                if m in p.sums:
                    acc = _grow_add(acc, p.sums[m])
            out.sums[m] = acc if acc is not None else np.zeros(0)
            out.sketch[m] = _merge_sparse([p.sketch[m] for p in parts if m in p.sketch])
        out.steps = frozenset().union(*(p.steps for p in parts))
        out.lengths_ok = all(p.lengths_ok for p in parts)
        if out.lengths_ok:
            for p in parts:
                out.lengths = _grow_add(out.lengths, p.lengths)
        for attr in ("mask", "mask_steps"):
            for p in parts:
                for name, arr in getattr(p, attr).items():
                    getattr(out, attr)[name] = _grow_add(getattr(out, attr).get(name), arr)
        return out

    # -- (de)serialisation: one .npz per partial ---------------------------------------------------
    def save(self, path: Path) -> None:
        from cppo_diag.storage.layout import atomic_replace

        arrays = {"tokens": self.tokens, "thr_sum": self.thr_sum, "steps": np.array(sorted(self.steps), np.int64)}
        for m in self.spec.metrics:
            arrays[f"sum|{m}"] = self.sums.get(m, np.zeros(0))
            keys, counts = self.sketch.get(m, (np.zeros(0, np.int64),) * 2)
            # sorted keys as gaps and counts in the narrowest unsigned type (~3-4 bytes per entry, not 16)
            arrays[f"gaps|{m}"] = _narrow(np.diff(keys, prepend=np.int64(0)))
            arrays[f"counts|{m}"] = _narrow(counts)
        arrays.update({f"mask|{k}": v for k, v in self.mask.items()})
        arrays.update({f"mask_steps|{k}": v for k, v in self.mask_steps.items()})
        if self.lengths_ok:
            arrays["lengths"] = _narrow(self.lengths)
        arrays["spec"] = np.frombuffer(json.dumps(asdict(self.spec)).encode(), dtype=np.uint8)
        with atomic_replace(Path(path)) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)

    @classmethod
    def load(cls, path: Path) -> "Partial":
        with np.load(path) as z:
            raw = json.loads(bytes(z["spec"]).decode())
            spec = AggSpec(**{**raw, "metrics": tuple(raw["metrics"])})
            p = cls(spec, tokens=z["tokens"], thr_sum=z["thr_sum"], steps=frozenset(z["steps"].tolist()))
            for m in spec.metrics:
                p.sums[m] = z[f"sum|{m}"]
                keys = (np.cumsum(z[f"gaps|{m}"], dtype=np.int64) if f"gaps|{m}" in z.files
                        else z[f"keys|{m}"].astype(np.int64))
                p.sketch[m] = (keys, z[f"counts|{m}"].astype(np.int64))
            if "lengths" in z.files:
                p.lengths, p.lengths_ok = z["lengths"].astype(np.int64), True
            for name in z.files:
                attr, _, k = name.partition("|")
                if attr in ("mask", "mask_steps"):
                    getattr(p, attr)[k] = z[name]
        return p


# -- one pass over some tokens -> a Partial -----------------------------------------------------------
COLUMNS = ("step", "pos", "logp", "logp_rollout", "advantage", "update")
LENGTH_COLUMNS = ("seq_id", "rank")
MASK_COLUMNS = ("keep_applied", "reason_applied")


class _Accumulator:
    """Adds chunks of token columns (numpy) into dense per-worker arrays; :meth:`partial` compacts.

    The inner loop works on slices of ``SLICE`` tokens, so that its dozen elementwise passes run on arrays
    that stay in the core's L2 cache (a pass over a 2 M-token chunk streams through memory: measured 4-5x
    slower per token for the same operations), and adds into persistent histograms with ``np.add.at``
    (no per-slice allocation of a histogram of every slot)."""

    DENSE_LIMIT = 1 << 24  # largest dense histogram (slots) per metric before switching to sparse pieces
    SLICE = 1 << 16  # tokens per inner-loop slice (~256 KB per float32 column)

    def __init__(self, spec: AggSpec):
        self.spec = spec
        self.tokens: np.ndarray | None = None  # tokens whose first metric is NaN, per key (the rest: histogram)
        self.thr: np.ndarray | None = None
        self.sums: dict = {m: None for m in spec.metrics}
        self.dense: dict = {m: np.zeros(0, np.int64) for m in spec.metrics}
        self.pieces: dict = {m: [] for m in spec.metrics}
        self.steps: set[int] = set()
        self.mask: dict = {}
        self.mask_steps: dict = {}

    def add(self, cols: dict[str, np.ndarray]) -> None:
        """Add one chunk: ``pos`` (int), ``logp``, ``logp_rollout``, ``advantage`` (float32, NaN for null),
        ``update`` (and ``_T`` when the spec needs response lengths; ``keep_applied`` and ``step`` when the
        shards logged a mask), in slices of ``SLICE`` tokens."""
        n = len(cols["pos"])
        for i in range(0, n, self.SLICE):
            sl = slice(i, min(n, i + self.SLICE))
            part = {k: (tuple(a[sl] for a in v) if isinstance(v, tuple) else v[sl] if isinstance(v, np.ndarray) else v)
                    for k, v in cols.items()}
            self._add_slice(part)

    def _add_slice(self, cols: dict[str, np.ndarray]) -> None:
        spec = self.spec
        pos = cols["pos"]
        if len(pos) == 0:
            return
        if spec.relative:
            length = cols["_T"]
            b = np.clip(np.ceil((pos + 1.0) / length * spec.n_rel_bins), 1, spec.n_rel_bins).astype(np.int32) - 1
        else:
            if not cols.get("_pos_ok") and pos.min() < 0:  # _pos_ok: the shard's statistics say min(pos) >= 0
                raise ValueError(f"column 'pos': expected positions >= 0, found {int(pos.min())}")
            w = spec.bin_width
            if w & (w - 1) == 0 and pos.dtype == np.int32:
                b = np.right_shift(pos, w.bit_length() - 1)
            else:
                b = np.floor_divide(pos, w, dtype=np.int32, casting="unsafe")
        # g = (bin * 4 + sign) * 2 + update class, sign code 0 neg, 1 zero, 2 pos, 3 NaN
        adv = cols["advantage"]
        g = np.left_shift(b, 3, out=b)
        gt, lt = adv > 0, adv < 0
        g += 2
        g += gt
        g += gt
        g -= lt
        g -= lt
        upd = cols["update"]
        if isinstance(upd, np.ndarray):
            g += upd > 0
        elif upd > 0:  # one update for the whole row group (from the shard's statistics)
            g += 1
        nan_adv = np.isnan(adv)
        if nan_adv.any():
            g[nan_adv] += 4
        n_g = int(g.max()) + 1
        if spec.delta is not None:
            thr = threshold_schedule(pos, delta=spec.delta, w_min=spec.w_min, length=cols["_T"])  # delta / w_t (Eq. 9)
            self.thr = _grow_add(self.thr, np.bincount(g, weights=thr))
        lp, lr = cols["logp"], cols["logp_rollout"]
        if "keep_applied" in cols:
            self._add_mask(cols, g)
        wide = n_g * spec.n_slots >= 1 << 31
        for i, m in enumerate(spec.metrics):
            d = _metric_values(m, lp, lr)
            gm = g
            nan = np.isnan(d)
            if nan.any():
                if i == 0:  # tokens per key = the first metric's histogram counts + its NaN values
                    self.tokens = _grow_add(self.tokens, np.bincount(g[nan]))
                d, gm = d[~nan], g[~nan]
            if not len(d):
                continue
            self.sums[m] = _grow_add(self.sums[m], np.bincount(gm, weights=d))
            key = _slots(d, spec, nonneg=m in NONNEG_METRICS)
            key += (gm.astype(np.int64) if wide else gm) * spec.n_slots
            top = n_g * spec.n_slots
            if top <= self.DENSE_LIMIT:
                if len(self.dense[m]) < top:
                    grown = np.zeros(max(top, min(self.DENSE_LIMIT, 2 * len(self.dense[m]))), np.int64)
                    grown[: len(self.dense[m])] = self.dense[m]
                    self.dense[m] = grown
                np.add.at(self.dense[m], key, 1)
            else:
                uniq, inv = np.unique(key, return_inverse=True)
                self.pieces[m].append((uniq.astype(np.int64), np.bincount(inv).astype(np.int64)))

    def _add_mask(self, cols: dict, g: np.ndarray) -> None:
        # (N,) bool each: mask logged, masked, reason "budget", reason logged, away
        has, masked, budget, reason, away = cols["keep_applied"]
        if not has.any():
            return
        step, upd = cols["step"], cols["update"]
        if not has.all():
            g, masked, budget, reason, away = g[has], masked[has], budget[has], reason[has], away[has]
            step, upd = step[has], upd[has]
        for name, w in (("n", None), ("masked", masked), ("budget", budget), ("reason", reason), ("away", away)):
            self.mask[name] = _grow_add(self.mask.get(name), np.bincount(g, weights=w).astype(np.int64))
        if step.min() < 0:
            raise ValueError(f"column 'step': expected steps >= 0, found {int(step.min())}")
        sk = step.astype(np.int64) * N_UCLS + (upd > 0)
        for name, w in (("n", None), ("masked", masked), ("budget", budget), ("reason", reason)):
            self.mask_steps[name] = _grow_add(self.mask_steps.get(name), np.bincount(sk, weights=w).astype(np.int64))

    def partial(self) -> Partial:
        spec = self.spec
        p = Partial(spec, steps=frozenset(self.steps), mask=self.mask, mask_steps=self.mask_steps)
        p.thr_sum = self.thr if self.thr is not None else np.zeros(0)
        for m in spec.metrics:
            p.sums[m] = self.sums[m] if self.sums[m] is not None else np.zeros(0)
            pieces = list(self.pieces[m])
            if self.dense[m] is not None:
                nz = np.flatnonzero(self.dense[m])
                pieces.append((nz.astype(np.int64), self.dense[m][nz].astype(np.int64)))
            p.sketch[m] = _merge_sparse(pieces)
        keys, counts = p.sketch[spec.metrics[0]]
        hist = np.bincount(keys // spec.n_slots, weights=counts).astype(np.int64) if len(keys) else np.zeros(0, np.int64)
        p.tokens = _grow_add(hist, self.tokens) if self.tokens is not None else hist
        return p


def _frame_columns(df: pl.DataFrame, spec: AggSpec) -> dict[str, np.ndarray]:
    cols = {
        "pos": df["pos"].to_numpy(),
        "logp": df["logp"].cast(pl.Float32).to_numpy(), "logp_rollout": df["logp_rollout"].cast(pl.Float32).to_numpy(),
        "advantage": df["advantage"].cast(pl.Float32).fill_null(float("nan")).to_numpy(),
        "update": df["update"].to_numpy(),
    }
    if spec.needs_lengths:
        cols["_T"] = df["_T"].to_numpy()
    if "keep_applied" in df.columns:
        keep = df["keep_applied"]
        reason = df["reason_applied"] if "reason_applied" in df.columns else pl.Series([None] * df.height, dtype=pl.UInt8)
        # SPEC away test A (rho - 1) > 0, by the rule library on the float32 columns (as the rules evaluate it)
        away = direction_array(cols["advantage"], cols["logp"], cols["logp_rollout"]) > 0
        cols["keep_applied"] = (keep.is_not_null().to_numpy(), (~keep).fill_null(False).to_numpy(),
                                (reason == Reason.BUDGET).fill_null(False).to_numpy(), reason.is_not_null().to_numpy(),
                                away)
        cols["step"] = df["step"].to_numpy()
    return cols


def _with_lengths(df: pl.DataFrame) -> pl.DataFrame:
    """``_T`` = max(pos) + 1 over each response (step, update, rank, seq_id): all its tokens are in ``df``."""
    key = [c for c in ("step", "update", "rank", "seq_id") if c in df.columns]
    return df.with_columns(_T=(pl.col("pos").max().over(key) + 1).cast(pl.Float64))


def _read_file(path: str, spec: AggSpec) -> pl.DataFrame:
    names = pl.read_parquet_schema(path)
    want = list(COLUMNS) + list(MASK_COLUMNS) + (list(LENGTH_COLUMNS) if spec.needs_lengths else [])
    if "keep_applied" not in names and not spec.needs_lengths:
        want.remove("step")  # steps come from the file names; per-step counts only for a logged mask
    missing = [c for c in ("step", "pos", "logp", "logp_rollout", "advantage") if c not in names]
    if missing:
        raise ValueError(f"{path}: token shard is missing required column(s) {missing}; found {sorted(names)}")
    from cppo_diag.storage.validate import valid_token_rows

    df = pl.read_parquet(path, columns=[c for c in want if c in names])
    valid = valid_token_rows(df.columns)  # impossible values are never averaged in (storage.validate)
    if valid is not None and not df.select(valid.all()).item():
        df = df.filter(valid)
    fill = [pl.lit(0, pl.Int32).alias(c) for c in ("update", "rank") if c in want and c not in names]
    return df.with_columns(fill) if fill else df


def aggregate_files(files: Sequence[str], spec: AggSpec) -> Partial:
    """The partial of the token shards ``files`` (whole steps when ``spec`` needs response lengths: every
    shard of a step must be in the same call). The unit of work of every engine."""
    acc = _Accumulator(spec)
    acc.steps.update(_step_of(f) for f in files)
    if spec.needs_lengths:  # lengths per response: read one step at a time
        by_step: dict[int, list[str]] = {}
        for f in files:
            by_step.setdefault(_step_of(f), []).append(f)
        for s in sorted(by_step):
            df = pl.concat([_read_file(f, spec) for f in by_step[s]], how="diagonal_relaxed")
            acc.add(_frame_columns(_with_lengths(df), spec))
        return acc.partial()
    for f in files:
        for cols in _read_row_groups(f, spec):
            acc.add(cols)
    return acc.partial()


def _numpy_column(table, name: str, dtype, path: str, fill=None) -> np.ndarray:
    """One column of an Arrow table as numpy ``dtype``, nulls as ``fill`` (None: nulls are an error)."""
    vals, valid = _to_numpy(table.column(name))
    if valid is not None:
        if fill is None:
            raise ValueError(f"{path}: column {name!r} has {int((~valid).sum())} null value(s); expected none")
        vals = np.where(valid, vals, fill)
    return vals if vals.dtype == dtype else vals.astype(dtype)


_NUMPY_TYPES = {"float": np.float32, "double": np.float64, "int8": np.int8, "int16": np.int16, "int32": np.int32,
                "int64": np.int64, "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64}


def _to_numpy(col) -> tuple[np.ndarray, np.ndarray | None]:
    """(values, validity or None when there is no null) of an Arrow (chunked) array, read from its buffers:
    pyarrow's own ``to_numpy`` imports pandas (~0.25 s once per process), which the recorder's writer must
    not pay. Other types than booleans and fixed-width numbers go through ``to_numpy``."""
    chunks = getattr(col, "chunks", [col])
    vals, valid = [], []
    for a in chunks:
        n, off, bufs = len(a), a.offset, a.buffers()
        name = str(a.type)
        if n == 0:
            v = np.zeros(0, _NUMPY_TYPES.get(name, bool if name == "bool" else np.float64))
        elif name == "bool":
            v = np.unpackbits(np.frombuffer(bufs[1], np.uint8), bitorder="little")[off: off + n].astype(bool)
        elif name in _NUMPY_TYPES:
            v = np.frombuffer(bufs[1], _NUMPY_TYPES[name])[off: off + n]
        else:
            v = a.to_numpy(zero_copy_only=False)
        vals.append(v)
        if a.null_count and bufs[0] is not None:
            valid.append(np.unpackbits(np.frombuffer(bufs[0], np.uint8), bitorder="little")[off: off + n].astype(bool))
        else:
            valid.append(None)
    out = vals[0] if len(vals) == 1 else (np.concatenate(vals) if vals else np.zeros(0))
    if all(v is None for v in valid):
        return out, None
    return out, np.concatenate([np.ones(len(x), bool) if v is None else v for x, v in zip(vals, valid)])


def _read_row_groups(path: str, spec: AggSpec):
    """The columns :meth:`_Accumulator.add` needs from each row group of one token shard, decoded by
    pyarrow straight to numpy (single-threaded: the engines parallelise over files)."""
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = set(pf.schema_arrow.names)
    missing = [c for c in ("step", "pos", "logp", "logp_rollout", "advantage") if c not in names]
    if missing:
        raise ValueError(f"{path}: token shard is missing required column(s) {missing}; found {sorted(names)}")
    want = ["pos", "logp", "logp_rollout", "advantage"] + [c for c in ("update", *MASK_COLUMNS) if c in names]
    if "keep_applied" in names:
        want.append("step")
    for rg in range(pf.num_row_groups):
        # columns the row group's statistics pin down are not decoded: one update for the whole group
        # (a run with one optimiser update per batch), positions known to be >= 0
        stats = _column_stats(pf.metadata.row_group(rg))
        upd = stats.get("update")
        const_update = "keep_applied" not in names and upd is not None and upd[0] == upd[1]
        cols = table_columns(pf.read_row_group(rg, columns=[c for c in want if not (const_update and c == "update")],
                                               use_threads=False), spec, path)
        if const_update:
            cols["update"] = int(upd[0])
        pos = stats.get("pos")
        cols["_pos_ok"] = pos is not None and pos[0] >= 0
        yield cols


def _column_stats(rg) -> dict[str, tuple]:
    """(min, max) of each column of a Parquet row group whose statistics hold them."""
    out = {}
    for i in range(rg.num_columns):
        c = rg.column(i)
        st = c.statistics
        if (st is not None and st.has_min_max and st.has_null_count and st.null_count == 0
                and c.path_in_schema in ("update", "pos")):
            out[c.path_in_schema] = (st.min, st.max)
    return out


def table_columns(t, spec: AggSpec, path: str = "token table") -> dict[str, np.ndarray]:
    """The columns :meth:`_Accumulator.add` needs, from an Arrow table of token rows (a shard's row group,
    or the table the recorder's writer is about to write)."""
    names = set(t.column_names)
    cols = {"pos": _numpy_column(t, "pos", np.int32, path),
            "logp": _numpy_column(t, "logp", np.float32, path, float("nan")),
            "logp_rollout": _numpy_column(t, "logp_rollout", np.float32, path, float("nan")),
            "advantage": _numpy_column(t, "advantage", np.float32, path, float("nan")),
            "update": (_numpy_column(t, "update", np.int32, path, 0) if "update" in names
                       else np.zeros(t.num_rows, np.int32))}
    ok = _valid_rows(t)
    if ok is not None:  # impossible values are never averaged in (storage.validate, where present)
        cols = {k: v[ok] for k, v in cols.items()}
        t = t.filter(pa_mask(ok))
    if "keep_applied" in names:  # the logged mask (as _frame_columns, from Arrow: nulls = not logged)
        keep, has = _to_numpy(t.column("keep_applied"))
        has = np.ones(len(keep), bool) if has is None else has
        if "reason_applied" in names:
            reason, has_reason = _to_numpy(t.column("reason_applied"))
            has_reason = np.ones(len(reason), bool) if has_reason is None else has_reason
            budget = (reason == int(Reason.BUDGET)) & has_reason
        else:
            budget = has_reason = np.zeros(t.num_rows, bool)
        # SPEC away test A (rho - 1) > 0, by the rule library on the float32 columns (as the rules evaluate it)
        away = direction_array(cols["advantage"], cols["logp"], cols["logp_rollout"]) > 0
        cols["keep_applied"] = (has, ~keep & has, budget, has_reason, away)
        cols["step"] = _numpy_column(t, "step", np.int64, path)
    return cols


def _valid_rows(t) -> np.ndarray | None:
    """The rows of an Arrow token table that ``cppo_diag.storage.validate`` accepts (finite log-probs at most
    ``LOGP_MAX``, a finite advantage; a null is not a bad value), as a bool mask; None when every row passes
    or the storage package has no such rule."""
    try:
        from cppo_diag.storage.validate import FINITE_COLUMNS, LOGP_MAX, LOGPROB_COLUMNS
    except ImportError:
        return None
    bad = None
    for name in [c for c in (*LOGPROB_COLUMNS, *FINITE_COLUMNS) if c in t.column_names]:
        vals, valid = _to_numpy(t.column(name))
        if vals.dtype.kind != "f":
            continue
        b = ~np.isfinite(vals)
        if name in LOGPROB_COLUMNS:
            b |= vals > LOGP_MAX
        if valid is not None:
            b &= valid
        if b.any():
            bad = b if bad is None else bad | b
    return None if bad is None else ~bad


def pa_mask(ok: np.ndarray):
    """A numpy bool mask as an Arrow boolean array, built from its packed bits (``pa.array(ndarray)`` imports
    pandas)."""
    import pyarrow as pa

    return pa.Array.from_buffers(pa.bool_(), len(ok), [None, pa.py_buffer(np.packbits(ok, bitorder="little"))])


def aggregate_frame(lf: pl.LazyFrame | pl.DataFrame, spec: AggSpec, chunk_rows: int = 2_000_000) -> Partial:
    """The partial of a token frame (for sources that are not run directories), in this process."""
    from cppo_diag.analyses.tokens import load_tokens

    lf = load_tokens(lf)
    acc = _Accumulator(spec)
    names = lf.collect_schema().names()
    sel = [c for c in (*COLUMNS, *MASK_COLUMNS) if c in names] + ([c for c in LENGTH_COLUMNS if c in names] if spec.needs_lengths else [])
    lf = lf.select(sel)
    acc.steps.update(lf.select(pl.col("step").unique()).collect()["step"].to_list())
    if spec.needs_lengths:
        df = lf.collect()
        if df.height:
            acc.add(_frame_columns(_with_lengths(df), spec))
        return acc.partial()
    for chunk in lf.collect_batches(chunk_size=chunk_rows, engine="streaming"):
        acc.add(_frame_columns(chunk, spec))
    return acc.partial()


def _step_of(path: str) -> int:
    from cppo_diag.storage import layout

    step = layout.parse_step_dir(Path(path).parent.name)
    if step is None:
        raise ValueError(f"{path}: expected a token shard under tokens/step=NNNNNN/, found parent "
                         f"{Path(path).parent.name!r}")
    return step


# -- engines: shard groups -> partials -> one merged partial --------------------------------------------
def _aggregate_group(args: tuple[list[str], dict]) -> Partial:
    files, spec = args
    return aggregate_files(files, AggSpec(**{**spec, "metrics": tuple(spec["metrics"])}))


def run_groups(groups: Sequence[Sequence[str]], spec: AggSpec, *, engine: str = "local", workers: int | None = None,
               ray_address: str | None = None, progress: bool = False) -> list[Partial]:
    """One partial per shard group, computed by ``engine``:

    * ``"local"``: ``workers`` processes on this machine (1 runs in this process; :func:`aggregate_run`'s
      default: one per ``AUTO_BYTES_PER_WORKER`` of shards, at most the CPU count);
    * ``"ray"``: one Ray task per group on the cluster at ``ray_address`` (default: a local cluster with
      ``workers`` CPUs, started here and shut down afterwards). The workers read the shard files by path,
      so every node must see the run directory (a shared file system) and have cppo-diag installed.
    """
    tasks = [([str(f) for f in g], asdict(spec)) for g in groups if len(g)]
    return map_tasks(_aggregate_group, tasks, engine=engine, workers=workers, ray_address=ray_address,
                     progress="aggregate" if progress else None)


def map_tasks(fn, tasks: Sequence, *, engine: str = "local", workers: int | None = None,
              ray_address: str | None = None, progress: str | None = None) -> list:
    """``[fn(t) for t in tasks]`` by ``engine`` (see :func:`run_groups`), in task order. ``fn`` must be a
    module-level function (it is pickled by reference); ``progress``: a tqdm label, or None."""
    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {list(ENGINES)}, found {engine!r}")
    workers = max(1, int(workers or os.cpu_count() or 1))
    if not tasks:
        return []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(tasks), desc=f"{progress} ({engine})", unit="group")
    try:
        if engine == "ray":
            return _run_ray(fn, tasks, workers, ray_address, bar)
        if workers == 1 or len(tasks) == 1:
            out = []
            for t in tasks:
                out.append(fn(t))
                if bar is not None:
                    bar.update(1)
            return out
        return _run_local(fn, tasks, workers, bar)
    finally:
        if bar is not None:
            bar.close()


def _run_local(fn, tasks: list, workers: int, bar) -> list:
    """``workers - 1`` worker processes plus this process, taking tasks from one queue: this process starts
    on the first task at once while the workers start (a fresh interpreter importing numpy and polars costs
    a few tenths of a second, a tenth of a 100 M-token scan), and whoever is free takes the next task."""
    import multiprocessing as mp
    import threading
    from concurrent.futures import ProcessPoolExecutor

    out: list = [None] * len(tasks)
    lock = threading.Lock()
    todo = list(range(len(tasks)))[::-1]  # popped from the end: task order
    errors: list = []

    def take() -> int | None:
        with lock:
            return todo.pop() if todo and not errors else None

    def done(i: int, res) -> None:
        out[i] = res
        if bar is not None:
            bar.update(1)

    def feed(ex) -> None:  # one feeder thread per worker process: it only waits on the process
        try:
            while (i := take()) is not None:
                done(i, ex.submit(fn, tasks[i]).result())
        except BaseException as exc:  # noqa: BLE001  (re-raised in the caller's thread)
            errors.append(exc)

    # one polars thread per worker process: the processes are the parallelism
    old = os.environ.get("POLARS_MAX_THREADS")
    os.environ["POLARS_MAX_THREADS"] = "1"
    try:
        # forkserver: a fresh single-threaded server (it imports this module once, before polars starts any
        # thread) forks the workers: they start fast, and safely (a plain fork of a process whose polars
        # threads may hold locks can deadlock). The caller's __main__ still needs its guard.
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload([__name__, fn.__module__])
        n_proc = min(workers, len(tasks)) - 1
        with ProcessPoolExecutor(max_workers=n_proc, mp_context=ctx) as ex:
            feeders = [threading.Thread(target=feed, args=(ex,), daemon=True) for _ in range(n_proc)]
            for t in feeders:
                t.start()
            try:
                while (i := take()) is not None:
                    done(i, fn(tasks[i]))
            except BaseException as exc:
                errors.append(exc)
            for t in feeders:
                t.join()
        if errors:
            raise errors[0]
        return out
    finally:
        if old is None:
            os.environ.pop("POLARS_MAX_THREADS", None)
        else:
            os.environ["POLARS_MAX_THREADS"] = old


def _run_ray(fn, tasks: list, workers: int, ray_address: str | None, bar) -> list:
    try:
        import ray
    except ImportError as exc:
        raise ImportError("engine 'ray' needs the ray package: pip install 'cppo-diag[ray]'") from exc
    started = False
    if not ray.is_initialized():
        env = {"POLARS_MAX_THREADS": "1"}
        if ray_address is None:  # a local cluster: its workers import this checkout
            root = str(Path(__file__).resolve().parents[1])
            env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])])
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     runtime_env={"env_vars": env})
        else:
            ray.init(address=ray_address, log_to_driver=False, runtime_env={"env_vars": env})
        started = True
    try:
        task = ray.remote(num_cpus=1)(fn)
        refs = [task.remote(t) for t in tasks]
        out = ray.get(refs)
        if bar is not None:
            bar.update(len(refs))
        return out
    finally:
        if started:
            ray.shutdown()


# -- shard groups, fingerprints and the cache beside the run --------------------------------------------
def _run_files(run) -> dict[int, list[Path]]:
    """step -> token shard files of completed steps (the reader's ``token_files``: done markers)."""
    out: dict[int, list[Path]] = {}
    for f in run.token_files():
        out.setdefault(_step_of(str(f)), []).append(Path(f))
    return out


def _fingerprint(files: Iterable[Path], done: Iterable[str], stat_cache: dict | None = None) -> str:
    """Hash of the shard files (name, size, mtime) and the done markers of a block of steps (``stat_cache``:
    path -> (size, mtime), filled as files are seen, for many overlapping blocks)."""
    h = hashlib.sha1()
    for f in sorted(files):
        st = stat_cache.get(f) if stat_cache is not None else None
        if st is None:
            r = f.stat()
            st = (r.st_size, r.st_mtime_ns)
            if stat_cache is not None:
                stat_cache[f] = st
        h.update(f"{f.parent.name}/{f.name}:{st[0]}:{st[1]};".encode())
    for d in sorted(done):
        h.update(d.encode())
    return h.hexdigest()[:16]


def _done_names(run) -> set[str]:
    done_dir = Path(run.path) / "_done"
    return {f.name for f in done_dir.iterdir()} if done_dir.is_dir() else set()


def _done_of(run, steps: Iterable[int], names: set[str] | None = None) -> list[str]:
    from cppo_diag.storage import layout

    names = _done_names(run) if names is None else names
    want = {layout.step_dir_name(s) for s in steps}
    return [n for n in names if n.split(".")[0] in want]


def _group_steps(files: dict[int, list[Path]], steps: list[int], n_groups: int) -> list[list[int]]:
    """Consecutive steps in about ``n_groups`` groups of similar size (bytes on disk)."""
    if not steps:
        return []
    sizes = [sum(f.stat().st_size for f in files[s]) for s in steps]
    target = max(sum(sizes) / max(n_groups, 1), 1)
    groups, cur, acc = [], [], 0.0
    for s, b in zip(steps, sizes):
        cur.append(s)
        acc += b
        if acc >= target:
            groups.append(cur)
            cur, acc = [], 0.0
    if cur:
        groups.append(cur)
    return groups


@dataclass
class AggregateInfo:
    """What :func:`aggregate_run` did: steps read now, steps taken from the cache, blocks written."""

    steps_aggregated: list[int] = field(default_factory=list)
    steps_cached: list[int] = field(default_factory=list)
    blocks_written: int = 0
    from_recorder: bool = False  # merged from the recorder's write-time aggregates (WRITE_SPEC_ARGS)
    note: str | None = None  # why the write-time aggregates could not serve this spec (a scan instead)


LAST_INFO = AggregateInfo()  # the last aggregate_run's AggregateInfo (tests and the benchmark read it)


def aggregate_run(
    source: Any,
    spec: AggSpec,
    *,
    step_range: tuple[int | None, int | None] | None = None,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    cache: bool = True,
    max_blocks: int = 32,
    progress: bool = False,
) -> Partial:
    """The merged partial of a run's completed steps in ``step_range`` (inclusive; None ends open).

    For a run directory, the steps are split into shard groups run by ``engine`` (:func:`run_groups`). With
    ``cache``, each group's partial is saved beside the run (``RUN/_cache/aggregates/``) as a block of
    steps keyed by the spec and a fingerprint of the block's shard files and done markers: a later call
    reads the blocks still valid and aggregates only the steps no valid block covers (a growing run: its
    new steps). Blocks are used when they lie wholly inside ``step_range``; more than ``max_blocks`` valid
    blocks are merged into one. An unwritable run directory just skips the cache. Other sources (frames)
    are aggregated in this process.
    """
    global LAST_INFO
    from cppo_diag.analyses.tokens import _open_run

    if engine not in ENGINES:
        raise ValueError(f"engine: expected one of {list(ENGINES)}, found {engine!r}")
    if isinstance(source, (pl.LazyFrame, pl.DataFrame)):
        from cppo_diag.analyses.tokens import filter_tokens

        lf = filter_tokens(source.lazy() if isinstance(source, pl.DataFrame) else source, step_range=step_range)
        LAST_INFO = AggregateInfo()
        return aggregate_frame(lf, spec)
    run = _open_run(Path(source)) if isinstance(source, (str, Path)) else source
    if not hasattr(run, "token_files") or not hasattr(run, "path"):
        from cppo_diag.analyses.tokens import filter_tokens

        LAST_INFO = AggregateInfo()
        return aggregate_frame(filter_tokens(run.tokens(), step_range=step_range), spec)
    files = _run_files(run)
    lo, hi = step_range if step_range is not None else (None, None)
    steps = [s for s in sorted(files) if (lo is None or s >= lo) and (hi is None or s <= hi)]
    write_spec = AggSpec(**WRITE_SPEC_ARGS)
    recorded = cache and (Path(run.path) / CACHE_DIR / write_spec.key()).is_dir()
    if recorded and spec != write_spec:
        why = derivable(spec, write_spec)
        if why is None:  # merge the recorder's blocks (scan only steps they miss), then coarsen
            part = aggregate_run(run, write_spec, step_range=step_range, engine=engine, workers=workers,
                                 ray_address=ray_address, cache=cache, progress=progress)
            if spec.delta is None or part.lengths_ok or not part.steps:
                LAST_INFO.from_recorder = True
                return derive(part, spec) if part.steps else Partial(spec)
            why = "the delta / w_t overlay needs the response lengths, which not every step's aggregate holds"
    else:
        why = None

    def n_groups_for(todo: list[int]) -> int:  # several groups per worker: whoever is free takes the next
        return 4 * _local_workers(files, todo, engine, workers)

    def compute(groups: list[list[int]]) -> list[Partial]:
        n = _local_workers(files, [s for g in groups for s in g], engine, workers)
        return run_groups([[str(p) for s in g for p in files[s]] for g in groups], spec, engine=engine,
                          workers=n, ray_address=ray_address, progress=progress)

    store = BlockStore(key=spec.key(), load=Partial.load, save=lambda part, path: part.save(path),
                       merge=lambda parts: parts[0].merge(*parts[1:]), steps_of=lambda part: set(part.steps))
    parts, LAST_INFO = cached_map(run, files, steps, store, compute, n_groups_for=n_groups_for, cache=cache,
                                  max_blocks=max_blocks if spec != write_spec else 1 << 30)
    LAST_INFO.from_recorder = spec == write_spec and recorded
    if why is not None:
        LAST_INFO.note = f"{why}: scanned the token shards instead of merging the recorded aggregates"
    if not parts:
        return Partial(spec)
    return parts[0].merge(*parts[1:]) if len(parts) > 1 else parts[0]


def derivable(spec: AggSpec, base: AggSpec) -> str | None:
    """None when :func:`derive` can compute ``spec``'s partial from one of ``base``; else why not."""
    if spec.relative or base.relative:
        return "relative position bins need each response's length"
    if spec.mantissa_bits != base.mantissa_bits:
        return f"relative accuracy {relative_accuracy_of(spec.mantissa_bits):.2%} differs from the recorded one"
    extra = [m for m in spec.metrics if m not in base.metrics]
    if extra:
        return f"metric(s) {extra} are not among the recorded aggregates' {list(base.metrics)}"
    if spec.bin_width % base.bin_width:
        return (f"bin width {spec.bin_width} is not a multiple of the recorded aggregates' {base.bin_width}")
    return None


def derive(part: Partial, spec: AggSpec) -> Partial:
    """``part`` (of a finer spec, :func:`derivable`) as the partial of ``spec``: its metrics only, each bin
    of ``spec.bin_width`` the sum of the ``spec.bin_width / part.spec.bin_width`` finer bins it holds.
    Exact: counts and sums add, and a coarse bin's sketch is the sum of its fine bins' sketches."""
    why = derivable(spec, part.spec)
    if why is None and spec.delta is not None and not part.lengths_ok:
        why = "the delta / w_t overlay needs the response lengths, which not every step's aggregate holds"
    if why is not None:
        raise ValueError(f"spec: cannot derive from the partial's {part.spec}: {why}")
    f = spec.bin_width // part.spec.bin_width
    per_bin = N_SIGNS * N_UCLS

    def regroup(g: np.ndarray) -> np.ndarray:  # fine key g -> coarse key
        return (g // per_bin // f) * per_bin + g % per_bin

    def dense(arr: np.ndarray) -> np.ndarray:
        if not len(arr):
            return arr
        out = np.bincount(regroup(np.arange(len(arr))), weights=arr)
        return out.astype(arr.dtype) if arr.dtype.kind in "iu" else out

    out = Partial(spec, tokens=dense(part.tokens), thr_sum=dense(part.thr_sum), steps=part.steps,
                  mask={k: dense(v) for k, v in part.mask.items()}, mask_steps=dict(part.mask_steps),
                  lengths=part.lengths, lengths_ok=part.lengths_ok)
    if spec.delta is not None:
        thr, n = _threshold_sums(part.lengths, spec), len(out.tokens)
        out.thr_sum = np.pad(thr, (0, max(0, n - len(thr))))[:n]  # keys past the last token's are all 0
    n = spec.n_slots
    for m in spec.metrics:
        out.sums[m] = dense(part.sums.get(m, np.zeros(0)))
        keys, counts = part.sketch.get(m, (np.zeros(0, np.int64),) * 2)
        out.sketch[m] = _sum_by_key(regroup(keys // n) * n + keys % n, counts) if f > 1 else (keys, counts)
    return out


def _threshold_sums(lengths: np.ndarray, spec: AggSpec) -> np.ndarray:
    """Per key g, the sum of delta / w_t (Eq. 9) over its tokens, from the responses counted by valid length
    T and class (``Partial.lengths``): a response of length T has one token at each t < T."""
    per_cls = N_SIGNS * N_UCLS
    n = np.pad(lengths, (0, -len(lengths) % per_cls)).reshape(-1, per_cls)
    out = np.zeros(0)
    for T in np.flatnonzero(n.any(axis=1)):
        t = np.arange(T)
        thr = threshold_schedule(t, delta=spec.delta, w_min=spec.w_min, length=float(T))
        by_bin = np.bincount(t // spec.bin_width, weights=thr)  # (bins,)
        add = (by_bin[:, None] * n[T][None, :]).reshape(-1)  # key (bin * 4 + sign) * 2 + ucls
        out = _grow_add(out, add)
    return out


def _response_lengths(cols: dict) -> tuple[np.ndarray, bool]:
    """(lengths histogram, ok) of a token table holding whole responses in (seq_id, pos) order: key
    T * 8 + sign * 2 + update class. ``ok`` is False when a response is not whole (positions 0..T-1 in
    order) or its tokens carry more than one advantage sign."""
    pos, seq, upd, adv = cols["pos"], cols["seq_id"], cols["update"], cols["advantage"]
    n = len(pos)
    if n == 0:
        return np.zeros(0, np.int64), True
    start = np.ones(n, bool)
    start[1:] = (seq[1:] != seq[:-1]) | (upd[1:] != upd[:-1])
    idx = np.flatnonzero(start)
    step_ok = np.diff(pos)[~start[1:]] == 1
    if pos[idx].any() or not step_ok.all():
        return np.zeros(0, np.int64), False
    sign = np.where(np.isnan(adv), 3, np.sign(np.nan_to_num(adv)).astype(np.int64) + 1)  # 0 neg .. 3 NaN
    if (np.minimum.reduceat(sign, idx) != np.maximum.reduceat(sign, idx)).any():
        return np.zeros(0, np.int64), False
    T = np.diff(np.r_[idx, n])
    key = T * (N_SIGNS * N_UCLS) + sign[idx] * N_UCLS + (upd[idx] > 0)
    return np.bincount(key), True


class StepAggregates:
    """The recorder's write-time aggregates: one :class:`Partial` (``WRITE_SPEC_ARGS``) per step of one rank,
    accumulated from the token tables the background writer writes and saved once the step's ``_done``
    marker is on disk, as the block of that step beside the run; every aligned run of 2^k steps (k >= 3)
    is also saved as one block (a dyadic tree: any step range merges from O(log n) blocks). The first
    ``stats`` / report / app view then merges blocks instead of scanning (:func:`aggregate_run`).

    The blocks' fingerprints hash this rank's shards and marker: a step that other ranks also wrote, or
    whose shards changed later, fails the reader's check (which hashes every shard of the step), and the
    reader rescans it. Saving is best effort: :meth:`finish` raises ``OSError`` (a full disk, a read-only
    directory) after the shards and marker are written, so no token is ever lost for it."""

    MIN_LEVEL = 3  # blocks of 2, 4 steps are merged in memory only: a range reads <= 7 single steps per end

    def __init__(self, run_dir: Path, rank: int = 0):
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.spec = AggSpec(**WRITE_SPEC_ARGS)
        self._acc: dict[int, _Accumulator] = {}
        self._levels: dict[tuple[int, int], Partial] = {}  # (level, index) -> partial awaiting its sibling
        self.cpu_s = 0.0

    def add(self, step: int, table) -> None:
        """Add a token table (Arrow) of ``step``."""
        acc = self._acc.get(step)
        if acc is None:
            acc = self._acc[step] = _Accumulator(self.spec)
            acc.steps.add(int(step))
            acc.lengths, acc.lengths_ok = np.zeros(0, np.int64), True
        cols = table_columns(table, self.spec)
        acc.add(cols)
        if acc.lengths_ok and "seq_id" in table.column_names:
            lengths, ok = _response_lengths({**cols, "seq_id": _numpy_column(table, "seq_id", np.int64, "table", -1)})
            acc.lengths, acc.lengths_ok = _grow_add(acc.lengths, lengths), ok
        else:
            acc.lengths_ok = False

    def drop(self, step: int) -> None:
        self._acc.pop(step, None)

    def finish(self, step: int) -> int:
        """Save the block of ``step`` (and each dyadic block it completes); the number of blocks written."""
        acc = self._acc.pop(step, None)
        if acc is None:
            return 0
        part = acc.partial()
        part.lengths, part.lengths_ok = acc.lengths, acc.lengths_ok
        key = self.spec.key()
        return save_dyadic(self._levels, step, part, lambda a, b: a.merge(b),
                           lambda p, lo, hi: p.save(writer_block_path(self.run_dir, self.rank, key, lo, hi)),
                           self.MIN_LEVEL)


def save_dyadic(levels: dict, step: int, part, merge, save, min_level: int) -> int:
    """The recorder's dyadic blocks: save ``step``'s state ``part`` (``save(part, lo, hi)``), then merge it with
    each completed sibling block held in ``levels`` ((level, index) -> state) and save every aligned block of
    2^k steps (k >= ``min_level``) it completes; smaller merged blocks stay in memory only. The number of
    blocks saved."""
    written, level, idx = 0, 0, int(step)
    while True:
        if level == 0 or level >= min_level:
            save(part, idx << level, ((idx + 1) << level) - 1)
            written += 1
        sib = (level, idx ^ 1)
        if sib not in levels:
            levels[(level, idx)] = part
            return written
        other = levels.pop(sib)
        part = merge(other, part) if idx & 1 else merge(part, other)
        level, idx = level + 1, idx >> 1


def writer_block_path(run_dir: Path, rank: int, key: str, lo: int, hi: int) -> Path:
    """Where the recorder's writer saves the block of steps [lo, hi] under the cache key ``key``: fingerprinted
    by this rank's shards and done markers (a step other ranks also wrote fails the reader's check and is read
    from the shards); its folder exists."""
    from cppo_diag.storage import layout

    d = layout.run_dirs(run_dir)
    files = sorted(p for s in range(lo, hi + 1)
                   for p in (d["tokens"] / layout.step_dir_name(s)).glob(f"rank{rank}-*.parquet"))
    done = [layout.done_marker_name(s, rank) for s in range(lo, hi + 1)
            if (d["done"] / layout.done_marker_name(s, rank)).exists()]
    path = layout.aggregate_block_path(run_dir, key, lo, hi, _fingerprint(files, done))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class WriteTimeAggregates:
    """What the recorder's background writer builds per rank as steps complete, fed the same token tables: the
    position partials (:class:`StepAggregates`) and the per-step tables of :func:`write_time_tables`
    (``cppo_diag.analyses.step_cache.StepTables``)."""

    def __init__(self, run_dir: Path, rank: int = 0):
        from cppo_diag.analyses.step_cache import StepTables

        self.parts = (StepAggregates(run_dir, rank), StepTables(run_dir, rank, write_time_tables()))

    def add(self, step: int, table) -> None:
        for p in self.parts:
            p.add(step, table)

    def drop(self, step: int) -> None:
        for p in self.parts:
            p.drop(step)

    def finish(self, step: int) -> int:
        return sum(p.finish(step) for p in self.parts)


def write_time_tables() -> dict:
    """cache key -> per-step table function the recorder computes as each step completes: the doctor's series,
    the Doctor page's default mismatch family (by step, pi / mu, the updates after the first, or all of them
    for a run with one update per batch), the attribution by
    step (which names a runaway's cause; the Attribution page and its summary) and the Attribution page's
    position strata (mu strata, 32-token bins)."""
    from cppo_diag.analyses.attribution import step_terms, strata_table
    from cppo_diag.analyses.doctor_series import STORE_KEY, step_rows
    from cppo_diag.analyses.mismatch import step_family

    return {STORE_KEY: step_rows, **dict([step_family(pair="pi", updates="after_first"),
                                          step_family(pair="pi", updates="all"), step_terms(), strata_table()])}


def recorder_cache_keys() -> set[str]:
    """The cache folders the recorder's writer fills (:class:`WriteTimeAggregates`)."""
    return {AggSpec(**WRITE_SPEC_ARGS).key(), *write_time_tables()}


def drop_view_caches(run_dir) -> None:
    """Delete what earlier views cached beside a run, keeping what the recorder wrote: the state of a first
    view (benchmarks)."""
    import shutil

    keep = recorder_cache_keys()
    for d in (Path(run_dir) / CACHE_DIR).glob("*"):
        if d.name not in keep:
            shutil.rmtree(d, ignore_errors=True)


def _register_write_aggregates() -> None:
    """Make the recorder's background writer build :class:`WriteTimeAggregates` (capture sits below analyses
    and imports none of it: ``cppo_diag.capture.hooks``, which loads no torch)."""
    from cppo_diag.capture.hooks import register_write_aggregator

    register_write_aggregator(WriteTimeAggregates)


_register_write_aggregates()


def _local_workers(files: dict, steps: list[int], engine: str, workers: int | None) -> int:
    """``workers``, or for the local engine by default one process per ``AUTO_BYTES_PER_WORKER`` of the
    shards to read (a worker process costs about a second to start), at most the CPU count."""
    if workers is None and engine == "local":
        size = sum(p.stat().st_size for s in steps for p in files[s])
        return max(1, min(os.cpu_count() or 1, size // AUTO_BYTES_PER_WORKER))
    return max(1, int(workers or os.cpu_count() or 1))


@dataclass
class BlockStore:
    """How one kind of mergeable state is cached as blocks of steps beside a run (:func:`cached_map`)."""

    key: str  # its folder under RUN/_cache/aggregates/ (a hash of everything the state depends on)
    load: Any  # Path -> state
    save: Any  # (state, Path) -> None
    merge: Any  # [state, ...] -> state
    steps_of: Any  # state -> set of the steps it covers


def cached_map(run, files: dict[int, list[Path]], steps: list[int], store: BlockStore, compute, *, n_groups_for,
               cache: bool = True, max_blocks: int = 32) -> tuple[list, AggregateInfo]:
    """The states covering ``steps`` of ``run``: cached blocks still valid, plus ``compute(groups)`` (one
    state per group of whole steps) for the steps no valid block covers, saved as new blocks.

    A block ``s<lo>-<hi>-<fingerprint>.npz`` covers every completed step in [lo, hi]; its fingerprint hashes
    those steps' shard files (name, size, mtime) and done markers, so a changed shard makes it stale (it is
    deleted). Blocks are used when they lie wholly inside ``steps``. New groups never straddle a cached
    block, so each new block can be saved. More than ``max_blocks`` valid blocks are merged into one.
    """
    info = AggregateInfo()
    parts: list = []
    cache_dir = Path(run.path) / CACHE_DIR / store.key
    covered: set[int] = set()
    valid: list[tuple[Path, int, int]] = []
    if cache and cache_dir.is_dir():
        import bisect

        from cppo_diag.storage import layout

        wanted = set(steps)
        order = sorted(files)
        done_by: dict[str, list[str]] = {}
        for n in _done_names(run):
            done_by.setdefault(n.split(".")[0], []).append(n)
        stat_cache: dict = {}
        # at each first step the widest block first (the writer's dyadic blocks: few files per range)
        for f, b_lo, b_hi in sorted(_cached_blocks(cache_dir), key=lambda t: (t[1], -t[2])):
            fp = f.stem.rsplit("-", 1)[1]
            block = order[bisect.bisect_left(order, b_lo): bisect.bisect_right(order, b_hi)]
            done = [n for s in block for n in done_by.get(layout.step_dir_name(s), ())]
            if not block or _fingerprint([p for s in block for p in files[s]], done, stat_cache) != fp:
                try:  # stale: a shard of the block changed (or vanished)
                    f.unlink()
                except OSError:
                    pass
                continue
            if set(block) <= wanted and not (set(block) & covered):
                try:
                    parts.append(store.load(f))
                except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # unreadable: rebuild it
                    f.unlink(missing_ok=True)
                    continue
                covered.update(block)
            valid.append((f, b_lo, b_hi))
    todo = [s for s in steps if s not in covered]
    info.steps_cached = sorted(covered)
    info.steps_aggregated = todo
    if todo:
        # runs of steps not interrupted by a covered step, each split into groups (so a group's block of
        # steps [first, last] holds every completed step in between, and can be cached)
        import bisect

        cov = sorted(covered)
        segments, cur = [], []
        for s in todo:
            if cur and bisect.bisect_left(cov, s) != bisect.bisect_right(cov, cur[-1]):
                segments.append(cur)
                cur = []
            cur.append(s)
        segments.append(cur)
        per = max(1, round(n_groups_for(todo) / len(segments))) if len(todo) > 1 else 1
        groups = [g for seg in segments for g in _group_steps(files, seg, n_groups=per)]
        new = compute(groups)
        parts.extend(new)
        # cache only blocks that do not overlap a valid block (a narrower step range can leave such gaps)
        order = sorted(files)
        taken = {s for _, b_lo, b_hi in valid
                 for s in order[bisect.bisect_left(order, b_lo): bisect.bisect_right(order, b_hi)]}
        if cache:
            for g, part in zip(groups, new):
                if set(range(g[0], g[-1] + 1)) & taken:
                    continue
                if _save_block(cache_dir, run, files, g, part, store):
                    info.blocks_written += 1
                    valid.append((cache_dir / "?", g[0], g[-1]))
    if cache and len(valid) > max_blocks and not todo:
        _compact(cache_dir, run, files, store)
    return parts, info


def _cached_blocks(cache_dir: Path) -> list[tuple[Path, int, int]]:
    """(file, first step, last step) of the cached blocks, in step order (so merges add in a fixed order)."""
    out = []
    for f in cache_dir.glob("s*-*-*.npz"):
        try:
            rng, _ = f.stem[1:].rsplit("-", 1)
            b_lo, b_hi = (int(x) for x in rng.split("-"))
        except ValueError:
            continue
        out.append((f, b_lo, b_hi))
    return sorted(out, key=lambda t: (t[1], t[2]))


def _save_block(cache_dir: Path, run, files, steps: list[int], part, store: BlockStore) -> bool:
    block = [s for s in files if steps[0] <= s <= steps[-1]]
    fp = _fingerprint([p for s in block for p in files[s]], _done_of(run, block))
    from cppo_diag.storage import layout

    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        store.save(part, layout.aggregate_block_path(run.path, cache_dir.name, steps[0], steps[-1], fp))
        return True
    except OSError:  # a read-only run (or a full disk): no cache
        return False


def _compact(cache_dir: Path, run, files, store: BlockStore) -> None:
    """Merge every cached block into one (states add), so a run polled while it grows keeps few files."""
    blocks = [f for f, _, _ in _cached_blocks(cache_dir)]
    parts = [store.load(f) for f in blocks]
    if len(parts) < 2:
        return
    merged = store.merge(parts)
    steps = sorted(store.steps_of(merged))
    if set(steps) != {s for s in files if steps[0] <= s <= steps[-1]}:
        return  # the blocks leave gaps (steps never aggregated): one block would claim them
    if _save_block(cache_dir, run, files, [steps[0], steps[-1]], merged, store):
        keep = next(iter(sorted(cache_dir.glob(f"s{steps[0]}-{steps[-1]}-*.npz"))), None)
        for f in blocks:
            if f != keep:
                f.unlink(missing_ok=True)


# -- merged partial -> the position_stats table ------------------------------------------------------
def _selected_groups(n_groups: int, adv_sign: str | None, updates: str) -> np.ndarray:
    g = np.arange(n_groups)
    sign, ucls = (g // N_UCLS) % N_SIGNS, g % N_UCLS
    keep = np.ones(n_groups, bool)
    if adv_sign not in (None, "all"):
        codes = {"neg": 0, "zero": 1, "pos": 2}
        if adv_sign not in codes:
            raise ValueError(f"adv_sign: expected one of None, 'all', 'pos', 'neg', 'zero', found {adv_sign!r}")
        keep &= sign == codes[adv_sign]
    check_updates(updates)
    if updates != "all":
        keep &= ucls == (0 if updates == "first" else 1)
    return keep


def _by_bin(arr: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Sum a dense per-key array over the selected keys of each bin."""
    n = len(arr)
    a = np.where(keep[:n], arr, 0)
    n_bins = -(-n // (N_SIGNS * N_UCLS))
    a = np.pad(a, (0, n_bins * N_SIGNS * N_UCLS - n))
    return a.reshape(n_bins, N_SIGNS * N_UCLS).sum(axis=1)


def _bin_sketch_stats(slots: np.ndarray, counts: np.ndarray, bounds, thresholds, hill: bool, hill_min_k: int) -> dict:
    lo, hi, val = bounds
    v = val[slots]
    cum = np.cumsum(counts)
    n = int(cum[-1])

    def order_stat(r: int) -> float:
        return float(v[np.searchsorted(cum, r, side="right")])

    out = {}
    fs = {}
    for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
        h = q * (n - 1)
        f = int(math.floor(h))
        a, b, t = order_stat(f), order_stat(min(f + 1, n - 1)), h - f
        out[name] = b - (b - a) * (1 - t) if t >= 0.5 else a + (b - a) * t  # numpy's linear interpolation
        fs[name] = (f, h)
    f, h = fs["p90"]
    p90 = out["p90"]
    r0 = f if (h == f or order_stat(f) >= p90) else f + 1  # first order statistic >= p90

    def tail_sum(r: int, fn) -> tuple[float, int]:
        """Sum of fn(value) over order statistics r..n-1, and their number."""
        i = int(np.searchsorted(cum, r, side="right"))
        first = (cum[i] - r) * fn(v[i : i + 1])[0]
        return float(first + (counts[i + 1 :] * fn(v[i + 1 :])).sum()), n - r

    s, k = tail_sum(r0, lambda x: x)
    out["top10_mean"] = s / k if k else None
    for x in thresholds:
        b_lo, b_hi = lo[slots], hi[slots]
        above = counts[b_lo >= x].sum()
        mid = (b_lo < x) & (b_hi > x)  # the bucket straddling x: its share above x, linearly
        share = ((b_hi[mid] - x) / (b_hi[mid] - b_lo[mid]) * counts[mid]).sum()
        out[f"surv_{x:g}"] = float(above + share) / n
    out["hill_alpha"], out["hill_k"] = None, None
    if hill:
        k = n - 1 - f
        out["hill_k"] = k
        if k >= hill_min_k and p90 > 0 and k > 0:
            with np.errstate(divide="ignore", invalid="ignore"):
                sl, _ = tail_sum(f + 1, np.log)
            xi = sl / k - math.log(p90)
            out["hill_alpha"] = 1.0 / xi if xi > 0 else None
    return out


def stats_table(
    part: Partial,
    *,
    adv_sign: str | None = None,
    updates: str = "all",
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    hill_min_k: int = 5,
    metrics: Sequence[str] | None = None,
) -> pl.DataFrame:
    """``position_stats``' long table (one row per metric and bin) from a merged partial, restricted to the
    advantage sign ``adv_sign`` and the updates ``updates`` (formulas in the module docstring)."""
    spec = part.spec
    metrics = tuple(metrics or spec.metrics)
    missing = [m for m in metrics if m not in spec.metrics]
    if missing:
        raise ValueError(f"metrics: expected names from the partial's {list(spec.metrics)}, found {missing}")
    n_groups = len(part.tokens)
    keep = _selected_groups(n_groups, adv_sign, updates)
    count = _by_bin(part.tokens, keep) if n_groups else np.zeros(0, np.int64)
    thr = _by_bin(part.thr_sum, keep) if spec.delta is not None and len(part.thr_sum) else None
    bounds = slot_bounds(spec)
    rows = []
    for m in metrics:
        keys, counts = part.sketch.get(m, (np.zeros(0, np.int64),) * 2)
        g = keys // spec.n_slots
        sel = keep[g] if len(keys) else np.zeros(0, bool)
        keys, counts, g = keys[sel], counts[sel], g[sel]
        bins = g // (N_SIGNS * N_UCLS)
        k2 = bins * spec.n_slots + keys % spec.n_slots  # (bin, slot), summed over signs and update classes
        k2, c2 = _sum_by_key(k2, counts)
        sums = _by_bin(part.sums.get(m, np.zeros(0)), keep)
        b2 = k2 // spec.n_slots
        edges = np.flatnonzero(np.r_[True, b2[1:] != b2[:-1], True]) if len(b2) else np.zeros(1, np.int64)
        for i in range(len(edges) - 1):
            sl = slice(edges[i], edges[i + 1])
            bn = int(b2[edges[i]])
            c = c2[sl]
            st = _bin_sketch_stats(k2[sl] % spec.n_slots, c, bounds, thresholds, m not in BOUNDED_METRICS, hill_min_k)
            row = {"metric": m, "bin": bn, "count": int(count[bn]), "mean": float(sums[bn]) / int(c.sum()), **st}
            if thr is not None:
                row["threshold_mean"] = float(thr[bn]) / int(count[bn])
            rows.append(row)
    return _rows_to_long(rows, thresholds, spec.relative, spec.bin_width, spec.n_rel_bins, spec.delta is not None)


def position_summary(
    source: Any,
    *,
    metrics: Sequence[str] = ("tv", "abs_logratio", "k3"),
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
    relative_accuracy: float = 0.01,
    exact: bool = False,
    engine: str = "local",
    workers: int | None = None,
    ray_address: str | None = None,
    cache: bool = True,
    progress: bool = False,
) -> pl.DataFrame:
    """``cppo_diag.analyses.position.position_stats`` from mergeable partials (same arguments and table).

    ``exact=True`` runs ``position_stats`` itself (exact quantiles, one process). Otherwise the run is
    aggregated by ``engine`` over shard groups (:func:`aggregate_run`, cached beside the run with ``cache``)
    and the quantile columns carry at most ``relative_accuracy`` relative error (module docstring).
    ``updates=None`` picks the run's default (``cppo_diag.analyses.updates.default_updates``). The partials
    classify tokens by update index only, so ``updates="lagged"`` (the default of runs that record ``lag``)
    runs the exact engine.
    """
    mantissa_bits_for(relative_accuracy)  # a bad accuracy is an error whichever engine runs
    if updates is None:
        from cppo_diag.analyses.updates import default_updates

        updates = default_updates(source)
    if exact or updates == "lagged":
        from cppo_diag.analyses.position import position_stats

        return position_stats(source, metrics=metrics, bin_width=bin_width, relative=relative, n_rel_bins=n_rel_bins,
                              step_range=step_range, adv_sign=adv_sign, updates=updates, thresholds=thresholds,
                              delta=delta, w_min=w_min, hill_min_k=hill_min_k, progress=progress)
    spec = AggSpec(metrics=tuple(metrics), bin_width=bin_width if not relative else 64, relative=relative,
                   n_rel_bins=n_rel_bins, mantissa_bits=mantissa_bits_for(relative_accuracy), delta=delta, w_min=w_min)
    part = aggregate_run(source, spec, step_range=step_range, engine=engine, workers=workers,
                         ray_address=ray_address, cache=cache, progress=progress)
    return stats_table(part, adv_sign=adv_sign, updates=updates, thresholds=thresholds, hill_min_k=hill_min_k)


# -- the trainer's logged mask from the same partials ---------------------------------------------------
def applied_mask_tables(part: Partial, run: str, label: str, *, updates: str = "all"
                        ) -> tuple[dict, pl.DataFrame, pl.DataFrame] | None:
    """(summary, by_position, by_step) of the logged mask (``keep_applied``) in ``part``, as
    ``cppo_diag.analyses.compare`` reports it: masked fraction overall, by advantage sign, by position bin and by
    step, the budget-mask share #budget / #masked (paper Fig. 7) and the fraction of ``away`` tokens.
    None when no token of the selected updates has a logged mask."""
    spec = part.spec
    if not part.mask or not len(part.mask.get("n", ())):
        return None
    n_groups = len(part.mask["n"])
    keep = _selected_groups(n_groups, None, updates)

    def tot(name: str, sign: int | None = None) -> int:
        arr = part.mask[name][:n_groups]
        sel = keep[: len(arr)] & (((np.arange(len(arr)) // N_UCLS) % N_SIGNS == sign) if sign is not None else True)
        return int(arr[sel].sum())

    n_valid = tot("n")
    if not n_valid:
        return None
    n_masked, n_budget = tot("masked"), (tot("budget") if tot("reason") else None)
    frac = lambda sign: (tot("masked", sign) / tot("n", sign)) if tot("n", sign) else None  # noqa: E731
    summary = {"run": run, "rule": label, "applied": True, "n_valid": n_valid, "n_masked": n_masked,
               "masked_frac": n_masked / n_valid, "budget_share": (n_budget / n_masked) if n_masked and n_budget is not None else None,
               "away_frac": tot("away") / n_valid, "masked_frac_pos_adv": frac(2), "masked_frac_neg_adv": frac(0)}
    nb, mb = _by_bin(part.mask["n"], keep), _by_bin(part.mask["masked"], keep)
    bins = np.flatnonzero(nb)
    _, start, end = _bin_exprs(spec.relative, spec.bin_width, spec.n_rel_bins)
    by_pos = pl.DataFrame({"bin": bins.astype(np.int64), "n_valid": nb[bins].astype(np.int64),
                           "masked_frac": mb[bins] / nb[bins]}).with_columns(
        bin_start=start.cast(pl.Float64), bin_end=end.cast(pl.Float64))
    ucls = np.arange(len(part.mask_steps["n"])) % N_UCLS
    sel = ucls >= 0 if updates == "all" else ucls == (0 if updates == "first" else 1)
    per_step = {k: np.bincount(np.arange(len(v))[sel[: len(v)]] // N_UCLS, weights=v[sel[: len(v)]])
                for k, v in part.mask_steps.items()}
    steps = np.flatnonzero(per_step["n"])
    with np.errstate(invalid="ignore", divide="ignore"):
        by_step = pl.DataFrame({
            "step": steps.astype(np.int64), "masked_frac": per_step["masked"][steps] / per_step["n"][steps],
            "budget_share": np.where((per_step["masked"][steps] > 0) & (per_step["reason"][steps] > 0),
                                     per_step["budget"][steps] / np.maximum(per_step["masked"][steps], 1), np.nan),
        }).with_columns(pl.col("budget_share").fill_nan(None))
    return summary, by_pos, by_step


def applied_mask(source: Any, run: str, label: str, *, bin_width: int = 64, relative: bool = False,
                 n_rel_bins: int = 20, step_range=None, updates: str = "all", cache: bool = True,
                 workers: int | None = 1) -> tuple[dict, pl.DataFrame, pl.DataFrame] | None:
    """:func:`applied_mask_tables` of ``source`` (aggregated, and cached beside a run directory, with the
    |pi - mu| sketch of the same pass: ``stats_table`` of the same partial gives its position statistics)."""
    spec = AggSpec(metrics=("tv",), bin_width=bin_width if not relative else 64, relative=relative,
                   n_rel_bins=n_rel_bins)
    part = aggregate_run(source, spec, step_range=step_range, cache=cache, workers=workers)
    return applied_mask_tables(part, run, label, updates=updates)
