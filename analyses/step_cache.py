"""Per-step tables cached beside a run: any analysis whose rows are one per training step, each computed from
that step's tokens alone, is read from blocks of steps under ``RUN/_cache/aggregates/<key>/`` (the block cache
of :func:`cppo_diag.analyses.aggregate.cached_map`: a changed shard or done marker makes its block stale and it
is recomputed; a growing run computes only its new steps). The doctor's series (``analyses.doctor_series``),
the mismatch family by step (``analyses.mismatch``), and the attribution by step and its position strata
(``analyses.attribution``) go through it; the recorder writes their defaults as steps complete
(:class:`StepTables`, ``analyses.aggregate.write_time_tables``).

A block is an ``.npz`` holding the rows as one Parquet payload (dtypes and nulls kept)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import polars as pl

ROWS_PER_GROUP_BYTES = 24 << 20  # shards read per computation: about 2 M tokens, so memory stays bounded
WRITE_MAX_ROWS = 2_000_000  # the writer holds a step's tables up to this many rows (of one rank); beyond, the
#                             step gets no write-time rows and the reader computes them from the shards


def block_key(name: str, **params) -> str:
    """A cache folder name for the analysis ``name`` under ``params`` (JSON-able values)."""
    h = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{name}-{h}" if params else name


def save_rows(rows: pl.DataFrame, path: Path) -> None:
    from cppo_diag.storage.layout import atomic_replace

    buf = io.BytesIO()
    rows.write_parquet(buf, compression="lz4")
    with atomic_replace(Path(path)) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, parquet=np.frombuffer(buf.getvalue(), np.uint8))


def load_rows(path: Path) -> pl.DataFrame:
    with np.load(path, allow_pickle=False) as z:
        return pl.read_parquet(io.BytesIO(z["parquet"].tobytes()))


def _merge(parts: list[pl.DataFrame]) -> pl.DataFrame:
    return pl.concat(parts, how="diagonal_relaxed").sort("step")


def row_store(key: str):
    from cppo_diag.analyses.aggregate import BlockStore

    return BlockStore(key=key, load=load_rows, save=save_rows, merge=_merge,
                      steps_of=lambda rows: set(rows["step"].to_list()))


def cached_step_rows(source: Any, key: str, rows_fn: Callable[[pl.LazyFrame], pl.DataFrame], *,
                     step_range=None, cache: bool = True, progress: bool = False, desc: str = "per-step rows",
                     empty: pl.DataFrame | None = None) -> pl.DataFrame:
    """``rows_fn(tokens)`` (a frame with a ``step`` column, one row per step) over the completed steps of
    ``source`` in ``step_range``, sorted by step. A run directory is computed in groups of whole steps, and
    each group's rows are cached as a block keyed by ``key``; a token frame is computed at once."""
    from cppo_diag.analyses.tokens import _open_run, _scan_step_files, filter_tokens, load_tokens

    if isinstance(source, (str, Path)):
        source = _open_run(Path(source))
    if isinstance(source, (pl.LazyFrame, pl.DataFrame)) or not (hasattr(source, "token_files")
                                                                 and hasattr(source, "path")):
        return rows_fn(filter_tokens(load_tokens(source), step_range=step_range))
    from cppo_diag.analyses.aggregate import _run_files, cached_map

    files = _run_files(source)
    lo, hi = step_range if step_range is not None else (None, None)
    steps = [s for s in sorted(files) if (lo is None or s >= lo) and (hi is None or s <= hi)]

    def compute(groups: list[list[int]]) -> list[pl.DataFrame]:
        from tqdm.auto import tqdm

        out = []
        for g in tqdm(groups, desc=desc, unit="group", disable=not progress):
            lf = _scan_step_files([p for s in g for p in files[s]]).filter(pl.col("step").is_between(g[0], g[-1]))
            out.append(rows_fn(lf))
        return out

    def n_groups_for(todo: list[int]) -> int:
        return max(1, int(sum(p.stat().st_size for s in todo for p in files[s]) // ROWS_PER_GROUP_BYTES))

    # no compaction: the recorder's blocks overlap (a step's own and the aligned 2^k blocks that hold it)
    parts, _ = cached_map(source, files, steps, row_store(key), compute, n_groups_for=n_groups_for, cache=cache,
                          max_blocks=1 << 30)
    parts = [p for p in parts if p.height]
    if not parts:
        return empty if empty is not None else pl.DataFrame(schema={"step": pl.Int64})
    return _merge(parts)


class StepTables:
    """The recorder's write-time half: the background writer's token tables of a step are held (at most
    ``WRITE_MAX_ROWS`` rows) and, once the step's ``_done`` marker is written, each ``tables[key](tokens)`` is
    saved as that step's block under ``key``, the rows a reader would compute from the step's shards (same
    validity filter, same ``update`` / ``rank`` fill), and as part of each aligned block of 2^k steps (k >= 3)
    the step completes. The block's fingerprint hashes this rank's shards and
    marker: a step other ranks also wrote fails the reader's check and is read from the shards. Saving is best
    effort (the writer warns and stops on an error; the tokens are already on disk)."""

    MIN_LEVEL = 3  # as StepAggregates: blocks of 2 and 4 steps are merged in memory only

    def __init__(self, run_dir: Path, rank: int, tables: dict[str, Callable[[pl.LazyFrame], pl.DataFrame]]):
        self.run_dir = Path(run_dir)
        self.rank = int(rank)
        self.tables = dict(tables)
        self._held: dict[int, list | None] = {}
        self._rows: dict[int, int] = {}
        self._levels: dict[str, dict[tuple[int, int], pl.DataFrame]] = {k: {} for k in self.tables}

    def add(self, step: int, table) -> None:
        n = self._rows.get(step, 0) + table.num_rows
        self._rows[step] = n
        if n > WRITE_MAX_ROWS:  # too large to hold: the reader computes this step
            self._held[step] = None
            return
        held = self._held.setdefault(step, [])
        if held is not None:
            held.append(table)

    def drop(self, step: int) -> None:
        self._held.pop(step, None)
        self._rows.pop(step, None)

    def finish(self, step: int) -> int:
        held = self._held.pop(step, None)
        self._rows.pop(step, None)
        if not held:
            return 0
        import pyarrow as pa

        from cppo_diag.analyses.aggregate import save_dyadic, writer_block_path
        from cppo_diag.analyses.tokens import load_tokens
        from cppo_diag.storage.validate import valid_token_rows

        df = pl.from_arrow(pa.concat_tables(held, promote_options="default"))
        valid = valid_token_rows(df.columns)  # impossible values are never averaged in (as the reader)
        tokens = load_tokens(df.lazy().filter(valid) if valid is not None else df.lazy())
        written = 0
        for key, fn in self.tables.items():
            # the step's block, and each aligned block of 2^k steps it completes: a reader merges any step range
            # from a few files (the same dyadic tree as StepAggregates)
            written += save_dyadic(
                self._levels[key], step, fn(tokens), lambda a, b: pl.concat([a, b], how="diagonal_relaxed"),
                lambda rows, lo, hi, key=key: save_rows(rows, writer_block_path(self.run_dir, self.rank, key, lo, hi)),
                self.MIN_LEVEL)
        return written
