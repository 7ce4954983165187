"""Which optimiser updates of a step an analysis pools: ``updates="all" | "first" | "after_first" | "lagged"``.

A trainer that takes several optimiser updates per batch (epochs x minibatches) logs every update's tokens
under the same step, with ``update`` = 0, 1, ... (``cppo_diag.storage.schema``). Whether the policy has moved
away from the sampling weights by a token's update is what the run-format column ``lag`` records: the
optimiser steps between the weights that sampled the token and those that computed ``logp``. With on-policy
sampling (staleness 0) update 0 has lag 0: pi differs from mu only by the engine mismatch (sampler vs trainer
numerics), nothing the policy did, and pooling it with the later updates dilutes |pi - mu| and the masked
fraction. With stale rollouts (asynchronous RL; the ``long`` preset samples ten iterations back) update 0
already carries the policy lag of several batches: it is *not* pi = mu. Every position, masked-fraction and
budget analysis therefore takes an ``updates`` filter:

* ``"all"``: every logged update;
* ``"first"``: update 0 only (the first update of each step's batch);
* ``"after_first"``: updates 1, 2, ...;
* ``"lagged"``: the tokens with ``lag`` > 0, i.e. whose policy had moved since sampling (needs ``lag``).

:func:`default_updates` is the default the app, the report and the study use, and it follows the recorded lag:
``"lagged"`` when the run records ``lag`` (for staleness 0 that is exactly "after the first update"; for stale
rollouts it is every update), else ``"after_first"`` when the run logged more than one update in a step (which
assumes on-policy sampling, and the notes say so), else ``"all"``. The pages and figures say which updates they
pool (:func:`updates_note`); ``cppo_diag.analyses.attribution`` splits what moved (engine, lag, update).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import polars as pl

UPDATES = ("all", "first", "after_first", "lagged")
UPDATE_LABELS = {
    "all": "all updates",
    "first": "first update of each batch only",
    "after_first": "updates after the first of each batch",
    "lagged": "tokens the policy had moved on since sampling (lag > 0)",
}


def check_updates(updates: str) -> str:
    """``updates`` itself, or a ValueError naming the field, the expected and the found value."""
    if updates not in UPDATES:
        raise ValueError(f"updates: expected one of {list(UPDATES)}, found {updates!r}")
    return updates


NO_LAG = ("updates='lagged' needs the run-format column 'lag', which this run did not log; "
          "use 'after_first', 'first' or 'all'")


def keeps_update(update: int, updates: str, lag: int | None = None) -> bool:
    """Whether an update index (and, for ``"lagged"``, its batch's lag) passes the ``updates`` filter."""
    check_updates(updates)
    if updates == "lagged":
        if lag is None:
            raise ValueError(NO_LAG)
        return lag > 0
    return updates == "all" or (update == 0) == (updates == "first")


def update_filter(updates: str) -> pl.Expr | None:
    """A polars predicate on the ``update`` (or ``lag``) column (None for ``"all"``: nothing to filter)."""
    check_updates(updates)
    if updates == "all":
        return None
    if updates == "lagged":
        return pl.col("lag") > 0
    return (pl.col("update") == 0) if updates == "first" else (pl.col("update") > 0)


def has_lag(lf: pl.LazyFrame) -> bool:
    """Whether the token frame records the ``lag`` column (with at least one value)."""
    if "lag" not in lf.collect_schema().names():
        return False
    return bool(lf.select(pl.col("lag").is_not_null().any()).collect().item())


def filter_updates(lf: pl.LazyFrame, updates: str) -> pl.LazyFrame:
    """``lf`` restricted to the updates ``updates`` selects (a frame without an ``update`` column is all
    update 0, as ``cppo_diag.analyses.tokens.load_tokens`` fills it). ``"lagged"`` on a frame without ``lag``
    raises ValueError naming the column."""
    pred = update_filter(updates)
    if updates == "lagged" and "lag" not in lf.collect_schema().names():
        raise ValueError(NO_LAG)
    return lf if pred is None else lf.filter(pred)


def _is_batch_set(source: Any) -> bool:
    """``source`` is an ``analyses.recomputation.BatchSet`` (without importing that module, which loads torch:
    an instance exists only once it is imported)."""
    import sys

    mod = sys.modules.get("cppo_diag.analyses.recomputation")
    return mod is not None and isinstance(source, mod.BatchSet)


def max_update(source: Any) -> int:
    """The largest ``update`` index the run logged (0 for an empty run or one update per batch)."""
    from cppo_diag.analyses.tokens import load_tokens

    if _is_batch_set(source):
        return max((b.update for b in source.batches), default=0)
    top = load_tokens(source).select(pl.col("update").max()).collect().item()
    return int(top) if top is not None else 0


def default_updates(source: Any) -> str:
    """``"lagged"`` when the run records ``lag``; else ``"after_first"`` when it logged several updates per
    step; else ``"all"``."""
    from cppo_diag.analyses.tokens import load_tokens

    if not _is_batch_set(source) and has_lag(load_tokens(source)):
        return "lagged"
    return "after_first" if max_update(source) > 0 else "all"


def resolve_updates(source: Any, updates: str | None) -> str:
    """``updates``, or the run's :func:`default_updates` when it is None."""
    return default_updates(source) if updates is None else check_updates(updates)


def updates_note(updates: str) -> str:
    """One sentence saying which updates a table or figure pools, for pages and captions."""
    check_updates(updates)
    if updates == "lagged":
        return ("Pooled over the tokens whose policy had moved since they were sampled (recorded lag > 0): with "
                "on-policy sampling, the updates after the first of each batch; with stale rollouts, every update.")
    if updates == "after_first":
        return ("Pooled over the updates after the first of each batch. In the first update pi differs from mu "
                "by the engine mismatch plus any policy lag of stale rollouts; this run records no lag, so the "
                "split assumes on-policy sampling.")
    if updates == "first":
        return ("Only the first update of each batch: the engine mismatch, plus the policy lag when rollouts "
                "are stale (the Attribution page separates them).")
    return "Pooled over all logged updates."


def select_updates(source: Any, updates: str, *, step_range=None):
    """A token source for the recompute-based analyses (``recompute``, ``recompute_many``,
    ``budget_exhaustion``, ``whatif_sweep``) holding only the updates ``updates`` selects.

    ``"all"`` returns ``source`` unchanged. A ``BatchSet`` is filtered in memory; any other source becomes a
    ``BatchSet`` whose batches are streamed from it (one step in memory at a time) for ``step_range`` only:
    pass the same ``step_range`` to the analysis.
    """
    from cppo_diag.analyses.recomputation import BatchSet, iter_batches
    from cppo_diag.analyses.tokens import _open_run, run_meta

    check_updates(updates)
    if updates == "all":
        return source
    if isinstance(source, BatchSet):
        if updates == "lagged":
            raise ValueError("updates='lagged': an in-memory BatchSet carries no 'lag'; select from the run instead")
        return BatchSet([b for b in source.batches if keeps_update(b.update, updates)], meta=dict(source.meta),
                        name=source.name, step_range=source.step_range)
    if isinstance(source, (str, Path)):
        source = _open_run(Path(source))
    lagged = _lagged_batches(source) if updates == "lagged" else None

    def keep(b) -> bool:
        if lagged is None:
            return keeps_update(b.update, updates)
        return (b.step, b.update, b.rank) in lagged

    class _Streamed(BatchSet):
        """A BatchSet whose ``batches`` are read lazily on each pass (never all held at once)."""

        def __init__(self):  # not the dataclass __init__: ``batches`` is a property here
            self.meta, self.name, self.step_range = run_meta(source), getattr(source, "name", None), step_range

        @property
        def batches(self) -> Iterator:  # type: ignore[override]
            return (b for b in iter_batches(source, step_range=step_range) if keep(b))

    return _Streamed()


def _lagged_batches(source: Any) -> set[tuple[int, int, int]]:
    """The (step, update, rank) batches holding tokens with lag > 0 (the bundled trainer's lag is one value
    per batch: the whole batch was sampled by the same weights)."""
    from cppo_diag.analyses.tokens import load_tokens

    lf = load_tokens(source)
    if "lag" not in lf.collect_schema().names():
        raise ValueError(NO_LAG)
    keys = lf.filter(pl.col("lag") > 0).select("step", "update", "rank").unique().collect()
    return set(keys.iter_rows())


def add_updates_argument(parser, *, default: str = "auto") -> None:
    """``--updates {auto,all,first,after_first,lagged}`` for the analyses commands (auto: the run's default)."""
    parser.add_argument("--updates", choices=["auto", *UPDATES], default=default,
                        help="optimiser updates to pool: all, first (update 0 of each batch), after_first (updates "
                             "1, 2, ...), lagged (tokens with recorded lag > 0: the policy had moved since "
                             "sampling), auto (lagged where the run records lag, else after_first for runs with "
                             f"several updates per batch, else all); default {default}")


def updates_arg(value: str) -> str | None:
    """The ``--updates`` value as the analyses take it (None for auto)."""
    return None if value == "auto" else value
