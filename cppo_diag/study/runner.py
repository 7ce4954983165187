"""Run every cell of a study grid with the bundled trainer, resumably, in 1..N worker processes.

Each cell is one ``cppo-diag train`` process (``python -m cppo_diag.cli.main train ...``), so a crash,
a ``kill`` or an out-of-memory in one run never takes the others down, and torch's thread pool can be
sized per worker. All runs land directly under one root (``ROOT/<rule>-s<seed>``), which is exactly what
``cppo-diag app ROOT`` and ``cppo_diag.list_runs(ROOT)`` browse; the study's own files (its resolved
config, the grid manifest, one log per run) live in ``ROOT/_study/``, which is not a run.

Resume: a cell whose run directory says ``status == "finished"`` in ``meta.json`` and has at least
``steps`` completed steps is skipped; any other existing run directory (killed, failed, shorter) is
handed back to the trainer, which continues it from its last checkpoint in the same directory.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol, Sequence

from cppo_diag.storage import schema
from cppo_diag.storage.meta import RunFormatError, is_run_dir, read_meta
from cppo_diag.study.config import Cell, StudyConfig

__all__ = [
    "STUDY_DIR",
    "CellState",
    "Launcher",
    "TrainerLauncher",
    "StudyRunReport",
    "cell_state",
    "run_study",
    "write_manifest",
    "read_manifest",
]

STUDY_DIR = "_study"  # ROOT/_study: study.json, manifest.json, logs/<run>.log (never a run directory)
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class CellState:
    status: str  # "finished" | "partial" | "missing"
    completed_steps: int
    meta_status: str | None  # meta.json "status" as written by the trainer, None without meta.json


def _completed_steps(run_dir: Path) -> int:
    """Number of distinct steps with a completion marker (any rank).

    Goes through the run reader when it is available (the contract), so the rule of what counts as a
    complete step lives in one place.
    """
    try:
        from cppo_diag.storage import open_run
    except ImportError:  # reader not installed: count the schema's _done markers directly
        done = run_dir / schema.DONE_DIR
        if not done.is_dir():
            return 0
        steps = {p.name.split(".")[0] for p in done.iterdir() if p.name.startswith("step=")}
        return len(steps)
    try:
        return len(open_run(run_dir).completed_steps())
    except Exception:  # unreadable / half-created run: treat as not done, the trainer resumes or restarts
        return 0


def cell_state(run_dir: str | Path, steps: int) -> CellState:
    """Whether the run at ``run_dir`` is finished (skip), partial (resume) or missing (start)."""
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        return CellState("missing", 0, None)
    try:
        meta = read_meta(run_dir, version=False)
    except RunFormatError:
        return CellState("partial", 0, None)
    done = _completed_steps(run_dir)
    if meta.status == "finished" and done >= _recorded_steps(meta, steps):
        return CellState("finished", done, meta.status)
    return CellState("partial", done, meta.status)


def _recorded_steps(meta, steps: int) -> int:
    """How many of ``steps`` iterations a finished run holds token shards (and ``_done`` markers) for: the bundled
    trainer records every ``log.every_n_steps``-th iteration from the first (its resolved config in meta.json)."""
    log = (meta.config or {}).get("log") or {}
    every = log.get("every_n_steps", 1)
    every = every if isinstance(every, int) and every >= 1 else 1
    return len(range(0, steps, every))


class Launcher(Protocol):
    """Turns a grid cell into the command line of one training process."""

    def argv(self, cell: Cell, study: StudyConfig, root: Path, threads: int = 0) -> list[str]: ...


def _fmt_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple, dict)):
        return json.dumps(v)
    return str(v)


@dataclass
class TrainerLauncher:
    """``cppo-diag train`` for one cell: the study's trainer preset/config, then its overrides.

    The trainer's command line (``cppo_diag.train.config``): ``--preset NAME``, ``--config FILE``, one
    ``--section.field VALUE`` per config field and ``--rule.param KEY=VALUE`` per rule parameter.
    ``python`` defaults to the interpreter running the study, so a worker uses the same venv.
    """

    python: str = sys.executable
    extra_args: Sequence[str] = ()

    def argv(self, cell: Cell, study: StudyConfig, root: Path, threads: int = 0) -> list[str]:
        cmd = [self.python, "-m", "cppo_diag.cli.main", "train"]
        if study.trainer_preset:
            cmd += ["--preset", study.trainer_preset]
        if study.trainer_config:
            cmd += ["--config", study.trainer_config]
        sets = {
            **cell.overrides,
            "rule.name": cell.rule,
            "seed": cell.seed,
            "steps": study.steps,
            "log.out_dir": str(root),
            "log.name": cell.run_name,
        }
        if threads:
            sets["threads"] = threads
        for k, v in sets.items():
            cmd += [f"--{k}", _fmt_value(v)]
        for k, v in cell.rule_params.items():
            cmd += ["--rule.param", f"{k}={_fmt_value(v)}"]
        cmd += list(self.extra_args)
        return cmd


@dataclass
class StudyRunReport:
    root: Path
    total: int
    skipped: list[str] = field(default_factory=list)  # finished before this invocation
    ran: list[str] = field(default_factory=list)  # ran to completion now
    failed: dict[str, str] = field(default_factory=dict)  # run name -> reason (with log path)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed


def write_manifest(study: StudyConfig, root: Path) -> Path:
    """Write ROOT/_study/{manifest.json, study.json}: the grid and the resolved study config."""
    sdir = root / STUDY_DIR
    (sdir / "logs").mkdir(parents=True, exist_ok=True)
    cells = [
        {
            "run_name": c.run_name,
            "rule": c.rule,
            "seed": c.seed,
            "setting": c.setting,
            "label": c.label,
            "rule_params": c.rule_params,
            "overrides": c.overrides,
        }
        for c in study.cells()
    ]
    manifest = {
        "study": study.name,
        "description": study.description,
        "source": study.source,
        "steps": study.steps,
        "rules": list(study.rules),
        "seeds": list(study.seeds),
        "analysis": dict(study.analysis.__dict__),
        "cells": cells,
    }
    path = sdir / MANIFEST
    tmp = path.with_name(".tmp-" + path.name)
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    (sdir / "study.json").write_text(json.dumps(study.raw, indent=2, default=str) + "\n")
    return path


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / STUDY_DIR / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"study root {root}: expected {STUDY_DIR}/{MANIFEST} (written by `cppo-diag study`), found none"
        )
    return json.loads(path.read_text())


def _tail(path: Path, n: int = 15) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-n:])


@dataclass
class _Job:
    cell: Cell
    proc: subprocess.Popen
    log_path: Path
    log_fh: object
    started: float


def run_study(
    study: StudyConfig,
    root: str | Path,
    *,
    workers: int = 1,
    launcher: Launcher | None = None,
    threads_per_worker: int | None = None,
    progress: bool = True,
    poll_s: float = 1.0,
    only: Callable[[Cell], bool] | None = None,
) -> StudyRunReport:
    """Run every unfinished cell of ``study`` under ``root`` with at most ``workers`` processes at once.

    ``threads_per_worker`` sets OMP/MKL threads of each process and is passed to the launcher (the trainer's
    ``--threads``); default CPU count // workers, at least 1, so two workers on a 2-core box do not
    oversubscribe it.
    The progress bar counts completed training steps over the whole grid (finished runs included).
    A failing cell is reported (with the tail of its log) and the others continue.
    """
    if workers < 1:
        raise ValueError(f"workers: expected >= 1, found {workers}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    launcher = launcher or TrainerLauncher()
    write_manifest(study, root)
    logs = root / STUDY_DIR / "logs"
    cells = [c for c in study.cells() if only is None or only(c)]
    report = StudyRunReport(root=root, total=len(cells))
    threads = threads_per_worker or max(1, (os.cpu_count() or 1) // workers)
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(threads),
        MKL_NUM_THREADS=str(threads),
        PYTHONUNBUFFERED="1",
    )

    pending: list[Cell] = []
    done_steps: dict[str, int] = {}
    for c in cells:
        state = cell_state(root / c.run_name, study.steps)
        done_steps[c.run_name] = min(state.completed_steps, study.steps)
        if state.status == "finished":
            report.skipped.append(c.run_name)
        else:
            pending.append(c)

    from tqdm.auto import tqdm

    bar = tqdm(
        total=len(cells) * study.steps,
        initial=sum(done_steps.values()),
        desc=f"study {study.name}",
        unit="step",
        disable=not progress,
        dynamic_ncols=True,
    )
    bar.set_postfix_str(f"{len(report.skipped)}/{len(cells)} runs done, {len(pending)} to run")
    t0 = time.time()
    running: list[_Job] = []

    def refresh() -> None:
        for job in running:
            n = min(_completed_steps(root / job.cell.run_name), study.steps)
            if n > done_steps[job.cell.run_name]:
                bar.update(n - done_steps[job.cell.run_name])
                done_steps[job.cell.run_name] = n

    def finish(job: _Job, rc: int) -> None:
        job.log_fh.close()
        state = cell_state(root / job.cell.run_name, study.steps)
        n = min(state.completed_steps, study.steps)
        if n > done_steps[job.cell.run_name]:
            bar.update(n - done_steps[job.cell.run_name])
            done_steps[job.cell.run_name] = n
        if rc == 0 and state.status == "finished":
            report.ran.append(job.cell.run_name)
        else:
            why = (
                f"exit code {rc}" if rc != 0 else
                f"exited 0 but run is {state.status} (meta status {state.meta_status!r}, "
                f"{state.completed_steps}/{study.steps} steps)"
            )
            report.failed[job.cell.run_name] = f"{why}; log {job.log_path}"
            bar.write(f"[study] {job.cell.run_name} FAILED: {why}. Last lines of {job.log_path}:\n"
                      f"{_tail(job.log_path)}")
        bar.set_postfix_str(
            f"{len(report.skipped) + len(report.ran)}/{len(cells)} runs done, "
            f"{len(report.failed)} failed"
        )

    try:
        queue = list(pending)
        while queue or running:
            while queue and len(running) < workers:
                cell = queue.pop(0)
                argv = launcher.argv(cell, study, root, threads)
                log_path = logs / f"{cell.run_name}.log"
                fh = open(log_path, "a")
                fh.write(f"\n# {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} $ {shlex.join(argv)}\n")
                fh.flush()
                proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                        stdin=subprocess.DEVNULL)
                running.append(_Job(cell, proc, log_path, fh, time.time()))
            time.sleep(poll_s)
            refresh()
            for job in list(running):
                rc = job.proc.poll()
                if rc is not None:
                    running.remove(job)
                    finish(job, rc)
    except BaseException:
        # Ctrl-C or any error: stop only the processes this runner started; their runs resume next time.
        for job in running:
            if job.proc.poll() is None:
                job.proc.terminate()
        for job in running:
            try:
                job.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.proc.kill()
            job.log_fh.close()
        raise
    finally:
        bar.close()
    report.seconds = time.time() - t0
    return report
