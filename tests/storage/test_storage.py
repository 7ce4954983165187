"""Reader: open_run / list_runs validation, corrupt shards, live runs, steps() merging, bytes/token."""

from __future__ import annotations

import json
import os
import warnings

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cppo_diag import RunRecorder, list_runs, open_run
from cppo_diag.storage import RunFormatError, RunWarning, layout, schema


def _log(rec, step, B=4, T=8, seed=None):
    g = torch.Generator().manual_seed(step if seed is None else seed)
    rec.log_tokens(step=step, logp=-torch.rand(B, T, generator=g), logp_rollout=-torch.rand(B, T, generator=g),
                   advantages=torch.randn(B, generator=g))
    rec.end_step(step)


def _make_run(path, steps=(0, 1, 2), **kw):
    with RunRecorder(path, on_error="raise", **kw) as rec:
        for s in steps:
            _log(rec, s)
    return open_run(path)


def test_open_run_errors_name_the_problem(tmp_path):
    with pytest.raises(RunFormatError, match="is not a directory"):
        open_run(tmp_path / "nope")
    with pytest.raises(RunFormatError, match="has no meta.json"):
        open_run(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(RunFormatError, match="cannot parse JSON"):
        open_run(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"schema_version": 99}))
    with pytest.raises(RunFormatError, match="schema_version expected 1, found 99 .*newer"):
        open_run(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(RunFormatError, match="schema_version expected 1, found None"):
        open_run(tmp_path)


def test_shard_missing_required_column_is_a_clear_error(tmp_path):
    run = _make_run(tmp_path)
    bad = tmp_path / "tokens" / "step=000000" / "rank0-u0-001.parquet"
    pq.write_table(pa.table({"step": [0], "seq_id": [0], "pos": pa.array([0], pa.int32())}), bad)
    with pytest.raises(RunFormatError, match=r"rank0-u0-001.parquet: token shard is missing required column\(s\) \['logp', 'logp_rollout', 'advantage'\]"):
        run.tokens()


def test_shard_with_wrong_column_type_is_a_clear_error(tmp_path):
    run = _make_run(tmp_path)
    bad = tmp_path / "tokens" / "step=000000" / "rank0-u0-001.parquet"
    pq.write_table(pa.table({"step": [0], "seq_id": [0], "pos": pa.array([0], pa.int32()), "logp": ["x"],
                             "logp_rollout": [0.0], "advantage": [0.0]}), bad)
    with pytest.raises(RunFormatError, match=r"rank0-u0-001.parquet: token column 'logp' has type string; expected Float32"):
        run.tokens()


def test_compatible_wider_types_are_cast(tmp_path):
    run = _make_run(tmp_path, steps=(0,))
    extra = tmp_path / "tokens" / "step=000000" / "rank0-u0-001.parquet"
    pq.write_table(pa.table({"step": [0], "seq_id": pa.array([99], pa.int32()), "pos": pa.array([0], pa.int64()),
                             "logp": pa.array([-0.5], pa.float64()), "logp_rollout": [-0.25], "advantage": [1.0],
                             "token_id": pa.array([7], pa.int32())}), extra)
    df = open_run(tmp_path).tokens().collect()
    assert df.schema["pos"] == pl.Int32 and df.schema["logp"] == pl.Float32 and df.schema["token_id"] == pl.Int64
    assert df.filter(pl.col("seq_id") == 99)["logp"].to_list() == [-0.5]


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_shard_is_skipped_with_a_warning_naming_it(tmp_path, damage):
    run = _make_run(tmp_path)
    full = run.tokens().collect()
    victim = run.token_files()[1]
    data = victim.read_bytes()
    if damage == "truncate":
        victim.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        victim.write_bytes(b"PAR1" + os.urandom(len(data) - 8) + b"PAR1")
    else:
        victim.write_bytes(b"")
    run = open_run(tmp_path)
    with pytest.warns(RunWarning, match=f"skipping corrupt or truncated shard .*{victim.name}"):
        df = run.tokens().collect()
    assert df.equals(full.filter(pl.col("step") != 1))


def test_temp_files_and_unmarked_shards_are_ignored(tmp_path):
    run = _make_run(tmp_path)
    full = run.tokens().collect()
    step_dir = tmp_path / "tokens" / "step=000001"
    (step_dir / ".tmp-rank0-u0-009.parquet.123.abc").write_bytes(b"PAR1 half written")
    orphan = tmp_path / "tokens" / "step=000005"
    orphan.mkdir()
    (orphan / "rank0-u0-000.parquet").write_bytes((step_dir / "rank0-u0-000.parquet").read_bytes())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        df = open_run(tmp_path).tokens().collect()
    msgs = " | ".join(str(w.message) for w in caught)
    assert "ignoring unfinished temp file" in msgs and ".tmp-rank0-u0-009" in msgs
    assert "step=000005" in msgs and "never completed" in msgs
    assert df.equals(full)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n_all = open_run(tmp_path).tokens(include_incomplete=True).collect().height
    msgs = " | ".join(str(w.message) for w in caught)
    assert "temp file" in msgs
    # the orphan is a copy of step 1: its step column disagrees with its directory, so it is skipped
    assert "its 'step' column holds [1]" in msgs and "directory says step 5" in msgs
    assert n_all == full.height


def test_empty_run_has_typed_empty_tables(tmp_path):
    with RunRecorder(tmp_path):
        pass
    run = open_run(tmp_path)
    df = run.tokens().collect()
    assert df.height == 0 and df.schema["logp"] == pl.Float32 and "rank" in df.columns
    assert run.steps().columns == ["step"]
    assert run.sequences().collect().height == 0
    assert run.completed_steps() == []
    full = run.tokens(all_columns=True).collect()
    assert list(full.columns) == list(schema.TOKEN_COLUMNS)


def test_all_columns_fills_typed_nulls_and_update_rank_zero(tmp_path):
    _make_run(tmp_path)
    # A shard written by a foreign tool without update/rank columns still gets them as 0.
    t = pa.table({"step": pa.array([3, 3], pa.int64()), "seq_id": pa.array([0, 0], pa.int64()),
                  "pos": pa.array([0, 1], pa.int32()), "logp": pa.array([-1.0, -2.0], pa.float32()),
                  "logp_rollout": pa.array([-1.0, -2.0], pa.float32()), "advantage": pa.array([1.0, 1.0], pa.float32())})
    (tmp_path / "tokens" / "step=000003").mkdir()
    pq.write_table(t, tmp_path / "tokens" / "step=000003" / "rank0-u0-000.parquet")
    (tmp_path / "_done" / "step=000003.rank0").write_text("{}")
    df = open_run(tmp_path).tokens(all_columns=True).collect()
    assert list(df.columns) == list(schema.TOKEN_COLUMNS)
    assert dict(df.schema) == schema.TOKEN_COLUMNS
    s3 = df.filter(pl.col("step") == 3)
    assert s3["update"].to_list() == [0, 0] and s3["rank"].to_list() == [0, 0]
    assert s3["entropy"].null_count() == 2


def test_list_runs(tmp_path):
    _make_run(tmp_path / "a", steps=(0,))
    _make_run(tmp_path / "b", steps=(0, 1))
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "meta.json").write_text(json.dumps({"schema_version": 0}))
    with pytest.warns(RunWarning, match="skipping .*old"):
        runs = list_runs(tmp_path)
    assert [r.name for r in runs] == ["a", "b"]
    assert [r.name for r in list_runs(tmp_path / "b")] == ["b"]
    with pytest.raises(FileNotFoundError):
        list_runs(tmp_path / "missing")


def test_is_live_while_recording(tmp_path):
    rec = RunRecorder(tmp_path, heartbeat_s=0.2)
    try:
        _log(rec, 0)
        rec.flush()
        run = open_run(tmp_path)
        assert run.is_live
        assert run.completed_steps() == [0]
    finally:
        rec.close()
    assert not run.is_live
    assert open_run(tmp_path).meta["status"] == "finished"


def test_steps_merges_ranks_and_resumed_rewrites(tmp_path):
    with RunRecorder(tmp_path, rank=1) as r1:
        r1.log_scalars(0, {"a": 10.0, "only_rank1": 1.0})
    with RunRecorder(tmp_path, rank=0) as r0:
        r0.log_scalars(0, {"a": 1.0})
        r0.log_scalars(1, {"a": 2.0})
        r0.log_scalars(1, {"a": 3.0})  # logged again (e.g. after a restart): the last value wins
    steps = open_run(tmp_path).steps()
    assert steps["step"].to_list() == [0, 1]
    assert steps["a"].to_list() == [1.0, 3.0]
    assert steps["only_rank1"].to_list() == [1.0, None]
    # a torn last line (crash mid-append) is skipped with a warning
    with open(tmp_path / "scalars" / "rank0.jsonl", "a") as fh:
        fh.write('{"step": 2, "a": ')
    with pytest.warns(RunWarning, match="malformed line 4"):
        assert open_run(tmp_path).steps()["step"].to_list() == [0, 1]


def test_required_columns_fit_in_16_bytes_per_token(tmp_path):
    # Log-probs shaped like a real LM's (log-softmax of a sampled token), rollout = logp + small noise.
    B, T = 16, 512
    torch.manual_seed(0)
    logits = torch.randn(B * T, 500) * 3
    lp = torch.log_softmax(logits, -1)
    tok = torch.multinomial(lp.exp(), 1)
    logp = lp.gather(1, tok).view(B, T)
    lengths = torch.randint(T // 4, T + 1, (B,))
    mask = torch.arange(T)[None] < lengths[:, None]
    with RunRecorder(tmp_path, on_error="raise") as rec:
        rec.log_tokens(step=0, logp=logp, logp_rollout=(logp + 0.01 * torch.randn(B, T)).clamp(max=0.0),  # <= 0
                       advantages=torch.randn(B),
                       response_mask=mask)
    files = open_run(tmp_path).token_files()
    md = pq.read_metadata(files[0])
    n = md.num_rows
    req = set(schema.REQUIRED_TOKEN_COLUMNS)
    req_bytes = sum(md.row_group(r).column(c).total_compressed_size
                    for r in range(md.num_row_groups) for c in range(md.num_columns)
                    if md.schema.column(c).name in req)
    assert n == int(mask.sum())
    assert req_bytes / n <= 16.0, req_bytes / n
    assert sum(f.stat().st_size for f in files) / n <= 16.0


def test_layout_names_roundtrip():
    assert layout.parse_token_shard(layout.token_shard_name(3, 2, 7)) == (3, 2, 7)
    assert layout.parse_sequence_shard(layout.sequence_shard_name(1, 4)) == (1, 4)
    assert layout.parse_done_marker(layout.done_marker_name(12, 5)) == (12, 5)
    assert layout.parse_step_dir(layout.step_dir_name(12)) == 12
    assert layout.parse_token_shard(".tmp-rank0-u0-000.parquet.1.ab") is None


def test_shards_with_different_optional_columns_scan_together(tmp_path):
    with RunRecorder(tmp_path, on_error="raise") as rec:
        rec.log_tokens(step=0, logp=-torch.rand(2, 3), logp_rollout=-torch.rand(2, 3), advantages=torch.ones(2),
                       topk_ids=torch.zeros(2, 3, 2, dtype=torch.long), entropy=torch.rand(2, 3))
        rec.log_tokens(step=1, logp=-torch.rand(2, 3), logp_rollout=-torch.rand(2, 3), advantages=torch.ones(2),
                       group_id=torch.tensor([4, 4]))
    df = open_run(tmp_path).tokens().collect().sort("step")
    assert {"topk_ids", "entropy", "group_id"} <= set(df.columns)
    assert df.filter(pl.col("step") == 1)["topk_ids"].null_count() == 6
    assert df.filter(pl.col("step") == 0)["group_id"].null_count() == 6
    assert df.filter(pl.col("step") == 0)["topk_ids"].to_list() == [[0, 0]] * 6
