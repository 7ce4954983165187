"""cppo_diag.analyses.responses (the token inspector's tables) on one step of a sample log, against the computations the
inspector page made inline before they moved here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cppo_diag.analyses import responses as R
from cppo_diag.analyses.recomputation import iter_step_frames
from cppo_diag import open_run

SAMPLES = Path(__file__).resolve().parents[2] / "sample_logs"
KEY = ["update", "rank", "seq_id"]


@pytest.fixture(scope="module")
def tokens():
    run = open_run(SAMPLES / "cppo-long")
    step = run.completed_steps()[-1]
    for _, frame in iter_step_frames(run, step_range=(step, step)):
        return frame
    raise AssertionError("the sample run has no token rows")


def test_marked_tokens_from_the_applied_mask(tokens):
    frame = R.marked_tokens(tokens)
    assert frame["m_keep"].equals(tokens["keep_applied"].alias("m_keep"))
    assert frame["m_reason"].equals(tokens["reason_applied"].alias("m_reason"))
    tv = np.abs(np.exp(tokens["logp"].to_numpy()) - np.exp(tokens["logp_rollout"].to_numpy()))
    np.testing.assert_allclose(frame["tv"].to_numpy(), tv, atol=1e-6)  # float32 exp


def test_marked_tokens_joins_recomputed_marks_by_position(tokens):
    marks = tokens.head(tokens.height // 2).select(*KEY, "pos", keep=~pl.col("keep_applied"),
                                                   reason=pl.col("reason_applied"))
    frame = R.marked_tokens(tokens, marks)
    assert frame.height == tokens.height
    joined = frame.join(marks, on=[*KEY, "pos"], how="left")
    assert joined.filter(pl.col("keep").is_not_null()).select((pl.col("m_keep") == pl.col("keep")).all()).item()
    assert frame["m_keep"].null_count() == tokens.height - marks.height


def test_response_table_summarises_each_response(tokens):
    frame = R.marked_tokens(tokens)
    seqs = R.response_table(frame)
    assert seqs.height == tokens.select(pl.struct(KEY).n_unique()).item()
    one = seqs.row(0, named=True)
    rows = R.response_tokens(frame, one["update"], one["rank"], one["seq_id"])
    assert rows["pos"].to_list() == sorted(rows["pos"].to_list())
    assert one["length"] == rows.height and one["masked"] == int((~rows["keep_applied"]).sum())
    assert one["max_tv"] == pytest.approx(float(rows["tv"].max()))
    assert one["reward"] == pytest.approx(float(rows["reward"][0]))
    # without a reward on the token rows, the sequences table's reward is used
    seq_rewards = seqs.select("seq_id", reward=pl.col("seq_id").cast(pl.Float64) / 10).unique("seq_id")
    filled = R.response_table(frame.drop("reward"), seq_rewards)
    assert filled["reward"].to_list() == (filled["seq_id"].cast(pl.Float64) / 10).to_list()


def test_find_responses_filters_and_sorts(tokens):
    seqs = R.response_table(R.marked_tokens(tokens))
    lo, hi = int(seqs["length"].quantile(0.25)), int(seqs["length"].max())
    found = R.find_responses(seqs, length=(lo, hi), min_masked=1, order="max_tv")
    expected = seqs.filter(pl.col("length").is_between(lo, hi) & (pl.col("masked") >= 1))
    assert found.height == expected.height
    assert found["max_tv"].to_list() == sorted(expected["max_tv"].to_list(), reverse=True)
    reward = seqs["reward"].drop_nulls()[0]
    only = R.find_responses(seqs, length=(0, 10**6), rewards=[reward], order="seq_id")
    assert set(only["reward"].to_list()) == {reward} and only["seq_id"].is_sorted()
    with pytest.raises(ValueError, match="order"):
        R.find_responses(seqs, length=(0, 1), order="pos")


def test_token_texts_and_colour_scale(tokens):
    frame = R.marked_tokens(tokens)
    one = R.response_table(frame).row(0, named=True)
    seq = R.response_tokens(frame, one["update"], one["rank"], one["seq_id"])
    assert R.token_texts(seq, None, one["seq_id"]) == [f"⟨{i}⟩" for i in seq["token_id"].to_list()]
    words = [f"w{i}" for i in range(seq.height)]
    table = pl.DataFrame({"seq_id": [one["seq_id"]], "tokens": [words]})
    assert R.token_texts(seq, table, one["seq_id"]) == words
    short = pl.DataFrame({"seq_id": [one["seq_id"]], "tokens": [words[:-1]]})  # too few strings: ids instead
    assert R.token_texts(seq, short, one["seq_id"])[0] == f"⟨{seq['token_id'][0]}⟩"
    assert R.divergence_scale(frame) == pytest.approx(float(np.quantile(frame["tv"].to_numpy(), 0.99)))
    assert R.divergence_scale(frame.with_columns(tv=pl.lit(0.0))) == 1e-6
