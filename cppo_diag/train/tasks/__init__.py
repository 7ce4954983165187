"""Tasks with verifiable rewards: synthetic arithmetic, a JSONL/Parquet math dataset, optional reasoning-gym."""

from __future__ import annotations

from .arithmetic import ArithmeticTask
from .base import Problem, Task
from .chain import ChainTask
from .math_dataset import MathDatasetTask, extract_boxed, normalize_answer

__all__ = ["ArithmeticTask", "ChainTask", "MathDatasetTask", "Problem", "Task", "build_task", "extract_boxed", "warmstart_key", "normalize_answer"]


def warmstart_key(cfg) -> str:
    """The shipped warm start a ``TaskConfig`` trains from: ``assets/warmstart_<key>`` (the chain task with forks
    has its own, trained on answers that branch at the forks)."""
    if cfg.kind == "chain" and cfg.forks > 0:
        return "chain_forks" if cfg.fork_profile == "rising" else f"chain_forks_{cfg.fork_profile}"
    return cfg.kind


def build_task(cfg) -> Task:
    """Task from a ``TaskConfig`` (``cppo_diag.train.config``)."""
    if cfg.kind in ("fib", "add"):
        return ArithmeticTask(cfg.kind, min_terms=cfg.min_terms, max_terms=cfg.max_terms, digits=cfg.digits,
                              reward=cfg.reward, eval_size=cfg.eval_size, eval_seed=cfg.eval_seed)
    if cfg.kind == "chain":
        return ChainTask(min_len=cfg.min_terms, max_len=cfg.max_terms, reward=cfg.reward, eval_size=cfg.eval_size,
                         eval_seed=cfg.eval_seed, forks=cfg.forks, detour_credit=cfg.detour_credit,
                          fork_profile=cfg.fork_profile)
    if cfg.kind == "dataset":
        if not cfg.path:
            raise ValueError("task.path: expected a .jsonl or .parquet file for task.kind='dataset', found ''")
        return MathDatasetTask(cfg.path, prompt_field=cfg.prompt_field, answer_field=cfg.answer_field,
                               eval_path=cfg.eval_path, eval_size=cfg.eval_size, eval_seed=cfg.eval_seed)
    if cfg.kind == "reasoning_gym":
        from .reasoning_gym_task import ReasoningGymTask

        return ReasoningGymTask(cfg.rg_name, eval_size=cfg.eval_size, seed=cfg.eval_seed)
    raise ValueError(f"task.kind: expected one of 'fib', 'add', 'chain', 'dataset', 'reasoning_gym', found {cfg.kind!r}")
