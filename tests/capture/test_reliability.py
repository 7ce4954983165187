"""Reliability: kill -9 mid-run, resume without duplicates, concurrent reader, unwritable disk, multi-rank."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import polars as pl
import pytest
import torch

from cppo_diag import RunRecorder, open_run
from cppo_diag.capture import RecorderError, RecorderWarning
from cppo_diag.storage import RunWarning

REPO = Path(__file__).resolve().parents[2]
B, T = 6, 16


def batch(step: int, update: int = 0):
    """Deterministic batch for (step, update): the child process and the test regenerate the same one."""
    g = torch.Generator().manual_seed(1000 * step + update)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    return dict(
        logp=-torch.rand(B, T, generator=g), logp_rollout=-torch.rand(B, T, generator=g),
        advantages=torch.randn(B, generator=g), response_mask=torch.arange(T)[None] < lengths[:, None],
    )


def expected(steps, updates=1) -> pl.DataFrame:
    rows = []
    for s in steps:
        for u in range(updates):
            d = batch(s, u)
            m = d["response_mask"]
            for b in range(B):
                n = int(m[b].sum())
                for t in range(n):
                    rows.append((s, b, t, float(d["logp"][b, t]), float(d["logp_rollout"][b, t]), float(d["advantages"][b]), u))
    return pl.DataFrame(rows, schema={"step": pl.Int64, "seq_id": pl.Int64, "pos": pl.Int32, "logp": pl.Float32,
                                      "logp_rollout": pl.Float32, "advantage": pl.Float32, "update": pl.Int32},
                        orient="row")


def read(run_dir, **kw) -> pl.DataFrame:
    return (open_run(run_dir).tokens(**kw).collect().drop("rank").sort(["step", "update", "seq_id", "pos"]))


CHILD = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {repo!r})
    sys.path.insert(0, {tests!r})
    from test_reliability import batch
    from cppo_diag import RunRecorder
    rec = RunRecorder({run!r}, on_error="raise", shard_rows=1, heartbeat_s=0.2, writer_threads={threads})
    for step in range(3):
        rec.log_tokens(step=step, **batch(step))
        rec.log_scalars(step, {{"x": float(step)}})
        rec.end_step(step)
    rec.flush()
    # step 3 is in flight: many small shards (shard_rows=1) and never an end_step
    update = 0
    while True:
        rec.log_tokens(step=3, update=update, **batch(3, update % 50))  # one update per call: no seq_id twice
        update += 1
        if update == 5:
            rec.flush()
            print("mid-step", flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 3])  # 3: shards are encoded by a writer pool
def test_kill_9_mid_run_then_resume_without_duplicates(tmp_path, threads):
    run_dir = tmp_path / "run"
    script = CHILD.format(repo=str(REPO), tests=str(REPO / "tests" / "capture"), run=str(run_dir), threads=threads)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line.strip() == "mid-step", child.stderr.read()
        time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert list((run_dir / "tokens" / "step=000003").glob("rank0-*.parquet")), "step 3 had shards on disk"

    run = open_run(run_dir)
    assert not run.is_live  # the writer's process is gone
    assert run.meta["status"] == "running"
    assert run.completed_steps() == [0, 1, 2]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = read(run_dir)
    assert got.equals(expected([0, 1, 2])), "completed steps read back exactly"
    msgs = [str(w.message) for w in caught if issubclass(w.category, RunWarning)]
    assert any("step=000003" in m and ("never completed" in m or "temp file" in m) for m in msgs), msgs
    assert open_run(run_dir).steps()["x"].to_list()[:3] == [0.0, 1.0, 2.0]

    # Resume: finished steps are skipped (with a warning), step 3's leftovers are removed, nothing duplicates.
    with pytest.warns(RecorderWarning, match="removed .* temp/unfinished file"):
        rec = RunRecorder(run_dir, on_error="raise")
    with rec:
        assert [rec.is_done(s) for s in range(5)] == [True, True, True, False, False]
        step3 = run_dir / "tokens" / "step=000003"
        assert not step3.exists() or not any(step3.iterdir())
        for step in range(5):  # a trainer that replays from step 0 must not duplicate
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RecorderWarning)
                rec.log_tokens(step=step, **batch(step))
            rec.end_step(step)
        assert rec.stats["skipped_done_steps"] == 3
    assert read(run_dir).equals(expected(range(5)))
    assert open_run(run_dir).meta["status"] == "finished"


def test_resume_skips_done_steps_and_keeps_meta(tmp_path):
    with RunRecorder(tmp_path, name="r", config={"lr": 1}, rule="cppo", trainer="trl", anchor="old") as rec:
        for s in range(2):
            rec.log_tokens(step=s, **batch(s))
    created = open_run(tmp_path / "r").meta["created"]
    with RunRecorder(tmp_path, name="r") as rec:
        assert rec.is_done(0) and rec.is_done(1) and not rec.is_done(2)
        with pytest.warns(RecorderWarning, match="step 1 is already complete"):
            rec.log_tokens(step=1, **batch(1))
        rec.log_tokens(step=2, **batch(2))
    meta = open_run(tmp_path / "r").meta
    assert meta["created"] == created and meta["config"] == {"lr": 1} and meta["rule"] == "cppo"
    assert meta["trainer"] == "trl" and meta["anchor"] == "old"  # defaults of the resuming call do not override
    assert read(tmp_path / "r").equals(expected(range(3)))
    with pytest.raises(FileExistsError, match="already holds a run"):
        RunRecorder(tmp_path, name="r", resume=False, on_error="raise")


def test_reader_and_writer_on_the_same_run_at_once(tmp_path):
    n_steps = 12
    stop = threading.Event()
    read_done = threading.Semaphore(0)  # the writer waits for a read after each step, so they interleave
    errors = []

    def write():
        try:
            with RunRecorder(tmp_path, on_error="raise", heartbeat_s=0.1) as rec:
                for s in range(n_steps):
                    for u in range(2):
                        rec.log_tokens(step=s, update=u, **batch(s, u))
                    rec.end_step(s)
                    read_done.acquire(timeout=10)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        finally:
            stop.set()

    th = threading.Thread(target=write)
    th.start()
    seen = 0
    while not (tmp_path / "meta.json").exists():
        time.sleep(0.005)
    while not stop.is_set() or seen == 0:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RunWarning)  # a live run must read cleanly
            run = open_run(tmp_path)
            done = run.completed_steps()
            df = run.tokens().collect()
            done_after = run.completed_steps()  # the writer may complete another step during the read
        # Every step the reader sees is complete, with exactly its expected rows; every step complete
        # before the read is among them.
        steps = sorted(df["step"].unique().to_list())
        assert set(steps) <= set(done_after), (steps, done_after)
        assert set(done) <= set(steps), (done, steps)
        if steps:
            want = expected(steps, updates=2)
            assert df.drop("rank").sort(["step", "update", "seq_id", "pos"]).equals(want)
        seen += 1
        read_done.release()
    th.join()
    assert not errors, errors
    assert seen >= n_steps
    assert read(tmp_path).equals(expected(range(n_steps), updates=2))


def test_warn_mode_never_raises_when_the_disk_goes_away(tmp_path):
    run_dir = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with RunRecorder(run_dir, heartbeat_s=3600) as rec:  # no heartbeat write racing the rmtree below
            rec.log_tokens(step=0, **batch(0))
            rec.end_step(0)
            rec.flush()
            shutil.rmtree(run_dir)
            run_dir.write_text("now a file: every write under it fails")  # works even as root
            for s in range(1, 4):
                rec.log_tokens(step=s, **batch(s))
                rec.log_scalars(s, {"x": 1.0})
                rec.log_sequences(step=s, seq_ids=[0], prompts=["p"])
                rec.end_step(s)
            rec.flush()
            assert rec.stats["dropped_records"] > 0
    assert any(issubclass(w.category, RecorderWarning) for w in caught)
    # Opening under a file path: the recorder becomes inert instead of raising.
    with pytest.warns(RecorderWarning, match="recording is disabled"):
        rec = RunRecorder(run_dir / "sub")
    rec.log_tokens(step=0, **batch(0))
    rec.close()


def test_raise_mode_surfaces_writer_errors(tmp_path):
    run_dir = tmp_path / "run"
    rec = RunRecorder(run_dir, on_error="raise", heartbeat_s=3600)
    rec.log_tokens(step=0, **batch(0))
    rec.flush()
    shutil.rmtree(run_dir)
    run_dir.write_text("x")
    rec.end_step(0)
    with pytest.raises(RecorderError, match="background writer failed"):
        rec.flush()
    rec._closed = True  # the run dir is gone; nothing left to close


def test_writer_pool_failed_shard_leaves_its_step_unmarked(tmp_path):
    run_dir = tmp_path / "run"
    rec = RunRecorder(run_dir, on_error="warn", writer_threads=2, heartbeat_s=3600)
    real = rec._writer._write_shard

    def flaky(table, path):
        if "step=000001" in str(path):
            raise OSError("disk full (injected)")
        return real(table, path)

    rec._writer._write_shard = flaky
    with pytest.warns(RecorderWarning, match=r"OSError: disk full \(injected\)"):
        for s in range(3):
            rec.log_tokens(step=s, **batch(s))
            rec.end_step(s)
        rec.flush()
    rec.close()
    assert rec.stats["dropped_records"] == 1
    run = open_run(run_dir)
    assert run.completed_steps() == [0, 2]
    assert read(run_dir).equals(expected([0, 2]))
    assert not list((run_dir / "tokens").rglob(".tmp-*"))


def test_writer_pool_error_surfaces_in_raise_mode(tmp_path):
    rec = RunRecorder(tmp_path / "run", on_error="raise", writer_threads=2, heartbeat_s=3600)

    def broken(table, path):
        raise OSError("disk full (injected)")

    rec._writer._write_shard = broken
    rec.log_tokens(step=0, **batch(0))
    rec.end_step(0)
    with pytest.raises(RecorderError, match=r"background writer failed: disk full \(injected\)"):
        rec.flush()
    rec.close()
    assert open_run(tmp_path / "run").completed_steps() == []


def test_two_ranks_into_one_run(tmp_path):
    recs = [RunRecorder(tmp_path, rank=r, on_error="raise", config={"world": 2}) for r in (1, 0)]
    for s in range(3):
        for rec in recs:
            d = batch(s, rec.rank)
            rec.log_tokens(step=s, seq_ids=torch.arange(B) + B * rec.rank, **d)
            rec.log_scalars(s, {f"r{rec.rank}": float(s)})
            rec.end_step(s)
    for rec in recs:
        rec.close()
    run = open_run(tmp_path)
    assert run.meta["status"] == "finished" and run.meta["config"] == {"world": 2}
    df = run.tokens().collect()
    assert sorted(df["rank"].unique().to_list()) == [0, 1]
    for r in (0, 1):
        part = df.filter(pl.col("rank") == r).sort(["step", "seq_id", "pos"])
        want = expected(range(3), updates=2).filter(pl.col("update") == r)
        assert part["logp"].equals(want["logp"])
        assert part["seq_id"].min() == B * r
    files = sorted(p.name for p in (tmp_path / "tokens" / "step=000000").iterdir())
    assert files == ["rank0-u0-000.parquet", "rank1-u0-000.parquet"]
    assert sorted(p.name for p in (tmp_path / "_done").iterdir())[:2] == ["step=000000.rank0", "step=000000.rank1"]
    assert set(run.steps().columns) == {"step", "r0", "r1"}


def test_two_ranks_with_resume_false_start_in_either_order(tmp_path):
    for first, second in ((0, 1), (1, 0)):
        run_dir = tmp_path / f"first{first}"
        a = RunRecorder(run_dir, rank=first, resume=False, on_error="raise", config={"first": first})
        b = RunRecorder(run_dir, rank=second, resume=False, on_error="raise", config={"first": first})
        for rec in (a, b):
            rec.log_tokens(step=0, **batch(0))
            rec.close()
        run = open_run(run_dir)
        assert "created_by_rank" not in run.meta and run.meta["status"] == "finished"
        assert sorted(run.tokens().collect()["rank"].unique().to_list()) == [0, 1]
        with pytest.raises(FileExistsError):
            RunRecorder(run_dir, rank=0, resume=False, on_error="raise")


def test_rank1_resume_does_not_touch_rank0_files(tmp_path):
    r0 = RunRecorder(tmp_path, rank=0)
    r0.log_tokens(step=0, **batch(0))
    r0.flush()  # step 0 of rank 0 is in flight (no end_step yet)
    r1 = RunRecorder(tmp_path, rank=1)  # must not delete rank 0's unfinished work
    r1.close()
    r0.close()
    assert open_run(tmp_path).completed_steps() == [0]
    assert read(tmp_path).filter(pl.col("step") == 0).height == expected([0]).height


def test_joining_rank_keeps_step_dirs_another_rank_writes_into(tmp_path):
    # Rank 0's writer creates a step directory, then writes a shard's temp file into it: a rank that joins
    # in between must not remove the (still empty) directory, or rank 0's write fails.
    r0 = RunRecorder(tmp_path, rank=0, on_error="raise")
    step_dirs = [tmp_path / top / "step=000000" for top in ("tokens", "sequences")]
    for d in step_dirs:
        d.mkdir(parents=True)
    r1 = RunRecorder(tmp_path, rank=1, on_error="raise")
    assert all(d.is_dir() for d in step_dirs)
    r0.log_tokens(step=0, **batch(0))
    r0.log_sequences(step=0, seq_ids=list(range(B)), completions=[f"c{i}" for i in range(B)])
    r1.close()
    r0.close()
    run = open_run(tmp_path)
    assert run.completed_steps() == [0]
    assert run.sequences().collect().height == B


def test_full_queue_drop_mode_counts(tmp_path):
    rec = RunRecorder(tmp_path, queue_size=1, on_full="drop")
    gate = threading.Event()
    rec._writer.put("call", gate.wait)  # hold the writer so the queue fills up
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        for s in range(4):
            rec.log_tokens(step=s, **batch(s))
    gate.set()
    rec.close()
    assert rec.stats["dropped_records"] >= 3


def test_writer_pool_recorder_left_open_is_closed_at_exit(tmp_path):
    """A trainer that never calls close(): the atexit close still writes the last step's shards and marker,
    although the interpreter has shut the encoding pool down by then."""
    run_dir = tmp_path / "run"
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests' / 'capture')!r})
        from test_reliability import batch
        from cppo_diag import RunRecorder
        rec = RunRecorder({str(run_dir)!r}, on_error="raise", writer_threads=2)
        for step in range(2):
            rec.log_tokens(step=step, **batch(step))
        # no end_step(1), no close()
    """)
    subprocess.run([sys.executable, "-c", code], check=True, timeout=600)
    run = open_run(run_dir)
    assert run.meta["status"] == "finished"
    assert run.completed_steps() == [0, 1]
    assert read(run_dir).equals(expected([0, 1]))


def test_rank0_opening_while_another_rank_links_meta_does_not_break_it(tmp_path, monkeypatch):
    # Rank 1 finds no meta.json, writes a temp file and link()s it into place. Rank 0 opening the run at that
    # moment (its resume cleanup removes its own stale meta temps) must not delete rank 1's temp: that race
    # crashed rank 1 with FileNotFoundError in the DDP test.
    import os

    from cppo_diag import RunRecorder

    run = tmp_path / "run"
    real_link = os.link
    opened = []

    def link_after_rank0_opens(src, dst, *a, **k):
        if not opened:
            opened.append(RunRecorder(run, rank=0, resume=True))
        return real_link(src, dst, *a, **k)

    monkeypatch.setattr(os, "link", link_after_rank0_opens)
    rank1 = RunRecorder(run, rank=1, resume=True, on_error="raise")
    monkeypatch.setattr(os, "link", real_link)
    rank1.close()
    opened[0].close()
    assert (run / "meta.json").exists()
    stale = run / ".tmp-meta.json.4242.deadbeef"  # rank 0's own leftover from a crash: removed on resume
    stale.write_text("{}")
    RunRecorder(run, rank=0, resume=True).close()
    assert not stale.exists()
