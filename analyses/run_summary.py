"""Per-run facts from what a run logged, without recomputing any rule: the summary row of the Runs page, the
token count per step (and the recent window of steps that pages recompute by default), and tables of the
trainer's own per-step scalars (reward and accuracy curves, the logged prefix-budget table of CPPO Fig. 7).

Each function takes a ``cppo_diag.storage`` run (``open_run``) or, for the scalar tables, its ``steps()``
frame; the app caches them per run version (``cppo_diag.app.data``).
"""

from __future__ import annotations

from typing import Any

import polars as pl

from cppo_diag import metric_names as M

REWARD_KEYS = (M.REWARD_MEAN, "reward", "train/reward", "rewards/mean")  # first one logged wins
CURVE_PREFIXES = ("reward", "accuracy", "acc", M.EVAL)  # scalars drawn as reward / accuracy curves
CURVE_NAMES = ("correct/mean",)


def format_params(params: dict | None) -> str:
    """``k=v, ...`` in key order ('' when there are none): a run's rule parameters in one cell."""
    if not params:
        return ""
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items()))


def last_reward(steps: pl.DataFrame) -> float | None:
    """The last finite value of the first of ``REWARD_KEYS`` that the per-step scalars hold (None: none)."""
    for key in REWARD_KEYS:
        if key in steps.columns:
            vals = steps.select(pl.col(key).drop_nulls().drop_nans()).to_series()
            if len(vals):
                return float(vals[-1])
    return None


def run_summary(run) -> dict[str, Any]:
    """One row of the Runs page: name, trainer, rule and its parameters, model, task, completed steps, token
    rows, last reward and status ("live" while a writer appends, else meta.json's status or "finished")."""
    meta = run.meta
    return {
        "name": str(meta.name or run.name),
        "trainer": meta.trainer,
        "rule": meta.rule,
        "rule_params": format_params(meta.rule_params),
        "model": meta.model,
        "task": meta.task,
        "steps": len(run.completed_steps()),
        "tokens": int(run.tokens().select(pl.len()).collect().item()),
        "last_reward": last_reward(run.steps()),
        "status": "live" if run.is_live else str(meta.status or "finished"),
    }


def _footer_facts(run) -> tuple[dict[int, int], int] | None:
    """(step -> token rows, largest pos) of a run directory's completed steps from the Parquet footers alone
    (row counts, and the ``step`` / ``pos`` statistics the writers store): no token is read, so the app's
    first view of a 10^8-token run does not wait for a scan. None when a footer lacks what is needed (a
    shard without statistics, or whose ``step`` is not one value): callers then scan."""
    if not callable(getattr(run, "token_files", None)):
        return None
    import pyarrow.parquet as pq

    counts: dict[int, int] = {}
    top = -1
    try:
        for f in run.token_files():
            md = pq.read_metadata(f)
            names = md.schema.names
            i_step, i_pos = names.index("step"), names.index("pos")
            for r in range(md.num_row_groups):
                rg = md.row_group(r)
                if rg.num_rows == 0:
                    continue
                st, sp = rg.column(i_step).statistics, rg.column(i_pos).statistics
                if st is None or sp is None or not (st.has_min_max and sp.has_min_max) or st.min != st.max:
                    return None
                counts[int(st.min)] = counts.get(int(st.min), 0) + rg.num_rows
                top = max(top, int(sp.max))
    except (OSError, ValueError):
        return None
    return dict(sorted(counts.items())), max(top, 0)


def tokens_per_step(run) -> dict[int, int]:
    """step -> number of token rows (from the shards' footers; else one streaming scan of ``step``)."""
    facts = _footer_facts(run)
    if facts is not None:
        return facts[0]
    df = run.tokens().group_by("step").agg(n=pl.len()).collect(engine="streaming")
    return {int(s): int(n) for s, n in df.iter_rows()}


def token_steps(run) -> list[int]:
    """The steps that have token rows, ascending (from the shards' footers; else a scan)."""
    facts = _footer_facts(run)
    if facts is not None:
        return [s for s, n in facts[0].items() if n]
    s = run.tokens().select(pl.col("step").unique().sort()).collect()
    return [int(v) for v in s["step"]]


def max_position(run) -> int:
    """The largest token position of the run (0 without tokens; from the shards' footers, else a scan)."""
    facts = _footer_facts(run)
    if facts is not None:
        return facts[1]
    v = run.tokens().select(max=pl.col("pos").max()).collect().item()
    return int(v) if v is not None else 0


def tokens_in_range(counts: dict[int, int], step_range: tuple[int, int] | None) -> int:
    """Token rows of the steps in ``step_range`` (inclusive; None: every step) from ``tokens_per_step``."""
    lo, hi = step_range if step_range is not None else (None, None)
    return sum(v for s, v in counts.items() if (lo is None or s >= lo) and (hi is None or s <= hi))


def recent_window(counts: dict[int, int], max_tokens: int) -> tuple[int, int] | None:
    """The latest steps whose tokens add up to at most ``max_tokens`` (at least one step; None without
    steps): the default window of the pages that recompute rules, so their first answer comes fast."""
    if not counts:
        return None
    steps = sorted(counts)
    total, lo = 0, steps[-1]
    for s in reversed(steps):
        if total + counts[s] > max_tokens and total > 0:
            break
        total += counts[s]
        lo = s
    return (lo, steps[-1])


def reward_curves(steps: pl.DataFrame) -> pl.DataFrame | None:
    """``step`` and the reward / accuracy scalars of a run's per-step table (names starting with
    ``CURVE_PREFIXES`` or in ``CURVE_NAMES``); None when it logged none."""
    if not steps.height:
        return None
    keep = [c for c in steps.columns if c == "step" or c.startswith(CURVE_PREFIXES) or c in CURVE_NAMES]
    return steps.select(keep) if len(keep) > 1 else None


def logged_budget_by_step(steps: pl.DataFrame, rule: str | None) -> pl.DataFrame | None:
    """CPPO Fig. 7 as the trainer logged it for every step: step, ``delta_b_mean`` (scalar
    ``<rule>/delta_b_mean``) and ``budget_share`` (``mask/<rule>/budget_share``), rows with both values only.
    None unless ``rule`` is of the CPPO family and both scalars were logged."""
    rule = rule or ""
    share_col, db_col = M.mask_name(rule, "budget_share"), M.rule_name(rule, "delta_b_mean")
    if not rule.startswith("cppo") or not {share_col, db_col} <= set(steps.columns):
        return None
    return steps.select("step", pl.col(db_col).alias("delta_b_mean"), pl.col(share_col).alias("budget_share")).drop_nulls()
