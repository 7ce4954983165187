"""What a token row must satisfy to be read, and the per-shard facts the reader checks once per shard.

One rule for every reader path (``Run.tokens()``, ``Run.batches()``, the per-step scans of
``cppo_diag.analyses.tokens`` and the aggregates of ``cppo_diag.analyses.aggregate``) and for the recorder,
which refuses (``on_error='raise'``) or drops (``'warn'``) the same values at write time:

* ``logp``, ``logp_rollout``, ``logp_old``, ``logp_behavior``: finite and at most ``LOGP_MAX`` (a log-probability is <= 0; the
  slack absorbs float rounding of log-softmax for tokens of probability ~1);
* ``advantage``: finite.

A row that breaks the rule is excluded (never averaged in) and counted in a warning that names the shard.
A shard is skipped whole, with a warning that names it, when its data pages do not decode, when its ``step``
column disagrees with its ``step=`` directory, when a ``pos`` lies outside ``0..MAX_POS``, or when it repeats a token key ``(update, rank, seq_id,
pos)`` (within itself, or of another shard of the step: a copied or re-written shard).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from cppo_diag.storage import schema

LOGP_MAX = 1e-3  # largest accepted log-probability (nats): probability 1.001, float rounding only
LOGPROB_COLUMNS = ("logp", "logp_rollout", "logp_old", "logp_behavior")
FINITE_COLUMNS = ("advantage",)
KEY_COLUMNS = ("update", "rank", "seq_id", "pos")
MAX_POS = (1 << 24) - 1  # largest accepted token position (16.7M tokens in one response); larger is corrupt


def valid_token_rows(names) -> pl.Expr | None:
    """Polars predicate of the rows that satisfy the rule above (None when ``names`` has none of the
    checked columns)."""
    names = set(names)
    parts = [pl.col(c).is_finite() & (pl.col(c) <= LOGP_MAX) for c in LOGPROB_COLUMNS if c in names]
    parts += [pl.col(c).is_finite() for c in FINITE_COLUMNS if c in names]
    if not parts:
        return None
    expr = parts[0]
    for p in parts[1:]:
        expr = expr & p
    return expr.fill_null(True)  # a null (absent optional value) is not a bad value


def bad_value_counts(df: pl.DataFrame) -> dict[str, int]:
    """``{"logp NaN/inf": n, "logp > 0": n, ...}`` for the rows of ``df`` that break the rule (zeros left out)."""
    exprs = []
    for c in LOGPROB_COLUMNS + FINITE_COLUMNS:
        if c not in df.columns or not df.schema[c].is_float():
            continue  # a column of another type is the reader's type error, not a value error
        exprs.append((~pl.col(c).is_finite()).fill_null(False).sum().alias(f"{c} NaN/inf"))
        if c in LOGPROB_COLUMNS:
            exprs.append((pl.col(c) > LOGP_MAX).fill_null(False).sum().alias(f"{c} > 0"))
    if not exprs:
        return {}
    row = df.select(exprs).row(0, named=True)
    return {k: int(v) for k, v in row.items() if v}


@dataclass
class ShardFacts:
    """What one token shard holds, from one full read (cached by the reader per file version)."""

    reason: str | None = None  # why the whole shard is skipped (None: readable)
    rows: int = 0
    bad_rows: int = 0  # rows that break the value rule (excluded)
    bad_counts: dict = field(default_factory=dict)
    ranges: pl.DataFrame | list | None = None  # (update, rank, seq_id, pos_min, pos_max): cross-shard duplicates
    #                                           (rows when read from the cache: ranges_frame)


def inspect_token_shard(path: Path, dir_step: int | None) -> ShardFacts:
    """Decode every page of the token shard ``path`` (page CRCs verified where written) and check it against
    the rules of the module docstring. ``dir_step``: the step its directory names."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path, page_checksum_verification=True)
        table = pf.read()
    except Exception as exc:  # noqa: BLE001 - any decode failure means corrupt data pages
        return ShardFacts(reason=f"corrupt data pages ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})")
    return inspect_token_table(table, dir_step)


def inspect_token_table(table, dir_step: int | None) -> ShardFacts:
    """The checks of :func:`inspect_token_shard` on a decoded token table (an Arrow table): what a reader
    would find in the shard written from it (the recorder records them as it writes: :func:`record_check`)."""
    try:
        df = pl.from_arrow(table)
    except Exception as exc:  # noqa: BLE001
        return ShardFacts(reason=f"unreadable columns ({type(exc).__name__}: {exc})")
    facts = ShardFacts(rows=df.height)
    if df.height == 0 or any(c not in df.columns or df.schema[c].is_float() != t.is_float()
                             or df.schema[c].is_integer() != t.is_integer()
                             for c, t in schema.REQUIRED_TOKEN_COLUMNS.items()):
        return facts  # the reader names missing or mistyped required columns itself
    # one pass for the row checks, one group_by for the per-sequence ranges (and duplicate keys)
    floats = [c for c in df.columns if df.schema[c].is_float()]
    pred = valid_token_rows(floats)
    row = df.select(
        wrong_step=(pl.col("step") != dir_step).sum() if dir_step is not None else pl.lit(0),
        bad_pos=((pl.col("pos") < 0) | (pl.col("pos") > MAX_POS)).sum(),
        valid=pred.sum() if pred is not None else pl.lit(df.height),
    ).row(0, named=True)
    if row["wrong_step"]:
        found = sorted(df.filter(pl.col("step") != dir_step)["step"].unique().to_list())[:3]
        return ShardFacts(reason=f"its 'step' column holds {found} in {row['wrong_step']} of {df.height} rows, "
                                 f"but its directory says step {dir_step}")
    if row["bad_pos"]:
        first = df.filter((pl.col("pos") < 0) | (pl.col("pos") > MAX_POS))["pos"][0]
        return ShardFacts(reason=f"column 'pos' holds {first} ({row['bad_pos']} rows); expected a position in "
                                 f"0..{MAX_POS}")
    seq_key = [c for c in ("update", "rank", "seq_id") if c in df.columns]
    ranges = df.group_by(seq_key).agg(pos_min=pl.col("pos").min(), pos_max=pl.col("pos").max(),
                                      _n=pl.len(), _unique=pl.col("pos").n_unique())
    dup = ranges.filter(pl.col("_n") != pl.col("_unique"))
    if dup.height:
        first = dup.row(0, named=True)
        n = int((dup["_n"] - dup["_unique"]).sum())
        return ShardFacts(reason=f"{n} rows repeat a token key {tuple(seq_key) + ('pos',)} (first in "
                                 f"{tuple(first[k] for k in seq_key)})")
    facts.ranges = ranges.drop("_n", "_unique")
    facts.bad_rows = int(df.height - row["valid"])
    if facts.bad_rows:
        facts.bad_counts = bad_value_counts(df)
    return facts


def overlapping_shards(ranges: list[tuple[Path, pl.DataFrame]]) -> dict[Path, tuple[Path, tuple]]:
    """Shards of one step that repeat token keys of an earlier shard (in the given order):
    ``{later shard: (earlier shard, (update, rank, seq_id))}``. One self-join of the shards' sequence ranges."""
    ranges = [(p, ranges_frame(r)) for p, r in ranges]
    parts = [r.with_columns(_shard=pl.lit(i, pl.Int64)) for i, (_, r) in enumerate(ranges)
             if r is not None and r.height]
    if len(parts) < 2:
        return {}
    cols = ["update", "rank", "seq_id"]
    parts = [p.with_columns([pl.lit(0, pl.Int64).alias(c) for c in cols if c not in p.columns])
             .select([pl.col(c).cast(pl.Int64) for c in cols + ["pos_min", "pos_max"]] + ["_shard"]) for p in parts]
    allr = pl.concat(parts)
    pairs = (allr.join(allr, on=cols, suffix="_o")
             .filter((pl.col("_shard") > pl.col("_shard_o"))
                     & (pl.col("pos_min") <= pl.col("pos_max_o")) & (pl.col("pos_min_o") <= pl.col("pos_max")))
             .sort(["_shard", "_shard_o"]))
    out: dict[Path, tuple[Path, tuple]] = {}
    for row in pairs.iter_rows(named=True):
        later, earlier = ranges[row["_shard"]][0], ranges[row["_shard_o"]][0]
        if later not in out and earlier not in out:
            out[later] = (earlier, tuple(row[c] for c in cols))
    return out


RANGE_COLUMNS = ("update", "rank", "seq_id", "pos_min", "pos_max")


def ranges_frame(ranges) -> pl.DataFrame | None:
    """A shard's sequence ranges as a frame: the cache keeps them as rows until a step with several shards
    needs them (building thousands of frames would cost seconds per process on a big run)."""
    if ranges is None or isinstance(ranges, pl.DataFrame):
        return ranges
    try:
        return pl.DataFrame(ranges, schema={c: pl.Int64 for c in RANGE_COLUMNS}, orient="row")
    except (TypeError, ValueError, pl.exceptions.PolarsError):  # a damaged cache entry: no duplicate check
        return None


# -- the checks' results beside the run -----------------------------------------------------------------------
CACHE_FILE = "_cache/shard_checks.json"  # inside the run directory; a missing or stale entry is re-checked
_CACHE_VERSION = 1


def facts_to_json(facts: ShardFacts, key: tuple[int, int, int]) -> dict:
    ranges = facts.ranges
    if isinstance(ranges, pl.DataFrame):
        cols = list(RANGE_COLUMNS)
        r = ranges.with_columns([pl.lit(0).alias(c) for c in cols if c not in ranges.columns])
        ranges = r.select(cols).rows()
    return {"key": list(key), "reason": facts.reason, "rows": facts.rows, "bad_rows": facts.bad_rows,
            "bad_counts": facts.bad_counts, "ranges": ranges}


def facts_from_json(entry: dict) -> tuple[tuple[int, int, int], ShardFacts] | None:
    try:
        ranges = entry.get("ranges")  # rows, made a frame only when needed (ranges_frame)
        if ranges is not None and not isinstance(ranges, list):
            raise ValueError("ranges")
        facts = ShardFacts(reason=entry["reason"], rows=int(entry["rows"]), bad_rows=int(entry["bad_rows"]),
                           bad_counts=dict(entry["bad_counts"]), ranges=ranges)
        return tuple(int(k) for k in entry["key"]), facts
    except (KeyError, TypeError, ValueError, pl.exceptions.PolarsError):
        return None  # a damaged entry is simply checked again


SIDECAR_DIR = "_cache/shard_checks.d"  # one small file per shard the recorder wrote and checked as it wrote it
_LOADED: dict[str, tuple[tuple, dict]] = {}  # path -> (file versions, entries): one parse per process


def _sidecar_name(rel: str) -> str:
    return rel.replace("/", "__") + ".json"


def record_check(run_dir: Path, path: Path, facts: ShardFacts) -> None:
    """Keep the checks of a shard just written (``facts``, from :func:`inspect_token_table` on the table it was
    written from) beside the run, keyed by the file's size, mtime and inode like the reader's own checks, so no
    reader has to decode it again. One small file per shard under ``SIDECAR_DIR``; the next reader folds them
    into ``CACHE_FILE``. Best effort: any error leaves the shard to the reader's check."""
    import json

    from cppo_diag.storage import layout

    run_dir, path = Path(run_dir), Path(path)
    st = path.stat()
    rel = str(path.relative_to(run_dir))
    side = run_dir / SIDECAR_DIR
    side.mkdir(parents=True, exist_ok=True)
    layout.atomic_write_bytes(side / _sidecar_name(rel), json.dumps(
        {"shard": rel, **facts_to_json(facts, (st.st_size, st.st_mtime_ns, st.st_ino))},
        separators=(",", ":")).encode())


def _sidecars(run_dir: Path) -> list[Path]:
    side = Path(run_dir) / SIDECAR_DIR
    try:
        return sorted(side.glob("*.json"))
    except OSError:
        return []


def load_cache(run_dir: Path) -> dict[str, tuple[tuple[int, int, int], ShardFacts]]:
    """``{shard path relative to the run: ((size, mtime_ns, inode), facts)}`` from ``RUN/_cache``; {} if none.
    Parsed once per process and file version (a 10^9-token run's file is ~25 MB): the readers of one run
    share the entries, which only ever gain checks of new shard versions."""
    import json

    path = Path(run_dir) / CACHE_FILE
    versions = []
    for f in (path, Path(run_dir) / SIDECAR_DIR):
        try:
            st = f.stat()
            versions.append((st.st_mtime_ns, st.st_size))
        except OSError:
            versions.append(None)
    seen = _LOADED.get(str(path))
    if seen is not None and seen[0] == tuple(versions):
        return seen[1]
    out = {}
    try:
        data = json.loads(path.read_text()) if versions[0] is not None else {}
    except (OSError, ValueError):
        data = {}
    if isinstance(data, dict) and data.get("version") == _CACHE_VERSION and isinstance(data.get("shards"), dict):
        for rel, entry in data["shards"].items():
            parsed = facts_from_json(entry) if isinstance(entry, dict) else None
            if parsed is not None:
                out[rel] = parsed
    for f in _sidecars(run_dir) if versions[1] is not None else []:  # what the recorder checked as it wrote
        try:
            entry = json.loads(f.read_text())
        except (OSError, ValueError):
            continue
        parsed = facts_from_json(entry) if isinstance(entry, dict) and isinstance(entry.get("shard"), str) else None
        if parsed is not None:
            out[entry["shard"]] = parsed
    _LOADED[str(path)] = (tuple(versions), out)
    return out


def has_sidecars(run_dir: Path) -> bool:
    """Checks the recorder kept that no reader has folded into ``CACHE_FILE`` yet."""
    return bool(_sidecars(run_dir))


def save_cache(run_dir: Path, entries: dict[str, tuple[tuple[int, int, int], ShardFacts]]) -> None:
    """Write the checks' results atomically; a read-only run directory just keeps no cache."""
    from cppo_diag.storage import layout

    path = Path(run_dir) / CACHE_FILE
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        layout.atomic_write_bytes(path, __import__("json").dumps(
            {"version": _CACHE_VERSION, "shards": {rel: facts_to_json(f, k) for rel, (k, f) in entries.items()}},
            separators=(",", ":")).encode())
        for f in _sidecars(run_dir):  # folded in now (a sidecar written meanwhile is for a shard not in entries)
            if f.name[: -len(".json")].replace("__", "/") in entries:
                f.unlink(missing_ok=True)
        _LOADED.pop(str(path), None)
    except OSError:
        pass
