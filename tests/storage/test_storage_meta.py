"""Run metadata (``cppo_diag.storage.meta``): the one reader and writer of meta.json, its defaults and errors;
the schema's dtypes and the layout's names that the writers take from storage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from cppo_diag.storage import layout, open_run, schema
from cppo_diag.storage.meta import (RunFormatError, RunMeta, is_run_dir, new_meta, read_meta, update_meta,
                                    write_meta)


def test_defaults_of_a_sparse_meta(tmp_path):
    write_meta(tmp_path, {"schema_version": schema.SCHEMA_VERSION})
    m = read_meta(tmp_path)
    assert isinstance(m, dict) and m.anchor == "rollout" and m.rule is None and m.rule_params == {}
    assert m.config == {} and m.status is None and m.name is None and m.schema_version == schema.SCHEMA_VERSION
    assert RunMeta().anchor == "rollout"  # the metadata of a frame in memory


def test_new_meta_round_trips_through_the_reader(tmp_path):
    meta = new_meta(name="r", trainer="custom", rule="cppo", rule_params={"delta": 0.1}, anchor="old",
                    config={"steps": 3}, status="finished")
    write_meta(tmp_path, meta)
    m = open_run(tmp_path).meta
    assert isinstance(m, RunMeta) and (m.rule, m.rule_params, m.anchor, m.status, m.config["steps"]) == (
        "cppo", {"delta": 0.1}, "old", "finished", 3)
    assert json.loads((tmp_path / schema.META_FILE).read_text())["created"] == m["created"]
    assert not write_meta(tmp_path, {"other": 1}, exclusive_tag="rank1")  # never clobbers an existing file


@pytest.mark.parametrize("obj, field", [
    ({"schema_version": schema.SCHEMA_VERSION, "rule_params": [1]}, "field 'rule_params' expected a JSON object"),
    ({"schema_version": schema.SCHEMA_VERSION, "anchor": 3}, "field 'anchor' expected a string"),
    ({"schema_version": 999}, "schema_version expected"),
    ([1, 2], "expected a JSON object, found list"),
])
def test_bad_meta_names_the_field(tmp_path, obj, field):
    (tmp_path / schema.META_FILE).write_text(json.dumps(obj))
    with pytest.raises(RunFormatError, match=field):
        read_meta(tmp_path)


def test_is_run_dir_and_update_meta(tmp_path):
    assert not is_run_dir(tmp_path) and update_meta(tmp_path, status="halted") is None
    with pytest.raises(RunFormatError, match="has no meta.json"):
        read_meta(tmp_path)
    write_meta(tmp_path, new_meta(name="r", trainer="custom"))
    assert is_run_dir(tmp_path)
    update_meta(tmp_path, status="halted", doctor={"live": True})
    m = read_meta(tmp_path)
    assert m.status == "halted" and m["doctor"] == {"live": True} and m.name == "r"


def test_writer_dtypes_and_names_come_from_storage():
    assert schema.numpy_dtype("logp") == np.float32 and schema.numpy_dtype("topk_ids") == np.int64
    assert schema.numpy_dtype("reason_applied") == np.uint8 and schema.numpy_dtype("fork") == np.bool_
    assert schema.arrow_type("tokens", schema.SEQUENCE_COLUMNS) == pa.list_(pa.string())
    with pytest.raises(KeyError, match="'nope'"):
        schema.numpy_dtype("nope")
    assert layout.heartbeat_file_name(2) == "rank2.json"
