"""Recompute any registered trust-region rule over a recorded run, one training step at a time.

Batch reconstruction is the storage layer's (``cppo_diag.storage.batches``; ``Run.batches()``): tokens are
grouped by ``(step, update, rank)``; inside a group each sequence becomes one row of a right-padded (B, T)
batch, in ``seq_id`` order, and each token sits at column ``pos``. A position that was not logged is padding.
The rules work per response, and the one with per-response randomness (``cppo_shuffled``) is keyed on the response's
``(step, seq_id)``, which ``run_rule`` passes to ``compute_mask``: so the rows need not be ``0..B-1`` (the
bundled trainer's minibatches hold any subset of a step's seq_ids) and sampled-out sequences leave no gap.

Memory: one (step, update, rank) group is materialised at a time; summaries are running counts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import polars as pl
import torch

from cppo_diag.analyses.tokens import _open_run, _scan_step_files, _step_files, load_tokens, require_columns, run_meta, step_lazyframes  # noqa: F401
from cppo_diag.masks.away import away_test, ratio
from cppo_diag.masks.reasons import Reason
from cppo_diag.storage import layout
from cppo_diag.storage.batches import BATCH_COLUMNS, Batch, batches_from_frame

def iter_step_frames(source: Any, *, step_range=None, columns: Sequence[str] | None = None,
                     progress: bool = False, desc: str = "steps") -> Iterator[tuple[int, pl.DataFrame]]:
    """Yield (step, DataFrame of that step's tokens) in step order, one step in memory at a time."""
    parts = step_lazyframes(source, step_range=step_range)
    it = parts
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(parts, desc=desc, unit="step")
    for step, sub in it:
        names = sub.collect_schema().names()
        cols = [c for c in (columns or names) if c in names]
        frame = sub.select(cols).collect()
        if frame.height:
            yield step, frame


@dataclass
class BatchSet:
    """The batches of a step range, rebuilt once and held in memory, so that rules can be recomputed on them
    many times without reading the run again (the app's What-if sliders). Any function that takes a token
    source and streams it through :func:`iter_batches` (``recompute``, ``recompute_many``,
    ``budget_exhaustion``) accepts one; ``meta`` and ``name`` stand in for the run's."""

    batches: list[Batch]
    meta: dict = field(default_factory=dict)
    name: str | None = None
    step_range: tuple | None = None

    @property
    def n_tokens(self) -> int:
        return sum(b.n_tokens for b in self.batches)


def load_batches(source: Any, *, step_range=None, progress: bool = False) -> BatchSet:
    """:func:`iter_batches` collected into a :class:`BatchSet` (memory: every batch of ``step_range``)."""
    if isinstance(source, (str, Path)):
        source = _open_run(Path(source))
    return BatchSet(list(iter_batches(source, step_range=step_range, progress=progress)), meta=run_meta(source),
                    name=getattr(source, "name", None), step_range=step_range)


def iter_batches(source: Any, *, step_range=None, columns: Sequence[str] | None = None,
                 progress: bool = False) -> Iterator[Batch]:
    """Yield one :class:`Batch` per (step, update, rank), in (step, update, rank) order.

    ``source``: a run or run directory (the reader's ``Run.batches()``), a token frame (rebuilt a step at a
    time by ``cppo_diag.storage.batches_from_frame``) or a :class:`BatchSet` (its batches inside
    ``step_range`` are yielded as they are)."""
    if isinstance(source, BatchSet):
        lo, hi = step_range if step_range is not None else (None, None)
        yield from (b for b in source.batches if (lo is None or b.step >= lo) and (hi is None or b.step <= hi))
        return
    if isinstance(source, (str, Path)):
        source = _open_run(Path(source))
    if callable(getattr(source, "batches", None)):  # a run: the reader rebuilds its batches
        yield from source.batches(step_range=step_range, columns=columns, progress=progress)
        return
    lf = load_tokens(source)
    require_columns(lf, ["step", "seq_id", "pos", "logp", "logp_rollout", "advantage"], "recompute")
    names = lf.collect_schema().names()
    cols = list(columns) if columns else [c for c in BATCH_COLUMNS if c in names]
    for _, frame in iter_step_frames(source, step_range=step_range, columns=cols, progress=progress):
        yield from batches_from_frame(frame)


def run_rule(batch: Batch, rule: str, params: dict | None = None, *, anchor: str = "rollout",
             return_internals: bool = False):
    """``cppo_diag.masks.compute_mask`` on one batch. ``anchor="old"`` anchors to pi_old (logp_old). The
    batch's step and seq_ids go with it (they key ``cppo_shuffled``'s permutation, as in the trainer)."""
    from cppo_diag.masks import compute_mask

    if anchor not in ("rollout", "old"):
        raise ValueError(f"anchor: expected 'rollout' or 'old', found {anchor!r}")
    if anchor == "old" and batch.logp_old is None:
        raise ValueError(f"anchor='old' needs column 'logp_old', which step {batch.step} did not log")
    kwargs = dict(params or {})
    if batch.topk is not None and str(kwargs.get("divergence", "")).startswith("topk"):
        kwargs["topk"] = batch.topk
    return compute_mask(
        rule, logp=batch.logp, logp_rollout=batch.logp_rollout, advantages=batch.advantages,
        response_mask=batch.response_mask, logp_old=batch.logp_old, return_internals=return_internals,
        anchor=anchor, seq_ids=torch.from_numpy(np.asarray(batch.seq_ids, dtype=np.int64)), step=int(batch.step),
        **kwargs,
    )


@dataclass
class RecomputeResult:
    """Summaries of one rule recomputed over a run (all counts over valid tokens)."""

    rule: str
    params: dict
    overall: dict
    by_step: pl.DataFrame
    by_position: pl.DataFrame
    by_adv_sign: pl.DataFrame
    metrics_by_step: pl.DataFrame
    agreement: dict | None = None
    side_table: Path | None = None
    bin_width: int = 64
    extra: dict = field(default_factory=dict)
    relative: bool = False  # by_position bins are t / T fractions (n_rel_bins of them) instead of positions
    n_rel_bins: int = 20


def position_bins(batch: Batch, *, bin_width: int = 64, relative: bool = False, n_rel_bins: int = 20) -> np.ndarray:
    """(N,) int64 position bin of each valid token (row-major order), as ``cppo_diag.analyses.position_stats`` bins:
    ``pos // bin_width``, or with ``relative=True`` the bin of t / T in ``n_rel_bins`` equal bins of (0, 1]
    (t = pos + 1, T = max(pos) + 1 of the response: ``ceil(n_rel_bins * t / T)`` clipped to 1..n, minus 1)."""
    pos = batch.unpad(batch.positions).astype(np.int64)  # (N,)
    if not relative:
        if bin_width < 1:
            raise ValueError(f"bin_width: expected an integer >= 1, found {bin_width}")
        return pos // bin_width
    if n_rel_bins < 1:
        raise ValueError(f"n_rel_bins: expected an integer >= 1, found {n_rel_bins}")
    mask = batch.response_mask.numpy()  # (B, T)
    length = np.where(mask, batch.positions, -1).max(axis=1) + 1  # (B,) T of each row
    rows = np.nonzero(mask)[0]  # (N,)
    rel = (pos + 1).astype(np.float64) / length[rows]
    return np.clip(np.ceil(rel * n_rel_bins), 1, n_rel_bins).astype(np.int64) - 1


class _PosCounter:
    """Running per-position-bin counts (numpy bincount, grows as needed)."""

    def __init__(self, bin_width: int, relative: bool = False, n_rel_bins: int = 20):
        self.bin_width, self.relative, self.n_rel_bins = bin_width, relative, n_rel_bins
        self.counts: dict[str, np.ndarray] = {}

    def add(self, name: str, bins: np.ndarray, weights: np.ndarray | None = None):
        c = np.bincount(bins, weights=weights)
        cur = self.counts.get(name)
        if cur is None:
            cur = np.zeros(0)
        if len(c) > len(cur):
            cur = np.pad(cur, (0, len(c) - len(cur)))
        cur[: len(c)] += c
        self.counts[name] = cur

    def frame(self, names: Sequence[str]) -> pl.DataFrame:
        n = max((len(v) for v in self.counts.values()), default=0)
        data = {"bin": np.arange(n, dtype=np.int64)}
        for k in names:
            v = self.counts.get(k, np.zeros(0))
            data[k] = np.pad(v, (0, n - len(v)))
        df = pl.DataFrame(data)
        if self.relative:  # fractions of the response length, as position_stats(relative=True)
            return df.with_columns(bin_start=pl.col("bin") / self.n_rel_bins,
                                   bin_end=(pl.col("bin") + 1) / self.n_rel_bins)
        return df.with_columns(
            bin_start=(pl.col("bin") * self.bin_width).cast(pl.Float64),
            bin_end=((pl.col("bin") + 1) * self.bin_width).cast(pl.Float64),
        )


def _frac(num, den):
    return float(num) / float(den) if den else float("nan")


class _Accumulator:
    """Running summaries of one rule's masks over the batches of a run."""

    def __init__(self, rule: str, params: dict, bin_width: int, side_path: Path | None = None,
                 rule_metrics: bool = True, relative: bool = False, n_rel_bins: int = 20):
        self.rule, self.params, self.bin_width, self.side_path = rule, params, bin_width, side_path
        self.rule_metrics = rule_metrics
        self.pos_counter = _PosCounter(bin_width, relative, n_rel_bins)
        self.step_rows: list[dict] = []
        self.metric_rows: list[dict] = []
        self.sign_counts = {s: np.zeros(3) for s in ("pos", "neg", "zero")}  # valid, masked, budget
        self.agree = {"n_compared": 0, "n_agree": 0, "first_mismatch": None}
        self.writer = None  # the side table's ParquetWriter, open on a temp file until close()
        self._side = None

    def add(self, batch: Batch, res, anchor: str = "rollout") -> None:
        keep = batch.unpad(res.keep)  # (N,)
        reason = batch.unpad(res.reason).astype(np.uint8)
        masked = ~keep
        adv = batch.unpad(batch.advantages)
        anchor_logp = batch.logp_old if anchor == "old" and batch.logp_old is not None else batch.logp_rollout
        away = batch.unpad(away_test(batch.advantages, ratio(batch.logp, anchor_logp), batch.response_mask))
        budget = reason == Reason.BUDGET
        n, n_m = keep.shape[0], int(masked.sum())
        row = {
            "step": batch.step, "update": batch.update, "rank": batch.rank, "n_valid": n, "n_masked": n_m,
            **{f"n_{r.name.lower()}": int((reason == r).sum()) for r in Reason if r != Reason.KEPT},
            "n_away": int(away.sum()), "n_seqs": int((batch.seq_ids >= 0).sum()),
        }
        for s, sel in (("pos", adv > 0), ("neg", adv < 0), ("zero", adv == 0)):
            self.sign_counts[s] += (sel.sum(), (masked & sel).sum(), (budget & sel).sum())
            row[f"n_valid_{s}_adv"] = int(sel.sum())
            row[f"n_masked_{s}_adv"] = int((masked & sel).sum())
        pc = self.pos_counter
        bins = position_bins(batch, bin_width=self.bin_width, relative=pc.relative, n_rel_bins=pc.n_rel_bins)
        self.pos_counter.add("n_valid", bins)
        self.pos_counter.add("n_masked", bins, masked.astype(np.float64))
        self.pos_counter.add("n_budget", bins, budget.astype(np.float64))
        self.pos_counter.add("n_away", bins, away.astype(np.float64))
        if batch.keep_applied is not None:
            applied = batch.unpad(batch.keep_applied)
            same = applied == keep
            self.agree["n_compared"] += n
            self.agree["n_agree"] += int(same.sum())
            row["n_agree"] = int(same.sum())
            if self.agree["first_mismatch"] is None and not same.all():
                i = int(np.argmin(same))
                keys = batch.token_keys()
                self.agree["first_mismatch"] = {k: int(v[i]) for k, v in keys.items()} | {
                    "keep_applied": bool(applied[i]), "keep_recomputed": bool(keep[i])}
        self.step_rows.append(row)
        if self.rule_metrics:  # evaluating res.metrics costs the rule a few reductions (and a sort)
            self.metric_rows.append({"step": batch.step, "update": batch.update, "rank": batch.rank,
                                     **{k: float(v) for k, v in (res.metrics or {}).items()}})
        if self.side_path is not None:
            self._write_side(batch, keep, reason, res)

    def _write_side(self, batch, keep, reason, res) -> None:
        import contextlib

        import pyarrow as pa

        cols = {k: pa.array(v) for k, v in batch.token_keys().items()}
        cols["keep"] = pa.array(keep)
        cols["reason"] = pa.array(reason, type=pa.uint8())
        if getattr(res, "weight", None) is not None:
            cols["weight"] = pa.array(batch.unpad(res.weight).astype(np.float32))
        table = pa.table(cols)
        if self.writer is None:
            self.side_path.parent.mkdir(parents=True, exist_ok=True)
            self._side = contextlib.ExitStack()
            self.writer = self._side.enter_context(layout.atomic_parquet_writer(self.side_path, table.schema))
        elif not table.schema.equals(self.writer.schema):
            table = table.select([n for n in self.writer.schema.names if n in table.column_names])
        self.writer.write_table(table)

    def close(self, error: BaseException | None = None) -> None:
        """Finish the side table: renamed into place whole, or, after ``error``, its temp file removed (a
        failed recompute leaves no side table, and an earlier one at that path untouched)."""
        if self.writer is not None:
            side, self._side, self.writer = self._side, None, None
            if error is None:
                side.close()
            else:
                side.__exit__(type(error), error, error.__traceback__)
        elif self.side_path is not None and error is None:  # no tokens: still write an empty, typed side table
            import pyarrow as pa

            self.side_path.parent.mkdir(parents=True, exist_ok=True)
            layout.atomic_write_parquet(pa.table({
                "step": pa.array([], pa.int64()), "update": pa.array([], pa.int32()),
                "rank": pa.array([], pa.int32()), "seq_id": pa.array([], pa.int64()),
                "pos": pa.array([], pa.int32()), "keep": pa.array([], pa.bool_()),
                "reason": pa.array([], pa.uint8())}), self.side_path)

    def result(self) -> "RecomputeResult":
        res = _summarise(self.rule, self.params, self.step_rows, self.metric_rows, self.pos_counter,
                         self.sign_counts, self.agree, self.side_path, self.bin_width)
        res.relative, res.n_rel_bins = self.pos_counter.relative, self.pos_counter.n_rel_bins
        return res


def recompute_many(
    source: Any,
    specs: dict[str, tuple[str, dict]],
    *,
    step_range=None,
    bin_width: int = 64,
    anchor: str | None = None,
    rule_metrics: bool = False,
    progress: bool = True,
    relative: bool = False,
    n_rel_bins: int = 20,
) -> dict[str, "RecomputeResult"]:
    """Several rules over one pass of the run: ``specs`` maps a label to (rule name, params).

    ``rule_metrics``: also collect each rule's own ``res.metrics`` per batch into ``metrics_by_step``
    (off by default here: it costs the rule extra reductions). ``relative``: ``by_position`` over t / T
    in ``n_rel_bins`` bins (see :func:`position_bins`)."""
    if anchor is None:
        anchor = run_meta(source).get("anchor") or "rollout"
    from cppo_diag.masks import get_rule  # raises, listing the known rules, on an unknown name

    for rule, _ in specs.values():
        get_rule(rule)
    accs = {label: _Accumulator(rule, dict(params or {}), bin_width, rule_metrics=rule_metrics, relative=relative,
                                n_rel_bins=n_rel_bins)
            for label, (rule, params) in specs.items()}
    for batch in iter_batches(source, step_range=step_range, progress=progress):
        for label, (rule, params) in specs.items():
            accs[label].add(batch, run_rule(batch, rule, params, anchor=anchor), anchor)
    return {label: acc.result() for label, acc in accs.items()}


def _merge_accumulators(parts: list["_Accumulator"], like: "_Accumulator") -> "_Accumulator":
    """One accumulator holding ``parts`` (per-step accumulators, in step order) added together."""
    out = _Accumulator(like.rule, like.params, like.bin_width, rule_metrics=like.rule_metrics,
                       relative=like.pos_counter.relative, n_rel_bins=like.pos_counter.n_rel_bins)
    for p in parts:
        out.step_rows.extend(p.step_rows)
        out.metric_rows.extend(p.metric_rows)
        for s in out.sign_counts:
            out.sign_counts[s] = out.sign_counts[s] + p.sign_counts[s]
        out.agree["n_compared"] += p.agree["n_compared"]
        out.agree["n_agree"] += p.agree["n_agree"]
        if out.agree["first_mismatch"] is None:
            out.agree["first_mismatch"] = p.agree["first_mismatch"]
        for name, arr in p.pos_counter.counts.items():
            cur = out.pos_counter.counts.get(name, np.zeros(0))
            if len(arr) > len(cur):
                cur = np.pad(cur, (0, len(arr) - len(cur)))
            cur = cur.copy()
            cur[: len(arr)] += arr
            out.pos_counter.counts[name] = cur
    return out


# Per-step partials of recomputed rules (:func:`recompute_cached`): key -> that step's _Accumulator, least
# recently used first. A key is (run directory, the step's shard files as (name, size, mtime), rule,
# parameters, update filter, anchor, binning, rule_metrics), so a changed step never matches.
STEP_MEMO_MAX = 20_000  # per-step partials kept (a few KB each)
_STEP_MEMO: "dict[tuple, _Accumulator]" = {}
TOKENS_READ = [0]  # tokens :func:`recompute_cached` has read from disk in this process (tests, benchmarks)


def recompute_cached(
    source: Any,
    specs: dict[str, tuple[str, dict]],
    *,
    step_range=None,
    updates: str = "all",
    bin_width: int = 64,
    anchor: str | None = None,
    relative: bool = False,
    n_rel_bins: int = 20,
    rule_metrics: bool = False,
    batches: "BatchSet | None" = None,
    progress: bool = False,
) -> dict[str, "RecomputeResult"]:
    """:func:`recompute_many` of a run directory, from per-step partials kept in this process.

    Each step's partial of each rule is keyed by (the run's directory and that step's shard files, the rule,
    its parameters, the update filter ``updates``, the anchor and the binning): the steps of ``step_range``
    whose partials are all known are merged without reading a token (a slider back at an earlier value, a
    page revisited, a wider range); only the other steps are read (from ``batches`` when it holds them, a
    :class:`BatchSet` of the same run) and recomputed. Results equal :func:`recompute_many` (the same
    per-batch sums, added in step order). Sources that are not run directories go to
    :func:`recompute_many` uncached."""
    from cppo_diag.analyses.aggregate import _run_files
    from cppo_diag.analyses.updates import check_updates, keeps_update, select_updates
    from cppo_diag.masks import get_rule

    check_updates(updates)
    run = _open_run(Path(source)) if isinstance(source, (str, Path)) else source
    # filters by update index only; any other filter (one that needs more than a batch's update index)
    # goes through select_updates, uncached
    if not (hasattr(run, "token_files") and hasattr(run, "path")) or updates not in ("all", "first", "after_first"):
        return recompute_many(select_updates(run, updates, step_range=step_range), specs, step_range=step_range,
                              bin_width=bin_width, anchor=anchor, rule_metrics=rule_metrics, progress=progress,
                              relative=relative, n_rel_bins=n_rel_bins)
    if anchor is None:
        anchor = run_meta(run).get("anchor") or "rollout"
    for rule, _ in specs.values():
        get_rule(rule)
    files = _run_files(run)
    lo, hi = step_range if step_range is not None else (None, None)
    steps = [s for s in sorted(files) if (lo is None or s >= lo) and (hi is None or s <= hi)]
    root = str(Path(run.path).resolve())

    def fresh(rule: str, params: dict) -> _Accumulator:
        return _Accumulator(rule, dict(params or {}), bin_width, rule_metrics=rule_metrics, relative=relative,
                            n_rel_bins=n_rel_bins)

    def key(step: int, rule: str, params: dict) -> tuple:
        fp = tuple((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in sorted(files[step]))
        return (root, step, fp, rule, repr(sorted((params or {}).items())), updates, anchor, int(bin_width),
                bool(relative), int(n_rel_bins), bool(rule_metrics))

    keys = {s: {label: key(s, r, p) for label, (r, p) in specs.items()} for s in steps}
    todo = [s for s in steps if any(k not in _STEP_MEMO for k in keys[s].values())]
    if todo:
        held = {b.step for b in batches.batches} if batches is not None else set()
        new = {s: {label: fresh(r, p) for label, (r, p) in specs.items()} for s in todo}
        from_memory = [s for s in todo if s in held]
        from_disk = [s for s in todo if s not in held]
        sources = []
        if from_memory:
            sources.append(b for b in batches.batches if b.step in new)
        segments, cur = [], []  # contiguous runs of steps to read
        index = {s: i for i, s in enumerate(steps)}
        for s in from_disk:
            if cur and index[s] != index[cur[-1]] + 1:
                segments.append(cur)
                cur = []
            cur.append(s)
        if cur:
            segments.append(cur)
        for seg in segments:
            sources.append(run.batches(step_range=(seg[0], seg[-1]), progress=progress))
        for it in sources:
            for batch in it:
                if batch.step not in new or not keeps_update(batch.update, updates):
                    continue
                if batch.step not in held:
                    TOKENS_READ[0] += batch.n_tokens
                for label, (rule, params) in specs.items():
                    new[batch.step][label].add(batch, run_rule(batch, rule, params, anchor=anchor), anchor)
        for s in todo:
            for label in specs:
                _STEP_MEMO[keys[s][label]] = new[s][label]
    out = {}
    for label, (rule, params) in specs.items():
        parts = []
        for s in steps:
            k = keys[s][label]
            parts.append(_STEP_MEMO.pop(k))
            _STEP_MEMO[k] = parts[-1]  # most recently used last
        out[label] = _merge_accumulators(parts, fresh(rule, params)).result()
    while len(_STEP_MEMO) > STEP_MEMO_MAX:
        _STEP_MEMO.pop(next(iter(_STEP_MEMO)))
    return out


def recompute(
    source: Any,
    rule: str,
    *,
    params: dict | None = None,
    step_range=None,
    side_table: str | Path | None = None,
    bin_width: int = 64,
    anchor: str | None = None,
    return_internals: bool = False,
    on_batch: Callable[[Batch, Any], None] | None = None,
    rule_metrics: bool = True,
    progress: bool = True,
    relative: bool = False,
    n_rel_bins: int = 20,
) -> RecomputeResult:
    """Recompute ``rule`` (a registered name of ``cppo_diag.masks``) with ``params`` over a run.

    Streams the run step by step (:func:`iter_batches`), calls ``compute_mask`` per batch and accumulates:
    ``overall`` (n_valid, n_masked, masked_frac, budget_share = #reason budget / #masked, token/sequence
    reason counts, away_frac, masked_frac_pos_adv / _neg_adv), ``by_step``, ``by_position`` (bins of
    ``bin_width`` positions), ``by_adv_sign``, ``metrics_by_step`` (the rule's own ``res.metrics``), and, when
    the run logged ``keep_applied``, ``agreement`` (n_compared, n_agree, agreement = n_agree / n_compared,
    first mismatch). ``side_table``: write per-token keep/reason(/weight) with the sequence key and pos to
    this parquet file. ``anchor``: "rollout" or "old"; default the run's meta anchor (else "rollout").
    ``on_batch(batch, mask_result)`` is called for every batch (used by the budget analysis).
    ``rule_metrics=False`` skips evaluating the rule's own metrics (``metrics_by_step`` stays empty).
    ``relative=True``: ``by_position`` bins are t / T in ``n_rel_bins`` equal bins of (0, 1], as
    ``position_stats(relative=True)`` (``bin_start``/``bin_end`` are fractions).
    ``source`` may be a :class:`BatchSet` (:func:`load_batches`) to recompute without re-reading the run.
    """
    params = dict(params or {})
    if anchor is None:
        anchor = run_meta(source).get("anchor") or "rollout"
    from cppo_diag.masks import get_rule  # raises, listing the known rules, on an unknown name

    get_rule(rule)
    acc = _Accumulator(rule, params, bin_width, Path(side_table) if side_table else None, rule_metrics=rule_metrics,
                       relative=relative, n_rel_bins=n_rel_bins)
    try:
        for batch in iter_batches(source, step_range=step_range, progress=progress):
            res = run_rule(batch, rule, params, anchor=anchor, return_internals=return_internals)
            if on_batch is not None:
                on_batch(batch, res)
            acc.add(batch, res, anchor)
    except BaseException as exc:
        acc.close(exc)
        raise
    acc.close()
    return acc.result()


_STEP_SCHEMA = {"step": pl.Int64, "n_valid": pl.Int64, "n_masked": pl.Int64, "n_token": pl.Int64,
                "n_budget": pl.Int64, "n_sequence": pl.Int64, "n_away": pl.Int64, "n_seqs": pl.Int64}


def _summarise(rule, params, step_rows, metric_rows, pos_counter, sign_counts, agree, side_path, bin_width):
    if step_rows:
        raw = pl.DataFrame(step_rows)
        sums = [c for c in raw.columns if c.startswith("n_")]
        by_step = raw.group_by("step").agg(pl.col(sums).sum()).sort("step")
    else:
        by_step = pl.DataFrame(schema=_STEP_SCHEMA)
    by_step = by_step.with_columns(
        masked_frac=pl.col("n_masked") / pl.col("n_valid"),
        budget_share=pl.when(pl.col("n_masked") > 0).then(pl.col("n_budget") / pl.col("n_masked")),
        away_frac=pl.col("n_away") / pl.col("n_valid"),
    )
    tot = {c: int(by_step[c].sum()) for c in by_step.columns if c.startswith("n_")}
    overall = {
        **tot,
        "masked_frac": _frac(tot.get("n_masked", 0), tot.get("n_valid", 0)),
        "budget_share": _frac(tot.get("n_budget", 0), tot.get("n_masked", 0)),
        "away_frac": _frac(tot.get("n_away", 0), tot.get("n_valid", 0)),
        "masked_frac_pos_adv": _frac(sign_counts["pos"][1], sign_counts["pos"][0]),
        "masked_frac_neg_adv": _frac(sign_counts["neg"][1], sign_counts["neg"][0]),
    }
    by_pos = pos_counter.frame(["n_valid", "n_masked", "n_budget", "n_away"]).with_columns(
        pl.col("n_valid", "n_masked", "n_budget", "n_away").cast(pl.Int64)
    ).with_columns(
        masked_frac=pl.when(pl.col("n_valid") > 0).then(pl.col("n_masked") / pl.col("n_valid")),
        budget_share=pl.when(pl.col("n_masked") > 0).then(pl.col("n_budget") / pl.col("n_masked")),
        away_frac=pl.when(pl.col("n_valid") > 0).then(pl.col("n_away") / pl.col("n_valid")),
    )
    by_sign = pl.DataFrame({
        "adv_sign": list(sign_counts),
        "n_valid": [int(v[0]) for v in sign_counts.values()],
        "n_masked": [int(v[1]) for v in sign_counts.values()],
        "n_budget": [int(v[2]) for v in sign_counts.values()],
    }).with_columns(masked_frac=pl.when(pl.col("n_valid") > 0).then(pl.col("n_masked") / pl.col("n_valid")))
    metrics = pl.DataFrame(metric_rows) if metric_rows else pl.DataFrame(schema={"step": pl.Int64})
    agreement = None
    if agree["n_compared"]:
        agreement = {**agree, "agreement": agree["n_agree"] / agree["n_compared"]}
    return RecomputeResult(rule=rule, params=params, overall=overall, by_step=by_step, by_position=by_pos,
                           by_adv_sign=by_sign, metrics_by_step=metrics, agreement=agreement,
                           side_table=side_path, bin_width=bin_width)
