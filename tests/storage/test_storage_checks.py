"""The reader's shard checks at scale (issue 26): the recorder records each token shard's checks as it writes it
(one sidecar per shard, from the very table it wrote), so the first reader decodes no page again; the sidecars are
folded into RUN/_cache/shard_checks.json once; a shard changed after it was recorded is checked again; a damaged
sidecar is ignored."""

from pathlib import Path

import polars as pl
import pytest

from cppo_diag.analyses.synthetic import write_recorded_run
from cppo_diag.storage import open_run, reader, validate


def _side(run: Path) -> list[Path]:
    return sorted((run / validate.SIDECAR_DIR).glob("*.json"))


@pytest.fixture()
def counted(monkeypatch):
    calls: list = []
    real = validate.inspect_token_shard
    monkeypatch.setattr(validate, "inspect_token_shard", lambda *a, **k: (calls.append(a), real(*a, **k))[1])
    reader._VERIFIED.clear()
    return calls


def test_recorded_checks_spare_the_reader_a_decode(tmp_path, counted):
    run = write_recorded_run(tmp_path / "run", n_tokens=40_000, seqs_per_step=16, max_len=300, updates=2, seed=1)
    n_shards = len(list((run / "tokens").glob("step=*/*.parquet")))
    assert len(_side(run)) == n_shards
    files = open_run(run).token_files()
    assert len(files) == n_shards and counted == []  # every shard's checks came from the recorder
    assert not _side(run) and (run / validate.CACHE_FILE).exists()  # folded into one file
    saved = validate.load_cache(run)
    for f in files[:2]:  # the recorder's facts are the reader's
        want = validate.inspect_token_table(pl.read_parquet(f).to_arrow(), int(f.parent.name.split("=")[1]))
        got = saved[str(f.relative_to(run))][1]
        assert (got.rows, got.bad_rows, got.reason) == (want.rows, want.bad_rows, want.reason)
        cols = list(validate.RANGE_COLUMNS)
        assert validate.ranges_frame(got.ranges).sort(cols).equals(
            want.ranges.select(pl.col(c).cast(pl.Int64) for c in cols).sort(cols))


def test_a_changed_shard_or_a_damaged_sidecar_is_checked_again(tmp_path, counted):
    run = write_recorded_run(tmp_path / "run", n_tokens=20_000, seqs_per_step=16, max_len=300, seed=2)
    shard = sorted((run / "tokens").glob("step=000000/*.parquet"))[0]
    pl.read_parquet(shard).write_parquet(shard)  # rewritten after the recorder kept its checks: a new version
    _side(run)[-1].write_text("{not json")  # and one damaged sidecar
    files = open_run(run).token_files()
    assert len(files) == len(list((run / "tokens").glob("step=*/*.parquet")))
    assert {Path(a[0]).name for a in counted} >= {shard.name} and len(counted) == 2
