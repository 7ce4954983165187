"""Token rows <-> the padded batches a rule saw: the two directions of the run format's batch convention.

A trainer hands a rule one (step, update, rank) batch at a time: right-padded (B, T) tensors, one row per
response. The recorder writes one row per valid token, keyed by ``(step, update, rank, seq_id, pos)``
(``schema.SEQUENCE_KEY`` + ``pos``). :func:`batch_from_frame` rebuilds the batch from those rows: row ``b``
holds the response ``seq_ids[b]`` (ids increasing, any subset of a step's ids), column ``pos`` its token at
that position, anything not logged is padding (``response_mask`` False). :meth:`Batch.token_frame` goes
back: per-token (or per-sequence) arrays of the batch become one row per valid token with the key columns.

The values at valid positions are exactly the recorded ones (float32 as stored); the padding differs from the
trainer's (zeros, and T is the longest logged response), which no rule reads. ``advantages`` is (B, T) with
the per-token advantage (the rules accept (B,) or (B, T)).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

if TYPE_CHECKING:
    import torch


def _torch():
    """torch, imported on first use: reading a run's token files (``cppo-diag stats``) never loads it."""
    import torch

    return torch

# Columns a batch is rebuilt from: the required ones, then those it uses when the run logged them.
BASE_COLUMNS = ("step", "update", "rank", "seq_id", "pos", "logp", "logp_rollout", "advantage")
OPTIONAL_BATCH_COLUMNS = ("logp_old", "keep_applied", "reason_applied", "token_id", "topk_ids", "topk_logp_rollout",
                          "topk_logp")
BATCH_COLUMNS = BASE_COLUMNS + OPTIONAL_BATCH_COLUMNS
_KEY_DTYPES = {"step": np.int64, "update": np.int32, "rank": np.int32, "seq_id": np.int64, "pos": np.int32}


@dataclass
class Batch:
    """One (step, update, rank) group rebuilt as a padded batch.

    ``logp``, ``logp_rollout``, ``advantages`` (B, T) float32; ``response_mask`` (B, T) bool;
    ``positions`` (B, T) int64 (pos, 0 on padding); ``seq_ids`` (B,) int64, increasing;
    ``order`` (N,) int64: for each valid token in row-major order, its row index in the source frame.
    Optional (B, T) tensors: ``logp_old``, ``keep_applied``, ``reason_applied``; ``topk`` dict of
    (B, T, K) tensors (keys "ids", "logp_rollout", "logp") plus (B, T) "token_ids" when the run logged
    them (the mapping ``cppo_diag.masks`` accepts as ``topk``).
    """

    step: int
    update: int
    rank: int
    seq_ids: np.ndarray
    logp: torch.Tensor
    logp_rollout: torch.Tensor
    advantages: torch.Tensor
    response_mask: torch.Tensor
    positions: np.ndarray
    order: np.ndarray
    logp_old: torch.Tensor | None = None
    keep_applied: torch.Tensor | None = None
    reason_applied: torch.Tensor | None = None
    topk: dict | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.order.shape[0])

    def rule_inputs(self) -> dict:
        """The keyword arguments a trainer gives ``cppo_diag.masks.compute_mask`` for this batch: ``logp``,
        ``logp_rollout``, ``advantages``, ``response_mask``, ``logp_old`` (None when not logged), ``seq_ids``
        and ``step`` (they key ``cppo_shuffled``'s permutation). Add the rule name, ``anchor`` and params."""
        return dict(logp=self.logp, logp_rollout=self.logp_rollout, advantages=self.advantages,
                    response_mask=self.response_mask, logp_old=self.logp_old,
                    seq_ids=_torch().from_numpy(np.asarray(self.seq_ids, dtype=np.int64)), step=int(self.step))

    def unpad(self, x) -> np.ndarray:
        """Valid entries of a (B, T) tensor/array in row-major order, as numpy (N,)."""
        if hasattr(x, "detach"):  # a torch tensor
            x = x.detach().cpu().numpy()
        return np.asarray(x)[self.response_mask.numpy()]

    def frame_values(self, x) -> np.ndarray:
        """Valid entries of a (B, T) tensor/array in the row order of the frame the batch was rebuilt from
        (the inverse of the rebuild: ``frame_values(batch.logp)`` is the frame's ``logp`` column)."""
        vals = self.unpad(x)
        out = np.empty_like(vals)
        out[self.order] = vals
        return out

    def token_keys(self) -> dict[str, np.ndarray]:
        """step, update, rank, seq_id, pos of the valid tokens in row-major order."""
        m = self.response_mask.numpy()
        rows = np.nonzero(m)[0]
        n = rows.shape[0]
        return {
            "step": np.full(n, self.step, dtype=_KEY_DTYPES["step"]),
            "update": np.full(n, self.update, dtype=_KEY_DTYPES["update"]),
            "rank": np.full(n, self.rank, dtype=_KEY_DTYPES["rank"]),
            "seq_id": self.seq_ids[rows],
            "pos": self.positions[m].astype(_KEY_DTYPES["pos"]),
        }

    def token_frame(self, columns: Mapping[str, object] | None = None, *, skip_other_shapes: bool = False
                    ) -> pl.DataFrame:
        """One row per valid token (row-major: ``seq_id``, then ``pos``): the key columns of
        :meth:`token_keys`, then each of ``columns`` (tensors or arrays, dtype kept): a (B, T) one gives its
        valid entries, a (B,) one its row's value broadcast to the row's tokens. Another shape raises
        ``ValueError`` naming the column, unless ``skip_other_shapes`` (then the column is left out)."""
        mask = self.response_mask.numpy()
        rows = np.nonzero(mask)[0]
        cols: dict[str, np.ndarray] = dict(self.token_keys())
        for name, x in (columns or {}).items():
            arr = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
            if arr.shape == mask.shape:
                cols[name] = arr[mask]
            elif arr.shape == (mask.shape[0],):
                cols[name] = arr[rows]
            elif not skip_other_shapes:
                raise ValueError(f"token_frame column '{name}': expected shape {tuple(mask.shape)} (per token) or "
                                 f"({mask.shape[0]},) (per sequence), found {tuple(arr.shape)}")
        return pl.DataFrame(cols)


def _pad(values: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape, dtype, fill=0) -> np.ndarray:
    out = np.full(shape, fill, dtype=dtype)
    out[rows, cols] = values
    return out


def batch_from_frame(frame: pl.DataFrame) -> Batch:
    """Rebuild one (step, update, rank) group, a DataFrame with (at least) the required token columns, as a
    padded :class:`Batch`. Raises ``ValueError`` on an empty frame, negative ids or a token logged twice."""
    if frame.height == 0:
        raise ValueError("batch_from_frame: expected at least one token row, found 0")
    step = int(frame["step"][0])
    update = int(frame["update"][0]) if "update" in frame.columns else 0
    rank = int(frame["rank"][0]) if "rank" in frame.columns else 0
    seq = frame["seq_id"].to_numpy().astype(np.int64)
    pos = frame["pos"].to_numpy().astype(np.int64)
    if seq.min() < 0 or pos.min() < 0:
        raise ValueError(f"step {step}: expected non-negative seq_id and pos, found min seq_id {seq.min()}, "
                         f"min pos {pos.min()}")
    order = np.lexsort((pos, seq))  # sort by seq_id, then pos
    seq_s, pos_s = seq[order], pos[order]
    dup = (np.diff(seq_s) == 0) & (np.diff(pos_s) == 0)
    if dup.any():
        i = int(np.argmax(dup))
        raise ValueError(f"step {step} update {update} rank {rank}: token (seq_id {seq_s[i]}, pos {pos_s[i]}) "
                         f"logged twice; expected one row per (step, update, rank, seq_id, pos)")
    seq_ids, rows_s = np.unique(seq_s, return_inverse=True)  # row b holds sequence seq_ids[b]
    rows_s = rows_s.reshape(-1)
    shape = (len(seq_ids), int(pos_s.max()) + 1)

    def col(name, dtype, fill=0):
        return _pad(frame[name].to_numpy()[order], rows_s, pos_s, shape, dtype, fill)

    torch = _torch()
    mask = _pad(np.ones(len(order), dtype=bool), rows_s, pos_s, shape, bool, False)
    positions = _pad(pos_s, rows_s, pos_s, shape, np.int64)
    batch = Batch(
        step=step, update=update, rank=rank, seq_ids=seq_ids,
        logp=torch.from_numpy(col("logp", np.float32)), logp_rollout=torch.from_numpy(col("logp_rollout", np.float32)),
        advantages=torch.from_numpy(col("advantage", np.float32)), response_mask=torch.from_numpy(mask),
        positions=positions, order=order,
    )
    cols = set(frame.columns)
    if "logp_old" in cols and frame["logp_old"].null_count() < frame.height:
        batch.logp_old = torch.from_numpy(col("logp_old", np.float32))
    if "keep_applied" in cols and frame["keep_applied"].null_count() == 0:
        batch.keep_applied = torch.from_numpy(col("keep_applied", bool, False))
    if "reason_applied" in cols and frame["reason_applied"].null_count() == 0:
        batch.reason_applied = torch.from_numpy(col("reason_applied", np.uint8))
    if {"topk_ids", "topk_logp_rollout", "topk_logp", "token_id"} <= cols and frame["topk_ids"].null_count() == 0:
        batch.topk = _topk(frame, order, rows_s, pos_s, shape)
        batch.topk["token_ids"] = torch.from_numpy(col("token_id", np.int64))
    return batch


def _topk(frame: pl.DataFrame, order, rows, cols, shape) -> dict:
    torch = _torch()
    k = int(frame["topk_ids"].list.len().max())
    out = {}
    for key, name, dtype, fill in (("ids", "topk_ids", np.int64, 0), ("logp_rollout", "topk_logp_rollout",
                                                                      np.float32, -np.inf),
                                   ("logp", "topk_logp", np.float32, -np.inf)):
        vals = np.stack([np.pad(np.asarray(v, dtype=dtype), (0, k - len(v)), constant_values=fill)
                         for v in frame[name].to_list()])[order]
        arr = np.full((*shape, k), fill, dtype=dtype)
        arr[rows, cols] = vals
        out[key] = torch.from_numpy(arr)
    return out


def batches_from_frame(frame: pl.DataFrame) -> Iterator[Batch]:
    """The :class:`Batch` of every (update, rank) group of one step's token rows, in (update, rank) order
    (``update``/``rank`` count as 0 where the frame lacks them); nothing for an empty frame."""
    if frame.height == 0:
        return
    keys = [c for c in ("update", "rank") if c in frame.columns]
    if not keys:
        yield batch_from_frame(frame)
        return
    for _, part in sorted(frame.partition_by(keys, as_dict=True).items()):
        yield batch_from_frame(part)
