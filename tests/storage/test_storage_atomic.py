"""Every writer of a run directory goes through ``cppo_diag.storage.layout``'s atomic helpers: interrupted in the
middle of a file, it leaves no partial file (and no temp file) behind, and never a half-replaced one."""

from __future__ import annotations

import importlib
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cppo_diag.analyses.recomputation import recompute
from cppo_diag.analyses.synthetic import empty_run, write_synthetic_run
from cppo_diag import open_run
from cppo_diag.storage import layout


class Interrupted(RuntimeError):
    pass


def _torn_write_table(real):
    """A ``pq.write_table`` that writes the whole file, cuts it in half and then fails (a crash mid-write)."""

    def torn(table, where, **kw):
        real(table, where, **kw)
        with open(where, "r+b") as fh:
            fh.truncate(fh.seek(0, 2) // 2)
        raise Interrupted(f"interrupted while writing {where}")

    return torn


def _files(root):
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_parquet_and_json_writes_leave_nothing_partial(tmp_path, monkeypatch):
    table = pa.table({"x": np.arange(1000)})
    target = tmp_path / "t.parquet"
    assert layout.atomic_write_parquet(table, target) == target.stat().st_size
    before = target.read_bytes()
    monkeypatch.setattr(pq, "write_table", _torn_write_table(pq.write_table))
    with pytest.raises(Interrupted):
        layout.atomic_write_parquet(table.slice(0, 10), target)
    assert _files(tmp_path) == ["t.parquet"] and target.read_bytes() == before  # the old file, whole
    with pytest.raises(Interrupted):
        layout.atomic_write_parquet(table, tmp_path / "new.parquet")
    assert _files(tmp_path) == ["t.parquet"]
    monkeypatch.undo()

    with pytest.raises(Interrupted):  # a streamed file interrupted between two tables
        with layout.atomic_parquet_writer(tmp_path / "s.parquet", table.schema) as w:
            w.write_table(table)
            raise Interrupted("stop")
    assert _files(tmp_path) == ["t.parquet"]

    meta = tmp_path / "meta.json"
    layout.atomic_write_json(meta, {"a": 1})
    monkeypatch.setattr(layout.os, "replace", lambda *a: (_ for _ in ()).throw(Interrupted("rename")))
    with pytest.raises(Interrupted):
        layout.atomic_write_json(meta, {"a": 2})
    assert json.loads(meta.read_text()) == {"a": 1} and _files(tmp_path) == ["meta.json", "t.parquet"]


def test_create_json_if_absent_never_clobbers(tmp_path):
    meta = tmp_path / "meta.json"
    assert layout.create_json_if_absent(meta, {"by": 1}, tag="rank1") is True
    assert layout.create_json_if_absent(meta, {"by": 2}, tag="rank2") is False
    assert json.loads(meta.read_text()) == {"by": 1} and _files(tmp_path) == ["meta.json"]


def test_synthetic_writer_interrupted_leaves_only_whole_files(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = pq.write_table

    def fail_third(table, where, **kw):
        calls["n"] += 1
        return (_torn_write_table(real) if calls["n"] == 3 else real)(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", fail_third)
    with pytest.raises(Interrupted):
        write_synthetic_run(tmp_path / "syn", n_tokens=3000, seqs_per_step=4, max_len=64, updates=1)
    files = _files(tmp_path / "syn")
    assert files == ["_done/step=000000.rank0", "_done/step=000001.rank0",
                     "tokens/step=000000/rank0-u0-000.parquet", "tokens/step=000001/rank0-u0-000.parquet"]
    for f in files:
        if f.endswith(".parquet"):
            assert layout.parquet_footer_ok(tmp_path / "syn" / f) is None
    monkeypatch.undo()
    assert _files(empty_run(tmp_path / "empty")) == ["meta.json"]


def test_recompute_side_table_is_whole_or_absent(tmp_path, monkeypatch):
    run = write_synthetic_run(tmp_path / "r", n_tokens=4000, seqs_per_step=4, max_len=64, with_keep_applied="cppo")
    side = tmp_path / "out" / "side.parquet"
    res = recompute(open_run(run), "cppo", side_table=side, progress=False)
    whole = pq.read_table(side)
    assert whole.num_rows == res.overall["n_valid"] > 0

    rc = importlib.import_module("cppo_diag.analyses.recomputation")
    real, n = rc.run_rule, {"calls": 0}

    def fail_later(*a, **kw):
        n["calls"] += 1
        if n["calls"] == 3:  # two batches are already in the side table
            raise Interrupted("rule failed mid-run")
        return real(*a, **kw)

    monkeypatch.setattr(rc, "run_rule", fail_later)
    with pytest.raises(Interrupted):
        recompute(open_run(run), "cppo", side_table=side, progress=False)
    assert _files(tmp_path / "out") == ["side.parquet"] and pq.read_table(side).equals(whole)  # untouched
    n["calls"] = 0
    with pytest.raises(Interrupted):
        recompute(open_run(run), "cppo", side_table=tmp_path / "out" / "new.parquet", progress=False)
    assert _files(tmp_path / "out") == ["side.parquet"]
