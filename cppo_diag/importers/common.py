"""Shared pieces of the importers: the per-sequence record they produce and the writer into a run.

Every importer turns its trainer's dump into ``ImportedSequence`` objects grouped by (step, rank, update)
and hands them to ``RunWriter``, which writes them through the public ``RunRecorder`` (so imported runs go
through exactly the same validation, sharding and completion markers as recorded ones).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cppo_diag.capture import RunRecorder
from cppo_diag.storage import layout
from cppo_diag.storage.meta import is_run_dir


class ImportFormatError(ValueError):
    """The source does not look like the named trainer's dump; the message names the file and the field."""


@dataclass
class ImportedSequence:
    """One response, already aligned: index ``i`` of every per-token array is response position ``i``.

    valid         (T,) bool: tokens the trainer trained on (loss mask); others are not written, and ``pos``
                  counts valid tokens only (the run format's convention)
    logp          (T,) float: current policy (pi); importers without it copy what they document
    logp_rollout  (T,) float: the sampler's log-probs (mu)
    advantage     (T,) float or a float: per-token or per-sequence advantage
    entropy, keep_applied (bool), reason_applied (uint8 ``schema.REASONS``): (T,) or None
    seq_id        the source's own sequence index (default: running index within the batch's (step, rank))
    """

    valid: np.ndarray
    logp: np.ndarray
    logp_rollout: np.ndarray
    advantage: Any
    logp_old: np.ndarray | None = None
    token_ids: np.ndarray | None = None
    entropy: np.ndarray | None = None
    keep_applied: np.ndarray | None = None
    reason_applied: np.ndarray | None = None
    seq_id: int | None = None
    reward: float | None = None
    group_id: int | None = None
    prompt: str | None = None
    completion: str | None = None


@dataclass
class ImportStats:
    files: int = 0
    steps: set = field(default_factory=set)
    sequences: int = 0
    tokens: int = 0
    skipped_sequences: int = 0
    notes: list = field(default_factory=list)

    def summary(self) -> str:
        return (f"{self.files} files, {len(self.steps)} steps, {self.sequences} sequences, {self.tokens} tokens"
                + (f", {self.skipped_sequences} sequences skipped" if self.skipped_sequences else ""))


def natural_key(path: Path):
    """Sort key that orders step_2 before step_10."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(path))]


def _as_array(name: str, value, where: str, dtype, expected: str) -> np.ndarray:
    """``value`` (a list, numpy array or torch tensor) as a flat numpy array of ``dtype``."""
    try:
        arr = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ImportFormatError(f"{where}: field '{name}': expected {expected}, found {type(value).__name__}"
                                f" ({exc})") from None
    return arr.reshape(-1)


def as_float_array(name: str, value, where: str) -> np.ndarray:
    return _as_array(name, value, where, np.float64, "a list of numbers")


def as_int_array(name: str, value, where: str) -> np.ndarray:
    return _as_array(name, value, where, np.int64, "a list of integers")


def check_length(name: str, arr: np.ndarray, n: int, where: str) -> None:
    if arr.shape[0] != n:
        raise ImportFormatError(f"{where}: field '{name}': expected {n} values (one per token), found {arr.shape[0]}")


class RunWriter:
    """Writes imported sequences into a run directory, one ``RunRecorder`` per source rank."""

    def __init__(self, dst: str | Path, *, name: str | None, trainer: str, config: dict, anchor: str,
                 model: str | None = None, task: str | None = None, overwrite: bool = False,
                 rule: str | None = None, rule_params: dict | None = None):
        run_dir = layout.check_run_name(Path(dst), name)
        if is_run_dir(run_dir):
            if not overwrite:
                raise FileExistsError(f"{run_dir} already holds a run; pass overwrite=True (--overwrite) to replace it")
            layout.check_unlocked(run_dir)  # never delete a run that another process is writing
            shutil.rmtree(run_dir)
        self.run_dir = run_dir
        self._kwargs = dict(config=config, trainer=trainer, anchor=anchor, model=model, task=task, rule=rule,
                            rule_params=rule_params, on_error="raise", resume=False)
        self._recorders: dict[int, RunRecorder] = {}
        self.stats = ImportStats()
        self._recorder(0)  # rank 0 writes meta.json

    def _recorder(self, rank: int) -> RunRecorder:
        rec = self._recorders.get(rank)
        if rec is None:
            kwargs = dict(self._kwargs)
            if self._recorders:  # the run exists now: other ranks join it
                kwargs["resume"] = True
            rec = self._recorders[rank] = RunRecorder(self.run_dir, rank=rank, **kwargs)
        return rec

    def write(self, *, step: int, rank: int, update: int, sequences: list[ImportedSequence],
              seq_id_offset: int = 0) -> None:
        """Write one batch: the sequences of (step, rank, update), padded to (B, T) with a response mask."""
        seqs = [s for s in sequences if s.valid.any()]
        self.stats.skipped_sequences += len(sequences) - len(seqs)
        if not seqs:
            return
        batch = len(seqs)
        width = max(s.valid.shape[0] for s in seqs)
        mask = np.zeros((batch, width), dtype=bool)
        logp = np.zeros((batch, width), dtype=np.float32)
        mu = np.zeros((batch, width), dtype=np.float32)
        adv = np.zeros((batch, width), dtype=np.float32)
        # optional per-token columns: written when every sequence of the batch has them
        optional = {"logp_old": np.float32, "token_ids": np.int64, "entropy": np.float32, "keep_applied": bool,
                    "reason_applied": np.uint8}
        cols = {name: np.zeros((batch, width), dtype=dtype) for name, dtype in optional.items()
                if all(getattr(s, name) is not None for s in seqs)}
        if "keep_applied" in cols:
            cols["keep_applied"][:] = True  # padding: never read (response_mask False)
        for i, s in enumerate(seqs):
            n = s.valid.shape[0]
            mask[i, :n] = s.valid
            logp[i, :n] = s.logp
            mu[i, :n] = s.logp_rollout
            adv[i, :n] = s.advantage
            for name, arr in cols.items():
                arr[i, :n] = getattr(s, name)
        rewards = [s.reward for s in seqs]
        reward = np.asarray(rewards, dtype=np.float32) if all(r is not None for r in rewards) else None
        groups = [s.group_id for s in seqs]
        group_id = np.asarray(groups, dtype=np.int64) if all(g is not None for g in groups) else None
        if all(s.seq_id is not None for s in seqs):
            seq_ids = np.asarray([s.seq_id for s in seqs], dtype=np.int64)
        else:
            seq_ids = seq_id_offset + np.arange(batch, dtype=np.int64)
        rec = self._recorder(rank)
        rec.log_tokens(step=step, update=update, seq_ids=seq_ids, logp=logp, logp_rollout=mu, advantages=adv,
                       response_mask=mask, reward=reward, group_id=group_id, **cols)
        prompts = [s.prompt for s in seqs]
        completions = [s.completion for s in seqs]
        rec.log_sequences(
            step=step, seq_ids=seq_ids,
            prompts=prompts if any(p is not None for p in prompts) else None,
            completions=completions if any(c is not None for c in completions) else None,
            rewards=reward, lengths=np.asarray([int(np.flatnonzero(s.valid)[-1]) + 1 for s in seqs]),
            group_ids=group_id,
        )
        self.stats.steps.add(step)
        self.stats.sequences += batch
        self.stats.tokens += int(mask.sum())

    def end_step(self, step: int, rank: int) -> None:
        self._recorder(rank).end_step(step)

    def close(self) -> None:
        for rank in sorted(self._recorders, reverse=True):  # rank 0 last: its close marks the run finished
            self._recorders[rank].close()

    def __enter__(self) -> "RunWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            for rec in self._recorders.values():
                rec.close(status="failed")


def iter_files(src: Path, patterns: Iterable[str]) -> list[Path]:
    """Files under ``src`` (or ``src`` itself) matching any glob pattern, in natural order."""
    src = Path(src)
    if src.is_file():
        return [src]
    if not src.exists():
        raise FileNotFoundError(f"source {src} does not exist")
    found: set[Path] = set()
    for pattern in patterns:
        found.update(p for p in src.rglob(pattern) if p.is_file())
    return sorted(found, key=natural_key)
