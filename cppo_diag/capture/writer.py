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
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from cppo_diag.capture.staging import (
    BYTE_STREAM_SPLIT_COLUMNS,
    DELTA_COLUMNS,
    StagedTokens,
    materialize,
)
from cppo_diag.storage import layout

_STOP = object()


def write_parquet_atomic(table: pa.Table, path: Path, *, compression_level: int | None = None,
                         fsync: bool = False) -> int:
    """Write ``table`` to ``path`` (zstd, per-column encodings) via temp + rename; return bytes written."""
    names = table.column_names
    bss = [c for c in BYTE_STREAM_SPLIT_COLUMNS if c in names]
    delta = [c for c in DELTA_COLUMNS if c in names]
    encoding = {c: "BYTE_STREAM_SPLIT" for c in bss}
    encoding.update({c: "DELTA_BINARY_PACKED" for c in delta})
    dictionary = [c for c in names if c not in encoding]
    with layout.atomic_replace(path) as tmp:
        pq.write_table(
            table, tmp, compression="zstd", compression_level=compression_level,
            use_dictionary=dictionary, column_encoding=encoding or None, write_statistics=True,
        )
        if fsync:
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
        size = os.path.getsize(tmp)
    return size


def _json_value(v: Any):
    """Scalars -> JSON-safe values; non-finite floats become null (never written as valid numbers)."""
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, (int, float)):
        return None if isinstance(v, float) and not math.isfinite(v) else v
    raise TypeError(f"expected a number, bool or str, found {type(v).__name__}")


class BackgroundWriter(threading.Thread):
    """Consumes ``(kind, payload)`` messages; errors go to ``on_error(kind, exc, n_records)``."""

    def __init__(self, run_dir: Path, *, rank: int, queue_size: int, shard_rows: int,
                 heartbeat_s: float, nonfinite: str, fsync: bool, compression_level: int | None,
                 on_error: Callable[[str, BaseException, int], None],
                 on_warning: Callable[[str, str], None]):
        super().__init__(name=f"cppo-diag-writer-rank{rank}", daemon=True)
        self.run_dir = Path(run_dir)
        self.dirs = layout.run_dirs(self.run_dir)
        self.rank = int(rank)
        self.q: queue.Queue = queue.Queue(maxsize=max(1, int(queue_size)))
        self.shard_rows = int(shard_rows)
        self.heartbeat_s = float(heartbeat_s)
        self.nonfinite = nonfinite
        self.fsync = fsync
        self.compression_level = compression_level
        self.on_error = on_error
        self.on_warning = on_warning
        self._buffers: dict[tuple[int, int], list[pa.Table]] = defaultdict(list)
        self._buffer_rows: dict[tuple[int, int], int] = defaultdict(int)
        self._token_parts: dict[tuple[int, int], int] = defaultdict(int)
        self._seq_parts: dict[int, int] = {}
        self._last_beat = 0.0
        self.bytes_written = 0
        self.rows_written = 0
        self.busy_s = 0.0  # wall time spent handling messages (for benchmarks/bench_capture.py)
        self.cpu_s = 0.0  # CPU time of this thread spent handling messages

    # -- thread loop ------------------------------------------------------------------------------
    def run(self) -> None:
        self._beat(force=True)
        while True:
            try:
                msg = self.q.get(timeout=self.heartbeat_s)
            except queue.Empty:
                self._beat()
                continue
            try:
                if msg is _STOP:
                    return
                kind, payload = msg
                t0, c0 = time.perf_counter(), time.thread_time()
                try:
                    getattr(self, f"_do_{kind}")(payload)
                except BaseException as exc:  # noqa: BLE001 - reported through on_error, never kills the thread
                    self.on_error(kind, exc, 1)
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
                self.dirs["live"] / f"rank{self.rank}.json",
                {"pid": os.getpid(), "host": socket.gethostname(), "time": now, "rank": self.rank},
            )
        except OSError:
            pass  # a missing heartbeat only makes the run look not-live

    def remove_heartbeat(self) -> None:
        try:
            (self.dirs["live"] / f"rank{self.rank}.json").unlink()
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
        key = (staged.step, staged.update)
        self._buffers[key].append(table)
        self._buffer_rows[key] += table.num_rows
        if self._buffer_rows[key] >= self.shard_rows:
            self._flush_buffer(key)

    def _flush_buffer(self, key: tuple[int, int]) -> None:
        tables = self._buffers.pop(key, [])
        self._buffer_rows.pop(key, None)
        if not tables:
            return
        step, update = key
        table = pa.concat_tables(tables, promote_options="default")
        if len(tables) > 1:  # micro-batches may interleave seq_ids; keep the shard in (seq_id, pos) order
            table = table.sort_by([("seq_id", "ascending"), ("pos", "ascending")])
        step_dir = self.dirs["tokens"] / layout.step_dir_name(step)
        step_dir.mkdir(parents=True, exist_ok=True)
        part = self._token_parts[key]
        path = step_dir / layout.token_shard_name(self.rank, update, part)
        while path.exists():  # never overwrite a shard written earlier (e.g. by a previous session)
            part += 1
            path = step_dir / layout.token_shard_name(self.rank, update, part)
        self._token_parts[key] = part + 1
        self.bytes_written += write_parquet_atomic(
            table, path, compression_level=self.compression_level, fsync=self.fsync
        )
        self.rows_written += table.num_rows

    def _do_end_step(self, step: int) -> None:
        errors = []
        for key in [k for k in self._buffers if k[0] == step]:
            try:
                self._flush_buffer(key)
            except BaseException as exc:  # noqa: BLE001
                errors.append(exc)
        if errors:
            # The step is incomplete on disk: no marker, so readers and a resume ignore its shards.
            raise errors[0]
        self.dirs["done"].mkdir(parents=True, exist_ok=True)
        marker = self.dirs["done"] / layout.done_marker_name(step, self.rank)
        layout.atomic_write_json(marker, {"step": step, "rank": self.rank, "time": time.time()}, fsync=self.fsync)

    def _do_drop_step(self, step: int) -> None:
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
        with open(self.dirs["scalars"] / layout.scalars_file_name(self.rank), "a", encoding="utf-8") as fh:
            fh.write(line)

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
        self.bytes_written += write_parquet_atomic(table, path, fsync=self.fsync)

    def _do_flush(self, event: threading.Event) -> None:
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
