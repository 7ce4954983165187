"""Which optimiser updates of a step an analysis pools: ``updates="all" | "first" | "after_first"``.

A trainer that takes several optimiser updates per batch (epochs x minibatches) logs every update's tokens
under the same step, with ``update`` = 0, 1, ... (``cppo_diag.storage.schema``). In update 0 the policy has
not moved yet, so pi = mu up to numerics (exactly, when the sampler and the trainer agree): |pi - mu| is ~0 and
no rule masks anything. Pooling it with the off-policy updates halves mean |pi - mu| and the masked fraction
of a run with two updates per batch. Every position, masked-fraction and budget analysis therefore takes an
``updates`` filter:

* ``"all"``: every logged update;
* ``"first"``: update 0 only (the first update of each step's batch);
* ``"after_first"``: updates 1, 2, ... (the off-policy updates, where the trust region acts).

:func:`default_updates` is the default the app, the report and the study use: ``"after_first"`` when the run
logged more than one update in a step, ``"all"`` otherwise (a run with one update per batch has nothing after
the first). The pages and figures say which updates they pool (:func:`updates_note`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator

import polars as pl

UPDATES = ("all", "first", "after_first")
UPDATE_LABELS = {
    "all": "all updates",
    "first": "first update of each batch only (pi = mu)",
    "after_first": "updates after the first of each batch",
}


def check_updates(updates: str) -> str:
    """``updates`` itself, or a ValueError naming the field, the expected and the found value."""
    if updates not in UPDATES:
        raise ValueError(f"updates: expected one of {list(UPDATES)}, found {updates!r}")
    return updates


def keeps_update(update: int, updates: str) -> bool:
    """Whether an update index passes the ``updates`` filter."""
    check_updates(updates)
    return updates == "all" or (update == 0) == (updates == "first")


def update_filter(updates: str) -> pl.Expr | None:
    """A polars predicate on the ``update`` column (None for ``"all"``: nothing to filter)."""
    check_updates(updates)
    if updates == "all":
        return None
    return (pl.col("update") == 0) if updates == "first" else (pl.col("update") > 0)


def filter_updates(lf: pl.LazyFrame, updates: str) -> pl.LazyFrame:
    """``lf`` restricted to the updates ``updates`` selects (a frame without an ``update`` column is all
    update 0, as ``cppo_diag.analyses.tokens.load_tokens`` fills it)."""
    pred = update_filter(updates)
    return lf if pred is None else lf.filter(pred)


def max_update(source: Any) -> int:
    """The largest ``update`` index the run logged (0 for an empty run or one update per batch)."""
    from cppo_diag.analyses.recomputation import BatchSet
    from cppo_diag.analyses.tokens import load_tokens

    if isinstance(source, BatchSet):
        return max((b.update for b in source.batches), default=0)
    top = load_tokens(source).select(pl.col("update").max()).collect().item()
    return int(top) if top is not None else 0


def default_updates(source: Any) -> str:
    """``"after_first"`` when the run logged several updates per step, else ``"all"``."""
    return "after_first" if max_update(source) > 0 else "all"


def resolve_updates(source: Any, updates: str | None) -> str:
    """``updates``, or the run's :func:`default_updates` when it is None."""
    return default_updates(source) if updates is None else check_updates(updates)


def updates_note(updates: str) -> str:
    """One sentence saying which updates a table or figure pools, for pages and captions."""
    check_updates(updates)
    if updates == "after_first":
        return ("Pooled over the updates after the first of each batch: in the first update pi = mu, so "
                "including it would dilute |pi - mu| and the masked fraction.")
    if updates == "first":
        return "Only the first update of each batch (pi = mu up to numerics)."
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
        return BatchSet([b for b in source.batches if keeps_update(b.update, updates)], meta=dict(source.meta),
                        name=source.name, step_range=source.step_range)
    if isinstance(source, (str, Path)):
        source = _open_run(Path(source))

    class _Streamed(BatchSet):
        """A BatchSet whose ``batches`` are read lazily on each pass (never all held at once)."""

        def __init__(self):  # not the dataclass __init__: ``batches`` is a property here
            self.meta, self.name, self.step_range = run_meta(source), getattr(source, "name", None), step_range

        @property
        def batches(self) -> Iterator:  # type: ignore[override]
            return (b for b in iter_batches(source, step_range=step_range) if keeps_update(b.update, updates))

    return _Streamed()


def add_updates_argument(parser, *, default: str = "auto") -> None:
    """``--updates {auto,all,first,after_first}`` for the analyses commands (auto: the run's default)."""
    parser.add_argument("--updates", choices=["auto", *UPDATES], default=default,
                        help="optimiser updates to pool: all, first (update 0 of each batch, where pi = mu), "
                             "after_first (updates 1, 2, ...), auto (after_first for runs with several updates per "
                             f"batch, else all); default {default}")


def updates_arg(value: str) -> str | None:
    """The ``--updates`` value as the analyses take it (None for auto)."""
    return None if value == "auto" else value
