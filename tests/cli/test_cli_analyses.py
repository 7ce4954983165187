"""`cppo-diag report | recompute | stats` end to end on small synthetic runs."""

import base64
import json
import re

import polars as pl
import pytest

from cppo_diag.analyses.synthetic import write_synthetic_run
from cppo_diag.cli.main import main


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = write_synthetic_run(root / "cppo_run", n_tokens=5_000, seqs_per_step=8, max_len=100, with_keep_applied="cppo",
                            seed=1)
    b = write_synthetic_run(root / "plain", n_tokens=3_000, seqs_per_step=8, max_len=60, with_logp_old=False, seed=2)
    return a, b


@pytest.mark.slow
def test_report_writes_pngs_and_self_contained_html(runs, tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["report", str(runs[0]), str(runs[1]), "--out", str(out), "--bin", "16", "--no-progress",
                 "--param", "cppo:delta=0.2"]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    for fig in ("compare_masked_frac", "cppo_run_position_tv", "cppo_run_budget_by_step", "cppo_run_first_reject",
                "cppo_run_slack", "cppo_run_mismatch", "cppo_run_whatif_masked", "plain_position_tv"):
        assert f"{fig}.png" in pngs
    assert "plain_mismatch.png" not in pngs
    page = (out / "report.html").read_text()
    imgs = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(imgs) == len(pngs)
    assert base64.b64decode(imgs[0])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "needs column 'logp_old'" in page  # the run without logp_old says so
    assert "applied:cppo" in page
    assert "wrote" in capsys.readouterr().out


def test_recompute_cli(runs, tmp_path, capsys):
    side = tmp_path / "side.parquet"
    assert main(["recompute", str(runs[0]), "--rule", "cppo", "--out", str(side), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "agreement with keep_applied: 100.000%" in text
    df = pl.read_parquet(side)
    assert {"step", "update", "rank", "seq_id", "pos", "keep", "reason"} <= set(df.columns)
    assert main(["recompute", str(runs[0]), "--rule", "dppo", "--param", "delta=0.05", "--json",
                 "--steps", "0:1", "--no-progress"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["params"] == {"delta": 0.05} and [r["step"] for r in data["by_step"]] == [0, 1]
    assert main(["recompute", str(runs[0]), "--rule", "nope", "--no-progress"]) == 2
    assert "known rules" in capsys.readouterr().err


def test_stats_cli(runs, tmp_path, capsys):
    assert main(["stats", str(runs[0]), "--by", "position", "--bin", "25", "--format", "csv"]) == 0
    csv = capsys.readouterr().out
    lines = csv.strip().splitlines()
    assert lines[0].startswith("metric,bin,bin_start,bin_end,count,mean,p50,p90,p99,top10_mean")
    assert main(["stats", str(runs[0]), "--by", "relative", "--bin", "5", "--format", "json", "--metric", "tv"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 5 and {r["metric"] for r in rows} == {"tv"}
    assert main(["stats", str(runs[1]), "--mismatch"]) == 2
    assert "logp_old" in capsys.readouterr().err
