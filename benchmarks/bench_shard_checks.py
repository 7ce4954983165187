"""Cost of the reader's shard checks (cppo_diag/storage/validate.py): decode every page once and apply the value
rule, then remember the result in RUN/_cache/shard_checks.json.

Writes a run of 64 steps x 64 responses x 512 tokens (2.1M tokens) into DIR (default: a temp dir), then times,
in fresh processes: the first listing (checks every shard), one scan query, and the listing of a later process
(reads the saved checks). Prints the numbers quoted in docs/run-format.md ("Guarantees").

Usage: python benchmarks/bench_shard_checks.py [DIR]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TIMED = """
import sys, time
import polars as pl
import cppo_diag
run = cppo_diag.open_run(sys.argv[1])
t0 = time.perf_counter(); files = run.token_files(); t1 = time.perf_counter()
run.tokens().select(pl.len(), (pl.col("logp") - pl.col("logp_rollout")).abs().mean()).collect()
t2 = time.perf_counter()
print(f"{len(files)} shards: listing with checks {t1 - t0:.2f} s, one scan query {t2 - t1:.2f} s")
"""


def write_run(root: Path) -> Path:
    import numpy as np

    sys.path.insert(0, str(REPO))
    from cppo_diag import RunRecorder

    rng = np.random.default_rng(0)
    B, T = 64, 512
    with RunRecorder(root, name="bench-checks", resume=False) as rec:
        for step in range(64):
            mu = -rng.random((B, T), dtype=np.float32) * 3
            rec.log_tokens(step=step, logp=np.minimum(mu + 0.01 * rng.standard_normal((B, T), dtype=np.float32), 0),
                           logp_rollout=mu, advantages=rng.standard_normal(B).astype(np.float32),
                           entropy=rng.random((B, T), dtype=np.float32), token_ids=rng.integers(0, 50000, (B, T)))
            rec.end_step(step)
    return root / "bench-checks"


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="bench-checks-"))
    run = write_run(root)
    size = sum(f.stat().st_size for f in run.rglob("*.parquet")) / 2**20
    print(f"run {run}: {size:.0f} MB of shards")
    for label in ("first process (checks every shard)", "later process (saved checks)"):
        out = subprocess.run([sys.executable, "-c", TIMED, str(run)], capture_output=True, text=True,
                             env={"PYTHONPATH": str(REPO), "PATH": ""}, check=True).stdout.strip()
        print(f"{label}: {out}")


if __name__ == "__main__":
    main()
