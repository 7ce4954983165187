"""Smoke test of ``benchmarks/bench_trainer_vs_trl.py --quick --clock cpu``: both trainers run and the ratio
lines print. No timing assertions (these machines are noisy)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_quick_run_prints_ratios():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_trainer_vs_trl.py"), "--quick",
                          "--clock", "cpu"],
                         capture_output=True, text=True, env=env, timeout=1800, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    text = out.stdout
    # one round: both sides generated the same fixed number of tokens (2 prompts x 4 responses x 8 tokens)
    assert re.search(r"round 0 \(bundled/trl\): tokens/step bundled 64 trl 64 \|", text), text
    for phase in ("rollout", "update"):
        m = re.search(rf"{phase} ratio bundled/trl: median (\d+\.\d+) \((\d+\.\d+)\)", text)
        assert m, text
        assert float(m.group(1)) > 0 and m.group(1) == m.group(2)  # one round: the median is that round


def test_steps_below_two_is_refused():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_trainer_vs_trl.py"), "--steps", "1"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert out.returncode != 0 and "--steps: expected >= 2" in out.stderr
