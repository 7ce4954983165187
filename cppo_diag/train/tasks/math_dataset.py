"""A JSONL / Parquet math dataset (DAPO-Math-17k style rows of prompt + answer) scored by ``\\boxed{}`` match."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from .base import Problem, distinct_prompts, exclude_prompts, split_distinct

DEFAULT_SUFFIX = "\nPlease reason step by step, and put your final answer within \\boxed{}."


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, balancing nested braces."""
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)\s*\{", text)]
    if not starts:
        m = re.findall(r"\\boxed\s+([^\s$]+)", text)  # "\boxed 5"
        return m[-1] if m else None
    i = starts[-1]
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None  # unbalanced: the response was cut off


def normalize_answer(ans: str) -> str:
    """Canonical form for string comparison: no spaces, $, \\left/\\right, \\text{}, thousands commas, '.0'."""
    s = ans.strip()
    s = re.sub(r"\\text\{([^}]*)\}", r"\1", s)
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|:)", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("^\\circ", "").replace("^{\\circ}", "")
    s = s.replace("$", "").replace(" ", "").rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    m = re.fullmatch(r"\\frac\{?(-?\d+)\}?\{?(\d+)\}?", s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    return s


class MathDatasetTask:
    def __init__(self, path: str, *, prompt_field: str = "prompt", answer_field: str = "answer",
                 suffix: str = DEFAULT_SUFFIX, eval_path: str = "", eval_size: int = 64, eval_seed: int = 12345):
        rows = self._read(path)
        for i, r in enumerate(rows[:1]):
            for f in (prompt_field, answer_field):
                if f not in r:
                    raise ValueError(f"task.path {path}: row {i} has no field {f!r} (found {sorted(r)})")
        problems = [Problem(self._text(r[prompt_field]) + suffix, str(r[answer_field]), {}) for r in rows]
        if eval_path:  # a separate held-out file: its distinct prompts, none of them trained on
            held = [Problem(self._text(r[prompt_field]) + suffix, str(r[answer_field]), {}) for r in self._read(eval_path)]
            self._eval = distinct_prompts(held)
            self._train = exclude_prompts(problems, self._eval)
        else:  # hold out a fixed random set of distinct prompts (at most a fifth of them)
            k = min(eval_size, len({p.prompt for p in problems}) // 5)
            self._eval, self._train = split_distinct(problems, k, np.random.default_rng(eval_seed))
        if not self._train:
            raise ValueError(f"task.path {path}: expected at least one training row whose prompt is not held out, "
                             f"found {len(rows)} rows in all")
        self.domain_size = len({p.prompt for p in self._eval} | {p.prompt for p in self._train})
        self.name = f"math:{Path(path).name}"

    @staticmethod
    def _text(v) -> str:
        # DAPO-Math-17k stores the prompt as a chat list [{"role": "user", "content": ...}]
        if isinstance(v, list):
            return "\n".join(m.get("content", "") for m in v if isinstance(m, dict))
        return str(v)

    @staticmethod
    def _read(path: str) -> list[dict]:
        p = Path(path)
        if not p.exists():
            raise FileNotFoundError(f"task.path: no such file {p}")
        if p.suffix == ".parquet":
            import polars as pl

            return pl.read_parquet(p).to_dicts()
        if p.suffix in (".jsonl", ".json"):
            return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
        raise ValueError(f"task.path: expected a .jsonl or .parquet file, found {p.suffix!r} ({p})")

    def sample(self, n: int, rng: np.random.Generator) -> list[Problem]:
        return [self._train[i] for i in rng.integers(0, len(self._train), size=n)]

    def eval_set(self) -> list[Problem]:
        return self._eval

    def score(self, problem: Problem, completion: str) -> tuple[float, bool]:
        got = extract_boxed(completion)
        ok = got is not None and normalize_answer(got) == normalize_answer(problem.answer)
        return float(ok), ok
