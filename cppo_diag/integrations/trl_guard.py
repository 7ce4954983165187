"""The live doctor as a ``transformers`` ``TrainerCallback`` for TRL (``GRPOTrainer`` or the cppo-diag plug-in).

    from cppo_diag.integrations.trl_guard import DoctorGuardCallback

    guard = DoctorGuardCallback(run_dir="runs/my-run", on_critical="halt")
    trainer = GRPOTrainer(..., callbacks=[guard])          # or CppoDiagGRPOTrainer(..., callbacks=[guard])
    trainer.train()
    sys.exit(guard.finish())                                # 3 when the doctor halted the run, else 0

Every time TRL logs (``logging_steps``), the callback feeds the logged reward (``reward``, TRL's mean reward),
when logged, the entropy (``entropy``), and the plug-in's divergence tail (``cppo_diag/div_tail_top10``: the
top-decile mean of |log pi - log mu| over the step's response tokens, logged by ``CppoDiagGRPOTrainer``) to
``LiveDoctor`` (analyses/doctor_live.py), the detector of ``cppo-diag train --doctor.live true``, and appends each
finding that fires to ``RUN/findings.jsonl``. With the tail, the divergence runaway (warning) and the imminent
collapse (critical: the halt, before the reward has halved) fire too; with TRL's own ``GRPOTrainer`` (no tail in
its logs) only the reward checks do; ``cppo-diag doctor`` on the plug-in's run directory runs the rest offline.

* The first warning pins the latest ``checkpoint-N`` of ``args.output_dir`` saved before its step (copied to
  ``before-warning-checkpoint-N``, which the Trainer's rotation never deletes).
* A critical finding (an imminent or sustained reward collapse) with ``on_critical="halt"`` sets
  ``control.should_training_stop``; ``finish()`` then marks ``RUN/meta.json`` status ``halted`` (when the run
  directory holds one) and returns ``HALT_EXIT_CODE`` (3). ``"warn"`` only records.

A run that logs no ``reward`` raises ``ValueError`` at the first log that lacks it.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from transformers import TrainerCallback

from cppo_diag.train.guard import HALT_EXIT_CODE

__all__ = ["DoctorGuardCallback", "HALT_EXIT_CODE"]

_CKPT = re.compile(r"^checkpoint-(\d+)$")


class DoctorGuardCallback(TrainerCallback):
    """Online doctor for a TRL run. ``run_dir``: where ``findings.jsonl`` goes (default ``args.output_dir``);
    ``reward_key`` / ``entropy_key`` / ``tail_key``: the names in TRL's logs (``tail_key`` defaults to the plug-in's
    ``cppo_diag/div_tail_top10``)."""

    def __init__(self, run_dir: str | Path | None = None, *, on_critical: str = "warn", reward_key: str = "reward",
                 entropy_key: str = "entropy", tail_key: str | None = None, rule: str | None = None):
        if on_critical not in ("halt", "warn"):
            raise ValueError(f"on_critical: expected 'halt' | 'warn', found {on_critical!r}")
        from cppo_diag.analyses.doctor_live import TAIL_METRIC, LiveDoctor

        self.tail_key = tail_key or TAIL_METRIC
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.on_critical, self.reward_key, self.entropy_key = on_critical, reward_key, entropy_key
        self.doctor = LiveDoctor(rule=rule)
        self.halted = None
        self.pinned: str | None = None
        self.first_warning: int | None = None

    def _dir(self, args) -> Path:
        d = self.run_dir if self.run_dir is not None else Path(args.output_dir)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or state.global_step < 1 or not getattr(state, "is_world_process_zero", True):
            return
        if "loss" not in logs and self.reward_key not in logs:
            return  # an eval / summary log line, not a training step
        if self.reward_key not in logs:
            raise ValueError(f"DoctorGuardCallback: TRL's log at step {state.global_step} has no {self.reward_key!r} "
                             f"(found {sorted(logs)}); pass reward_key= the name of the mean reward")
        from cppo_diag.storage.layout import append_json_line, findings_path

        step = state.global_step - 1
        new = self.doctor.observe(step, reward=float(logs[self.reward_key]), entropy=logs.get(self.entropy_key),
                                  tail_top10=logs.get(self.tail_key))
        path = findings_path(self._dir(args))
        for f in new:
            append_json_line(path, {"step": step, **f.to_json()})
            if f.severity in ("warning", "critical") and self.first_warning is None:
                self.first_warning = f.first_step if f.first_step is not None else step
                self.pinned = _pin(Path(args.output_dir), self.first_warning)
            if f.severity == "critical" and self.on_critical == "halt" and self.halted is None:
                self.halted = {"step": step, "finding": f.id, "first_step": f.first_step,
                               "checkpoint_before_first_warning": self.pinned, "exit_code": HALT_EXIT_CODE}
                control.should_training_stop = True

    def finish(self) -> int:
        """After ``trainer.train()``: mark the run ``halted`` when the doctor stopped it; the exit code to use."""
        if self.halted is None:
            return 0
        from cppo_diag.storage.meta import update_meta

        if self.run_dir is not None:
            update_meta(self.run_dir, status="halted",
                        doctor={"live": True, "on_critical": self.on_critical, "halted": self.halted})
        return HALT_EXIT_CODE


def _pin(output_dir: Path, step: int) -> str | None:
    """Copy the latest ``checkpoint-N`` with N <= ``step`` (N counts optimiser steps, so checkpoint N holds the
    state after step N - 1) to ``before-warning-checkpoint-N``."""
    if not output_dir.exists():
        return None
    found = sorted((int(m.group(1)), p) for p in output_dir.iterdir() if (m := _CKPT.match(p.name)))
    before = [(n, p) for n, p in found if n <= step]
    if not before:
        return None
    n, src = before[-1]
    dst = output_dir / f"before-warning-checkpoint-{n}"
    if not dst.exists():
        shutil.copytree(src, dst)
    return str(dst)
