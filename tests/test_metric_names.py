"""One home for the step-scalar names: the docs list exactly them, the trainer logs no other, the rules and the
loss use them."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cppo_diag import metric_names as M
from cppo_diag.loss import policy_loss
from cppo_diag.masks import compute_mask

ROOT = Path(__file__).resolve().parents[1]


def documented_names() -> set[str]:
    """Names in the first column of docs/trainer.md's "Scalars logged per step" table; a bare name (no '/')
    shares the prefix of the name before it in the cell; wildcards ('...') are left out."""
    text = (ROOT / "docs" / "trainer.md").read_text()
    section = text.split("## Scalars logged per step", 1)[1].split("\n## ", 1)[0]
    names: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        prefix = ""
        for name in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            if "/" in name:
                prefix = name.rsplit("/", 1)[0] + "/"
            else:
                name = prefix + name
            if not name.endswith("..."):
                names.add(name)
    return names


def test_docs_list_exactly_the_names_of_the_module():
    documented = documented_names()
    defined = set(M.trainer_scalar_names())
    assert defined - documented == set(), "defined in cppo_diag/metric_names.py but not in docs/trainer.md"
    assert documented - defined == set(), "listed in docs/trainer.md but not defined in cppo_diag/metric_names.py"


def test_rule_and_loss_metrics_use_the_names():
    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=g, dtype=torch.float64) * 2  # (B, T)
    lr = lp + 0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64)  # (B, T)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    res = compute_mask("cppo", logp=lp, logp_rollout=lr, advantages=adv)
    expected = {M.mask_name("cppo", k) for k in M.MASK_KEYS} | {M.rule_name("cppo", k) for k in M.CPPO_KEYS}
    assert expected <= set(res.metrics)
    assert {M.div_name("tv", s) for s in M.DIV_STATS} <= set(res.metrics)
    _, metrics = policy_loss(lp, lr, adv, None, res, trunc_cap=2.0)
    assert set(metrics) <= set(M.LOSS_SCALARS) and M.LOSS_POLICY in metrics


def test_a_run_logs_only_named_scalars(tmp_path):
    from cppo_diag import open_run
    from cppo_diag.train import build_config, train

    cfg = build_config("tiny", overrides={"steps": 1, "threads": 1, "optim": {"updates_per_batch": 2},
                                          "log": {"out_dir": str(tmp_path), "name": "r", "progress": False}})
    summary = train(cfg)
    logged = set(open_run(tmp_path / "r").steps().columns) - {"step"}
    known = set(M.trainer_scalar_names(rule="cppo", divergence="tv", k=cfg.log.eval_k))
    known |= {M.after_first(n) for n in known if M.is_after_first_kind(n)}
    assert logged - known == set()
    assert set(M.BATCH_SCALARS) | set(M.TIME_SCALARS) <= logged
    assert any(n.startswith(M.AFTER_FIRST) for n in logged)
    # the tiny preset's fib task has no per-digit validity check: no valid-share summary
    assert set(summary) == set(M.SUMMARY_SCALARS) - {M.SUMMARY_GREEDY_VALID_SHARE_BEFORE,
                                                     M.SUMMARY_GREEDY_VALID_SHARE_AFTER}


def test_summary_and_eval_helpers():
    assert M.summary_name(M.EVAL_GREEDY_ACC, "before") == "summary/greedy_acc_before"
    assert M.summary_name("eval/avg@16", "after") == "summary/avg@16_after"
    assert M.summary_name(M.EVAL_HELDOUT_SIZE) == "summary/heldout_size"
    assert M.eval_avg_at(16) == "eval/avg@16"
    assert M.mask_name("dppo") == "mask/dppo/frac"
