"""The task interface (verifiable problems with a reward function) and the held-out split every task uses.

Held-out rule (shared by all tasks through the helpers below): the held-out set is a set of **distinct**
prompts, drawn without replacement, and no training problem ever has one of its prompts. A task states how
many distinct prompts it can produce (``domain_size``, None when unbounded or unknown), so an accuracy on the
held-out set can be read against the size of the domain it came from (``heldout_scalars``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import numpy as np


@dataclass
class Problem:
    prompt: str  # text shown to the model (before any chat template)
    answer: str  # reference answer
    meta: dict = field(default_factory=dict)


class Task(Protocol):
    name: str
    domain_size: int | None  # distinct prompts the task can produce (held-out + training); None = unbounded

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        """n training problems drawn with ``rng`` (never a held-out prompt)."""

    def eval_set(self) -> list[Problem]:
        """The fixed held-out problems (distinct prompts) used for greedy accuracy and Avg@k."""

    def score(self, problem: Problem, completion: str) -> tuple[float, bool]:
        """(reward, exactly correct) for one completion."""


def draw_distinct(draw: Callable[[np.random.Generator], Problem], n: int, rng: np.random.Generator, *,
                  domain_size: int | None = None, what: str = "task.eval_size") -> list[Problem]:
    """n problems with distinct prompts from a generator ``draw(rng)``: sampling without replacement from the
    generator's distribution (repeats are skipped). Raises when the domain cannot hold n distinct prompts plus
    at least one training prompt, or when the generator stops producing new prompts."""
    if domain_size is not None and n >= domain_size:
        raise ValueError(f"{what}: expected fewer held-out problems than the task's {domain_size} distinct prompts "
                         f"(training needs the rest), found {n}")
    out, seen, tries = [], set(), 0
    limit = 50 * n + 10_000
    while len(out) < n:
        tries += 1
        if tries > limit:
            raise ValueError(f"{what}: could draw only {len(out)} distinct prompts of the {n} asked for in "
                             f"{limit} draws; the task's prompt domain is too small for this held-out size")
        p = draw(rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
    return out


def distinct_prompts(problems: Iterable[Problem]) -> list[Problem]:
    """The first problem of each distinct prompt, in order."""
    firsts: dict[str, Problem] = {}
    for p in problems:
        firsts.setdefault(p.prompt, p)
    return list(firsts.values())


def split_distinct(problems: Iterable[Problem], n_eval: int, rng: np.random.Generator, *,
                   what: str = "task.eval_size") -> tuple[list[Problem], list[Problem]]:
    """(held-out, training) from a finite list: ``n_eval`` distinct prompts drawn without replacement, and
    every problem whose prompt is not held out (duplicates of a held-out prompt never reach training)."""
    problems = list(problems)
    distinct = distinct_prompts(problems)
    if n_eval >= len(distinct):
        raise ValueError(f"{what}: expected fewer held-out problems than the {len(distinct)} distinct prompts "
                         f"(training needs the rest), found {n_eval}")
    held = [distinct[i] for i in rng.permutation(len(distinct))[:n_eval]]
    return held, exclude_prompts(problems, held)


def exclude_prompts(problems: Iterable[Problem], held: Iterable[Problem]) -> list[Problem]:
    """The problems whose prompt is not one of ``held``'s."""
    banned = {p.prompt for p in held}
    return [p for p in problems if p.prompt not in banned]


def heldout_scalars(task, prefix: str = "eval/") -> dict[str, float]:
    """``<prefix>heldout_size`` (distinct held-out prompts) and, when the task states it, ``<prefix>domain_size``
    (distinct prompts the task can produce): logged next to every held-out accuracy."""
    out = {f"{prefix}heldout_size": float(len({p.prompt for p in task.eval_set()}))}
    domain = getattr(task, "domain_size", None)
    if domain is not None:
        out[f"{prefix}domain_size"] = float(domain)
    return out
