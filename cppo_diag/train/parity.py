"""Offline check that a run's logged ``keep_applied`` is what its rule gives on the logged tokens.

Rebuilds every (step, update, rank) batch from the token table in ``seq_id`` order (any subset of a step's
seq_ids; rows are compact), reruns the run's rule through the public ``compute_mask`` on the CPU with the
batch's ``step`` and ``seq_ids`` (which key ``cppo_shuffled``'s permutation, as in the trainer) and counts
disagreements.
"""

from __future__ import annotations

import numpy as np
import torch

from cppo_diag import compute_mask, open_run


def check_parity(run_path) -> dict[str, int]:
    """{"tokens": n, "keep_mismatch": k, "reason_mismatch": r, "masked": m} over the whole run."""
    run = open_run(run_path)
    meta = run.meta
    toks = run.tokens().sort(["step", "update", "rank", "seq_id", "pos"]).collect()
    out = {"tokens": 0, "keep_mismatch": 0, "reason_mismatch": 0, "masked": 0}
    has_old = "logp_old" in toks.columns and toks["logp_old"].null_count() < len(toks)
    for (step, _, _), g in toks.group_by(["step", "update", "rank"], maintain_order=True):
        seq = g["seq_id"].to_numpy()
        ids = np.unique(seq)
        row, pos = torch.tensor(np.searchsorted(ids, seq)), torch.tensor(g["pos"].to_numpy(), dtype=torch.long)
        B, T = len(ids), int(pos.max()) + 1  # rebuilt padded batch (B, T)

        def dense(col):
            x = torch.zeros(B, T)
            x[row, pos] = torch.tensor(g[col].to_numpy(), dtype=torch.float32)
            return x

        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[row, pos] = True
        adv = torch.zeros(B)
        adv[row] = torch.tensor(g["advantage"].to_numpy(), dtype=torch.float32)
        res = compute_mask(meta["rule"], logp=dense("logp"), logp_rollout=dense("logp_rollout"), advantages=adv,
                           response_mask=mask, logp_old=dense("logp_old") if has_old else None,
                           anchor=meta.get("anchor", "rollout"), seq_ids=torch.from_numpy(ids.astype(np.int64)),
                           step=int(step), **(meta.get("rule_params") or {}))
        keep = res.keep[row, pos].numpy()
        out["tokens"] += len(g)
        out["masked"] += int((~g["keep_applied"].to_numpy()).sum())
        out["keep_mismatch"] += int((keep != g["keep_applied"].to_numpy()).sum())
        out["reason_mismatch"] += int((res.reason[row, pos].numpy() != g["reason_applied"].to_numpy()).sum())
    return out
