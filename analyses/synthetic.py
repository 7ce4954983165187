"""A synthetic run generator for tests, demos of the figures and benchmarks.

It writes a real run directory in the on-disk layout of ``cppo_diag.storage.layout`` (``meta.json``,
``tokens/step=NNNNNN/rank0-u<U>-000.parquet``, ``_done`` markers), every file through the layout's atomic
writers, fast enough for 100 M tokens, with the
dtypes of ``cppo_diag.storage.schema``. The model of the data (not of any real trainer):

* mu(y_t) ~ a Beta(2, 0.3) draw per token (most sampled tokens are likely, some are not);
* log pi = log mu + sigma_t * StudentT(3) noise, clipped to <= 0, with sigma_t = ``noise`` *
  (1 + ``drift`` * t / max_len), so divergence grows with position when ``drift`` > 0 and has heavy tails;
* a fraction ``burst_frac`` of responses switches to sigma_t * ``burst_scale`` after a uniformly drawn change
  point (sustained drift that exhausts CPPO's prefix budget);
* log pi_old = log mu + (``noise`` / 4) * N(0, 1) (train/rollout mismatch);
* advantages: per sequence, group-normalised Bernoulli rewards (groups of ``group_size``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from cppo_diag.storage import layout
from cppo_diag.storage.meta import new_meta, write_meta


def _step_frame(rng: np.random.Generator, step: int, update: int, seqs: int, max_len: int, min_len: int,
                noise: float, drift: float, group_size: int, with_logp_old: bool, burst_frac: float = 0.0,
                burst_scale: float = 1.0) -> tuple[pl.DataFrame, dict]:
    lengths = rng.integers(min_len, max_len + 1, size=seqs)  # (B,)
    n = int(lengths.sum())
    seq_id = np.repeat(np.arange(seqs, dtype=np.int64), lengths)  # (N,)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    pos = (np.arange(n, dtype=np.int64) - starts).astype(np.int32)  # (N,)
    q = rng.beta(2.0, 0.3, size=n).astype(np.float32)
    logp_rollout = np.log(np.clip(q, 1e-6, 1.0)).astype(np.float32)
    sigma = (noise * (1.0 + drift * pos / max_len)).astype(np.float32)
    # "bursts": a fraction of responses drift off-policy after a random change point (sigma x burst_scale),
    # the situation CPPO's prefix budget is built for.
    bursty = rng.random(seqs) < burst_frac
    change = (rng.random(seqs) * lengths).astype(np.int64)
    in_burst = np.repeat(bursty, lengths) & (pos >= np.repeat(change, lengths))
    sigma = np.where(in_burst, sigma * burst_scale, sigma).astype(np.float32)
    logp = np.minimum(logp_rollout + sigma * rng.standard_t(3, size=n).astype(np.float32), 0.0).astype(np.float32)
    rewards = (rng.random(seqs) < 0.5).astype(np.float32)
    groups = np.arange(seqs) // max(group_size, 1)
    adv = np.empty(seqs, dtype=np.float32)
    for g in np.unique(groups):
        sel = groups == g
        adv[sel] = rewards[sel] - rewards[sel].mean()
    cols = {
        "step": np.full(n, step, dtype=np.int64),
        "seq_id": seq_id,
        "pos": pos,
        "logp": logp,
        "logp_rollout": logp_rollout,
        "advantage": np.repeat(adv, lengths),
        "update": np.full(n, update, dtype=np.int32),
        "rank": np.zeros(n, dtype=np.int32),
        "group_id": np.repeat(groups.astype(np.int64) + step * 100_000, lengths),
        "reward": np.repeat(rewards, lengths),
    }
    if with_logp_old:
        old = logp_rollout + (noise / 4) * rng.standard_normal(n).astype(np.float32)
        cols["logp_old"] = np.minimum(old, 0.0).astype(np.float32)
    return pl.DataFrame(cols), {"lengths": lengths}


def _applied(frame: pl.DataFrame, rule: str, params: dict) -> pl.DataFrame:
    """keep_applied / reason_applied from the rule library, on the batch the reader rebuilds from ``frame``."""
    from cppo_diag.analyses.recomputation import run_rule
    from cppo_diag.storage.batches import batch_from_frame

    batch = batch_from_frame(frame)
    res = run_rule(batch, rule, params)
    return frame.with_columns(keep_applied=pl.Series(batch.frame_values(res.keep).astype(bool)),
                              reason_applied=pl.Series(batch.frame_values(res.reason).astype(np.uint8), dtype=pl.UInt8))


def write_synthetic_run(
    path,
    *,
    n_tokens: int = 100_000,
    seqs_per_step: int = 64,
    max_len: int = 512,
    min_len: int | None = None,
    updates: int = 1,
    seed: int = 0,
    noise: float = 0.01,
    drift: float = 2.0,
    burst_frac: float = 0.3,
    burst_scale: float = 4.0,
    group_size: int = 8,
    with_logp_old: bool = True,
    with_keep_applied: str | None = None,
    rule_params: dict | None = None,
    name: str | None = None,
    progress: bool = False,
) -> Path:
    """Write a synthetic run of about ``n_tokens`` tokens to ``path`` and return the run directory.

    ``with_keep_applied``: a rule name; when given, ``keep_applied``/``reason_applied`` are that rule's
    output from ``cppo_diag.masks.compute_mask`` (so the recompute agreement must be 100%) and the meta
    records the rule. Steps hold ``seqs_per_step`` responses of lengths uniform in [min_len, max_len]
    (default min_len = max_len // 4) for each of ``updates`` updates.
    """
    run = Path(path)
    dirs = layout.run_dirs(run)
    for key in ("tokens", "done"):
        dirs[key].mkdir(parents=True, exist_ok=True)
    min_len = max(1, max_len // 4) if min_len is None else min_len
    rng = np.random.default_rng(seed)
    per_step = seqs_per_step * (min_len + max_len) / 2 * updates
    n_steps = max(1, int(round(n_tokens / per_step))) if n_tokens > 0 else 0
    meta = new_meta(name=name or run.name, trainer="synthetic", rule=with_keep_applied, rule_params=rule_params,
                    task="synthetic", status="finished",
                    config={"n_tokens": n_tokens, "seqs_per_step": seqs_per_step, "max_len": max_len,
                            "min_len": min_len, "updates": updates, "seed": seed, "noise": noise, "drift": drift,
                            "burst_frac": burst_frac, "burst_scale": burst_scale})
    steps = range(n_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="synthetic run", unit="step")
    for step in steps:
        for update in range(updates):
            frame, _ = _step_frame(rng, step, update, seqs_per_step, max_len, min_len, noise, drift, group_size,
                                   with_logp_old, burst_frac, burst_scale)
            if with_keep_applied:
                frame = _applied(frame, with_keep_applied, rule_params or {})
            layout.write_token_shard(run, frame, step=step, update=update, compression="zstd")
        layout.write_done_marker(dirs["done"], step, 0)
    write_meta(run, meta)
    return run


def empty_run(path, *, name: str | None = None) -> Path:
    """A run directory with meta.json and no token rows (for tests of the empty case)."""
    run = Path(path)
    dirs = layout.run_dirs(run)
    dirs["tokens"].mkdir(parents=True, exist_ok=True)
    write_meta(run, new_meta(name=name or run.name, trainer="synthetic", status="finished"))
    return run


def write_recorded_run(path, *, n_tokens: int = 1_000_000, seqs_per_step: int = 512, max_len: int = 1024,
                       min_len: int | None = None, updates: int = 1, seed: int = 0, noise: float = 0.01,
                       drift: float = 2.0, progress: bool = False, aggregates: bool = True,
                       stats: dict | None = None) -> Path:
    """Like :func:`write_synthetic_run` (same model of the data), but written through
    ``cppo_diag.RunRecorder.log_tokens`` (packed tokens + ``cu_seqlens``), so the shards, their
    compression and the done markers are exactly what a trainer's recorder leaves (benchmarks, scale tests).
    ``aggregates``: the recorder's write-time aggregates (``RunRecorder(aggregates=)``); ``stats``: a dict
    that receives the recorder's ``stats`` (writer CPU seconds, of which ``writer_aggregates_cpu_s``)."""
    from cppo_diag import RunRecorder

    if aggregates:
        import cppo_diag.analyses.aggregate  # noqa: F401  (registers the writer's aggregator, as the trainer does)
    min_len = max(1, max_len // 4) if min_len is None else min_len
    rng = np.random.default_rng(seed)
    per_step = seqs_per_step * (min_len + max_len) / 2 * updates
    n_steps = max(1, int(round(n_tokens / per_step))) if n_tokens > 0 else 0
    steps = range(n_steps)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc="recorded synthetic run", unit="step")
    rec = RunRecorder(path, trainer="synthetic", task="synthetic", on_error="raise", resume=False, aggregates=aggregates,
                      config={"n_tokens": n_tokens, "seqs_per_step": seqs_per_step, "max_len": max_len,
                              "min_len": min_len, "updates": updates, "seed": seed, "noise": noise, "drift": drift})
    try:
        for step in steps:
            for update in range(updates):
                frame, info = _step_frame(rng, step, update, seqs_per_step, max_len, min_len, noise, drift, 8, True)
                lengths = info["lengths"]
                cu = np.r_[0, np.cumsum(lengths)].astype(np.int64)  # (B+1,)
                rec.log_tokens(step=step, update=update, logp=frame["logp"].to_numpy(),
                               logp_rollout=frame["logp_rollout"].to_numpy(), cu_seqlens=cu,
                               advantages=frame["advantage"].to_numpy()[cu[:-1]], logp_old=frame["logp_old"].to_numpy())
            rec.end_step(step)
    finally:
        rec.close()
        if stats is not None:
            stats.update(rec.stats)
    return Path(path)
