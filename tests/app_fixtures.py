"""Shared fixtures of the app tests: a small root of real runs written through ``cppo_diag.RunRecorder``.

Each run applies one rule (``compute_mask`` decides ``keep_applied``), logs per-token data, per-sequence
token strings and rewards, and per-step scalars - everything a trainer would - so every page has data.
The synthetic policy drifts more at late positions, so the rules actually mask tokens.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# (run name, applied rule, rule params)
DEFAULT_RUNS = (
    ("cppo-run", "cppo", {"delta": 0.15, "w_min": 0.8, "delta_b": 0.02}),
    ("dppo-run", "dppo", {"delta": 0.15}),
    ("grpo-run", "grpo_clip", {}),
)
# Token strings, including characters that must be escaped in the inspector's HTML.
# The inspector must show each exactly as written (escaped once): '&' as '&', '<script>' as text, not as markup.
VOCAB = ["the", " sum", " is", " 12", "+", "34", "=", "46", ",", " <b>", " &", "\n", " \"q\"", " 'x'", " 7",
         "<script>alert(1)</script>"]


def _step_batch(rng: np.random.Generator, seqs: int, max_len: int, noise: float, drift: float):
    lengths = rng.integers(max(2, max_len // 4), max_len + 1, size=seqs)  # (B,)
    T = int(lengths.max())
    pos = np.arange(T)[None, :]  # (1, T)
    mask = pos < lengths[:, None]  # (B, T)
    mu = np.clip(rng.beta(2.0, 0.3, size=(seqs, T)), 1e-4, 1.0 - 1e-6)  # (B, T)
    logp_rollout = np.log(mu).astype(np.float32)
    sigma = noise * (1.0 + drift * pos / max_len)  # (1, T)
    logp = np.minimum(logp_rollout + sigma * rng.standard_t(3, size=(seqs, T)), 0.0).astype(np.float32)
    rewards = rng.integers(0, 2, size=seqs).astype(np.float32)  # (B,)
    groups = np.arange(seqs) // 4
    adv = rewards.copy()
    for g in np.unique(groups):
        sel = groups == g
        adv[sel] = rewards[sel] - rewards[sel].mean()
    return logp, logp_rollout, adv.astype(np.float32), mask, rewards, groups, lengths


def write_run(root: Path, name: str, rule: str, params: dict, *, n_steps: int = 5, seqs: int = 16, max_len: int = 48,
              seed: int = 0, noise: float = 0.12, drift: float = 2.0, close: bool = True):
    """Write one run under ``root/name``; returns its path (and the open recorder when ``close=False``)."""
    import torch

    from cppo_diag import RunRecorder, compute_mask

    rng = np.random.default_rng(seed)
    rec = RunRecorder(root, name=name, trainer="cppo-diag", rule=rule, rule_params=params, model="toy-gpt",
                      task="multi-add", config={"seed": seed})
    for step in range(n_steps):
        logp, logp_rollout, adv, mask, rewards, groups, lengths = _step_batch(rng, seqs, max_len, noise, drift)
        res = compute_mask(rule, logp=torch.from_numpy(logp), logp_rollout=torch.from_numpy(logp_rollout),
                           advantages=torch.from_numpy(adv), response_mask=torch.from_numpy(mask), **params)
        token_ids = rng.integers(0, len(VOCAB), size=logp.shape)  # (B, T)
        rec.log_tokens(step=step, logp=logp, logp_rollout=logp_rollout, advantages=adv, response_mask=mask,
                       keep_applied=res.keep.numpy(), reason_applied=res.reason.numpy(), token_ids=token_ids,
                       reward=rewards, group_id=groups)
        toks = [[VOCAB[i] for i in token_ids[b, : lengths[b]]] for b in range(seqs)]
        rec.log_sequences(step=step, seq_ids=np.arange(seqs), prompts=["12+34="] * seqs,
                          completions=["".join(t) for t in toks], tokens=toks, rewards=rewards,
                          lengths=lengths, group_ids=groups, correct=rewards > 0.5)
        rec.log_scalars(step, {"reward/mean": float(rewards.mean()) + 0.05 * step,
                               "acc/mean": float((rewards > 0.5).mean()),  # the trainer's name
                               **{k: float(v) for k, v in res.metrics.items()}})
        rec.end_step(step)
    if close:
        rec.close()
        return root / name
    rec.flush()
    return root / name, rec


def build_root(root: Path, runs=DEFAULT_RUNS, **kwargs) -> list[Path]:
    """A root holding one run per (name, rule, params); different seeds so the runs differ."""
    root.mkdir(parents=True, exist_ok=True)
    return [write_run(root, name, rule, params, seed=i, **kwargs) for i, (name, rule, params) in enumerate(runs)]
