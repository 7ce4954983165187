"""The on-disk run format: one place that names every column, its dtype and the directory layout.

Shared by the writer (``cppo_diag.capture``), the reader (``cppo_diag.storage``), the importers and the
analyses. ``docs/run-format.md`` is the human-readable version of this module; keep the two in step and
bump ``SCHEMA_VERSION`` on any incompatible change.

Conventions
-----------
* One row per **valid** response token (prompt and padding are never written).
* ``pos`` is the 0-based index of the token inside its response, so SPEC.md's ``t`` is ``pos + 1`` and a
  response's valid length ``T`` is ``max(pos) + 1``.
* A token's sequence is identified by ``(step, update, rank, seq_id)``; ``seq_id`` names one response of the
  step (the bundled trainer: its row in the step's rollout batch, the same id in every update and in the
  sequence table, so token rows join sequence rows on ``(step, rank, seq_id)``). A recompute rebuilds each
  (step, update, rank) batch in ``seq_id`` order and passes ``step`` and ``seq_ids`` to ``compute_mask``
  (they key ``cppo_shuffled``'s permutation).
* All log-probs are natural-log probabilities of the *sampled* token; ``logp`` is the current policy at
  loss time (pi), ``logp_rollout`` the sampler's value (mu), ``logp_old`` the trainer's recomputed old
  policy (pi_old), when it has one; ``logp_behavior`` the sampling weights' log-prob under the trainer's
  numerics (so engine mismatch and policy lag separate).
"""

from __future__ import annotations

import polars as pl

from cppo_diag.masks.reasons import REASON_NAMES

SCHEMA_VERSION = 1

# -- directory layout -------------------------------------------------------------------------------
META_FILE = "meta.json"  # run metadata (see META_KEYS)
TOKENS_DIR = "tokens"  # tokens/step=000012/rank0-u0-000.parquet
SEQUENCES_DIR = "sequences"  # sequences/step=000012/rank0-000.parquet
SCALARS_DIR = "scalars"  # scalars/rank0.jsonl  (one JSON object per line: {"step": .., name: value})
DONE_DIR = "_done"  # _done/step=000012.rank0   (marker: every shard of that step/rank is complete)

# Codes for ``reason_applied`` / recomputed reasons (uint8): code -> name, defined by the rule library.
REASONS = REASON_NAMES

# -- per-token table ----------------------------------------------------------------------------------
REQUIRED_TOKEN_COLUMNS: dict[str, pl.DataType] = {
    "step": pl.Int64,
    "seq_id": pl.Int64,
    "pos": pl.Int32,
    "logp": pl.Float32,
    "logp_rollout": pl.Float32,
    "advantage": pl.Float32,
}

OPTIONAL_TOKEN_COLUMNS: dict[str, pl.DataType] = {
    "update": pl.Int32,  # optimiser update / minibatch pass index within the step (0 if not given)
    "rank": pl.Int32,  # data-parallel rank that wrote the row (0 if not given)
    "group_id": pl.Int64,  # GRPO group (prompt) the response belongs to
    "token_id": pl.Int64,  # vocabulary id of the sampled token
    "logp_old": pl.Float32,  # pi_old
    # attribution (docs/run-format.md "Attribution"): the sampled token's log-prob under the weights that
    # sampled it, computed with the trainer's numerics; log pi - log mu = engine + lag + update with
    # engine = logp_behavior - logp_rollout, lag = logp_old - logp_behavior, update = logp - logp_old
    "logp_behavior": pl.Float32,
    "lag": pl.Int32,  # optimiser steps between the weights that sampled the token and the weights that computed logp
    "fork": pl.Boolean,  # the task's oracle: this position admits two right tokens (the chain task's forks)
    "entropy": pl.Float32,  # entropy of the current policy at this position
    "reward": pl.Float32,  # sequence reward broadcast to tokens
    "keep_applied": pl.Boolean,  # the mask the trainer actually used
    "reason_applied": pl.UInt8,  # REASONS code of what the trainer did
    # the per-token weight the loss multiplied a kept token's term by, for rules that weight rather than mask
    # (cppo_soft's gate, cispo's truncated IS weight; ``cppo_diag.loss.applied_weight``); absent when the
    # loss used keep_applied alone
    "loss_weight": pl.Float32,
    "topk_ids": pl.List(pl.Int64),  # top-K ids of mu at this position
    "topk_logp_rollout": pl.List(pl.Float32),  # mu's log-probs at topk_ids
    "topk_logp": pl.List(pl.Float32),  # pi's log-probs at topk_ids
}

TOKEN_COLUMNS: dict[str, pl.DataType] = {**REQUIRED_TOKEN_COLUMNS, **OPTIONAL_TOKEN_COLUMNS}

_NUMPY_DTYPES = {pl.Int64: "int64", pl.Int32: "int32", pl.UInt8: "uint8", pl.Float32: "float32", pl.Boolean: "bool"}


def numpy_dtype(column: str, table: dict[str, pl.DataType] | None = None):
    """The numpy dtype a writer stores ``column`` of ``table`` (default the token table) in; for a list column,
    the dtype of its elements. KeyError names the column."""
    import numpy as np

    tables = TOKEN_COLUMNS if table is None else table
    if column not in tables:
        raise KeyError(f"column {column!r}: not in the table; expected one of {sorted(tables)}")
    dtype = tables[column]
    if isinstance(dtype, pl.List):
        dtype = dtype.inner
    return np.dtype(_NUMPY_DTYPES[dtype.base_type()])


def arrow_type(column: str, table: dict[str, pl.DataType] | None = None):
    """The Arrow type a writer stores ``column`` of ``table`` (default the token table) as (strings as
    ``pa.string()``, lists as ``pa.list_``). KeyError names the column."""
    import pyarrow as pa

    tables = TOKEN_COLUMNS if table is None else table
    if column not in tables:
        raise KeyError(f"column {column!r}: not in the table; expected one of {sorted(tables)}")

    def of(dtype):
        if isinstance(dtype, pl.List):
            return pa.list_(of(dtype.inner))
        if dtype == pl.Utf8:
            return pa.string()
        return pa.from_numpy_dtype(_NUMPY_DTYPES[dtype.base_type()])

    return of(tables[column])


def columns_of_dtype(dtype: pl.DataType, table: dict[str, pl.DataType] | None = None) -> set[str]:
    """The columns of ``table`` (default the token table) stored as ``dtype`` (e.g. ``pl.Float32``,
    ``pl.List(pl.Float32)``)."""
    return {c for c, t in (TOKEN_COLUMNS if table is None else table).items() if t == dtype}

# Columns that identify one sequence's tokens.
SEQUENCE_KEY = ("step", "update", "rank", "seq_id")

# -- per-sequence table -------------------------------------------------------------------------------
SEQUENCE_COLUMNS: dict[str, pl.DataType] = {
    "step": pl.Int64,
    "seq_id": pl.Int64,
    "rank": pl.Int32,
    "group_id": pl.Int64,
    "prompt": pl.Utf8,
    "completion": pl.Utf8,
    "tokens": pl.List(pl.Utf8),  # completion token strings, index = pos
    "reward": pl.Float32,
    "length": pl.Int32,  # valid response length T
    "correct": pl.Boolean,
}
REQUIRED_SEQUENCE_COLUMNS = ("step", "seq_id")

# -- run metadata (meta.json) ---------------------------------------------------------------------------
META_KEYS = {
    "schema_version": "int, SCHEMA_VERSION of the writer",
    "name": "str, run name (directory name by default)",
    "created": "str, ISO-8601 UTC time the run was first opened",
    "trainer": "str, e.g. 'cppo-diag', 'trl', 'verl', 'prime-rl'",
    "rule": "str or null, registered rule name the trainer applied",
    "rule_params": "dict, keyword arguments of that rule",
    "model": "str or null",
    "task": "str or null",
    "anchor": "str, 'rollout' (mu, default) or 'old' (pi_old): what logp_rollout-anchored rules used",
    "config": "dict, free-form resolved trainer config",
    "status": "str, 'running' | 'finished' | 'failed' | 'halted' (stopped by the live doctor)",
}
