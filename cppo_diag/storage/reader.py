"""Read a run directory: ``open_run(path) -> Run`` and ``list_runs(root)``.

The reader only ever sees whole files (the writer renames temp files into place) and only counts a step's
token shards once that step's ``_done`` marker exists, so it can read a run that is still being written.
Each shard's Parquet footer is checked cheaply (magic bytes + footer parse, cached by size/mtime); a
truncated or corrupt shard is skipped with a warning that names the file. ``Run.batches()`` rebuilds the
padded batches a rule saw (``cppo_diag.storage.batches``).
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from cppo_diag.storage import layout, schema, validate
from cppo_diag.storage.batches import BATCH_COLUMNS, Batch, batches_from_frame
from cppo_diag.storage.meta import RunFormatError, RunMeta, is_run_dir, read_meta


class RunWarning(UserWarning):
    """A part of a run was skipped while reading (the message names the file)."""


_LIVE_STALE_S = 60.0  # heartbeat older than this from another host => not live

# Shards read and checked once in this process (storage.validate): (path, size, mtime_ns, inode) -> ShardFacts.
# Shards are immutable once renamed into place, so a checked file stays checked until it changes.
_VERIFIED: dict[tuple[str, int, int, int], validate.ShardFacts] = {}


class Run:
    """One run directory. Cheap to construct; every method re-lists the directory (live runs grow)."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise RunFormatError(f"not a run: {self.path} is not a directory")
        self.meta: RunMeta = read_meta(self.path)  # validated (storage.meta)
        self.name: str = self.meta.name or self.path.name
        self._footer_cache: dict[Path, tuple[tuple[int, int], object]] = {}
        self._facts: dict[Path, validate.ShardFacts] = {}  # token shards: what storage.validate found
        self._checks: dict | None = None  # RUN/_cache/shard_checks.json, loaded on first use
        self._checks_dirty = False
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, status={self.meta.status!r})"

    # -- liveness / completeness --------------------------------------------------------------------
    @property
    def is_live(self) -> bool:
        """True while some writer of this run is still open (status 'running' and a fresh heartbeat;
        on the same host the heartbeat's process must still exist)."""
        if self._reload_meta().status != "running":
            return False
        live_dir = self.path / layout.LIVE_DIR
        if not live_dir.is_dir():
            return False
        host = socket.gethostname()
        for f in live_dir.glob(layout.HEARTBEAT_GLOB):
            try:
                beat = json.loads(f.read_text())
            except (OSError, ValueError):
                continue
            if beat.get("host") == host:
                try:
                    os.kill(int(beat["pid"]), 0)
                    return True
                except ProcessLookupError:
                    continue
                except (PermissionError, KeyError, ValueError, TypeError):
                    return True
            elif time.time() - float(beat.get("time", 0)) < _LIVE_STALE_S:
                return True
        return False

    def _reload_meta(self) -> RunMeta:
        try:
            self.meta = read_meta(self.path, version=False)
        except RunFormatError:  # being replaced, or broken since open: keep what was read
            pass
        return self.meta

    def _done_pairs(self) -> set[tuple[int, int]]:
        done_dir = self.path / schema.DONE_DIR
        if not done_dir.is_dir():
            return set()
        out = set()
        for f in done_dir.iterdir():
            parsed = layout.parse_done_marker(f.name)
            if parsed:
                out.add(parsed)
        return out

    def completed_steps(self) -> list[int]:
        """Steps with a ``_done`` marker from at least one rank, ascending."""
        return sorted({s for s, _ in self._done_pairs()})

    # -- shard discovery ----------------------------------------------------------------------------
    def _warn(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        warnings.warn(message, RunWarning, stacklevel=3)

    def _check_shard(self, path: Path):
        """Return the file's pyarrow schema, or None (with a warning) if truncated/corrupt."""
        try:
            st = path.stat()
        except OSError as exc:
            self._warn(str(path), f"skipping shard {path}: {exc}")
            return None
        key = (st.st_size, st.st_mtime_ns)
        cached = self._footer_cache.get(path)
        if cached and cached[0] == key:
            return cached[1]
        reason = layout.parquet_footer_ok(path)
        arrow_schema = None
        if reason is None:
            try:
                arrow_schema = pq.read_schema(path)
            except Exception as exc:  # noqa: BLE001 - any parse failure means a corrupt footer
                reason = f"unreadable footer ({exc})"
        if reason is None:
            # A valid footer over corrupt data pages would fail every query later, without naming the file;
            # token shards are also checked against storage.validate's rules (step, duplicate keys, values).
            vkey = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
            if vkey not in _VERIFIED:
                rel = str(path.relative_to(self.path))
                saved = self._saved_checks().get(rel)
                if saved is not None and saved[0] == vkey[1:]:
                    _VERIFIED[vkey] = saved[1]  # checked by an earlier process (RUN/_cache/shard_checks.json)
                else:
                    if path.parent.parent.name == schema.TOKENS_DIR:
                        _VERIFIED[vkey] = validate.inspect_token_shard(path, layout.parse_step_dir(path.parent.name))
                    else:
                        _VERIFIED[vkey] = validate.ShardFacts(reason=layout.verify_parquet_pages(path))
                    self._saved_checks()[rel] = (vkey[1:], _VERIFIED[vkey])
                    self._checks_dirty = True
            facts = _VERIFIED[vkey]
            reason = facts.reason
            self._facts[path] = facts
        if reason is not None:
            what = "corrupt or truncated shard" if reason.startswith(("corrupt", "unreadable", "missing", "file is",
                                                                        "footer", "cannot")) else "shard"
            self._warn(str(path), f"skipping {what} {path}: {reason}")
            self._footer_cache[path] = (key, None)
            return None
        self._footer_cache[path] = (key, arrow_schema)
        return arrow_schema

    def _saved_checks(self) -> dict:
        if self._checks is None:
            self._checks = validate.load_cache(self.path)
            if validate.has_sidecars(self.path):  # the recorder's checks: fold them into one file for later readers
                self._checks_dirty = True
        return self._checks

    def _shards(self, kind: str, include_incomplete: bool) -> list[tuple[Path, object]]:
        out = self._list_shards(kind, include_incomplete)
        if self._checks_dirty:  # new checks: keep them for the next process (best effort)
            self._checks_dirty = False
            live = {str(p.relative_to(self.path)) for p in self.path.glob("*/step=*/*.parquet")}
            validate.save_cache(self.path, {k: v for k, v in self._saved_checks().items() if k in live})
        return out

    def _list_shards(self, kind: str, include_incomplete: bool) -> list[tuple[Path, object]]:
        top = self.path / (schema.TOKENS_DIR if kind == "tokens" else schema.SEQUENCES_DIR)
        if not top.is_dir():
            return []
        done = self._done_pairs()
        live = None
        out = []
        for step_dir in sorted(top.iterdir()):
            step = layout.parse_step_dir(step_dir.name)
            if step is None or not step_dir.is_dir():
                continue
            for f in sorted(step_dir.iterdir()):
                if f.name.startswith(layout.TMP_PREFIX):
                    if live is None:
                        live = self.is_live
                    # Re-check existence: a writer that just finished renamed it (not a leftover).
                    if not live and f.exists():
                        self._warn(str(f), f"ignoring unfinished temp file {f} (a writer stopped mid-write)")
                    continue
                parsed = layout.parse_token_shard(f.name) if kind == "tokens" else layout.parse_sequence_shard(f.name)
                if parsed is None:
                    continue
                rank = parsed[0]
                if not include_incomplete and (step, rank) not in done:
                    if live is None:
                        live = self.is_live
                    if live or not (self.path / schema.DONE_DIR / layout.done_marker_name(step, rank)).exists():
                        if not live:
                            self._warn(
                                str(f),
                                f"ignoring shard {f}: step {step} of rank {rank} was never completed (no _done marker)",
                            )
                        continue
                    # the marker appeared while we were listing: the step completed, read it
                arrow_schema = self._check_shard(f)
                if arrow_schema is not None:
                    out.append((f, arrow_schema))
        if kind == "tokens":
            out = self._check_token_shards(out)
        return out

    def _check_token_shards(self, shards: list[tuple[Path, object]]) -> list[tuple[Path, object]]:
        """Skip shards that repeat another shard's token keys (the later one by name, with a warning) and
        warn once per shard about rows excluded for impossible values (storage.validate)."""
        by_step: dict[Path, list[tuple[Path, object]]] = {}
        for shard in shards:
            by_step.setdefault(shard[0].parent, []).append(shard)
        skip: set[Path] = set()
        for group in by_step.values():
            if len(group) > 1:
                ranges = [(p, self._facts[p].ranges if p in self._facts else None) for p, _ in group]
                for later, (earlier, key) in validate.overlapping_shards(ranges).items():
                    skip.add(later)
                    self._warn(str(later), f"skipping shard {later}: it repeats the tokens of {earlier.name} "
                                           f"(update, rank, seq_id) = {key} (a duplicated shard?)")
        out = []
        for path, arrow_schema in shards:
            if path in skip:
                continue
            facts = self._facts.get(path)
            if facts is not None and facts.bad_rows:
                detail = ", ".join(f"{k}: {v}" for k, v in facts.bad_counts.items())
                self._warn(f"{path}:values", f"excluding {facts.bad_rows} of {facts.rows} rows of {path} with "
                                             f"impossible values ({detail}; a log-prob must be finite and <= 0)")
            out.append((path, arrow_schema))
        return out

    def _bad_value_shards(self, shards) -> set[Path]:
        return {p for p, _ in shards if p in self._facts and self._facts[p].bad_rows}

    # -- tables -------------------------------------------------------------------------------------
    def token_files(self, include_incomplete: bool = False) -> list[Path]:
        """Token shards that would be read (complete steps only unless ``include_incomplete``)."""
        return [p for p, _ in self._shards("tokens", include_incomplete)]

    def tokens(self, *, include_incomplete: bool = False, all_columns: bool = False) -> pl.LazyFrame:
        """All token rows of completed steps as a LazyFrame.

        Columns: the required ones, ``update`` and ``rank`` (0 where a writer did not store them), and
        every optional column present in any shard (null in shards that lack it). ``all_columns=True``
        adds every schema column (typed nulls where never recorded).
        """
        shards = self._shards("tokens", include_incomplete)
        return _scan(shards, schema.TOKEN_COLUMNS, schema.REQUIRED_TOKEN_COLUMNS, ("update", "rank"),
                     all_columns=all_columns, what="token", filter_paths=self._bad_value_shards(shards))

    def sequences(self, *, include_incomplete: bool = False, all_columns: bool = False) -> pl.LazyFrame:
        """Per-sequence rows (prompt/completion text, tokens, reward, length, ...) of completed steps."""
        shards = self._shards("sequences", include_incomplete)
        return _scan(shards, schema.SEQUENCE_COLUMNS, {c: schema.SEQUENCE_COLUMNS[c] for c in schema.REQUIRED_SEQUENCE_COLUMNS},
                     ("rank",), all_columns=all_columns, what="sequence")

    def batches(self, step_range: tuple[int | None, int | None] | None = None, *,
                columns: Sequence[str] | None = None, include_incomplete: bool = False,
                progress: bool = False) -> Iterator[Batch]:
        """The batches the rule saw: one :class:`~cppo_diag.storage.batches.Batch` per (step, update, rank),
        in that order, each the padded (B, T) tensors of the group's responses in ``seq_id`` order
        (``cppo_diag.storage.batches``). ``batch.rule_inputs()`` are the arguments of ``compute_mask``.

        ``step_range``: (lo, hi), inclusive, None for open ends. ``columns``: the token columns to read
        (default ``batches.BATCH_COLUMNS`` that the run has; the required ones must be among them). One step's
        shards are read at a time (memory: one step). ``progress``: a tqdm bar over the steps.
        """
        by_step: dict[int, list] = {}
        for shard in self._shards("tokens", include_incomplete):
            by_step.setdefault(layout.parse_step_dir(shard[0].parent.name), []).append(shard)
        lo, hi = step_range if step_range is not None else (None, None)
        steps = [s for s in sorted(by_step) if (lo is None or s >= lo) and (hi is None or s <= hi)]
        if progress:
            from tqdm.auto import tqdm

            steps = tqdm(steps, desc="steps", unit="step")
        for step in steps:
            lf = _scan(by_step[step], schema.TOKEN_COLUMNS, schema.REQUIRED_TOKEN_COLUMNS, ("update", "rank"),
                       all_columns=False, what="token", filter_paths=self._bad_value_shards(by_step[step]))
            names = lf.collect_schema().names()
            cols = [c for c in (columns or BATCH_COLUMNS) if c in names]
            yield from batches_from_frame(lf.filter(pl.col("step") == step).select(cols).collect())

    def steps(self) -> pl.DataFrame:
        """One row per step: ``step`` plus one column per scalar name (rank 0's value wins on conflicts;
        a step logged again after a resume keeps the latest value)."""
        sdir = self.path / schema.SCALARS_DIR
        rows = []
        order = 0
        family: dict[str, str] = {}  # scalar name -> type of its first value (number, bool or str)
        for f in sorted(sdir.glob("rank*.jsonl")) if sdir.is_dir() else []:
            try:
                lines = f.read_text(encoding="utf-8", errors="replace").splitlines()
            except OSError as exc:
                self._warn(str(f), f"skipping scalars file {f}: {exc}")
                continue
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    self._warn(f"{f}:{i}", f"skipping malformed line {i + 1} of {f} (partial write?)")
                    continue
                step = row.get("step") if isinstance(row, dict) else None
                if isinstance(step, float) and step.is_integer():
                    step = row["step"] = int(step)
                if not isinstance(step, int) or isinstance(step, bool) or step < 0:
                    self._warn(f"{f}:{i}", f"skipping line {i + 1} of {f}: expected a JSON object with 'step' a "
                                           f"non-negative integer, found {line.strip()[:80]!r}")
                    continue
                for name in [k for k in row if k not in ("step", "rank")]:
                    v = row[name]
                    kind = (None if v is None else "bool" if isinstance(v, bool) else
                            "number" if isinstance(v, (int, float)) else "str" if isinstance(v, str) else "other")
                    if kind is None:
                        continue
                    if kind == "other" or family.setdefault(name, kind) != kind:
                        want = family[name] if kind != "other" else "a number, bool or string"
                        self._warn(f"{f}:{i}:{name}", f"line {i + 1} of {f}: scalar '{name}' expected {want}, "
                                                      f"found {v!r:.60}; value skipped")
                        del row[name]
                if not isinstance(row.get("rank", 0), int) or isinstance(row.get("rank"), bool):
                    row.pop("rank")
                row["_order"] = order
                order += 1
                rows.append(row)
        if not rows:
            return pl.DataFrame(schema={"step": pl.Int64})
        df = pl.from_dicts(rows, infer_schema_length=None, strict=False)
        if "rank" not in df.columns:
            df = df.with_columns(pl.lit(0, pl.Int32).alias("rank"))
        names = [c for c in df.columns if c not in ("step", "rank", "_order")]
        # Later writes win, and rank 0 wins over other ranks: sort so those come last, take last non-null.
        df = df.sort(["step", pl.col("rank") == 0, "_order"])
        out = df.group_by("step", maintain_order=True).agg([pl.col(c).drop_nulls().last().alias(c) for c in names])
        return out.with_columns(pl.col("step").cast(pl.Int64)).sort("step")


def _type_family(t) -> str:
    """Coarse family of a pyarrow type: the reader casts within a family (int32 -> Int64), never across."""
    import pyarrow.types as pat

    if pat.is_boolean(t):
        return "bool"
    if pat.is_integer(t):
        return "int"
    if pat.is_floating(t):
        return "float"
    if pat.is_string(t) or pat.is_large_string(t):
        return "str"
    if pat.is_list(t) or pat.is_large_list(t):
        return "list[" + _type_family(t.value_type) + "]"
    return str(t)


def _polars_family(dtype: pl.DataType) -> str:
    if dtype == pl.Boolean:
        return "bool"
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    if dtype == pl.Utf8:
        return "str"
    if isinstance(dtype, pl.List):
        return "list[" + _polars_family(dtype.inner) + "]"
    return str(dtype)


def _scan(shards, dtypes: dict, required: dict, fill_zero: tuple[str, ...], *, all_columns: bool, what: str,
          filter_paths: set | frozenset = frozenset()) -> pl.LazyFrame:
    present: dict[str, pl.DataType] = {}
    for path, arrow_schema in shards:
        names = set(arrow_schema.names)
        missing = [c for c in required if c not in names]
        if missing:
            raise RunFormatError(
                f"{path}: {what} shard is missing required column(s) {missing}; found {sorted(names)}"
            )
        for name in arrow_schema.names:
            if name in dtypes:
                found = arrow_schema.field(name).type
                if _type_family(found) != _polars_family(dtypes[name]):
                    raise RunFormatError(
                        f"{path}: {what} column '{name}' has type {found}; expected {dtypes[name]}"
                    )
                present[name] = dtypes[name]
    columns = list(dtypes) if all_columns else [c for c in dtypes if c in present or c in required or c in fill_zero]
    target = {c: dtypes[c] for c in columns}
    if not shards:
        return pl.LazyFrame(schema=target)
    # Shards written by one writer share a schema; foreign or older shards may lack optional columns or
    # use wider types. Scan each distinct schema once, cast to the schema.py dtypes, insert typed nulls.
    groups: dict[tuple, list[str]] = {}
    for path, arrow_schema in shards:
        # every column in the key: a shard with extra (unknown, newer) columns is scanned apart, and the
        # select below drops those columns (docs/run-format.md, versioning: added optional columns are compatible)
        # shards with rows that break storage.validate's value rule are scanned apart and filtered
        key = (path in filter_paths,) + tuple((f.name, str(f.type)) for f in arrow_schema)
        groups.setdefault(key, []).append(str(path))
    frames = []
    for key, files in groups.items():
        have = {name for name, _ in key[1:] if name in target}
        lf = pl.scan_parquet(files, hive_partitioning=False)
        lf = lf.select([
            (pl.col(c).cast(t) if c in have else pl.lit(None, dtype=t)).alias(c) for c, t in target.items()
        ])
        pred = validate.valid_token_rows(have) if key[0] else None
        frames.append(lf.filter(pred) if pred is not None else lf)
    lf = frames[0] if len(frames) == 1 else pl.concat(frames, how="vertical")
    return lf.with_columns([pl.col(c).fill_null(0) for c in fill_zero if c in target])


def open_run(path: str | os.PathLike) -> Run:
    """Open the run directory ``path`` (raises ``RunFormatError`` if it is not a run of this schema)."""
    return Run(path)


def list_runs(root: str | os.PathLike) -> list[Run]:
    """Runs directly under ``root`` (and ``root`` itself if it is a run), sorted by name.

    Directories that are not runs are ignored; runs with an unreadable meta.json or another schema version
    are skipped with a warning.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"runs root {root} is not a directory")
    candidates = [root] if is_run_dir(root) else []
    candidates += sorted(p for p in root.iterdir() if p.is_dir() and is_run_dir(p))
    runs = []
    for p in candidates:
        try:
            runs.append(Run(p))
        except RunFormatError as exc:
            warnings.warn(f"skipping {p}: {exc}", RunWarning, stacklevel=2)
    return runs
