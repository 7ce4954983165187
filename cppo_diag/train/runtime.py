"""What the trainer's phases share: processes, device and precision, seeds, and the ``Run`` they read and update.

``start_run(cfg)`` does everything before the first iteration: start the process group (torchrun), pick the
device, build the task, the policy, the samplers and AdamW, resume from the run directory's last checkpoint,
and open the recorder. The phases (``phases.py``) then read the ``Run`` and change only its ``queue`` and
``summary``.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cppo_diag.capture import NullRecorder, RunRecorder
from cppo_diag.storage.meta import is_run_dir

from .checkpoint import list_checkpoints, load_checkpoint, load_queue
from .config import TrainConfig, to_dict
from .models import build_policy
from .rollout import RolloutBatch, TorchSampler
from .tasks import build_task, warmstart_key


# -- processes, device, precision ----------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device_kind: str) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: start a process group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def barrier(d: Dist) -> None:
    """Wait for every rank (no-op in a single process)."""
    if d.world > 1:
        import torch.distributed as dist

        dist.barrier()


def all_ranks_sum(d: Dist, value: int, device) -> int:
    """The sum of an integer over the ranks (the value itself in a single process)."""
    if d.world <= 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], device=device)
    dist.all_reduce(t)
    return int(t.item())


def resolve_device(cfg: TrainConfig, d: Dist) -> torch.device:
    kind = ("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: 'cuda' requested, but torch.cuda.is_available() is False")
        torch.cuda.set_device(d.local_rank)
        return torch.device("cuda", d.local_rank)
    return torch.device("cpu")


_AMP = {"bf16": torch.bfloat16, "fp32": None}


def autocast_dtype(cfg: TrainConfig, device: torch.device):
    """The trainer's autocast dtype: ``precision`` auto (bf16 on CUDA, none on CPU) | fp32 | bf16."""
    if cfg.precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return _AMP[cfg.precision]


def rollout_autocast_dtype(cfg: TrainConfig, amp):
    """The sampler's autocast dtype: ``rollout.precision`` auto (the trainer's ``amp``) | fp32 | bf16."""
    return amp if cfg.rollout.precision == "auto" else _AMP[cfg.rollout.precision]


def lr_lambda(cfg: TrainConfig):
    """Linear warm-up over ``optim.warmup_steps`` iterations, then ``optim.schedule`` to ``steps``, decaying to
    ``optim.min_lr_ratio`` of the peak (not to 0) when that is set."""
    warm, total, kind = cfg.optim.warmup_steps, max(cfg.steps, 1), cfg.optim.schedule
    floor = cfg.optim.min_lr_ratio

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        frac = min(1.0, (step - warm) / max(1, total - warm))
        if kind == "cosine":
            return floor + (1.0 - floor) * 0.5 * (1 + math.cos(math.pi * frac))
        if kind == "linear":
            return floor + (1.0 - floor) * (1.0 - frac)
        return 1.0

    return f


# -- seeds: everything random derives from (seed, step, rank), so a resumed run replays exactly ------------------
def default_run_name(cfg: TrainConfig) -> str:
    return cfg.log.name or f"{cfg.rule.name}-{cfg.task.kind}-s{cfg.seed}"


def step_rng(seed: int, step: int, rank: int, purpose: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, rank, purpose])


def torch_gen(seed: int, step: int, rank: int, device) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(int(np.random.default_rng([seed, step, rank, 7]).integers(2**62)))
    return g


# -- the run -------------------------------------------------------------------------------------------------
@dataclass
class StepClock:
    """The time split of one iteration (``time/*`` scalars). Every phase timer reads ``now()``."""

    start: float = field(default_factory=lambda: StepClock.now())
    rollout_s: float = 0.0
    update_s: float = 0.0
    rule_s: float = 0.0
    log_tokens_s: float = 0.0

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def elapsed(self) -> float:
        return self.now() - self.start


@dataclass
class Run:
    """Everything the phases read; ``queue`` and ``summary`` are the only state they change."""

    cfg: TrainConfig
    d: Dist
    device: torch.device
    amp: torch.dtype | None  # the trainer's autocast dtype
    task: object
    policy: object
    module: torch.nn.Module  # the model
    train_module: torch.nn.Module  # the model, or its DDP wrapper: what the updates run forward through
    sampler: TorchSampler  # the rollout engine (rollout.precision)
    eval_sampler: TorchSampler  # evaluation, in the trainer's numerics
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    name: str
    run_dir: Path
    rec: object  # RunRecorder, the factory's recorder, or a NullRecorder (log.record false)
    start: int = 0  # first iteration to run (after the resumed checkpoint)
    summary: dict = field(default_factory=dict)
    # rollout.staleness = k: {iteration j: (batch sampled for j, policy version that sampled it)}
    queue: dict[int, tuple[RolloutBatch, int]] = field(default_factory=dict)
    scalar_steps: set[int] = field(default_factory=set)  # steps whose scalars are on disk (every_n_steps > 1)

    @property
    def rule_params(self) -> dict:
        return dict(self.cfg.rule.params)

    def step_logger(self, step: int):
        """The recorder for this step, or a NullRecorder for a step it already holds: a resumed run replays the
        steps after its last checkpoint to rebuild the state, without logging them twice. Steps the recorder
        does not sample (every_n_steps > 1) never get a done marker: one whose scalars are on disk counts."""
        logged = self.rec.is_done(step) or (step % self.cfg.log.every_n_steps != 0 and step in self.scalar_steps)
        return _NULL if logged else self.rec


_NULL = NullRecorder()


def start_run(cfg: TrainConfig, recorder_factory=None) -> Run:
    """Processes, device, seeds, task, model, samplers, optimiser; then resume and open the recorder."""
    kind = "cuda" if (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())) else "cpu"
    d = setup_distributed(kind)
    device = resolve_device(cfg, d)
    amp = autocast_dtype(cfg, device)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)

    task = build_task(cfg.task)
    policy = build_policy(cfg.model, warmstart_key(cfg.task), device)
    module = policy.module
    module.train()
    train_module = module
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_module = DDP(module, device_ids=[device.index] if device.type == "cuda" else None)
    rollout_amp = rollout_autocast_dtype(cfg, amp)

    def make_sampler(dtype):
        return TorchSampler(lambda ids, attn, pos, cache: policy.forward(module, ids, attn, pos, cache, use_cache=True),
                            eos_id=policy.eos_id, pad_id=policy.pad_id, device=device, autocast_dtype=dtype,
                            empty_cache=policy.empty_cache)

    sampler = make_sampler(rollout_amp)
    eval_sampler = sampler if rollout_amp == amp else make_sampler(amp)
    optimizer = torch.optim.AdamW(module.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=(cfg.optim.beta1, cfg.optim.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    name = default_run_name(cfg)
    run = Run(cfg=cfg, d=d, device=device, amp=amp, task=task, policy=policy, module=module,
              train_module=train_module, sampler=sampler, eval_sampler=eval_sampler, optimizer=optimizer,
              scheduler=scheduler, name=name, run_dir=Path(cfg.log.out_dir) / name, rec=None)
    _resume(run)
    run.rec = _open_recorder(run, recorder_factory)
    return run


def _resume(run: Run) -> None:
    """Load the run directory's last checkpoint (weights, AdamW, schedule, summary, the rollout queue)."""
    cfg = run.cfg
    ckpts = list_checkpoints(run.run_dir) if cfg.ckpt.resume else []
    if not ckpts:
        return
    state = load_checkpoint(ckpts[-1][1], run.module, run.optimizer, run.scheduler)
    run.start, run.summary = state["step"] + 1, dict(state.get("summary", {}))
    if cfg.rollout.staleness > 0 and state.get("queue"):
        from .phases import unpack_queue

        run.queue = unpack_queue(load_queue(ckpts[-1][1], run.d.rank, run.device))


def _open_recorder(run: Run, recorder_factory):
    cfg = run.cfg
    meta = dict(config=to_dict(cfg), trainer="cppo-diag", rule=cfg.rule.name, rule_params=run.rule_params,
                model=run.policy.name, task=run.task.name, anchor=cfg.rule.anchor, rank=run.d.rank)
    sinks = [n for n, on in (("tensorboard", cfg.log.tensorboard), ("wandb", cfg.log.wandb)) if on]
    if not cfg.log.record:
        rec = NullRecorder()
    elif recorder_factory is not None:
        rec = recorder_factory(cfg.log.out_dir, run.name, **meta)
    else:
        import cppo_diag.analyses.aggregate  # noqa: F401 - registers the recorder's write-time aggregates
        rec = RunRecorder(cfg.log.out_dir, name=run.name, every_n_steps=cfg.log.every_n_steps,
                          seq_fraction=cfg.log.seq_fraction, on_error="raise", sinks=sinks, **meta)
    if run.start > 0 and cfg.log.record and cfg.log.every_n_steps > 1 and is_run_dir(run.run_dir):
        from cppo_diag.storage import open_run

        run.scalar_steps = set(open_run(run.run_dir).steps()["step"].to_list())
    return rec
