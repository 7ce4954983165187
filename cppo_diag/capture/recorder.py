"""``RunRecorder``: record per-token trust-region data from any trainer into a run directory.

Usage::

    from cppo_diag import RunRecorder

    with RunRecorder("runs", name="grpo-qwen", trainer="custom", rule="cppo", config=cfg) as rec:
        for step in range(start, n_steps):
            ...
            rec.log_tokens(step=step, logp=logp, logp_rollout=logp_rollout,   # (B, T) on any device
                           advantages=adv, response_mask=mask)               # (B,), (B, T)
            rec.log_scalars(step, {"reward/mean": reward.mean().item()})
            rec.end_step(step)

Guarantees (see docs/run-format.md):

* **Capture never changes training**: inputs are copied, never modified; with ``on_error="warn"`` (the
  default) no exception from recording reaches the caller - a warning is emitted once per kind and the
  dropped records are counted in ``rec.stats``.
* **No stall**: CUDA tensors are copied with ``non_blocking=True`` into pinned memory and a CUDA event is
  waited on by the writer thread, never by the training thread. Work happens in a background thread fed
  by a bounded queue (``queue_size``; when full the caller blocks, or drops with ``on_full="drop"``).
* **Crash safety**: every file is written to a temp name and renamed; a step's token shards count only once
  its ``_done`` marker exists, so a crash loses at most the steps in flight.
* **Resume**: re-opening a run continues it. Steps already done are skipped (``is_done(step)``; logging
  them warns), and shards/temp files of this rank's unfinished steps are removed.
* **One writer per run and rank**: opening takes ``_live/rank{r}.lock`` (``storage.layout.WriterLock``); a second
  writer gets ``RunLockedError`` naming the holder (pid, host, start time), in either ``on_error`` mode and
  before anything is touched; the lock of a dead process is taken over with a warning.
* **Refusals**: ``step``/``update`` must be non-negative integers, a ``seq_id`` appears once per (step, update),
  ``name`` is one directory name inside ``path``, log-probs are finite and <= 0 (``storage.validate``).
* **Multi-rank**: each rank writes its own shards (``rank`` in file names and column), its own scalars file
  and markers; only rank 0 writes ``meta.json`` (other ranks create it only if it is missing).
* **Scalar sinks** (``sinks=["tensorboard", "wandb"]``, rank 0 only): step scalars are mirrored to TensorBoard /
  W&B from the writer thread (``cppo_diag.capture.sinks``); a failing sink warns once and is switched off.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import os
import threading
import time
import warnings
import weakref
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa

from cppo_diag.capture.sampling import keep_sequences, keep_step
from cppo_diag.capture.sinks import ScalarSinks, check_sink_names
from cppo_diag.capture.staging import (
    CaptureInputError, _is_torch, check_index, materialize, stage_tokens, values_ok,
)
from cppo_diag.capture.writer import COMPRESSIONS, BackgroundWriter
from cppo_diag.storage import layout, schema
from cppo_diag.storage.meta import DEFAULT_ANCHOR, is_run_dir, meta_path, read_meta, write_meta


class RecorderWarning(UserWarning):
    """Something went wrong while recording; training continues (``on_error='warn'``)."""


class RecorderError(RuntimeError):
    """Recording failed in ``on_error='raise'`` mode (the cause is chained)."""


def _utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class RunRecorder:
    """Write one rank's share of a run. See the module docstring and docs/run-format.md.

    Args:
        path: a root directory (with ``name``) or the run directory itself.
        name: run name; the run directory is ``path / name``. Defaults to ``path``'s basename.
        config, trainer, rule, rule_params, model, task, anchor: stored in ``meta.json``.
        rank: data-parallel rank of this process (0 writes ``meta.json``).
        on_error: ``"warn"`` (never raise into training) or ``"raise"`` (raise ``RecorderError`` /
            ``CaptureInputError``; in this mode values are also checked synchronously in ``log_tokens``).
        every_n_steps: record tokens/sequences of steps 0, n, 2n, ... (scalars are recorded every step).
        seq_fraction: keep this fraction of sequences, chosen by a hash of ``(step, seq_id)`` so all updates
            of a step (and ``log_sequences``) keep the same ones.
        resume: continue an existing run (default). ``False`` refuses a directory that already holds a run.
        queue_size: bounded queue length between the training thread and the writer.
        on_full: ``"block"`` (default; back-pressure) or ``"drop"`` (count and drop) when the queue is full.
        shard_rows: buffer a step's tokens (all its updates: one shard per step) until ``end_step`` or this
            many rows before writing a shard (``writer_threads > 1``: per (step, update)).
        heartbeat_s: period of the ``_live/rank{r}.json`` heartbeat that marks the run as live.
        fsync: fsync each shard and marker before renaming (survives power loss, slower).
        compression: Parquet page codec of the shards: ``"lz4"`` (default, fastest to write), ``"zstd"``
            (~4 % smaller, ~1.3x slower to write), ``"snappy"`` or ``"none"``. Readers handle all of them.
        compression_level: zstd level (None = Arrow's default); ignored by the other codecs.
        writer_threads: threads that encode and write token shards (default 1). More help when one
            thread cannot keep up with the trainer (pyarrow releases the GIL while encoding); see
            ``benchmarks/bench_capture.py --writer-only``.
        aggregates: also write each completed step's mergeable position-statistics aggregate and per-step
            rows (the doctor's series, ...) beside the run (``RUN/_cache/aggregates/``,
            ``cppo_diag.analyses.aggregate.WriteTimeAggregates``), so the first ``stats`` / ``doctor`` /
            report / app view merges them instead of scanning the shards; best effort (a failure
            warns and switches them off, never costs a token). The aggregator is the analyses layer's, which
            registers itself when ``cppo_diag.analyses.aggregate`` is imported (the bundled trainer and the
            plug-ins import it; capture imports nothing above it): without it the views scan.
        sinks: also send every step scalar to these (``"tensorboard"``, ``"wandb"``; see
            ``cppo_diag.capture.sinks``), rank 0 only, with ``meta.json`` as config. A sink that fails warns
            once and is switched off, in either ``on_error`` mode; unknown names raise ``ValueError``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        name: str | None = None,
        config: Mapping[str, Any] | None = None,
        trainer: str = "custom",
        rule: str | None = None,
        rule_params: Mapping[str, Any] | None = None,
        model: str | None = None,
        task: str | None = None,
        anchor: str = "rollout",
        rank: int = 0,
        on_error: str = "warn",
        every_n_steps: int = 1,
        seq_fraction: float = 1.0,
        resume: bool = True,
        queue_size: int = 16,
        on_full: str = "block",
        shard_rows: int = 1 << 20,
        heartbeat_s: float = 5.0,
        fsync: bool = False,
        compression_level: int | None = None,
        compression: str = "lz4",
        writer_threads: int = 1,
        aggregates: bool = True,
        sinks: Sequence[str] | None = None,
    ):
        if on_error not in ("warn", "raise"):
            raise ValueError(f"on_error: expected 'warn' or 'raise', found {on_error!r}")
        if on_full not in ("block", "drop"):
            raise ValueError(f"on_full: expected 'block' or 'drop', found {on_full!r}")
        if int(every_n_steps) < 1:
            raise ValueError(f"every_n_steps: expected an integer >= 1, found {every_n_steps!r}")
        if not (0.0 < float(seq_fraction) <= 1.0):
            raise ValueError(f"seq_fraction: expected a number in (0, 1], found {seq_fraction!r}")
        if anchor not in ("rollout", "old"):
            raise ValueError(f"anchor: expected 'rollout' or 'old', found {anchor!r}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression: expected one of {COMPRESSIONS}, found {compression!r}")
        if isinstance(writer_threads, bool) or int(writer_threads) != writer_threads or int(writer_threads) < 1:
            raise ValueError(f"writer_threads: expected an integer >= 1, found {writer_threads!r}")
        sink_names = check_sink_names(sinks)
        self.run_dir = layout.check_run_name(Path(path), name)  # refuses names that escape ``path``
        self.name = name or self.run_dir.name
        if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or int(rank) < 0:
            raise ValueError(f"rank: expected a non-negative integer, found {rank!r}")
        self.rank = int(rank)
        self.on_error = on_error
        self.every_n_steps = int(every_n_steps)
        self.seq_fraction = float(seq_fraction)
        self.on_full = on_full
        self._lock = threading.Lock()
        self._warned: dict[str, int] = {}
        self.stats: dict[str, Any] = {
            "dropped_records": 0,  # log_* calls (or writer messages) lost to errors / full queue
            "dropped_sequences_nonfinite": 0,
            "skipped_done_steps": 0,
            "warnings": self._warned,  # kind -> number of occurrences (each kind is warned once)
            # filled by close(): writer_busy_s, writer_cpu_s, bytes_written, rows_written
        }
        self._error: BaseException | None = None  # first writer error, re-raised in raise mode
        self._closed = False
        self._inert = False  # warn mode: opening failed, behave like NullRecorder
        self._done_before: set[int] = set()  # steps complete on disk when this session opened
        self._done: set[int] = set()  # + steps ended in this session
        self._open_steps: set[int] = set()  # steps with data logged but not yet ended
        self._writer: BackgroundWriter | None = None
        self._sinks: ScalarSinks | None = None
        self._writer_lock: layout.WriterLock | None = None
        self._seen_seq_ids: dict[tuple[int, int], set[int]] = {}  # (step, update) -> seq_ids logged (open steps)
        self._meta_fields = dict(
            name=self.name, trainer=trainer, rule=rule, rule_params=dict(rule_params or {}), model=model,
            task=task, anchor=anchor, config=dict(config or {}),
        )
        try:
            self._open(resume=resume)
        except layout.RunLockedError:
            raise  # in both modes: a second writer must not start (it would mix the run); nothing recorded yet
        except Exception as exc:
            if self._writer_lock is not None:
                self._writer_lock.release()
            if on_error == "raise":
                raise
            self._inert = True
            self._warn("open", f"cannot open run directory {self.run_dir}: {exc!r}; recording is disabled")
            return
        self._writer = BackgroundWriter(
            self.run_dir, rank=self.rank, queue_size=queue_size, shard_rows=shard_rows,
            heartbeat_s=heartbeat_s, nonfinite="raise" if on_error == "raise" else "drop",
            fsync=fsync, compression_level=compression_level, compression=compression,
            threads=int(writer_threads), on_error=self._writer_error, on_warning=self._writer_warning,
            aggregates=aggregates,
        )
        self._writer.start()
        if sink_names and self.rank == 0:
            meta = dict(read_meta(self.run_dir, version=False))
            self._sinks = ScalarSinks(sink_names, self.run_dir, meta, warn=self._warn) or None
        ref = weakref.ref(self)
        self._atexit = lambda: (ref() is not None and ref().close())
        atexit.register(self._atexit)

    # -- construction helpers -----------------------------------------------------------------------
    @staticmethod
    def disabled() -> "NullRecorder":
        """A recorder that records nothing (same methods, all no-ops)."""
        from cppo_diag.capture.null import NullRecorder

        return NullRecorder()

    def _open(self, *, resume: bool) -> None:
        dirs = layout.run_dirs(self.run_dir)
        existing = None
        # Before anything is read or cleaned up: one writer per (run, rank). A second one is refused naming
        # the holder; a lock left by a dead process is taken over (and said so).
        self._writer_lock = layout.WriterLock(self.run_dir, f"rank{self.rank}").acquire()
        if self._writer_lock.stale:
            self._warn("stale-lock", f"took over the writer lock of rank {self.rank} in {self.run_dir} left by "
                                     f"pid {self._writer_lock.stale.get('pid')} on "
                                     f"{self._writer_lock.stale.get('host')!r} (no longer running)")
        if is_run_dir(self.run_dir):
            existing = read_meta(self.run_dir, version=False)
            # Only rank 0 refuses an existing run: other ranks join the run rank 0 (re)creates, and rank 0
            # accepts a meta.json that another rank of this launch created moments earlier.
            if not resume and self.rank == 0 and existing.get("created_by_rank", 0) == 0:
                raise FileExistsError(
                    f"run directory {self.run_dir} already holds a run (meta.json); pass resume=True to "
                    "continue it or choose another name"
                )
            found = existing.schema_version
            if found != schema.SCHEMA_VERSION:
                raise ValueError(f"meta.json schema_version: expected {schema.SCHEMA_VERSION}, found {found!r} in "
                                 f"{meta_path(self.run_dir)}")
        for key in ("tokens", "sequences", "scalars", "done"):
            dirs[key].mkdir(parents=True, exist_ok=True)
        self._write_meta(existing, status="running")
        self._cleanup_unfinished(dirs)

    def _write_meta(self, existing: dict | None, *, status: str) -> None:
        meta = dict(existing or {})
        if not existing:
            meta.update(self._meta_fields)
            meta["created"] = _utc_now()
        else:  # resume: fill what this session knows, keep what it does not (defaults never override)
            defaults = {"trainer": "custom", "anchor": DEFAULT_ANCHOR}
            for k, v in self._meta_fields.items():
                if k not in meta or (v not in (None, {}) and v != defaults.get(k)):
                    meta[k] = v
        meta["schema_version"] = schema.SCHEMA_VERSION
        meta["status"] = status
        meta["updated"] = _utc_now()
        if self.rank == 0:
            meta.pop("created_by_rank", None)
            write_meta(self.run_dir, meta)
        elif not is_run_dir(self.run_dir):
            meta["created_by_rank"] = self.rank
            # Another rank may race us; link() fails if rank 0 got there first, so we never clobber it.
            # write_meta(exclusive_tag=...) never clobbers rank 0's file. The temp name carries the rank
            # ('.tmp-meta.json.rank1.<pid>.<hex>'): rank 0's resume cleanup removes only its own meta temps.
            write_meta(self.run_dir, meta, exclusive_tag=f"rank{self.rank}")

    def _owned_by_me(self, name: str) -> bool:
        """Is this file name (or the target of this temp file) written by this rank?"""
        if name.startswith(layout.TMP_PREFIX):
            name = name[len(layout.TMP_PREFIX):].rsplit(".", 2)[0]
            if name == schema.META_FILE:
                return self.rank == 0
        parsed = layout.parse_token_shard(name) or layout.parse_sequence_shard(name)
        if parsed:
            return parsed[0] == self.rank
        parsed = layout.parse_done_marker(name)
        if parsed:
            return parsed[1] == self.rank
        return name in (layout.heartbeat_file_name(self.rank), layout.scalars_file_name(self.rank))

    def _cleanup_unfinished(self, dirs: dict[str, Path]) -> None:
        """Resume: load this rank's done steps; remove its temp files and shards of unfinished steps."""
        for p in dirs["done"].iterdir():
            parsed = layout.parse_done_marker(p.name)
            if parsed and parsed[1] == self.rank:
                self._done_before.add(parsed[0])
        self._done = set(self._done_before)
        removed = []
        for p in [self.run_dir, *(d for d in dirs.values() if d.is_dir())]:
            for f in p.iterdir():
                if f.is_file() and f.name.startswith(layout.TMP_PREFIX) and self._owned_by_me(f.name):
                    f.unlink(missing_ok=True)
                    removed.append(f)
        for top in (dirs["tokens"], dirs["sequences"]):
            for step_dir in top.iterdir():
                step = layout.parse_step_dir(step_dir.name)
                if step is None or not step_dir.is_dir():
                    continue
                # Step directories stay, even empty: another rank may have just created one to write into.
                for f in step_dir.iterdir():
                    mine = self._owned_by_me(f.name)
                    if mine and (f.name.startswith(layout.TMP_PREFIX) or step not in self._done):
                        f.unlink(missing_ok=True)
                        removed.append(f)
        if removed:
            self._warn(
                "resume-cleanup",
                f"resuming {self.run_dir}: removed {len(removed)} temp/unfinished file(s) of rank {self.rank} "
                f"(e.g. {removed[0].relative_to(self.run_dir)})",
            )

    # -- error policy -------------------------------------------------------------------------------
    def _warn(self, kind: str, message: str, stacklevel: int = 3) -> None:
        with self._lock:
            n = self._warned.get(kind, 0)
            self._warned[kind] = n + 1
        if n == 0:
            warnings.warn(f"cppo-diag recorder ({kind}): {message}", RecorderWarning, stacklevel=stacklevel)

    def _fail(self, kind: str, exc: BaseException, n_records: int = 1) -> None:
        """Handle an error raised while recording: raise (raise mode) or warn once + count (warn mode)."""
        with self._lock:
            self.stats["dropped_records"] += n_records
        if self.on_error == "raise":
            if isinstance(exc, (CaptureInputError, RecorderError, FileExistsError)):
                raise exc
            raise RecorderError(f"recording failed in {kind}: {exc}") from exc
        self._warn(kind, f"{type(exc).__name__}: {exc} (dropped; further '{kind}' errors are counted in rec.stats)")

    def _writer_error(self, kind: str, exc: BaseException, n_records: int) -> None:
        with self._lock:
            self.stats["dropped_records"] += n_records
            if self.on_error == "raise" and self._error is None:
                self._error = exc
        if self.on_error == "warn":
            self._warn(f"writer/{kind}", f"{type(exc).__name__}: {exc} (dropped)")

    def _writer_warning(self, kind: str, message: str) -> None:
        if kind == "nonfinite-dropped":  # a count, not a message: sequences dropped for NaN/Inf
            with self._lock:
                self.stats["dropped_sequences_nonfinite"] += int(message)
            return
        self._warn(kind, message)

    def _raise_pending(self) -> None:
        if self._error is not None and self.on_error == "raise":
            exc, self._error = self._error, None
            if isinstance(exc, CaptureInputError):
                raise exc
            raise RecorderError(f"background writer failed: {exc}") from exc

    def _active(self) -> bool:
        if self._inert:
            return False
        if self._closed:
            self._warn("closed", "recorder is closed; call ignored")
            return False
        self._raise_pending()
        return True

    def _skip_done(self, step: int, done: set[int], why: str) -> bool:
        """True (counted, warned once) when ``step`` is in ``done``: the caller skips the record."""
        if step not in done:
            return False
        with self._lock:
            self.stats["skipped_done_steps"] += 1
        self._warn("done-step", f"step {step} {why}", stacklevel=4)  # point at the trainer's log_* call
        return True

    def _enqueue(self, kind: str, payload: Any) -> None:
        if self.on_full == "block":
            # Wait in slices so a writer thread that died can never hang the training loop.
            while self._writer.is_alive():
                if self._writer.put(kind, payload, block=True, timeout=1.0):
                    return
            raise RecorderError("the background writer thread is not running")
        if not self._writer.put(kind, payload, block=False):
            with self._lock:
                self.stats["dropped_records"] += 1
            self._warn("queue-full", f"writer queue full; dropped a '{kind}' record")

    def _check_seq_ids(self, kind: str, step: int, update: int, seq_ids, n_seqs: int) -> None:
        """Refuse a seq_id logged twice for one (step, update) of this rank, within a call or across calls of
        an open step: ``seq_id`` names one response (docs/run-format.md) and a recompute refuses duplicates.
        seq_ids on a GPU are checked in ``on_error='raise'`` mode only (reading them back costs a sync)."""
        if seq_ids is None:
            ids = np.arange(n_seqs, dtype=np.int64)
        elif _is_torch(seq_ids):
            if seq_ids.device.type != "cpu" and self.on_error != "raise":
                return
            ids = seq_ids.detach().cpu().numpy().reshape(-1)
        else:
            ids = np.asarray(seq_ids).reshape(-1)
        uniq, counts = np.unique(ids, return_counts=True)
        where = f"step {step}" + (f" update {update}" if kind == "tokens" else "")
        if (counts > 1).any():
            raise CaptureInputError(f"seq_ids: seq_id {int(uniq[counts > 1][0])} appears "
                                    f"{int(counts[counts > 1][0])} times in one {kind} call ({where}); "
                                    "expected one id per response")
        seen = self._seen_seq_ids.setdefault((kind, step, update), set())
        again = seen.intersection(uniq.tolist())
        if again:
            raise CaptureInputError(f"seq_ids: seq_id {min(again)} was already logged for {where} of rank "
                                    f"{self.rank} (an earlier {kind} call); expected each response once per "
                                    "update (pass distinct seq_ids for micro-batches)")
        seen.update(uniq.tolist())

    # -- public API ---------------------------------------------------------------------------------
    def is_done(self, step: int) -> bool:
        """True when ``step`` is complete for this rank (on disk at open, or ended in this session)."""
        return int(step) in self._done

    def log_tokens(self, *, step: int, logp, logp_rollout, advantages, response_mask=None, cu_seqlens=None,
                   update: int = 0, seq_ids=None, logp_old=None, keep_applied=None, reason_applied=None,
                   token_ids=None, entropy=None, reward=None, group_id=None, topk_ids=None,
                   topk_logp_rollout=None, topk_logp=None, loss_weight=None, logp_behavior=None, lag=None,
                   fork=None) -> None:
        """Record one batch of per-token data (see docs/run-format.md for the columns).

        Shapes: padded ``logp``/``logp_rollout`` ``(B, T)`` + ``response_mask`` ``(B, T)`` (default: all
        valid), or packed ``(N,)`` + ``cu_seqlens`` ``(B+1,)``. ``advantages``/``reward``: ``(B,)`` or per
        token; ``seq_ids``/``group_id``: ``(B,)`` (``seq_ids`` default ``0..B-1``); ``logp_old``,
        ``entropy``, ``token_ids``, ``keep_applied``, ``reason_applied``, ``loss_weight``, ``logp_behavior``,
        ``fork``: per token; ``lag`` (optimiser steps, >= 0): ``(B,)`` or per token; ``topk_*``: per token
        plus a trailing K axis. Torch tensors on any device or numpy arrays.
        """
        if not self._active():
            return
        try:
            step = check_index("step", step)
            update = check_index("update", update)
            if not keep_step(step, self.every_n_steps):
                return
            if self._skip_done(step, self._done, f"is already complete in {self.run_dir}; log_tokens skipped"):
                return
            staged = stage_tokens(
                step=step, update=update, rank=self.rank, seq_fraction=self.seq_fraction,
                response_mask=response_mask, cu_seqlens=cu_seqlens, seq_ids=seq_ids,
                logp=logp, logp_rollout=logp_rollout, advantages=advantages, logp_old=logp_old,
                keep_applied=keep_applied, reason_applied=reason_applied, token_ids=token_ids,
                entropy=entropy, reward=reward, group_id=group_id, topk_ids=topk_ids,
                topk_logp_rollout=topk_logp_rollout, topk_logp=topk_logp, loss_weight=loss_weight,
                logp_behavior=logp_behavior, lag=lag, fork=fork,
            )
            if self.on_error == "raise":
                # Check values now so the error surfaces at the call that caused it (costs a host sync).
                # values_ok: one fused pass per float tensor; the full build only when it cannot prove
                # the values fine (so the error raised is materialize's, naming column, seq and pos).
                if not values_ok(staged):
                    materialize(_shallow_copy(staged), nonfinite="raise")
            self._check_seq_ids("tokens", step, update, seq_ids, staged.n_seqs)
            # A later step implies the trainer finished the earlier ones.
            for s in sorted(x for x in self._open_steps if x < step):
                self.end_step(s)
            self._open_steps.add(step)
            self._enqueue("tokens", staged)
        except Exception as exc:
            self._fail("log_tokens", exc)

    def log_scalars(self, step: int, values: Mapping[str, Any]) -> None:
        """Append ``{name: value}`` for ``step`` to this rank's scalars (names slash-namespaced)."""
        if not self._active():
            return
        try:
            step = check_index("step", step)
            if self._skip_done(step, self._done_before, "was complete before this session; log_scalars skipped"):
                return
            if not isinstance(values, Mapping):
                raise TypeError(f"values: expected a mapping name -> number, found {type(values).__name__}")
            vals = {}
            for k, v in values.items():
                if _is_torch(v):
                    if v.numel() != 1:
                        raise CaptureInputError(f"scalar '{k}': expected one element, found shape {tuple(v.shape)}")
                    v = v.detach().clone()  # .item() happens on the writer thread (no sync here)
                elif isinstance(v, np.ndarray):
                    v = v.item()
                vals[str(k)] = v
            self._enqueue("scalars", (step, vals))
            if self._sinks is not None:  # on the writer thread, after our own record of the same values
                self._enqueue("call", lambda: self._sinks.log(step, vals))
        except Exception as exc:
            self._fail("log_scalars", exc)

    def log_figure(self, step: int, tag: str, figure) -> None:
        """Send a figure to the open sinks as an image (rank 0 with ``sinks`` only; our record keeps no
        images). ``figure``: a matplotlib Figure, an RGB array, or an object with ``render()`` /
        a zero-argument callable returning one, drawn on the writer thread (``position_live.PositionFigure``)."""
        if self._sinks is None or not self._active():
            return
        try:
            step = int(step)
            self._enqueue("call", lambda: self._sinks.log_figure(step, tag, figure))
        except Exception as exc:
            self._fail("log_figure", exc)

    @property
    def has_sinks(self) -> bool:
        """Whether a sink is open (figures are worth making)."""
        return self._sinks is not None and bool(self._sinks)

    def log_sequences(self, *, step: int, seq_ids, prompts: Sequence[str] | None = None,
                      completions: Sequence[str] | None = None, tokens: Sequence[Sequence[str]] | None = None,
                      rewards=None, lengths=None, group_ids=None, correct=None) -> None:
        """Record per-sequence text and outcomes (one row per ``seq_ids`` entry); sampled like log_tokens."""
        if not self._active():
            return
        try:
            step = check_index("step", step)
            if not keep_step(step, self.every_n_steps):
                return
            if self._skip_done(step, self._done_before, "was complete before this session; log_sequences skipped"):
                return
            table = _sequence_table(step, self.rank, seq_ids, prompts=prompts, completions=completions,
                                    tokens=tokens, rewards=rewards, lengths=lengths, group_ids=group_ids,
                                    correct=correct)
            self._check_seq_ids("sequences", step, 0, table.column("seq_id").to_numpy(), table.num_rows)
            keep = keep_sequences(step, table.column("seq_id").to_numpy(), self.seq_fraction)
            if not keep.all():
                table = table.filter(pa.array(keep))
            if table.num_rows == 0:
                return
            self._open_steps.add(step)
            self._enqueue("sequences", (step, table))
        except Exception as exc:
            self._fail("log_sequences", exc)

    def end_step(self, step: int) -> None:
        """Mark ``step`` complete for this rank: flush its shards, then write ``_done/step=...rank{r}``."""
        if not self._active():
            return
        try:
            step = check_index("step", step)
            self._open_steps.discard(step)
            for key in [k for k in self._seen_seq_ids if k[1] == step]:
                del self._seen_seq_ids[key]
            if step in self._done:
                return
            self._done.add(step)
            if keep_step(step, self.every_n_steps):
                self._enqueue("end_step", step)
        except Exception as exc:
            self._fail("end_step", exc)

    def flush(self, timeout: float | None = None) -> None:
        """Block until everything logged so far has been processed by the writer."""
        if self._inert or self._writer is None or not self._writer.is_alive():
            return
        ev = threading.Event()
        if self._writer.put("flush", ev):
            deadline = None if timeout is None else time.monotonic() + timeout
            while not ev.wait(0.5) and self._writer.is_alive():
                if deadline is not None and time.monotonic() > deadline:
                    break
        self._raise_pending()

    def close(self, status: str = "finished") -> None:
        """End open steps (unless ``status='failed'``), drain the writer, update ``meta.json``."""
        if self._closed or self._inert:
            self._closed = True
            return
        self._closed = True
        try:
            atexit.unregister(self._atexit)
        except Exception:  # noqa: BLE001
            pass
        try:
            for s in sorted(self._open_steps):
                if status == "failed":
                    self._writer.put("drop_step", s)  # a half-logged step must not look complete
                else:
                    self._done.add(s)
                    self._writer.put("end_step", s)
            self._open_steps.clear()
            self._writer.stop()
            self._writer.remove_heartbeat()
            self.stats.update(writer_busy_s=self._writer.busy_s, writer_cpu_s=self._writer.cpu_s,
                              writer_aggregates_cpu_s=self._writer.agg_cpu_s,
                              bytes_written=self._writer.bytes_written,
                              rows_written=self._writer.rows_written)
            if self.rank == 0:
                meta = read_meta(self.run_dir, version=False) if is_run_dir(self.run_dir) else None
                self._write_meta(meta, status=status)
        except Exception as exc:
            self._fail("close", exc)
        if self._sinks is not None:  # after the writer drained: every queued scalar has reached them
            self._sinks.close()
        if self._writer_lock is not None:
            self._writer_lock.release()
        self._raise_pending()

    def __enter__(self) -> "RunRecorder":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.on_error == "raise":
            try:
                self.close(status="failed")
            except Exception:  # noqa: BLE001 - do not mask the training exception
                pass
            return
        self.close(status="failed" if exc_type is not None else "finished")

    def __repr__(self) -> str:
        return f"RunRecorder({str(self.run_dir)!r}, rank={self.rank}, on_error={self.on_error!r})"


def _shallow_copy(staged):
    import copy

    c = copy.copy(staged)
    c.warnings = []
    return c


def _to_list(name: str, x, n: int | None) -> list | None:
    if x is None:
        return None
    if _is_torch(x):
        x = x.detach().cpu().tolist()
    elif isinstance(x, np.ndarray):
        x = x.tolist()
    else:
        x = list(x)
    if n is not None and len(x) != n:
        raise CaptureInputError(f"{name}: expected {n} entries (one per seq_ids), found {len(x)}")
    return x


def _sequence_table(step: int, rank: int, seq_ids, **cols) -> pa.Table:
    ids = _to_list("seq_ids", seq_ids, None)
    n = len(ids)
    def typ(column: str):  # the schema's sequence table gives every column's type
        return schema.arrow_type(column, schema.SEQUENCE_COLUMNS)

    out = {
        "step": pa.array([step] * n, type=typ("step")),
        "seq_id": pa.array(ids, type=typ("seq_id")),
        "rank": pa.array([rank] * n, type=typ("rank")),
    }
    spec = {"group_ids": "group_id", "prompts": "prompt", "completions": "completion", "tokens": "tokens",
            "rewards": "reward", "lengths": "length", "correct": "correct"}
    for arg, column in spec.items():
        vals = _to_list(arg, cols.get(arg), n)
        if vals is None:
            continue
        if column == "reward":
            arr = np.asarray(vals, dtype=np.float64)
            if not np.all(np.isfinite(arr)):
                bad = int(np.flatnonzero(~np.isfinite(arr))[0])
                raise CaptureInputError(
                    f"rewards: {int((~np.isfinite(arr)).sum())} NaN/Inf value(s) at step {step} (first at seq {ids[bad]})"
                )
        if column == "tokens":
            out[column] = _token_strings(arg, vals, typ(column))
            continue
        try:
            out[column] = pa.array(vals, type=typ(column))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise CaptureInputError(f"{arg}: cannot convert to {typ(column)}: {exc}") from exc
    return pa.table(out)


def _token_strings(arg: str, vals: list, typ: pa.DataType) -> pa.Array:
    """``tokens`` (one list of token strings per sequence) as list<string>: converted in Arrow when every
    token already is a str (the common case; no Python loop over tokens), else each token via ``str()``."""
    try:
        arr = pa.array(vals, type=typ)
        if arr.values.null_count == 0:  # a None token would become null here but "None" via str()
            return arr
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError):
        pass
    vals = [None if v is None else [str(t) for t in v] for v in vals]
    try:
        return pa.array(vals, type=typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise CaptureInputError(f"{arg}: cannot convert to {typ}: {exc}") from exc
