"""The responses of one training step, token by token (what the token inspector shows): which tokens a mask
dropped and why, a per-response summary to search by, and the token strings.

Input is the token rows of one step (``cppo_diag.analyses.recomputation.iter_step_frames``), with columns of
``cppo_diag.storage.schema.TOKEN_COLUMNS``; a response is keyed by ``RESPONSE_KEY`` (update, rank, seq_id).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl

from cppo_diag.masks.logratio import tv

RESPONSE_KEY = ["update", "rank", "seq_id"]
SORT_KEYS = ("masked", "max_tv", "length", "reward", "seq_id")


def marked_tokens(tokens: pl.DataFrame, marks: pl.DataFrame | None = None) -> pl.DataFrame:
    """``tokens`` with the mask shown (``m_keep``, ``m_reason``) and ``tv`` = |pi - mu| (SPEC Eq. 8's D_t).

    ``marks`` None: the mask the run applied (``keep_applied``, ``reason_applied``); else a recomputed
    rule's rows (response key, pos, keep, reason), joined by position (tokens it lacks get nulls).
    """
    if marks is None:
        frame = tokens.with_columns(m_keep=pl.col("keep_applied"), m_reason=pl.col("reason_applied"))
    else:
        frame = tokens.join(marks.select(*RESPONSE_KEY, "pos", m_keep="keep", m_reason="reason"),
                            on=[*RESPONSE_KEY, "pos"], how="left")
    return frame.with_columns(tv=tv(pl.col("logp").cast(pl.Float64), pl.col("logp_rollout").cast(pl.Float64)))


def response_table(frame: pl.DataFrame, sequences: pl.DataFrame | None = None) -> pl.DataFrame:
    """One row per response of ``marked_tokens``: length, reward, masked tokens, advantage and max |pi - mu|.
    The reward comes from the token rows, or from the step's ``sequences`` table when they have none."""
    seqs = frame.group_by(RESPONSE_KEY).agg(
        length=pl.len(),
        reward=pl.col("reward").first() if "reward" in frame.columns else pl.lit(None, pl.Float32),
        masked=(~pl.col("m_keep")).sum(),
        advantage=pl.col("advantage").first(),
        max_tv=pl.col("tv").max(),
    ).sort(RESPONSE_KEY)
    if (sequences is not None and sequences.height and "reward" in sequences.columns
            and seqs["reward"].null_count() == seqs.height):
        seqs = seqs.drop("reward").join(sequences.select("seq_id", "reward"), on="seq_id", how="left")
    return seqs


def find_responses(seqs: pl.DataFrame, *, length: tuple[int, int], min_masked: int = 0,
                   rewards: Sequence[float] = (), order: str = "masked") -> pl.DataFrame:
    """The rows of ``response_table`` with a length in ``length`` (inclusive), at least ``min_masked`` masked
    tokens and a reward in ``rewards`` (empty: any), sorted by ``order`` (largest first; seq_id ascending)."""
    if order not in SORT_KEYS:
        raise ValueError(f"order: expected one of {', '.join(SORT_KEYS)}, found {order!r}")
    found = seqs.filter(pl.col("length").is_between(*length) & (pl.col("masked") >= min_masked))
    if rewards:
        found = found.filter(pl.col("reward").is_in(list(rewards)))
    return found.sort(order, descending=order != "seq_id", nulls_last=True)


def select_response(frame: pl.DataFrame, update: int, rank: int, seq_id: int) -> pl.DataFrame:
    """The rows of ``frame`` (token rows or ``response_table`` rows) of one response."""
    return frame.filter((pl.col("update") == update) & (pl.col("rank") == rank) & (pl.col("seq_id") == seq_id))


def response_tokens(frame: pl.DataFrame, update: int, rank: int, seq_id: int) -> pl.DataFrame:
    """The token rows of one response, in position order."""
    return select_response(frame, update, rank, seq_id).sort("pos")


def token_texts(seq: pl.DataFrame, sequences: pl.DataFrame | None, seq_id: int) -> list[str]:
    """The strings of a response's tokens: the step's ``sequences`` table's ``tokens`` when it has enough of
    them, else ``⟨token_id⟩`` per token (``·`` without ids)."""
    if sequences is not None and sequences.height and "tokens" in sequences.columns:
        match = sequences.filter(pl.col("seq_id") == seq_id)
        if match.height and match["tokens"][0] is not None:
            texts = list(match["tokens"][0])
            if len(texts) >= seq.height:
                return texts
    ids = seq["token_id"].to_list() if "token_id" in seq.columns else [None] * seq.height
    return [f"⟨{i}⟩" if i is not None else "·" for i in ids]


def divergence_scale(frame: pl.DataFrame) -> float:
    """The colour scale of the inspector: the step's P99 of |pi - mu| (at least 1e-6), full colour at it."""
    return max(float(np.quantile(frame["tv"].to_numpy(), 0.99)), 1e-6)
