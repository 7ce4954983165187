"""Reliability under bad input and concurrent writers (issue 22): one test per class of bad input.

Classes: untrusted pickles in imports; two writers of one run; corrupt shards and unknown columns in every
reader path; what the recorder refuses (steps, seq_ids, names, torn lines); impossible values, duplicates and
misplaced shards in the statistics; CLI / config errors as one line without a traceback; the app's errors.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cppo_diag import RunRecorder, open_run
from cppo_diag.capture import CaptureInputError, RecorderWarning
from cppo_diag.storage import RunWarning
from cppo_diag.storage.layout import RunLockedError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_logs" / "cppo-long"
B, T = 4, 8


def batch(step: int, update: int = 0, b: int = B):
    rng = np.random.default_rng(1000 * step + update)
    return dict(logp=-rng.random((b, T), dtype=np.float32), logp_rollout=-rng.random((b, T), dtype=np.float32),
                advantages=rng.standard_normal(b).astype(np.float32))


def record(root: Path, name: str = "r", steps=range(3)) -> Path:
    with RunRecorder(root, name=name, on_error="raise", rule="cppo") as rec:
        for s in steps:
            rec.log_tokens(step=s, **batch(s))
            rec.log_scalars(s, {"x": float(s)})
            rec.end_step(s)
    return root / name


def cli(*argv: str, cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    e.pop("CPPO_DIAG_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "cppo_diag.cli.main", *argv], capture_output=True, text=True,
                          cwd=cwd, env=e, timeout=300)


def cli_here(capsys, *argv: str) -> subprocess.CompletedProcess:
    """``cli`` in this process (no interpreter start-up): for errors found before any work."""
    from cppo_diag.cli.main import main

    try:
        rc = main(list(argv))
    except SystemExit as exc:  # argparse
        rc = exc.code
    out = capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), rc, out.out, out.err)


def assert_one_line_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """Non-zero exit, no traceback, and an error line naming each of ``needles``."""
    err = proc.stderr
    assert proc.returncode != 0, (proc.stdout, err)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith("cppo-diag")]
    assert lines, err
    for n in needles:
        assert any(n in ln for ln in lines), (n, err)
    return err


# -- 1. importers never unpickle code ---------------------------------------------------------------------
class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_slime_import_never_runs_code_from_a_pickle(tmp_path):
    import torch

    from cppo_diag.importers import ImportFormatError
    from cppo_diag.importers.slime import import_slime

    marker = tmp_path / "PWNED"
    src = tmp_path / "dump"
    src.mkdir()
    torch.save({"rollout_id": 0, "rank": 0, "rollout_data": {"x": _Evil(str(marker))}}, src / "rollout_0.pt")
    with pytest.raises(ImportFormatError, match=r"rollout_0\.pt.*(weights|safe)"):
        import_slime(src, tmp_path / "runs", name="evil", progress=False)
    assert not marker.exists(), "unpickling ran code from the dump"
    # and through the CLI: one line, no traceback, nothing run
    proc = cli("import", "--from", "slime", str(src), str(tmp_path / "runs2"), "--name", "evil")
    assert_one_line_error(proc, "rollout_0.pt")
    assert not marker.exists()


def test_slime_import_still_reads_plain_tensor_dumps(tmp_path):
    sys.path.insert(0, str(REPO / "tests" / "fixtures" / "importers"))
    from make_fixtures import write_slime

    from cppo_diag.importers.slime import import_slime

    write_slime(tmp_path / "slime", np.random.default_rng(1234))
    run_dir, stats = import_slime(tmp_path / "slime", tmp_path / "runs", name="ok", progress=False)
    assert stats.files == 4 and open_run(run_dir).tokens().select(pl.len()).collect().item() > 0


# -- 2. one writer per run and rank -----------------------------------------------------------------------
HOLDER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {repo!r})
    import numpy as np
    from cppo_diag import RunRecorder
    rec = RunRecorder({root!r}, name="r", on_error="raise")
    rec.log_tokens(step=0, logp=-np.ones((2, 3), np.float32), logp_rollout=-np.ones((2, 3), np.float32),
                   advantages=np.ones(2, np.float32))
    rec.end_step(0)
    rec.flush()
    print("holding", flush=True)
    sys.stdin.readline()
    rec.close()
    """
)


def test_second_writer_is_refused_naming_the_holder_and_a_dead_holder_is_taken_over(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO), root=str(tmp_path))],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "holding", child.stderr.read()
        # a second writer of rank 0, in either error mode, is refused before it touches the run
        for mode in ("raise", "warn"):
            with pytest.raises(RunLockedError, match=rf"pid {child.pid} on host .* since \d{{4}}-"):
                RunRecorder(tmp_path, name="r", on_error=mode)
        # the CLI's importer refuses to overwrite a run another process is writing
        from cppo_diag.importers.common import RunWriter

        with pytest.raises(RunLockedError, match=f"pid {child.pid}"):
            RunWriter(tmp_path, name="r", trainer="t", config={}, anchor="rollout", overwrite=True)
        assert (tmp_path / "r" / "meta.json").exists()
        # another rank of the same run is a different writer: allowed
        with RunRecorder(tmp_path, name="r", rank=1, on_error="raise") as rec1:
            rec1.log_tokens(step=0, **batch(0))
    finally:
        os.kill(child.pid, signal.SIGKILL)  # dies holding the lock: the kernel drops the flock
        child.wait()
    lock = json.loads((tmp_path / "r" / "_live" / "rank0.lock").read_text())
    assert lock["pid"] == child.pid and not lock.get("released")
    with pytest.warns(RecorderWarning, match=rf"took over the writer lock .* pid {child.pid}"):
        rec = RunRecorder(tmp_path, name="r", on_error="raise")
    with rec:
        assert rec.is_done(0)  # the dead writer's completed step is kept
        rec.log_tokens(step=1, **batch(1))
    assert open_run(tmp_path / "r").completed_steps() == [0, 1]


def test_two_writers_in_one_process_and_sequential_writers(tmp_path):
    rec = RunRecorder(tmp_path, name="r", on_error="raise")
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        RunRecorder(tmp_path, name="r", on_error="raise")
    rec.close()
    with RunRecorder(tmp_path, name="r", on_error="raise"):  # released on close: no warning, no error
        pass
    assert json.loads((tmp_path / "r" / "_live" / "rank0.lock").read_text())["released"] is True


# -- 3. corrupt shards and unknown columns, in every reader path ------------------------------------------
def _corrupt_copy(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A copy of a sample run with one shard whose data pages are garbage (valid footer) and one shard that
    carries an extra column a newer writer might add."""
    run = tmp_path / "run"
    shutil.copytree(SAMPLE, run)
    shards = sorted((run / "tokens").glob("step=*/*.parquet"))
    bad, extra = shards[1], shards[2]
    data = bytearray(bad.read_bytes())
    footer = pq.ParquetFile(bad).metadata.row_group(0).column(3)  # logp: the biggest column chunk
    start = footer.data_page_offset + 64
    data[start:start + 4000] = b"\xab" * 4000
    bad.write_bytes(bytes(data))
    assert pq.read_metadata(bad).num_rows > 0  # the footer still parses
    table = pq.read_table(extra)
    table = table.append_column("future_column", pa.array(np.arange(table.num_rows, dtype=np.float64)))
    pq.write_table(table, extra)
    return run, bad, extra


def _rows_without(run: Path, bad: Path) -> int:
    n = 0
    for f in sorted((run / "tokens").glob("step=*/*.parquet")):
        if f != bad:
            n += pq.read_metadata(f).num_rows
    return n


def test_corrupt_shard_is_skipped_and_extra_columns_ignored_in_the_reader(tmp_path):
    from cppo_diag.analyses.tokens import step_lazyframes

    run_dir, bad, extra = _corrupt_copy(tmp_path)
    want = _rows_without(run_dir, bad)
    with pytest.warns(RunWarning, match=rf"skipping corrupt .*{bad.parent.name}/{bad.name}.*corrupt data pages"):
        run = open_run(run_dir)
        df = run.tokens().collect()
    assert df.height == want and "future_column" not in df.columns
    assert bad not in run.token_files() and extra in run.token_files()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunWarning)
        assert sum(b.logp.numel() > 0 for b in open_run(run_dir).batches()) > 0
        total = sum(lf.select(pl.len()).collect().item() for _, lf in step_lazyframes(open_run(run_dir)))
    assert total == want


@pytest.mark.parametrize("argv", [
    ["stats", "{run}", "--no-progress", "--no-cache"],
    ["stats", "{run}", "--no-progress", "--exact"],
    ["recompute", "{run}", "--no-progress"],
    ["doctor", "{run}", "--no-figures", "--no-progress"],
    ["report", "{run}", "--out", "{tmp}/report", "--no-whatif", "--no-progress", "--rules", "cppo"],
])
def test_corrupt_shard_is_named_and_skipped_by_every_command(tmp_path, argv):
    run_dir, bad, _ = _corrupt_copy(tmp_path)
    proc = cli(*[a.format(run=run_dir, tmp=tmp_path) for a in argv])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"{bad.parent.name}/{bad.name}" in proc.stderr and "corrupt data pages" in proc.stderr


def test_app_data_layer_skips_the_corrupt_shard(tmp_path, monkeypatch):
    from cppo_diag.app import data

    run_dir, bad, _ = _corrupt_copy(tmp_path)
    monkeypatch.setattr(data, "roots", lambda: [tmp_path])
    data.clear_all_caches()
    with pytest.warns(RunWarning, match=bad.name):
        steps = data.token_steps(str(run_dir))
        summary = data.run_row(str(run_dir))
    assert steps and summary is not None


# -- 4. the recorder refuses what the reader would not read back ------------------------------------------
@pytest.mark.parametrize("field, value", [
    ("step", -1), ("step", 1.5), ("step", float("nan")), ("step", "3"), ("step", True), ("step", None),
    ("update", -2), ("update", 0.25),
])
def test_recorder_refuses_bad_steps_and_updates(tmp_path, field, value):
    kw = {"step": 0, "update": 0, field: value}
    with RunRecorder(tmp_path, name="r", on_error="raise") as rec:
        with pytest.raises(CaptureInputError, match=field):
            rec.log_tokens(**kw, **batch(0))
        if field == "step":
            with pytest.raises(CaptureInputError, match="step"):
                rec.log_scalars(value, {"x": 1.0})
            with pytest.raises(CaptureInputError, match="step"):
                rec.end_step(value)
        rec.log_tokens(step=2.0, **batch(2))  # an integral float is an integer step
    assert open_run(tmp_path / "r").completed_steps() == [2]
    # warn mode: dropped with a warning, never written as 'step=-00001'
    with pytest.warns(RecorderWarning, match=field):
        with RunRecorder(tmp_path, name="w", on_error="warn") as rec:
            rec.log_tokens(**kw, **batch(0))
    assert not [p for p in (tmp_path / "w" / "tokens").iterdir()]


def test_recorder_refuses_bad_rank():
    for rank in (-1, 1.5, "0"):
        with pytest.raises(ValueError, match="rank"):
            RunRecorder("/nonexistent-never-created", rank=rank)


def test_recorder_refuses_duplicate_seq_ids(tmp_path):
    with RunRecorder(tmp_path, name="r", on_error="raise") as rec:
        with pytest.raises(CaptureInputError, match="seq_id 1 appears 2 times"):
            rec.log_tokens(step=0, seq_ids=np.array([0, 1, 1, 2]), **batch(0))
        rec.log_tokens(step=0, seq_ids=np.arange(4), **batch(0))
        with pytest.raises(CaptureInputError, match="seq_id 0 was already logged for step 0 update 0"):
            rec.log_tokens(step=0, **batch(0))  # default ids 0..B-1 again: a second micro-batch
        rec.log_tokens(step=0, seq_ids=np.arange(4, 8), **batch(0))  # distinct ids: fine
        rec.log_tokens(step=0, update=1, **batch(0, 1))  # the same responses in the next update: fine
        with pytest.raises(CaptureInputError, match="seq_id 3 appears 2 times"):
            rec.log_sequences(step=0, seq_ids=[3, 3], completions=["a", "b"])
        rec.end_step(0)
        rec.log_tokens(step=1, **batch(1))  # a new step: ids may repeat
    df = open_run(tmp_path / "r").tokens().collect()
    assert df.select("step", "update", "seq_id", "pos").is_duplicated().sum() == 0
    assert sorted(df.filter(pl.col("update") == 0, pl.col("step") == 0)["seq_id"].unique()) == list(range(8))


@pytest.mark.parametrize("name", ["../x", "/abs/x", "a/b", "..", ".", "", "a\\b"])
def test_recorder_and_importer_refuse_names_that_escape_the_root(tmp_path, name):
    from cppo_diag.importers.common import RunWriter

    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(ValueError, match="name"):
        RunRecorder(root, name=name, on_error="warn")
    with pytest.raises(ValueError, match="name"):
        RunWriter(root, name=name, trainer="t", config={}, anchor="rollout")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_recorder_refuses_a_symlinked_name_that_leaves_the_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "link").symlink_to(outside)
    with pytest.raises(ValueError, match="outside the root"):
        RunRecorder(root, name="link", on_error="raise")
    assert not any(outside.iterdir())
    (root / "inner").mkdir()
    (root / "ok").symlink_to(root / "inner")  # a link that stays inside is fine
    with RunRecorder(root, name="ok", on_error="raise") as rec:
        rec.log_tokens(step=0, **batch(0))


def test_torn_scalars_line_does_not_swallow_the_next_line_on_resume(tmp_path):
    run_dir = record(tmp_path, steps=range(2))
    scalars = run_dir / "scalars" / "rank0.jsonl"
    with open(scalars, "a") as fh:
        fh.write('{"step": 2, "rank": 0, "x": 2.')  # disk full mid-line: no newline
    with RunRecorder(run_dir, on_error="raise") as rec:
        rec.log_scalars(3, {"x": 3.0})
        rec.log_scalars(4, {"x": 4.0})
    with pytest.warns(RunWarning, match="malformed line 3"):
        steps = open_run(run_dir).steps()
    assert steps["step"].to_list() == [0, 1, 3, 4] and steps["x"].to_list() == [0.0, 1.0, 3.0, 4.0]


def test_scalars_lines_with_wrong_types_are_skipped_with_a_warning(tmp_path):
    run_dir = record(tmp_path, steps=range(2))
    with open(run_dir / "scalars" / "rank0.jsonl", "a") as fh:
        for line in ('{"step": "two", "x": 1}', '[1, 2]', '{"step": null}', '{"step": -4, "x": 1}',
                     '{"step": 2.5, "x": 1}', '{"step": 5, "x": "high"}', '"text"'):
            fh.write(line + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        steps = open_run(run_dir).steps()
    msgs = [str(w.message) for w in caught if issubclass(w.category, RunWarning)]
    # bad steps skip the line; a value of another type than the name's first skips that value only
    assert steps["step"].to_list() == [0, 1, 5] and steps["x"].to_list() == [0.0, 1.0, None], steps
    assert len(msgs) == 7 and all("rank0.jsonl" in m for m in msgs), msgs
    assert any("scalar 'x' expected number, found 'high'" in m for m in msgs), msgs


# -- 5. impossible values, duplicates and misplaced shards never reach a statistic ------------------------
def _rewrite_shard(path: Path, fn) -> None:
    df = pl.read_parquet(path)
    fn(df).write_parquet(path)


def _clean_mean(run_dir: Path) -> tuple[int, float]:
    df = open_run(run_dir).tokens().collect()
    return df.height, float((df["logp"] - df["logp_rollout"]).abs().mean())


@pytest.mark.parametrize("value", [float("inf"), float("nan"), 0.7, float("-inf")])
def test_impossible_logp_values_are_excluded_and_counted(tmp_path, value):
    from cppo_diag.analyses.aggregate import position_summary

    run_dir = record(tmp_path, steps=range(3))
    n0, _ = _clean_mean(run_dir)
    shard = sorted((run_dir / "tokens").glob("step=000001/*.parquet"))[0]
    _rewrite_shard(shard, lambda df: df.with_columns(
        logp=pl.when(pl.int_range(pl.len()) < 3).then(pl.lit(value, pl.Float32)).otherwise(pl.col("logp"))))
    with pytest.warns(RunWarning, match=rf"excluding 3 of \d+ rows of .*{shard.name} with impossible values"):
        n, mean = _clean_mean(run_dir)
    assert n == n0 - 3 and np.isfinite(mean)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RunWarning)
        for exact in (True, False):
            table = position_summary(run_dir, metrics=("tv",), exact=exact, cache=False, updates="all")
            assert int(table["count"].sum()) == n and np.isfinite(table["mean"].to_numpy()).all(), table
            assert float(table["p99"].max()) <= 1.0  # |pi - mu| of real probabilities


def test_recorder_refuses_positive_logprobs(tmp_path):
    from cppo_diag.capture import NonFiniteError

    bad = batch(0)
    bad["logp_rollout"][1, 2] = 0.5
    with RunRecorder(tmp_path, name="r", on_error="raise") as rec:
        with pytest.raises(NonFiniteError, match=r"'logp_rollout' has 1 value\(s\) > 0 .* seq 1, pos 2"):
            rec.log_tokens(step=0, **bad)
    with pytest.warns(RecorderWarning, match="> 0"):
        with RunRecorder(tmp_path, name="w") as rec:
            rec.log_tokens(step=0, **bad)
    df = open_run(tmp_path / "w").tokens().collect()
    assert sorted(df["seq_id"].unique()) == [0, 2, 3]  # the bad sequence is dropped whole, like NaN


@pytest.mark.parametrize("how", ["copied shard", "rows twice", "wrong step", "huge pos", "negative pos"])
def test_duplicated_or_misplaced_shards_are_skipped_with_a_warning(tmp_path, how):
    from cppo_diag.analyses.aggregate import position_summary
    from cppo_diag.analyses.recomputation import recompute

    run_dir = record(tmp_path, steps=range(3))
    good = open_run(run_dir).tokens().collect()
    shard = sorted((run_dir / "tokens").glob("step=000001/*.parquet"))[0]
    if how == "copied shard":
        victim = shard.with_name(shard.name.replace("-000.", "-001."))
        shutil.copy(shard, victim)
        expect, n_expect = "repeats the tokens of", good.height
    else:
        victim = shard
        fn = {"rows twice": lambda df: pl.concat([df, df.head(5)]),
              "wrong step": lambda df: df.with_columns(step=pl.lit(7, pl.Int64)),
              "huge pos": lambda df: df.with_columns(pos=pl.when(pl.col("pos") == 0).then(2_000_000_000)
                                                     .otherwise(pl.col("pos")).cast(pl.Int32)),
              "negative pos": lambda df: df.with_columns(pos=pl.col("pos") - 1)}[how]
        _rewrite_shard(shard, fn)
        expect = {"rows twice": "repeat a token key", "wrong step": "directory says step 1",
                  "huge pos": "column 'pos' holds 2000000000", "negative pos": "column 'pos' holds -1"}[how]
        n_expect = good.height - good.filter(pl.col("step") == 1).height
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = open_run(run_dir)
        n = run.tokens().select(pl.len()).collect().item()
        res = recompute(run, "cppo", progress=False)
        table = position_summary(run_dir, metrics=("tv",), exact=True, cache=False, updates="all")
    msgs = [str(w.message) for w in caught if issubclass(w.category, RunWarning)]
    assert any(victim.name in m and expect in m for m in msgs), msgs
    # one policy everywhere: the reader, the recompute and the statistics count the same rows
    assert n == n_expect == res.overall["n_valid"] == int(table["count"].sum())


# -- 6. CLI and config errors: one line naming the field, non-zero exit, no traceback ----------------------
@pytest.mark.parametrize("argv, needles", [
    (["stats", "{run}", "--steps", "50:10"], ["--steps", "LO <= HI"]),
    (["stats", "{run}", "--steps", "a:b"], ["--steps"]),
    (["stats", "{run}", "--delta", "-1"], ["--delta", "[0.0, inf]"]),
    (["stats", "{run}", "--delta", "nan"], ["--delta", "finite"]),
    (["stats", "{run}", "--delta", "0.1", "--w-min", "2"], ["--w-min", "[0.0, 1.0]"]),
    (["stats", "{run}", "--w-min", "0.5"], ["--w-min", "--delta"]),
    (["stats", "{run}", "--bin", "0"], ["--bin", ">= 1"]),
    (["stats", "{run}", "--relative-accuracy", "1.5"], ["relative_accuracy"]),
    (["stats", "{run}", "--workers", "-2"], ["--workers"]),
    (["stats", "{run}", "--out", "{tmp}"], ["--out", "directory"]),
    (["stats", "{run}", "--engine", "ray", "--ray-address", "not an address"], ["--ray-address"]),
    (["stats", "{run}", "--ray-address", "auto"], ["--ray-address", "--engine ray"]),
    (["recompute", "{run}", "--rule", "cppo", "--param", "eps_high=0.2"], ["eps_high", "delta", "w_min"]),
    (["recompute", "{run}", "--param", "delta"], ["--param", "NAME=VALUE"]),
    (["recompute", "{run}", "--param", "=3"], ["--param", "NAME"]),
    (["recompute", "{run}", "--rule", "no_such_rule"], ["no_such_rule", "known rules"]),
    (["recompute", "{run}", "--rule", "cppo", "--param", "delta=-1"], ["delta", ">= 0"]),
    (["recompute", "{run}", "--out", "{tmp}"], ["--out", "directory"]),
    (["recompute", "{run}", "--bin", "-3"], ["--bin"]),
    (["report", "{run}", "--out", "{file}"], ["--out", "expected a directory"]),
    (["report", "{run}", "--out", "{tmp}/r", "--param", "cppo:eps_high=1"], ["eps_high", "cppo"]),
    (["doctor", "{tmp}/missing"], ["missing"]),
    (["stats", "{file}"], ["file.txt"]),
])
def test_cli_bad_arguments_give_one_line(tmp_path, capsys, argv, needles):
    (tmp_path / "file.txt").write_text("x")
    fmt = dict(run=SAMPLE, tmp=tmp_path, file=tmp_path / "file.txt")
    proc = cli_here(capsys, *[a.format(**fmt) for a in argv], "--no-progress")
    err = assert_one_line_error(proc, *needles)
    assert len([ln for ln in err.splitlines() if ln.strip()]) <= 2, err  # no usage block, no traceback


@pytest.mark.parametrize("rule_params", [[1, 2], "delta=0.2", 3])
def test_meta_rule_params_of_the_wrong_type_is_a_clear_error(tmp_path, capsys, rule_params):
    run_dir = tmp_path / "run"
    shutil.copytree(SAMPLE, run_dir)
    meta = json.loads((run_dir / "meta.json").read_text())
    meta["rule_params"] = rule_params
    (run_dir / "meta.json").write_text(json.dumps(meta))
    for argv in (["recompute", str(run_dir)], ["stats", str(run_dir)], ["doctor", str(run_dir), "--no-figures"]):
        assert_one_line_error(cli_here(capsys, *argv, "--no-progress"), "meta.json", "rule_params", "JSON object")


TRAIN_BAD = [
    ("[optim]\nlr = -1.0\n", "optim.lr"), ("[optim]\nlr = nan\n", "optim.lr"), ("[optim]\nlr = inf\n", "optim.lr"),
    ("[rollout]\nstaleness = -1\n", "rollout.staleness"), ("[rollout]\nn = 0\n", "rollout.n"),
    ("[rollout]\nn = 1\n", "rollout.n"), ("[optim]\nupdates_per_batch = 0\n", "optim.updates_per_batch"),
    ("[rule]\nname = \"cppo\"\n[rule.params]\ndelta = -1\n", "delta"),
    ("[rule]\nname = \"cppo\"\n[rule.params]\nw_min = 3\n", "w_min"),
    ("[rollout]\ntemperature = 0.0\n", "rollout.temperature"), ("[rollout]\ntop_p = 0.0\n", "rollout.top_p"),
    ("[optim]\nbeta2 = 1.0\n", "optim.beta2"), ("[log]\nseq_fraction = 0.0\n", "log.seq_fraction"),
    ("steps = -5\n", "steps"), ("[optim]\nepochs = 0\n", "optim.epochs"),
]


@pytest.mark.parametrize("toml, field", TRAIN_BAD)
def test_train_config_errors_before_any_run_directory(tmp_path, toml, field):
    from cppo_diag.train.config import build_config

    cfg_file = tmp_path / "bad.toml"
    cfg_file.write_text(toml)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        build_config("tiny", str(cfg_file), {}).validate()
    if field in ("optim.lr", "rule.params", "delta", "rollout.temperature"):  # and through the CLI (seconds each)
        out = tmp_path / "runs"
        proc = cli("train", "--preset", "tiny", "--config", str(cfg_file), "--log.out_dir", str(out))
        assert_one_line_error(proc, field)
        assert not out.exists(), "no run directory for a config that cannot train"


def test_a_run_that_trains_nothing_fails(tmp_path, monkeypatch):
    """Every group skipped for the whole run (all rewards equal): the run fails with a clear message."""
    import cppo_diag.train.phases as phases
    from cppo_diag.train import train
    from cppo_diag.train.config import build_config

    real = phases.advantages

    def no_signal(run, ro):
        ro.rewards[:] = 0.0  # every group of n responses has the same reward: zero variance, skipped
        return real(run, ro)

    monkeypatch.setattr(phases, "advantages", no_signal)
    cfg = build_config("tiny", None, {"steps": 2, "log": {"out_dir": str(tmp_path), "name": "nothing", "eval_every": 0},
                                      "ckpt": {"every": 0}})
    with pytest.raises(RuntimeError, match="trained nothing.*every group was skipped"):
        train(cfg)
    assert open_run(tmp_path / "nothing").meta["status"] == "failed"


# -- 7. the app: the same skipping, one-line errors, confinement of a run's files, Host/Origin ------------
def test_app_pages_show_a_broken_run_as_one_line(tmp_path, monkeypatch):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    app_file = REPO / "app" / "streamlit_app.py"
    corrupt, bad, _ = _corrupt_copy(tmp_path)
    badmeta = tmp_path / "badmeta"
    shutil.copytree(SAMPLE, badmeta)
    meta = json.loads((badmeta / "meta.json").read_text())
    meta["rule_params"] = ["delta", 0.2]
    (badmeta / "meta.json").write_text(json.dumps(meta))
    monkeypatch.setenv("CPPO_DIAG_ROOTS", str(tmp_path))
    at = AppTest.from_file(str(app_file), default_timeout=120).run()
    assert not at.exception, [e.message for e in at.exception]
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["badmeta", "status"] == "unreadable" and "rule_params" in table.loc["badmeta", "error"]
    for run, page, want in ((corrupt, "views/divergence.py", None),
                            (badmeta, "views/divergence.py", "rule_params")):
        at = AppTest.from_file(str(app_file), default_timeout=120).run()
        at.multiselect(key="selected_runs").set_value([str(run.resolve())]).run()
        at.switch_page(page).run()
        assert not at.exception, [e.message for e in at.exception]
        errors = [e.value for e in at.error]
        if want is None:
            assert not errors, errors  # the corrupt shard is skipped, the page renders
        else:
            assert any(want in e and "Traceback" not in e and "\n" not in e for e in errors), errors


def test_app_refuses_a_run_whose_meta_json_links_outside_the_roots(tmp_path):
    pytest.importorskip("streamlit")
    from cppo_diag.app import data

    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    shutil.copytree(SAMPLE, root / "run")
    secret = outside / "meta.json"
    shutil.move(root / "run" / "meta.json", secret)
    (root / "run" / "meta.json").symlink_to(secret)
    with pytest.raises(PermissionError, match="meta.json resolves to .*outside the app's roots"):
        data.confine(root / "run", allowed=[root])
    (root / "run" / "meta.json").unlink()
    shutil.copy(secret, root / "run" / "meta.json")
    assert data.confine(root / "run", allowed=[root]) == root / "run"
    (root / "run" / "scalars" / "rank0.jsonl").unlink()
    (root / "run" / "scalars" / "rank0.jsonl").symlink_to(secret)
    with pytest.raises(PermissionError, match="rank0.jsonl resolves to"):
        data.confine(root / "run", allowed=[root])


def _ws_handshake(port: int, host: str, origin: str | None = None) -> str:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((f"GET /_stcore/stream HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                   + (f"Origin: {origin}\r\n" if origin else "") + "\r\n").encode())
        return s.recv(4096).decode(errors="replace").split("\r\n")[0]


def test_app_server_refuses_foreign_host_and_origin(tmp_path):
    """DNS rebinding: a page on evil.example that resolves to 127.0.0.1 must not open the data websocket."""
    pytest.importorskip("streamlit")
    import socket

    from cppo_diag.cli import app_cmd

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = app_cmd.launch([str(REPO / "sample_logs")], port, quiet=True)
    try:
        app_cmd.wait_until_healthy(port, proc)
        assert " 101 " in _ws_handshake(port, f"127.0.0.1:{port}")
        assert " 101 " in _ws_handshake(port, f"localhost:{port}", f"http://localhost:{port}")
        for host, origin in ((f"evil.example:{port}", None), (f"evil.example:{port}", f"http://evil.example:{port}"),
                             (f"127.0.0.1:{port}", f"http://evil.example:{port}"), (f"10.0.0.1:{port}", None)):
            assert " 403 " in _ws_handshake(port, host, origin), (host, origin)
    finally:
        app_cmd.stop(proc)


def test_shard_checks_are_kept_beside_the_run_and_redone_when_a_shard_changes(tmp_path, monkeypatch):
    from cppo_diag.storage import reader, validate

    run_dir = record(tmp_path, steps=range(3))
    n = open_run(run_dir).tokens().collect().height
    assert (run_dir / validate.CACHE_FILE).is_file()
    reader._VERIFIED.clear()  # a new process: only the file beside the run remembers

    def no_checks(*_a, **_k):
        raise AssertionError("a shard was checked again although it did not change")

    monkeypatch.setattr(validate, "inspect_token_shard", no_checks)
    assert open_run(run_dir).tokens().collect().height == n
    monkeypatch.undo()
    reader._VERIFIED.clear()
    shard = sorted((run_dir / "tokens").glob("step=000002/*.parquet"))[0]
    _rewrite_shard(shard, lambda df: df.with_columns(step=pl.lit(0, pl.Int64)))  # changed: checked again
    with pytest.warns(RunWarning, match="directory says step 2"):
        assert open_run(run_dir).tokens().collect().height == n - pq.read_metadata(shard).num_rows
