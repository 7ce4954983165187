"""The background writer: one daemon thread per recorder draining a bounded queue.

The training thread only enqueues (``RunRecorder.log_*``); this thread waits for device copies, builds
Arrow tables, writes each Parquet shard atomically (temp file + ``os.replace``), appends scalars, writes
the ``_done`` markers and a heartbeat file that tells readers the run is live.
"""

from __future__ import annotations

import json
import math
import os
import queue
import socket
import threading
import time
from collections import defaultdict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa

from cppo_diag.capture.staging import (
    BYTE_STREAM_SPLIT_COLUMNS,
    DELTA_COLUMNS,
    PLAIN_COLUMNS,
    STATS_COLUMNS,
    StagedTokens,
    materialize,
)
from cppo_diag.capture.hooks import write_aggregator
from cppo_diag.storage import layout, schema, validate

_STOP = object()


# Codecs the writer accepts (every Parquet reader we use - polars, pyarrow, duckdb - reads all of them).
COMPRESSIONS = ("lz4", "zstd", "snappy", "none")
DEFAULT_COMPRESSION = "lz4"  # measured in benchmarks/bench_capture.py --writer-only (docs/benchmarks.md)


def parquet_write_options(names: list[str], *, compression: str = DEFAULT_COMPRESSION,
                          compression_level: int | None = None) -> dict:
    """Keyword arguments of ``pq.write_table`` for a token shard with columns ``names``.

    Per column (see staging.BYTE_STREAM_SPLIT_COLUMNS / DELTA_COLUMNS / PLAIN_COLUMNS): per-token floats
    BYTE_STREAM_SPLIT, ``pos`` DELTA_BINARY_PACKED, the integer and per-sequence columns PLAIN (runs of equal
    values compress to almost nothing in the page codec, and PLAIN skips dictionary hashing; with zstd
    they stay dictionary + RLE, which zstd packs 1 byte/token smaller), everything else dictionary + RLE. Statistics (min/max, used by readers to skip
    row groups) are written for the key columns only; min/max of per-token floats cost time and no reader
    filters on them. Values are unchanged by any of these choices; only the bytes on disk differ.
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression: expected one of {COMPRESSIONS}, found {compression!r}")
    encoding = {c: "BYTE_STREAM_SPLIT" for c in BYTE_STREAM_SPLIT_COLUMNS if c in names}
    encoding.update({c: "DELTA_BINARY_PACKED" for c in DELTA_COLUMNS if c in names})
    if compression != "zstd":  # zstd squeezes dictionary pages better (6.0 vs 7.0 bytes/token): keep them
        encoding.update({c: "PLAIN" for c in PLAIN_COLUMNS if c in names})
    dictionary = [c for c in names if c not in encoding]
    return dict(
        compression=compression, compression_level=compression_level if compression == "zstd" else None,
        use_dictionary=dictionary, column_encoding=encoding or None,
        write_statistics=[c for c in STATS_COLUMNS if c in names],
    )


def write_parquet_atomic(table: pa.Table, path: Path, *, compression: str = DEFAULT_COMPRESSION,
                         compression_level: int | None = None, fsync: bool = False) -> int:
    """Write ``table`` to ``path`` (per-column encodings, ``parquet_write_options``) via temp + rename;
    return bytes written."""
    opts = parquet_write_options(table.column_names, compression=compression, compression_level=compression_level)
    return layout.atomic_write_parquet(table, path, fsync=fsync, **opts)


def _json_value(v: Any):
    """Scalars -> JSON-safe values; non-finite floats become null (never written as valid numbers)."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return None if isinstance(v, float) and not math.isfinite(v) else v
    raise TypeError(f"expected a number, bool or str, found {type(v).__name__}")


# Writer pool: a (step, update) is split into parts of at least this many rows (one per thread at most).
MIN_PART_ROWS = 8192


def split_by_sequence(table: pa.Table, n_parts: int, min_rows: int) -> list[pa.Table]:
    """Split a shard sorted by ``seq_id`` into at most ``n_parts`` zero-copy slices of >= ~``min_rows``
    rows, cutting only where ``seq_id`` changes, so a sequence never spans two files."""
    n = table.num_rows
    k = min(int(n_parts), n // max(1, int(min_rows)))
    if k <= 1:
        return [table]
    seq = table.column("seq_id").to_numpy()  # (n,) non-decreasing
    cuts = sorted({int(np.searchsorted(seq, seq[(i * n) // k], side="left")) for i in range(1, k)} - {0})
    bounds = [0, *cuts, n]
    return [table.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]





class BackgroundWriter(threading.Thread):
    """Consumes ``(kind, payload)`` messages; errors go to ``on_error(kind, exc, n_records)``.

    With ``threads > 1`` the thread still does everything in message order except encoding and writing
    token shards, which run on a pool of ``threads`` workers (pyarrow releases the GIL while encoding);
    a (step, update) is split at sequence boundaries into up to ``threads`` parts of >= ``MIN_PART_ROWS``
    rows so that even one step at a time keeps several workers busy.
    A step's ``_done`` marker is written only once all its shards are on disk, by whichever of
    ``_reap`` calls (after each message, on idle, on ``flush`` / stop) finds them finished; at most
    ``2 * threads`` shards are in flight, so memory stays bounded.
    """

    def __init__(self, run_dir: Path, *, rank: int, queue_size: int, shard_rows: int,
                 heartbeat_s: float, nonfinite: str, fsync: bool, compression_level: int | None,
                 on_error: Callable[[str, BaseException, int], None],
                 on_warning: Callable[[str, str], None], compression: str = DEFAULT_COMPRESSION,
                 threads: int = 1, aggregates: bool = True):
        super().__init__(name=f"cppo-diag-writer-rank{rank}", daemon=True)
        self.run_dir = Path(run_dir)
        self.dirs = layout.run_dirs(self.run_dir)
        self.rank = int(rank)
        self.q: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self.shard_rows = int(shard_rows)
        self.heartbeat_s = float(heartbeat_s)
        self.nonfinite = nonfinite
        self.fsync = fsync
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression: expected one of {COMPRESSIONS}, found {compression!r}")
        if int(threads) < 1:
            raise ValueError(f"writer_threads: expected an integer >= 1, found {threads!r}")
        self.compression = compression
        self.compression_level = compression_level
        self.threads = int(threads)
        self._pool = (ThreadPoolExecutor(self.threads, thread_name_prefix=f"cppo-diag-encode-rank{rank}")
                      if self.threads > 1 else None)
        # step -> shard futures not yet reaped (pool mode); steps whose end_step arrived, in order
        self._inflight: dict[int, list[Future]] = defaultdict(list)
        self._ended: list[int] = []
        self._shard_cpu = 0.0  # CPU seconds of pool workers (added to cpu_s when reaped)
        self._stats_lock = threading.Lock()
        self._failed_steps: set[int] = set()
        self._seq = 0  # submission counter of pool futures (oldest first)
        self.on_error = on_error
        self.on_warning = on_warning
        self._buffers: dict[tuple[int, int], list[pa.Table]] = defaultdict(list)
        self._buffer_rows: dict[tuple[int, int], int] = defaultdict(int)
        self._token_parts: dict[tuple[int, int], int] = defaultdict(int)
        self._seq_parts: dict[int, int] = {}
        self._last_beat = 0.0
        self.bytes_written = 0
        self.rows_written = 0
        # write-time aggregates (cppo_diag.analyses.aggregate.StepAggregates), created on the first token table
        self.aggregates = bool(aggregates)
        self._agg = None
        self.agg_cpu_s = 0.0  # CPU time of this thread spent on them (benchmarks/bench_scale.py)
        self.busy_s = 0.0  # wall time spent handling messages (for benchmarks/bench_capture.py)
        self.cpu_s = 0.0  # CPU time of this thread spent handling messages

    # -- thread loop ------------------------------------------------------------------------------
    def run(self) -> None:
        self._beat(force=True)
        while True:
            try:
                msg = self.q.get(timeout=self.heartbeat_s)
            except queue.Empty:
                self._reap(block=False)
                self._beat()
                continue
            try:
                if msg is _STOP:
                    self._reap(block=True)
                    if self._pool is not None:
                        self._pool.shutdown(wait=True)
                    return
                kind, payload = msg
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    getattr(self, f"_do_{kind}")(payload)
                except BaseException as exc:  # noqa: BLE001 - reported through on_error, never kills the thread
                    self.on_error(kind, exc, 1)
                if self._pool is not None and kind != "flush":
                    self._reap(block=False)
                self.busy_s += time.perf_counter() - t0
                self.cpu_s += time.thread_time() - c0
                self._beat()
            finally:
                self.q.task_done()

    def _beat(self, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_beat < self.heartbeat_s:
            return
        self._last_beat = now
        try:
            self.dirs["live"].mkdir(parents=True, exist_ok=True)
            layout.atomic_write_json(
                self.dirs["live"] / layout.heartbeat_file_name(self.rank),
                {"pid": os.getpid(), "host": socket.gethostname(), "time": now, "rank": self.rank},
            )
        except OSError:
            pass  # a missing heartbeat only makes the run look not-live

    def remove_heartbeat(self) -> None:
        try:
            (self.dirs["live"] / layout.heartbeat_file_name(self.rank)).unlink()
        except OSError:
            pass

    # -- message handlers -------------------------------------------------------------------------
    def _do_tokens(self, staged: StagedTokens) -> None:
        table = materialize(staged, nonfinite=self.nonfinite)
        for kind, message in staged.warnings:
            self.on_warning(kind, message)
        if staged.dropped_nonfinite:
            self.on_warning("nonfinite-dropped", str(staged.dropped_nonfinite))
        if table is None:
            return
        self._agg_call("add", staged.step, table)
        key = (staged.step, staged.update)
        self._buffers[key].append(table)
        self._buffer_rows[key] += table.num_rows
        if self._pool is None:
            # One thread: a step's updates share a shard (one file per step, not per update: the per-file
            # cost of Parquet dominates small steps); write early only when the step's buffer is full.
            if sum(r for k, r in self._buffer_rows.items() if k[0] == staged.step) >= self.shard_rows:
                self._flush_step(staged.step)
        elif self._buffer_rows[key] >= self.shard_rows:
            self._flush_buffer(key)

    def _key_table(self, key: tuple[int, int]) -> pa.Table | None:
        """Pop the buffered tables of (step, update) as one table in (seq_id, pos) order."""
        tables = self._buffers.pop(key, [])
        self._buffer_rows.pop(key, None)
        if not tables:
            return None
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
        if len(tables) > 1:  # micro-batches may interleave seq_ids; keep the shard in (seq_id, pos) order
            table = table.sort_by([("seq_id", "ascending"), ("pos", "ascending")])
        return table

    def _flush_step(self, step: int) -> None:
        """Write every buffered update of ``step``: one shard (pool mode: per update, see _flush_buffer).

        The shard holds the updates in increasing order, each in (seq_id, pos) order, and is named after
        its first update (``rank{r}-u{first}-{part}``); readers take ``update`` from the column."""
        keys = sorted(k for k in self._buffers if k[0] == step)
        if self._pool is not None:
            for key in keys:
                self._flush_buffer(key)
            return
        tables = [t for t in (self._key_table(k) for k in keys) if t is not None]
        if not tables:
            return
        table = tables[0] if len(tables) == 1 else pa.concat_tables(tables, promote_options="default")
        step_dir = self.dirs["tokens"] / layout.step_dir_name(step)
        step_dir.mkdir(parents=True, exist_ok=True)
        path = self._next_shard_path(keys[0], step_dir)
        self.bytes_written += self._write_shard(table, path)
        self.rows_written += table.num_rows

    def _flush_buffer(self, key: tuple[int, int]) -> None:
        table = self._key_table(key)
        if table is None:
            return
        step, update = key
        step_dir = self.dirs["tokens"] / layout.step_dir_name(step)
        step_dir.mkdir(parents=True, exist_ok=True)
        if self._pool is None:
            path = self._next_shard_path(key, step_dir)
            self.bytes_written += self._write_shard(table, path)
            self.rows_written += table.num_rows
            return
        # Pool: split the (step, update) into up to `threads` parts at sequence boundaries so one big step
        # is encoded by several threads at once (each part is an ordinary shard file).
        for sub in split_by_sequence(table, self.threads, MIN_PART_ROWS):
            path = self._next_shard_path(key, step_dir)
            # Bounded work in flight: wait for the oldest shard when 2 * threads are queued or running.
            while sum(len(f) for f in self._inflight.values()) >= 2 * self.threads:
                oldest = min((f for fs in self._inflight.values() for f in fs if not f.done()), default=None,
                             key=lambda f: f.seq)
                if oldest is None:
                    break
                oldest.exception()  # waits; errors are reported by _reap
                self._reap(block=False)
            try:
                fut = self._pool.submit(self._write_shard_counted, sub, path)
            except RuntimeError:  # interpreter shutdown (closed by atexit): the pool takes no new work
                self.bytes_written += self._write_shard(sub, path)
                self.rows_written += sub.num_rows
                continue
            self._seq += 1
            fut.seq = self._seq
            self._inflight[step].append(fut)

    def _next_shard_path(self, key: tuple[int, int], step_dir: Path) -> Path:
        step, update = key
        part = self._token_parts[key]
        path = step_dir / layout.token_shard_name(self.rank, update, part)
        while path.exists():  # never overwrite a shard written earlier (e.g. by a previous session)
            part += 1
            path = step_dir / layout.token_shard_name(self.rank, update, part)
        self._token_parts[key] = part + 1
        return path

    def _write_shard(self, table: pa.Table, path: Path) -> int:
        n = write_parquet_atomic(table, path, compression=self.compression,
                                 compression_level=self.compression_level, fsync=self.fsync)
        if self.aggregates and path.parent.parent.name == schema.TOKENS_DIR:
            # the reader's integrity checks of this shard, from the table in hand: no reader decodes it again
            try:
                validate.record_check(self.run_dir, path, validate.inspect_token_table(
                    table, layout.parse_step_dir(path.parent.name)))
            except Exception:  # noqa: BLE001 - best effort: the reader checks the shard itself
                pass
        return n

    def _write_shard_counted(self, table: pa.Table, path: Path) -> tuple[int, int]:
        """Pool worker: encode + write one shard; returns (bytes, rows) and accounts its CPU time."""
        c0 = time.thread_time()
        try:
            return self._write_shard(table, path), table.num_rows
        finally:
            with self._stats_lock:
                self._shard_cpu += time.thread_time() - c0

    def _reap(self, *, block: bool) -> None:
        """Pool mode: collect finished shards, and write the ``_done`` marker of every ended step whose
        shards are all on disk (``block=True``: wait for all of them first). A step with a failed shard
        gets no marker (readers and a resume ignore it) and the error goes to ``on_error``."""
        if self._pool is None:
            return
        for step in list(self._inflight):
            futs = self._inflight[step]
            if block:
                for f in futs:
                    f.exception()
            done = [f for f in futs if f.done()]
            for f in done:
                futs.remove(f)
                exc = f.exception()
                if exc is not None:
                    self._failed_steps.add(step)
                    self.on_error("tokens", exc, 1)
                else:
                    nbytes, nrows = f.result()
                    self.bytes_written += nbytes
                    self.rows_written += nrows
            if not futs:
                del self._inflight[step]
        with self._stats_lock:
            self.cpu_s += self._shard_cpu
            self._shard_cpu = 0.0
        for step in list(self._ended):
            if step in self._inflight:
                continue
            self._ended.remove(step)
            if step in self._failed_steps:
                self._failed_steps.discard(step)
                continue
            try:
                self._write_marker(step)
            except BaseException as exc:  # noqa: BLE001
                self.on_error("end_step", exc, 1)

    def _do_end_step(self, step: int) -> None:
        errors = []
        if self._pool is None:
            try:
                self._flush_step(step)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
                self._do_drop_step(step)
        for key in [k for k in self._buffers if k[0] == step]:
            try:
                self._flush_buffer(key)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            # The step is incomplete on disk: no marker, so readers and a resume ignore its shards.
            if self._pool is not None:
                self._failed_steps.add(step)
                self._ended.append(step)
            raise errors[0]
        if self._pool is not None:  # the marker waits for the step's shards (written by _reap)
            self._ended.append(step)
            return
        self._write_marker(step)

    def _write_marker(self, step: int) -> None:
        layout.write_done_marker(self.dirs["done"], step, self.rank, fsync=self.fsync)
        self._agg_call("finish", step)  # after the marker: the shards are safe whatever happens here

    def _agg_call(self, what: str, step: int, *args) -> None:
        """Feed or save the write-time aggregates; any failure (a full disk, ...) warns once and switches
        them off: the tokens are already written and a later view scans the shards instead."""
        if not self.aggregates:
            return
        c0 = time.thread_time()
        try:
            if self._agg is None:
                factory = write_aggregator()
                if factory is None:  # nothing registered: views scan this run's shards
                    self.aggregates = False
                    return
                self._agg = factory(self.run_dir, self.rank)
            getattr(self._agg, what)(step, *args)
        except Exception as exc:  # noqa: BLE001 - never costs a token
            self.aggregates, self._agg = False, None
            self.on_warning("aggregates", f"write-time aggregates switched off at step {step} ({exc!r}); "
                                          "the tokens are written and views scan them instead")
        finally:
            self.agg_cpu_s += time.thread_time() - c0

    def _do_drop_step(self, step: int) -> None:
        if self._agg is not None:
            self._agg.drop(step)
        for key in [k for k in self._buffers if k[0] == step]:
            self._buffers.pop(key, None)
            self._buffer_rows.pop(key, None)

    def _do_scalars(self, payload: tuple[int, dict]) -> None:
        step, values = payload
        row = {"step": int(step), "rank": self.rank}
        for name, v in values.items():
            row[str(name)] = _json_value(v)
        self.dirs["scalars"].mkdir(parents=True, exist_ok=True)
        line = json.dumps(row, allow_nan=False) + "\n"
        path = self.dirs["scalars"] / layout.scalars_file_name(self.rank)
        if not getattr(self, "_scalars_line_ok", False):
            # First append of this session, or the previous one failed (disk full): a torn last line without
            # its newline would swallow this one, so start on a fresh line (the torn one is skipped on read).
            try:
                with open(path, "rb") as fh:
                    fh.seek(-1, os.SEEK_END)
                    if fh.read(1) != b"\n":
                        line = "\n" + line
            except (OSError, ValueError):
                pass  # no file yet, or empty
        self._scalars_line_ok = False
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(line)
        self._scalars_line_ok = True

    def _do_sequences(self, payload: tuple[int, pa.Table]) -> None:
        step, table = payload
        step_dir = self.dirs["sequences"] / layout.step_dir_name(step)
        step_dir.mkdir(parents=True, exist_ok=True)
        part = self._seq_parts.get(step)
        if part is None:
            existing = [layout.parse_sequence_shard(p.name) for p in step_dir.iterdir()]
            part = 1 + max((e[1] for e in existing if e and e[0] == self.rank), default=-1)
        path = step_dir / layout.sequence_shard_name(self.rank, part)
        self._seq_parts[step] = part + 1
        self.bytes_written += write_parquet_atomic(table, path, compression=self.compression,
                                                   compression_level=self.compression_level, fsync=self.fsync)

    def _do_flush(self, event: threading.Event) -> None:
        self._reap(block=True)
        event.set()

    def _do_call(self, fn: Callable[[], None]) -> None:
        fn()

    # -- producer side ----------------------------------------------------------------------------
    def put(self, kind: str, payload: Any, *, block: bool = True, timeout: float | None = None) -> bool:
        """Enqueue a message; False if the queue stayed full (or the thread is gone). Never hangs forever
        on a dead thread: an unbounded wait is done in 1 s slices that check the thread is alive."""
        return self._put((kind, payload), block=block, timeout=timeout)

    def _put(self, item: Any, *, block: bool, timeout: float | None) -> bool:
        if not block or timeout is not None:
            try:
                self.q.put(item, block=block, timeout=timeout)
                return True
            except queue.Full:
                return False
        while self.is_alive():
            try:
                self.q.put(item, timeout=1.0)
                return True
            except queue.Full:
                continue
        return False

    def stop(self, timeout: float | None = None) -> None:
        if self._put(_STOP, block=True, timeout=None):
            self.join(timeout)
