#!/usr/bin/env python
"""Check a finished run against the ``long`` preset's four criteria (issue 10, docs/trainer.md) and print PASS/FAIL.

1. masked: over the tokens the policy had moved on since sampling (recorded ``lag`` > 0; a run without the
   column: the updates after the first of each batch) the run's rule masks 2-40% of the tokens: the fraction
   over all such tokens and its median over steps must both lie in [0.02, 0.40]. (``pg_is`` never masks: the
   criterion does not apply to it.)
2. tails: the top-decile mean of |pi - mu| (mean of the tokens at or above the bin's 90th percentile, the
   app's ``top10_mean``) in the last third of positions is >= 1.5x that of the first third. Thirds are of the
   relative position t / T (t = pos + 1, T = the response's length): first t/T <= 1/3, last t/T > 2/3.
   All logged tokens (every update) count.
3. length: mean response length (``response/len_mean`` averaged over steps) >= 128 tokens.
4. accuracy: greedy held-out accuracy after > before (``summary/greedy_acc_*``).

    python scripts/check_long_preset.py runs/dppo-chain-s0 [more runs ...]   # exit code 1 if any FAIL
    python scripts/check_long_preset.py --json RUN                             # the figures as JSON
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import polars as pl


def top_decile_mean(x: np.ndarray) -> float:
    if len(x) == 0:
        return float("nan")
    p90 = np.quantile(x, 0.9)  # linear interpolation, as analyses/position.py
    return float(x[x >= p90].mean())


def long_criteria(run_path) -> dict:
    """The four figures and their PASS flags for one run directory."""
    from cppo_diag import open_run

    run = open_run(run_path)
    from cppo_diag.analyses.updates import filter_updates, has_lag

    lf = run.tokens()
    cols = ["step", "update", "rank", "seq_id", "pos", "logp", "logp_rollout", "keep_applied"]
    toks = lf.select(cols + (["lag"] if has_lag(lf) else [])).collect()
    toks = toks.with_columns(tv=(pl.col("logp").exp() - pl.col("logp_rollout").exp()).abs(),
                             T=pl.len().over("step", "update", "rank", "seq_id"))
    later = filter_updates(toks.lazy(), "lagged" if "lag" in toks.columns else "after_first").collect()
    per_step = later.group_by("step").agg((~pl.col("keep_applied")).mean().alias("f")).sort("step")["f"].to_numpy()
    masked_all = float((~later["keep_applied"]).mean()) if len(later) else float("nan")
    masked_median = float(np.median(per_step)) if len(per_step) else float("nan")
    rel = ((toks["pos"] + 1) / toks["T"]).to_numpy()
    tv = toks["tv"].to_numpy()
    first, last = top_decile_mean(tv[rel <= 1 / 3]), top_decile_mean(tv[rel > 2 / 3])
    steps = run.steps()
    length = float(steps["response/len_mean"].mean())
    finished = "summary/greedy_acc_after" in steps.columns
    # an unfinished run: its first and latest held-out evaluations instead of the summary
    evals = steps.select("eval/greedy_acc", "eval/greedy_reward").drop_nulls()
    acc_before, acc_after = (float(evals["eval/greedy_acc"][0]), float(evals["eval/greedy_acc"][-1])) if len(evals) else (float("nan"),) * 2
    rew_before, rew_after = (float(evals["eval/greedy_reward"][0]), float(evals["eval/greedy_reward"][-1])) if len(evals) else (float("nan"),) * 2
    step_s = steps["time/step_s"].to_numpy()
    tps = steps["throughput/tokens_per_s"].drop_nulls().to_numpy() if "throughput/tokens_per_s" in steps.columns else []
    out = {
        "run": str(run_path), "rule": run.meta.rule, "steps": int(len(steps)),
        "masked_frac_after_first_update": masked_all, "masked_frac_median_step": masked_median,
        "masked_frac_step_min": float(per_step.min()) if len(per_step) else float("nan"),
        "masked_frac_step_max": float(per_step.max()) if len(per_step) else float("nan"),
        "tv_top10_first_third": first, "tv_top10_last_third": last, "tv_top10_ratio": last / first if first > 0 else float("inf"),
        "response_len_mean": length, "greedy_acc_before": acc_before, "greedy_acc_after": acc_after,
        "greedy_reward_before": rew_before, "greedy_reward_after": rew_after, "finished": finished,
        "step_s_median": float(np.median(step_s)), "train_s_total": float(step_s.sum()),
        "tokens_per_s_median": float(np.median(tps)) if len(tps) else float("nan"),
    }
    out["pass"] = {
        "masked": run.meta.rule == "pg_is" or (0.02 <= masked_all <= 0.40 and 0.02 <= masked_median <= 0.40),
        "tails": out["tv_top10_ratio"] >= 1.5,
        "length": length >= 128,
        "accuracy": acc_after > acc_before,
    }
    return out


def report(c: dict) -> str:
    p = c["pass"]
    tag = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    return "\n".join([
        f"{c['run']} (rule {c['rule']}, {c['steps']} steps{'' if c['finished'] else ', UNFINISHED'}, "
        f"median {c['step_s_median']:.1f} s/step, {c['tokens_per_s_median']:.0f} tokens/s)",
        f"  [{tag(p['masked'])}] masked where the policy had moved (lag > 0): {c['masked_frac_after_first_update']:.1%} of tokens "
        f"(per step: median {c['masked_frac_median_step']:.1%}, min {c['masked_frac_step_min']:.1%}, "
        f"max {c['masked_frac_step_max']:.1%}); want 2-40%",
        f"  [{tag(p['tails'])}] top-decile |pi - mu|: last third {c['tv_top10_last_third']:.4f} / first third "
        f"{c['tv_top10_first_third']:.4f} = {c['tv_top10_ratio']:.2f}x; want >= 1.5x",
        f"  [{tag(p['length'])}] mean response length {c['response_len_mean']:.1f} tokens; want >= 128",
        f"  [{tag(p['accuracy'])}] greedy held-out accuracy {c['greedy_acc_before']:.3f} -> {c['greedy_acc_after']:.3f} "
        f"(partial reward {c['greedy_reward_before']:.3f} -> {c['greedy_reward_after']:.3f}); want a rise",
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished run directories")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON instead")
    args = ap.parse_args(argv)
    results = [long_criteria(r) for r in args.runs]
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print("\n".join(report(c) for c in results))
    return 0 if all(all(c["pass"].values()) for c in results) else 1


if __name__ == "__main__":
    sys.exit(main())
