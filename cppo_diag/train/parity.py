"""Offline check that a run's logged ``keep_applied`` is what its rule gives on the logged tokens.

Takes every (step, update, rank) batch the reader rebuilds (``Run.batches()``: the group's responses in
``seq_id`` order, any subset of a step's seq_ids), reruns the run's rule through the public ``compute_mask`` on
the CPU with the batch's ``step`` and ``seq_ids`` (which key ``cppo_shuffled``'s permutation, as in the trainer)
and counts disagreements.
"""

from __future__ import annotations

from cppo_diag import compute_mask, open_run


def check_parity(run_path) -> dict[str, int]:
    """{"tokens": n, "keep_mismatch": k, "reason_mismatch": r, "masked": m} over the whole run.

    Raises ``ValueError`` when a batch has no ``keep_applied`` / ``reason_applied`` (nothing to compare)."""
    run = open_run(run_path)
    meta = run.meta
    out = {"tokens": 0, "keep_mismatch": 0, "reason_mismatch": 0, "masked": 0}
    for batch in run.batches():
        if batch.keep_applied is None or batch.reason_applied is None:
            raise ValueError(f"{run.path}: step {batch.step} update {batch.update} rank {batch.rank}: parity needs "
                             "columns 'keep_applied' and 'reason_applied' on every token, found them missing or null")
        res = compute_mask(meta.rule, anchor=meta.anchor, **batch.rule_inputs(), **meta.rule_params)
        applied = batch.unpad(batch.keep_applied)
        out["tokens"] += batch.n_tokens
        out["masked"] += int((~applied).sum())
        out["keep_mismatch"] += int((batch.unpad(res.keep) != applied).sum())
        out["reason_mismatch"] += int((batch.unpad(res.reason) != batch.unpad(batch.reason_applied)).sum())
    return out
