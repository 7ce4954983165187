"""The bundled RLVR trainer: GRPO-style groups, several updates per batch, any registered trust-region rule.

``train()`` reads top to bottom (cleanrl / nanoGPT style): set up, then per iteration five named phases
(``phases.py``, SPEC.md "Loss"):

1. rollout     sample P prompts x n responses with the rollout policy, mu (the sampler's log-probs) recorded at
               sampling time; with ``rollout.staleness = k`` the batch trained at iteration t was sampled by the
               policy of iteration t - k (asynchronous RL: the queued batches are part of the checkpoint);
2. advantages  reward each response; group advantages A = r - mean(group) (optionally / std); drop
               zero-variance groups;
3. update      ``epochs * updates_per_batch`` minibatch updates: recompute pi, apply the rule through the public
               ``cppo_diag.masks.compute_mask``, take the loss from ``cppo_diag.loss.policy_loss``, one AdamW
               step; the tokens the rule saw go to the public ``cppo_diag.RunRecorder``;
4. log         per-step scalars (pooled over the step's updates, ``step_stats.StepPool``; names in
               ``cppo_diag.metric_names``) and held-out evaluations;
5. checkpoint;
6. with ``doctor.live``, the live guard (``guard.TrainGuard``): the doctor's detector on this step, findings to
   RUN/findings.jsonl, a halt at a critical finding with ``doctor.on_critical = "halt"``.

All randomness derives from (seed, step, rank), so a resumed run replays exactly. Steps the recorder already
holds are replayed to rebuild the state but not logged again (``Run.step_logger``).
"""

from __future__ import annotations

from cppo_diag import metric_names as M

from . import phases
from .checkpoint import drop_checkpoints
from .guard import DoctorHalt, TrainGuard
from .config import TrainConfig
from .phases import group_advantages, pack_queue, sequence_logprobs, unpack_queue  # noqa: F401  (tests, benchmarks)
from .runtime import StepClock, start_run, step_rng  # noqa: F401  (step_rng: benchmarks)

__all__ = ["train"]


def train(cfg: TrainConfig, *, recorder_factory=None) -> dict:
    """Run RL training; returns the summary scalars (``summary/...``). ``recorder_factory(run_dir_parent, name,
    **meta) -> recorder`` replaces RunRecorder (benchmarks pass one returning a NullRecorder)."""
    cfg.validate()  # every error names the field, before any process group, model or run directory
    run = start_run(cfg, recorder_factory)  # device, model, task, optimiser; resume; the recorder
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.steps, initial=run.start, desc=f"train {run.name}",
               disable=not (cfg.log.progress and run.d.main), dynamic_ncols=True)
    guard = TrainGuard(run) if cfg.doctor.live else None
    try:
        if run.start == 0 and run.d.main:
            phases.evaluate_before(run)
        total_updates = 0
        for step in range(run.start, cfg.steps):
            clock, log = StepClock(), run.step_logger(step)
            rollout = phases.rollout(run, step, log, clock)
            batch = phases.advantages(run, rollout)
            pool, n_updates = phases.update(run, step, rollout, batch, log, clock)
            total_updates += n_updates
            scalars = phases.log_step(run, step, rollout, batch, pool, n_updates, log, clock)
            phases.checkpoint(run, step)
            if guard is not None:
                guard.after_step(step, scalars, pool)
            bar.update(1)
            bar.set_postfix(reward=f"{scalars[M.REWARD_MEAN]:.3f}", acc=f"{scalars[M.ACC_MEAN]:.2f}",
                            masked=f"{scalars.get(M.mask_name(cfg.rule.name), 0.0):.3f}")
        if run.start < cfg.steps and total_updates == 0:  # a run that trained nothing must not look finished
            raise RuntimeError(
                f"trained nothing: no optimiser update in steps {run.start}..{cfg.steps - 1}, every group was "
                "skipped (all n responses of each prompt got the same reward, optim.skip_zero_var); check "
                "rollout.temperature, rollout.n and the task's reward"
            )
        if run.d.main and cfg.ckpt.keep == 0:
            drop_checkpoints(run.run_dir)
        run.rec.close()
        if guard is not None:
            guard.record()
    except DoctorHalt as halt:  # the checkpoints stay (the one from before the first warning among them)
        run.rec.close(status="halted")
        guard.record(halt)
        raise
    except BaseException:
        run.rec.close(status="failed")
        raise
    finally:
        bar.close()
    return run.summary
