"""Token sources and the per-token quantities every analysis shares.

A *token source* is a run object (anything with ``.tokens()``, e.g. ``cppo_diag.open_run(path)``), a run
directory, a ``pl.LazyFrame`` or a ``pl.DataFrame`` with the columns of
``cppo_diag.storage.schema.TOKEN_COLUMNS``. ``load_tokens`` turns any of them into a LazyFrame whose
``update`` and ``rank`` columns exist (0 when absent), as the reader contract promises.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import polars as pl

from cppo_diag.masks import logratio
from cppo_diag.masks.logratio import LOG_RATIO_CLAMP as LOGRATIO_CLAMP  # SPEC: rho = exp(clamp(log pi - log mu, -20, 20))
from cppo_diag.storage import schema
from cppo_diag.storage.meta import RunMeta, is_run_dir, read_meta


class MissingColumnError(KeyError):
    """An analysis needs a column the run did not log."""

    def __init__(self, column: str, analysis: str, found: Iterable[str]):
        self.column, self.analysis, self.found = column, analysis, sorted(found)
        super().__init__(
            f"{analysis} needs column '{column}', which this run did not log; "
            f"expected '{column}' among the token columns, found {self.found}"
        )

    def __str__(self) -> str:  # KeyError would quote the message
        return self.args[0]


def _open_run(path: Path):
    from cppo_diag.storage import open_run

    return open_run(path)


def load_tokens(source: Any) -> pl.LazyFrame:
    """Token rows of ``source`` as a LazyFrame with ``update`` and ``rank`` filled with 0 when absent."""
    if isinstance(source, pl.LazyFrame):
        lf = source
    elif isinstance(source, pl.DataFrame):
        lf = source.lazy()
    elif hasattr(source, "tokens"):
        lf = source.tokens()
    elif isinstance(source, (str, Path)):
        lf = _open_run(Path(source)).tokens()
    else:
        raise TypeError(
            f"token source: expected a run, a run directory, a pl.LazyFrame or a pl.DataFrame, "
            f"found {type(source).__name__}"
        )
    names = lf.collect_schema().names()
    fill = [pl.lit(0, dtype=schema.OPTIONAL_TOKEN_COLUMNS[c]).alias(c) for c in ("update", "rank") if c not in names]
    return lf.with_columns(fill) if fill else lf


def run_meta(source: Any) -> RunMeta:
    """The run metadata of a run source (``storage.RunMeta``: typed fields with the format's defaults; empty for
    frames and for a path without meta.json). A malformed meta.json is an error naming its field."""
    if hasattr(source, "meta"):
        return RunMeta(source.meta or {})
    if isinstance(source, (str, Path)) and is_run_dir(source):
        return read_meta(source)
    return RunMeta()


def run_name(source: Any, default: str = "run") -> str:
    if getattr(source, "name", None):
        return str(source.name)
    if isinstance(source, (str, Path)):
        return Path(source).name
    return default


def _step_files(run: Any) -> dict[int, list[Path]] | None:
    """step -> token shard files of a run in the standard layout (lets a per-step scan open only that
    step's files). Uses the reader's ``token_files()`` (completed steps, intact shards) when it has one."""
    from cppo_diag.storage import layout

    if hasattr(run, "token_files"):
        paths = [Path(f) for f in run.token_files()]
    else:
        path = getattr(run, "path", None)
        if path is None or not (Path(path) / schema.TOKENS_DIR).is_dir():
            return None
        paths = sorted((Path(path) / schema.TOKENS_DIR).glob("step=*/*.parquet"))
    out: dict[int, list[Path]] = {}
    for f in paths:
        step = layout.parse_step_dir(f.parent.name)
        if step is None:
            return None  # not the standard layout: fall back to filtering the LazyFrame
        out.setdefault(step, []).append(f)
    return out


def _scan_step_files(files: list[Path]) -> pl.LazyFrame:
    from cppo_diag.storage.validate import valid_token_rows

    lf = pl.scan_parquet(files, hive_partitioning=False, missing_columns="insert", extra_columns="ignore")
    valid = valid_token_rows(lf.collect_schema().names())  # impossible values are never averaged in
    return load_tokens(lf.filter(valid) if valid is not None else lf)


def step_lazyframes(source: Any, *, step_range=None) -> list[tuple[int, pl.LazyFrame]]:
    """(step, LazyFrame of that step's tokens) in step order. For a run directory each LazyFrame scans only
    that step's shard files; otherwise it filters the source's LazyFrame."""
    if isinstance(source, (str, Path)):
        source = _open_run(Path(source))
    lo, hi = step_range if step_range is not None else (None, None)
    files = _step_files(source) if not isinstance(source, (pl.LazyFrame, pl.DataFrame)) else None
    if files is not None:
        steps = [s for s in sorted(files) if (lo is None or s >= lo) and (hi is None or s <= hi)]
        return [(s, _scan_step_files(files[s]).filter(pl.col("step") == s)) for s in steps]
    lf = load_tokens(source)
    steps = (filter_tokens(lf, step_range=step_range).select(pl.col("step").unique().sort())
             .collect(engine="streaming")["step"].to_list())
    return [(s, lf.filter(pl.col("step") == s)) for s in steps]


def step_group_lazyframes(source: Any, *, step_range=None, target_rows: int = 2_000_000) -> list[pl.LazyFrame]:
    """Like :func:`step_lazyframes`, but consecutive steps are grouped until a group holds about
    ``target_rows`` rows (from the parquet footers), so runs with many small steps do not pay a scan per
    step. Sequences never span steps, so per-sequence windows stay exact within a group."""
    if isinstance(source, (str, Path)):
        source = _open_run(Path(source))
    files = _step_files(source) if not isinstance(source, (pl.LazyFrame, pl.DataFrame)) else None
    if files is None:
        return [lf for _, lf in step_lazyframes(source, step_range=step_range)]
    import pyarrow.parquet as pq

    lo, hi = step_range if step_range is not None else (None, None)
    groups, cur, rows = [], [], 0
    for s in sorted(files):
        if (lo is not None and s < lo) or (hi is not None and s > hi):
            continue
        cur.append(s)
        rows += sum(pq.ParquetFile(f).metadata.num_rows for f in files[s])
        if rows >= target_rows:
            groups.append(cur)
            cur, rows = [], 0
    if cur:
        groups.append(cur)
    return [_scan_step_files([f for s in g for f in files[s]]).filter(pl.col("step").is_between(g[0], g[-1]))
            for g in groups]


def columns_of(lf: pl.LazyFrame) -> list[str]:
    return lf.collect_schema().names()


def require_columns(lf: pl.LazyFrame, columns: Iterable[str], analysis: str) -> None:
    """Raise :class:`MissingColumnError` for the first of ``columns`` that ``lf`` lacks."""
    found = columns_of(lf)
    for col in columns:
        if col not in found:
            raise MissingColumnError(col, analysis, found)


def filter_tokens(lf: pl.LazyFrame, *, step_range=None, adv_sign: str | None = None) -> pl.LazyFrame:
    """Keep steps in the inclusive ``step_range`` (lo, hi), either end None for open, and tokens with
    advantage sign ``adv_sign`` in {None/"all", "pos" (A > 0), "neg" (A < 0), "zero" (A == 0)}."""
    if step_range is not None:
        lo, hi = step_range
        if lo is not None:
            lf = lf.filter(pl.col("step") >= lo)
        if hi is not None:
            lf = lf.filter(pl.col("step") <= hi)
    if adv_sign in (None, "all"):
        return lf
    cond = {"pos": pl.col("advantage") > 0, "neg": pl.col("advantage") < 0, "zero": pl.col("advantage") == 0}
    if adv_sign not in cond:
        raise ValueError(f"adv_sign: expected one of None, 'all', 'pos', 'neg', 'zero', found {adv_sign!r}")
    return lf.filter(cond[adv_sign])


def divergence_exprs() -> dict[str, pl.Expr]:
    """Per-token divergence expressions (SPEC "Per-token divergence"), computed in float64 from the logged
    float32 log-probs (k3 and small |pi - mu| lose most of their digits to cancellation in float32).

    tv = |pi - mu|, k1 = log pi - log mu (clamped to +-20), abs_logratio = |k1|,
    k3 = rho - 1 - log rho with rho = exp(k1) (the formulas of ``cppo_diag.masks.logratio``).
    """
    lp, lr = pl.col("logp").cast(pl.Float64), pl.col("logp_rollout").cast(pl.Float64)
    k1 = logratio.log_ratio(lp, lr)
    return {
        "tv": logratio.tv(lp, lr),
        "k1": k1,
        "abs_logratio": k1.abs(),
        "k3": logratio.kl_k3(k1),
    }


def direction_expr(logp: str = "logp", logp_anchor: str = "logp_rollout", advantage: str = "advantage") -> pl.Expr:
    """Int8 sign of A * (rho - 1) per token: 1 away from the anchor (SPEC's away test), -1 back toward it, 0
    neither. Evaluated by the rule library (``cppo_diag.masks.away.direction_array``) on the float32
    columns, exactly as the rules evaluate it; a null input gives 0."""
    def fn(cols: list[pl.Series]) -> pl.Series:
        from cppo_diag.masks.away import direction_array

        return pl.Series(direction_array(*(c.cast(pl.Float32).fill_null(float("nan")).to_numpy() for c in cols)))

    return pl.map_batches([advantage, logp, logp_anchor], fn, return_dtype=pl.Int8, is_elementwise=True)


def with_divergences(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Add tv, k1, abs_logratio, k3 and ``away`` (SPEC's away test A * (rho - 1) > 0, by the rule library:
    :func:`direction_expr`) columns."""
    return lf.with_columns(
        *(e.alias(n) for n, e in divergence_exprs().items()),
        away=direction_expr() > 0,
    )
