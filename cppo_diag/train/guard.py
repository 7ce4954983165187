"""The live guard of ``cppo-diag train --doctor.live true`` (docs/analyses.md, "Doctor: live").

After each step (``trainer.train``), ``TrainGuard.after_step`` computes the step's doctor statistics from the
updates the trainer already holds (``analyses.doctor_live.live_step_stats``) and the logged reward, feeds them to
``LiveDoctor`` and appends each finding that fires to ``RUN/findings.jsonl`` (``storage.layout.findings_path``).

* Until the first warning, the latest checkpoint is kept as ``checkpoints/before-warning-step=NNNNNN`` (hard links,
  renewed when a newer checkpoint appears; a name the rotation and resume never touch), so the first warning finds
  the checkpoint saved before its step even when ``ckpt.keep`` rotated it out. A run that ends without a warning
  drops it.
* A critical finding with ``doctor.on_critical = "halt"`` raises ``DoctorHalt``: the trainer closes the run with
  meta.json status ``halted`` (and ``meta.json -> doctor``: the finding, the step, the pinned checkpoint), and
  ``cppo-diag train`` exits with ``HALT_EXIT_CODE`` (3). ``"warn"`` keeps training.

The guard's own time per step is measured (``time_s``) and written to ``meta.json -> doctor`` when the run ends;
scripts/bench_doctor_live.py compares it with the step time.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from cppo_diag import metric_names as M

HALT_EXIT_CODE = 3  # cppo-diag train: the live doctor halted the run (documented in README and docs/trainer.md)
PIN_PREFIX = "before-warning-"

__all__ = ["TrainGuard", "DoctorHalt", "HALT_EXIT_CODE", "pin_checkpoint_before"]


class DoctorHalt(RuntimeError):
    """The live doctor stopped training at a critical finding (``doctor.on_critical = "halt"``)."""

    def __init__(self, finding, step: int, checkpoint: str | None):
        self.finding, self.step, self.checkpoint = finding, step, checkpoint
        where = f"; the checkpoint from before the first warning is {checkpoint}" if checkpoint else \
            "; no checkpoint was saved before the first warning (lower ckpt.every)"
        super().__init__(f"doctor: halted at step {step} on [{finding.severity}] {finding.id}: {finding.message}{where}")


def pin_checkpoint_before(run_dir: Path, step: int, previous: str | None = None) -> str | None:
    """Copy (hard links where possible) the latest checkpoint saved before ``step`` to
    ``checkpoints/before-warning-step=NNNNNN`` and remove the ``previous`` pin; returns the pin's path, or
    ``previous`` when there is no newer checkpoint."""
    from .checkpoint import CKPT_DIR, list_checkpoints

    before = [(s, p) for s, p in list_checkpoints(run_dir) if s < step]
    if not before:
        return previous
    s, src = before[-1]
    dst = Path(run_dir) / CKPT_DIR / f"{PIN_PREFIX}step={s:06d}"
    if dst.exists():
        return str(dst)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)
    tmp = dst.with_name(f".tmp-{dst.name}")
    shutil.rmtree(tmp, ignore_errors=True)

    def link(a, b):
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link)
    os.replace(tmp, dst)
    return str(dst)


class TrainGuard:
    """One run's live doctor (rank 0 decides; with several ranks the decision to halt is shared).
    ``settings``: the detector's settings (None: ``DOCTOR_SETTINGS``; tests shorten the collapse rule)."""

    settings = None

    def __init__(self, run):
        from cppo_diag.analyses.doctor import DOCTOR_SETTINGS
        from cppo_diag.analyses.doctor_live import LiveDoctor
        from cppo_diag.storage.layout import findings_path

        self.run = run
        self.cfg = run.cfg.doctor
        self.doctor = LiveDoctor(rule=run.cfg.rule.name, settings=self.settings or DOCTOR_SETTINGS)
        self.path = findings_path(run.run_dir)
        self.version = (self.settings or DOCTOR_SETTINGS).version
        self.pinned: str | None = None
        self.first_warning: int | None = None
        self.time_s = 0.0
        self.steps = 0

    def after_step(self, step: int, scalars: dict, pool) -> None:
        """Feed the step to the detector; append new findings; pin / halt as configured."""
        from cppo_diag.analyses.doctor_live import live_step_stats
        from cppo_diag.storage.layout import append_json_line

        run = self.run
        halt = None
        if run.d.main:
            t0 = time.perf_counter()
            stats = live_step_stats(pool.updates)
            new = self.doctor.observe(step, reward=scalars.get(M.REWARD_MEAN), heldout=scalars.get(M.EVAL_GREEDY_ACC),
                                      **stats)
            for f in new:
                append_json_line(self.path, {"step": step, **f.to_json()})
                if f.severity in ("warning", "critical") and self.first_warning is None:
                    self.first_warning = f.first_step if f.first_step is not None else step
                if f.severity == "critical" and self.cfg.on_critical == "halt" and halt is None:
                    halt = f
            if self.first_warning is None:  # keep the latest checkpoint until a warning fires
                self.pinned = pin_checkpoint_before(run.run_dir, step + 1, self.pinned)
            self.time_s += time.perf_counter() - t0
            self.steps += 1
        if run.d.world > 1:
            from .runtime import all_ranks_sum

            if all_ranks_sum(run.d, int(halt is not None), run.device) and halt is None:
                raise DoctorHalt(_Remote(), step, None)
        if halt is not None:
            raise DoctorHalt(halt, step, self.pinned)

    def record(self, halted: DoctorHalt | None = None) -> None:
        """Write ``meta.json -> doctor`` (rank 0, after the recorder closed): settings version, the guard's time,
        the first warning, the pinned checkpoint, and the halt."""
        from cppo_diag.storage.meta import update_meta

        if not self.run.d.main:
            return
        if self.first_warning is None and self.pinned is not None:  # no warning: no checkpoint to keep
            shutil.rmtree(self.pinned, ignore_errors=True)
            self.pinned = None
        update_meta(self.run.run_dir, doctor={
            "live": True, "on_critical": self.cfg.on_critical, "settings_version": self.version,
            "steps_checked": self.steps, "time_s": round(self.time_s, 6),
            "findings": len(self.doctor.findings), "first_warning_step": self.first_warning,
            "checkpoint_before_first_warning": self.pinned,
            "halted": None if halted is None else {"step": halted.step, "finding": halted.finding.id,
                                                   "first_step": halted.finding.first_step,
                                                   "exit_code": HALT_EXIT_CODE},
        })


class _Remote:
    """Stands for rank 0's finding on the other ranks."""

    id, severity, first_step, message = "critical (rank 0)", "critical", None, "rank 0's live doctor halted the run"
