"""CPPO prefix-budget exhaustion (paper Fig. 7 and beyond), from ``compute_mask(..., return_internals=True)``.

Three tables:

* ``by_step``: per training step, the mean realised delta_b_seq over the step's responses (SPEC Eq. 22),
  the budget-mask share #budget / #masked (Fig. 7), the masked fraction, and the fraction of responses whose
  prefix budget rejected at least one ``away`` token.
* ``first_reject``: per response, the first position where the prefix budget alone rejects an ``away`` token
  (a masked token with reason "budget"), as a Kaplan-Meier survival curve over the 0-based position p:
  survival(p) = P(first budget rejection > p). Responses never rejected are censored at their valid length T
  (observed at positions 0..T-1); ``at_risk(p)`` = responses observed at p with no rejection before p,
  ``events(p)`` = first rejections at p, survival(p) = prod_{p' <= p} (1 - events(p') / at_risk(p')).
* ``slack``: the slack c_t = min(delta, delta + delta_b W_{t-1} - S_{t-1}) (SPEC CPPO step 4) by position bin:
  mean, minimum, fraction of tokens with c_t < 0 (every ``away`` token masked there), mean Z_t = w_t D_t, and
  the fraction of ``away`` tokens masked by the budget.

Every table derives from counts and sums that add (and per-bin minima that merge by ``min``): a result
keeps them in ``raw``, so results over disjoint groups of whole steps merge into the one-pass result
(:func:`merge_budget`). ``engine="local"|"ray"`` splits the steps of a run directory into such groups and
recomputes them in parallel (``cppo_diag.analyses.aggregate.map_tasks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from cppo_diag.analyses.recomputation import Batch, _PosCounter, recompute
from cppo_diag.analyses.tokens import run_meta
from cppo_diag.analyses.updates import resolve_updates, select_updates
from cppo_diag.masks.away import away_test, ratio
from cppo_diag.masks.reasons import Reason

_BY_STEP_SCHEMA = {"step": pl.Int64, "n_valid": pl.Int64, "n_masked": pl.Int64, "n_budget": pl.Int64,
                   "masked_frac": pl.Float64, "budget_share": pl.Float64, "n_resp": pl.Int64,
                   "n_resp_rejected": pl.Int64, "delta_b_mean": pl.Float64, "resp_rejected_frac": pl.Float64}


@dataclass
class BudgetResult:
    by_step: pl.DataFrame
    first_reject: pl.DataFrame
    slack: pl.DataFrame
    overall: dict
    rule: str
    params: dict
    updates: str = "all"
    # the additive state behind the tables (merge_budget): events, censored, slack sums, c_min, counts
    raw: dict | None = None
    # with an engine: which steps were recomputed and which came from the cache (analyses.aggregate.AggregateInfo)
    cache_info: Any = None


def _internal(res, name: str, rule: str) -> np.ndarray:
    internals = getattr(res, "internals", None) or {}
    if name not in internals:
        raise KeyError(
            f"budget_exhaustion needs internal {name!r} from compute_mask({rule!r}, return_internals=True); "
            f"found internals {sorted(internals)}"
        )
    v = internals[name]
    return v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)


class _BudgetAcc:
    def __init__(self, rule: str, bin_width: int, anchor: str = "rollout"):
        self.rule, self.anchor = rule, anchor
        self.slack = _PosCounter(bin_width)
        self.c_min: dict[int, float] = {}
        self.events = np.zeros(0, dtype=np.int64)  # first budget rejection at pos p
        self.censored = np.zeros(0, dtype=np.int64)  # responses never rejected, by valid length T
        self.rows: list[dict] = []

    @staticmethod
    def _grow(arr: np.ndarray, n: int) -> np.ndarray:
        return np.pad(arr, (0, n - len(arr))) if n > len(arr) else arr

    def __call__(self, batch: Batch, res) -> None:
        m = batch.response_mask.numpy()  # (B, T)
        reason = res.reason.detach().cpu().numpy()  # (B, T)
        c = _internal(res, "c", self.rule)  # (B, T)
        z = _internal(res, "Z", self.rule)  # (B, T)
        delta_b = _internal(res, "delta_b", self.rule).reshape(-1)  # (B,)
        rows = m.any(axis=1)
        budget = (reason == Reason.BUDGET) & m
        lengths = m.sum(axis=1)
        has = budget.any(axis=1)
        first = np.where(has, batch.positions[np.arange(m.shape[0]), np.argmax(budget, axis=1)], -1)
        ev = first[rows & has]
        cen = lengths[rows & ~has]
        if len(ev):
            self.events = self._grow(self.events, int(ev.max()) + 1)
            np.add.at(self.events, ev, 1)
        if len(cen):
            self.censored = self._grow(self.censored, int(cen.max()) + 1)
            np.add.at(self.censored, cen, 1)
        self.rows.append({"step": batch.step, "n_resp": int(rows.sum()), "delta_b_sum": float(delta_b[rows].sum()),
                          "n_resp_rejected": int((rows & has).sum())})
        pos = batch.positions[m]
        bins = pos // self.slack.bin_width
        cv, zv = c[m].astype(np.float64), z[m].astype(np.float64)
        anchor_logp = batch.logp_old if self.anchor == "old" and batch.logp_old is not None else batch.logp_rollout
        away = away_test(batch.advantages, ratio(batch.logp, anchor_logp), batch.response_mask).numpy()[m]
        self.slack.add("count", bins)
        self.slack.add("c_sum", bins, cv)
        self.slack.add("n_negative", bins, (cv < 0).astype(np.float64))
        self.slack.add("z_sum", bins, zv)
        self.slack.add("n_away", bins, away.astype(np.float64))
        self.slack.add("n_away_budget", bins, (budget[m] & away).astype(np.float64))
        order = np.argsort(bins, kind="stable")
        ub, starts = np.unique(bins[order], return_index=True)
        mins = np.minimum.reduceat(cv[order], starts) if len(order) else []
        for b, v in zip(ub.tolist(), np.asarray(mins).tolist()):
            self.c_min[b] = min(self.c_min.get(b, np.inf), v)


def _survival(events: np.ndarray, censored: np.ndarray) -> pl.DataFrame:
    n = max(len(events), len(censored) - 1, 0)
    events = np.pad(events, (0, max(0, n - len(events))))
    censored = np.pad(censored, (0, max(0, n + 1 - len(censored))))
    # at_risk(p) = #events at >= p + #censored with T > p (observed at p)
    ev_ge = np.cumsum(events[::-1])[::-1] if n else np.zeros(0)
    cen_gt = np.cumsum(censored[::-1])[::-1][1 : n + 1] if n else np.zeros(0)
    at_risk = (ev_ge + cen_gt).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        hazard = np.where(at_risk > 0, events / np.maximum(at_risk, 1), 0.0)
    return pl.DataFrame({
        "pos": np.arange(n, dtype=np.int64), "at_risk": at_risk, "events": events.astype(np.int64),
        "survival": np.cumprod(1.0 - hazard),
    })


def budget_exhaustion(
    source: Any,
    *,
    params: dict | None = None,
    rule: str = "cppo",
    step_range=None,
    bin_width: int = 64,
    anchor: str | None = None,
    updates: str | None = "all",
    progress: bool = True,
    engine: str | None = None,
    workers: int | None = None,
    ray_address: str | None = None,
    cache: bool = True,
) -> BudgetResult:
    """Budget exhaustion tables of a CPPO-family ``rule`` recomputed over a run (see the module docstring).

    ``params``: keyword parameters of the rule (SPEC names: delta, w_min, delta_b, delta_b_mode, ...);
    default the rule's defaults. ``updates``: "all", "first" or "after_first" (``cppo_diag.analyses.updates``).
    ``engine``: None recomputes in this process, step after step; "local" or "ray" recompute groups of
    whole steps of a run directory (other sources: as None) in ``workers`` processes / Ray tasks (local
    default: one per 256 MB of shards, at most the CPU count) and merge them (:func:`merge_budget`:
    the same tables, sums up to the order of float additions); with ``cache`` each group's state is saved
    beside the run (``cppo_diag.analyses.aggregate.cached_map``), so a growing run is recomputed for its new steps only.
    """
    from cppo_diag.masks import rules_with

    budget_rules = rules_with(prefix_budget=True)  # the rule facts (masks/registry.py), not a list of names
    if rule not in budget_rules:
        raise ValueError(f"rule: budget_exhaustion needs a rule with a prefix budget, expected one of "
                         f"{budget_rules}, found {rule!r}")
    if anchor is None:
        anchor = run_meta(source).get("anchor") or "rollout"
    if engine is not None and _is_run_dir(source):
        return _budget_by_groups(source, dict(params=params, rule=rule, bin_width=bin_width, anchor=anchor,
                                              updates=resolve_updates(source, updates)),
                                 step_range=step_range, engine=engine, workers=workers, ray_address=ray_address,
                                 progress=progress, cache=cache)
    acc = _BudgetAcc(rule, bin_width, anchor)
    updates = resolve_updates(source, updates)
    source = select_updates(source, updates, step_range=step_range)
    rec = recompute(source, rule, params=params, step_range=step_range, bin_width=bin_width, anchor=anchor,
                    return_internals=True, on_batch=acc, rule_metrics=False, progress=progress)
    if acc.rows:
        db = (pl.DataFrame(acc.rows).group_by("step").agg(pl.col("n_resp", "delta_b_sum", "n_resp_rejected").sum())
              .with_columns(delta_b_mean=pl.col("delta_b_sum") / pl.col("n_resp"),
                            resp_rejected_frac=pl.col("n_resp_rejected") / pl.col("n_resp"))
              .drop("delta_b_sum"))
        by_step = rec.by_step.select("step", "n_valid", "n_masked", "n_budget", "masked_frac", "budget_share").join(
            db, on="step", how="left").sort("step")
    else:
        by_step = pl.DataFrame(schema=_BY_STEP_SCHEMA)
    c_min = np.full(len(acc.slack.counts.get("count", ())), np.inf)
    for b, v in acc.c_min.items():
        c_min[b] = v
    raw = {"events": acc.events, "censored": acc.censored, "slack": dict(acc.slack.counts), "c_min": c_min,
           "steps": set(by_step["step"].to_list()),
           "counts": {k: int(v) for k, v in rec.overall.items() if k.startswith("n_")},
           "signs": {r["adv_sign"]: (int(r["n_valid"]), int(r["n_masked"])) for r in rec.by_adv_sign.to_dicts()}}
    return _assemble(by_step, raw, rule=rule, params=dict(params or {}), updates=updates, bin_width=bin_width)


def _frac(num, den) -> float:
    return float(num) / float(den) if den else float("nan")


def _assemble(by_step: pl.DataFrame, raw: dict, *, rule: str, params: dict, updates: str, bin_width: int
              ) -> BudgetResult:
    """The three tables and ``overall`` from ``by_step`` and the additive state ``raw``."""
    slack_counter = _PosCounter(bin_width)
    slack_counter.counts = dict(raw["slack"])
    names = ["count", "c_sum", "n_negative", "z_sum", "n_away", "n_away_budget"]
    slack = slack_counter.frame(names)
    c_min = raw["c_min"]
    slack = slack.with_columns(
        c_min=pl.Series([float(c_min[b]) if b < len(c_min) and np.isfinite(c_min[b]) else None
                         for b in slack["bin"].to_list()], dtype=pl.Float64),
    ).select(
        "bin", "bin_start", "bin_end", pl.col("count").cast(pl.Int64),
        c_mean=pl.col("c_sum") / pl.col("count"), c_min=pl.col("c_min"),
        frac_negative=pl.col("n_negative") / pl.col("count"), z_mean=pl.col("z_sum") / pl.col("count"),
        away_budget_frac=pl.when(pl.col("n_away") > 0).then(pl.col("n_away_budget") / pl.col("n_away")),
    ).filter(pl.col("count") > 0)
    first = _survival(raw["events"], raw["censored"])
    n_resp = int(by_step["n_resp"].sum()) if by_step.height else 0
    tot, signs = raw["counts"], raw["signs"]
    overall = {
        **tot,
        "masked_frac": _frac(tot.get("n_masked", 0), tot.get("n_valid", 0)),
        "budget_share": _frac(tot.get("n_budget", 0), tot.get("n_masked", 0)),
        "away_frac": _frac(tot.get("n_away", 0), tot.get("n_valid", 0)),
        "masked_frac_pos_adv": _frac(signs.get("pos", (0, 0))[1], signs.get("pos", (0, 0))[0]),
        "masked_frac_neg_adv": _frac(signs.get("neg", (0, 0))[1], signs.get("neg", (0, 0))[0]),
        "delta_b_mean": float(by_step["delta_b_mean"].mean()) if by_step.height else float("nan"),
        "resp_rejected_frac": (int(np.sum(raw["events"])) / n_resp) if n_resp else float("nan"),
    }
    return BudgetResult(by_step=by_step, first_reject=first, slack=slack, overall=overall, rule=rule,
                        params=params, updates=updates, raw=raw)


def _add_padded(a: np.ndarray, b: np.ndarray, fill: float = 0.0, op=np.add) -> np.ndarray:
    n = max(len(a), len(b))
    a = np.pad(np.asarray(a, dtype=np.float64 if fill else a.dtype), (0, n - len(a)), constant_values=fill)
    b = np.pad(np.asarray(b, dtype=a.dtype), (0, n - len(b)), constant_values=fill)
    return op(a, b)


def merge_budget(results: list[BudgetResult], *, bin_width: int) -> BudgetResult:
    """One result from results over disjoint groups of whole steps (same rule, parameters and updates):
    counts and sums add, per-bin minima take the minimum, ``by_step`` rows concatenate."""
    results = [r for r in results if r is not None]
    if not results:
        raise ValueError("merge_budget: expected at least one BudgetResult, found none")
    first = results[0]
    raw: dict = {"events": np.zeros(0, np.int64), "censored": np.zeros(0, np.int64), "slack": {},
                 "c_min": np.zeros(0), "counts": {}, "signs": {}, "steps": set()}
    for r in results:
        if (r.rule, r.params, r.updates) != (first.rule, first.params, first.updates):
            raise ValueError(f"merge_budget: expected results of one rule, parameters and updates, found "
                             f"{(first.rule, first.params, first.updates)} and {(r.rule, r.params, r.updates)}")
        if r.raw is None:
            raise ValueError("merge_budget: a result without its raw counts (made by an older version)")
        raw["events"] = _add_padded(raw["events"], r.raw["events"])
        raw["censored"] = _add_padded(raw["censored"], r.raw["censored"])
        for k, v in r.raw["slack"].items():
            raw["slack"][k] = _add_padded(raw["slack"].get(k, np.zeros(0)), v)
        raw["c_min"] = _add_padded(raw["c_min"], r.raw["c_min"], fill=np.inf, op=np.minimum)
        for k, v in r.raw["counts"].items():
            raw["counts"][k] = raw["counts"].get(k, 0) + v
        for k, (n, m) in r.raw["signs"].items():
            n0, m0 = raw["signs"].get(k, (0, 0))
            raw["signs"][k] = (n0 + n, m0 + m)
        raw["steps"] = raw["steps"] | set(r.raw.get("steps", ()))
    by_step = pl.concat([r.by_step for r in results], how="vertical_relaxed").sort("step")
    return _assemble(by_step, raw, rule=first.rule, params=first.params, updates=first.updates, bin_width=bin_width)




def _budget_task(task: tuple) -> BudgetResult:
    path, step_range, kwargs = task
    return budget_exhaustion(path, step_range=step_range, progress=False, **kwargs)


def _budget_by_groups(source: Any, kwargs: dict, *, step_range, engine: str, workers: int | None,
                      ray_address: str | None, progress: bool, cache: bool) -> BudgetResult:
    """``budget_exhaustion`` over groups of whole steps of a run directory, by ``engine``, merged; each
    group's state cached beside the run."""
    import hashlib
    import json
    from pathlib import Path

    from cppo_diag.analyses.aggregate import BlockStore, _local_workers, _run_files, cached_map, map_tasks
    from cppo_diag.analyses.tokens import _open_run

    run = _open_run(Path(source)) if isinstance(source, (str, Path)) else source
    files = _run_files(run)
    lo, hi = step_range if step_range is not None else (None, None)
    steps = [s for s in sorted(files) if (lo is None or s >= lo) and (hi is None or s <= hi)]
    n = _local_workers(files, steps, engine, workers)
    bin_width = kwargs["bin_width"]

    def compute(groups: list[list[int]]) -> list[BudgetResult]:
        tasks = [(str(run.path), (g[0], g[-1]), kwargs) for g in groups]
        parts = map_tasks(_budget_task, tasks, engine=engine, workers=n, ray_address=ray_address,
                          progress="budget" if progress else None)
        for g, part in zip(groups, parts):
            part.raw["steps"] = set(g)  # the group's steps, with or without tokens of the selected updates
        return parts

    spec = {"kind": "budget", "v": 1, **{k: kwargs[k] for k in ("rule", "bin_width", "anchor", "updates")},
            "params": kwargs["params"] or {}}
    key = "budget-" + hashlib.sha1(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]
    store = BlockStore(key=key, load=lambda path: _load_budget(path, bin_width), save=_save_budget,
                       merge=lambda parts: merge_budget(parts, bin_width=bin_width),
                       steps_of=lambda part: set(part.raw["steps"]))
    parts, info = cached_map(run, files, steps, store, compute, n_groups_for=lambda todo: 2 * n, cache=cache)
    if not parts:  # no completed step in the range
        raw = {"events": np.zeros(0, np.int64), "censored": np.zeros(0, np.int64), "slack": {}, "c_min": np.zeros(0),
               "counts": {}, "signs": {}, "steps": set()}
        out = _assemble(pl.DataFrame(schema=_BY_STEP_SCHEMA), raw, rule=kwargs["rule"],
                        params=dict(kwargs["params"] or {}), updates=kwargs["updates"], bin_width=bin_width)
    else:
        out = merge_budget(parts, bin_width=bin_width)
    out.cache_info = info
    return out


def _save_budget(result: BudgetResult, path) -> None:
    """A BudgetResult's additive state and ``by_step`` as one .npz (no pickle)."""
    import json

    from cppo_diag.storage.layout import atomic_replace

    raw = result.raw
    meta = {"rule": result.rule, "params": result.params, "updates": result.updates, "counts": raw["counts"],
            "signs": raw["signs"], "by_step": {c: str(t) for c, t in result.by_step.schema.items()}}
    arrays = {"events": raw["events"], "censored": raw["censored"], "c_min": raw["c_min"],
              "steps": np.array(sorted(raw["steps"]), np.int64),
              "meta": np.frombuffer(json.dumps(meta, default=str).encode(), dtype=np.uint8)}
    arrays.update({f"slack|{k}": v for k, v in raw["slack"].items()})
    for c in result.by_step.columns:
        col = result.by_step[c]
        arrays[f"by_step|{c}"] = col.fill_null(0).to_numpy()
        arrays[f"by_step_valid|{c}"] = col.is_not_null().to_numpy()
    with atomic_replace(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def _load_budget(path, bin_width: int) -> BudgetResult:
    import json

    with np.load(path) as z:
        meta = json.loads(bytes(z["meta"]).decode())
        dtypes = {"Int64": pl.Int64, "Float64": pl.Float64, "Int32": pl.Int32, "UInt32": pl.UInt32}
        by_step = pl.DataFrame({
            c: pl.Series(c, z[f"by_step|{c}"]).cast(dtypes.get(t, pl.Float64)).scatter(
                np.flatnonzero(~z[f"by_step_valid|{c}"]), None)
            for c, t in meta["by_step"].items()})
        raw = {"events": z["events"], "censored": z["censored"], "c_min": z["c_min"],
               "steps": set(z["steps"].tolist()), "counts": meta["counts"],
               "signs": {k: tuple(v) for k, v in meta["signs"].items()},
               "slack": {name.split("|", 1)[1]: z[name] for name in z.files if name.startswith("slack|")}}
    return _assemble(by_step, raw, rule=meta["rule"], params=meta["params"], updates=meta["updates"],
                     bin_width=bin_width)


def _is_run_dir(source: Any) -> bool:
    """Whether ``source`` is a run directory (a path or a reader object with shard files)."""
    from pathlib import Path

    if isinstance(source, (str, Path)):
        return Path(source).is_dir()
    return hasattr(source, "token_files") and hasattr(source, "path")
