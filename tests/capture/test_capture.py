"""RunRecorder: value-for-value round trips through open_run, input layouts, sampling, validation."""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import polars as pl
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cppo_diag import RunRecorder, open_run
from cppo_diag.capture import CaptureInputError, NonFiniteError, NullRecorder, RecorderWarning
from cppo_diag.capture.sampling import keep_sequences
from cppo_diag.capture.staging import materialize, stage_tokens
from cppo_diag.storage import schema


def _batch(B=5, T=9, seed=0, left=False, K=None):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    ar = torch.arange(T)[None, :]
    mask = (ar >= T - lengths[:, None]) if left else (ar < lengths[:, None])  # (B, T)
    d = dict(
        logp=-torch.rand(B, T, generator=g) * 3,
        logp_rollout=-torch.rand(B, T, generator=g) * 3,
        advantages=torch.randn(B, generator=g),
        response_mask=mask,
    )
    return d, lengths


def _expected_rows(step, d, *, seq_ids=None, update=0, per_token=()):
    """Plain-loop reference: one dict per valid token, in (seq_id, pos) order."""
    B, T = d["logp"].shape
    seq_ids = list(range(B)) if seq_ids is None else [int(s) for s in seq_ids]
    rows = []
    for b in range(B):
        pos = 0
        for t in range(T):
            if not bool(d["response_mask"][b, t]):
                continue
            adv = d["advantages"]
            row = dict(step=step, seq_id=seq_ids[b], pos=pos, update=update,
                       logp=float(d["logp"][b, t]), logp_rollout=float(d["logp_rollout"][b, t]),
                       advantage=float(adv[b] if adv.dim() == 1 else adv[b, t]))
            for name, col in per_token:
                row[col] = d[name][b, t].tolist()
            rows.append(row)
            pos += 1
    return sorted(rows, key=lambda r: (r["step"], r["update"], r["seq_id"], r["pos"]))


def _assert_rows(df: pl.DataFrame, rows: list[dict]):
    df = df.sort(["step", "update", "seq_id", "pos"])
    assert df.height == len(rows)
    for col in rows[0]:
        got = df[col].to_list()
        want = [r[col] for r in rows]
        if isinstance(want[0], float):
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=col)
        elif isinstance(want[0], list) and want[0] and isinstance(want[0][0], float):
            np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=col)
        else:
            assert got == want, col


@pytest.mark.parametrize("left", [False, True])
def test_padded_roundtrip_value_for_value(tmp_path, left):
    batches = {}
    with RunRecorder(tmp_path, name="r", on_error="raise") as rec:
        for step in range(3):
            d, _ = _batch(seed=step, left=left)
            batches[step] = d
            rec.log_tokens(step=step, **d)
            rec.end_step(step)
    run = open_run(tmp_path / "r")
    assert run.completed_steps() == [0, 1, 2]
    df = run.tokens().collect()
    assert dict(df.schema) == {**schema.REQUIRED_TOKEN_COLUMNS, "update": pl.Int32, "rank": pl.Int32}
    rows = [r for s, d in batches.items() for r in _expected_rows(s, d)]
    _assert_rows(df, rows)
    assert (df["rank"] == 0).all()


def test_left_and_right_padding_give_same_pos(tmp_path):
    d, lengths = _batch(seed=3)
    B, T = d["logp"].shape
    # Build the left-padded twin of the right-padded batch: same valid tokens, shifted right.
    left = {k: torch.zeros_like(v) for k, v in d.items() if k != "advantages"}
    for b in range(B):
        L = int(lengths[b])
        for k in ("logp", "logp_rollout", "response_mask"):
            left[k][b, T - L:] = d[k][b, :L]
    left["advantages"] = d["advantages"]
    with RunRecorder(tmp_path / "a", on_error="raise") as rec:
        rec.log_tokens(step=0, **d)
    with RunRecorder(tmp_path / "b", on_error="raise") as rec:
        rec.log_tokens(step=0, **left)
    a = open_run(tmp_path / "a").tokens().collect()
    b = open_run(tmp_path / "b").tokens().collect()
    assert a.equals(b)


def test_packed_roundtrip_matches_padded(tmp_path):
    d, lengths = _batch(seed=4)
    B, T = d["logp"].shape
    m = d["response_mask"]
    packed = dict(logp=d["logp"][m], logp_rollout=d["logp_rollout"][m], advantages=d["advantages"])  # (N,)
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])  # (B+1,)
    with RunRecorder(tmp_path / "packed", on_error="raise") as rec:
        rec.log_tokens(step=0, cu_seqlens=cu, **packed)
    with RunRecorder(tmp_path / "padded", on_error="raise") as rec:
        rec.log_tokens(step=0, **d)
    assert open_run(tmp_path / "packed").tokens().collect().equals(open_run(tmp_path / "padded").tokens().collect())


def test_packed_with_prompt_tokens_masked_and_per_token_advantage(tmp_path):
    # two sequences packed: [p p r r r] [p r r]; response_mask marks r; advantages per token (N,)
    logp = np.array([-1, -2, -0.1, -0.2, -0.3, -3, -0.4, -0.5], np.float32)
    mask = np.array([0, 0, 1, 1, 1, 0, 1, 1], bool)
    adv = np.arange(8, dtype=np.float32)
    with RunRecorder(tmp_path, on_error="raise") as rec:
        rec.log_tokens(step=7, logp=logp, logp_rollout=logp - 0.01, advantages=adv, response_mask=mask,
                       cu_seqlens=np.array([0, 5, 8]), seq_ids=np.array([10, 11]))
    df = open_run(tmp_path).tokens().collect()
    assert df["seq_id"].to_list() == [10, 10, 10, 11, 11]
    assert df["pos"].to_list() == [0, 1, 2, 0, 1]
    np.testing.assert_array_equal(df["logp"].to_numpy(), logp[mask])
    np.testing.assert_array_equal(df["advantage"].to_numpy(), adv[mask])
    assert df["step"].unique().to_list() == [7]


def test_numpy_inputs_and_all_optional_columns(tmp_path):
    rng = np.random.default_rng(0)
    B, T, K = 4, 6, 3
    mask = rng.random((B, T)) < 0.8
    mask[:, 0] = True
    d = dict(
        logp=-np.abs(rng.normal(size=(B, T))).astype(np.float32),  # log-probs are <= 0 (storage.validate)
        logp_rollout=-np.abs(rng.normal(size=(B, T))).astype(np.float64),
        advantages=rng.normal(size=(B, T)).astype(np.float32), response_mask=mask,
        logp_old=-np.abs(rng.normal(size=(B, T))).astype(np.float32), entropy=rng.random((B, T)).astype(np.float32),
        keep_applied=rng.random((B, T)) < 0.5, reason_applied=rng.integers(0, 4, (B, T)).astype(np.uint8),
        token_ids=rng.integers(0, 50000, (B, T)), reward=rng.normal(size=B).astype(np.float32),
        group_id=np.array([0, 0, 1, 1]), topk_ids=rng.integers(0, 100, (B, T, K)),
        topk_logp_rollout=rng.normal(size=(B, T, K)).astype(np.float32),
        topk_logp=rng.normal(size=(B, T, K)).astype(np.float32), loss_weight=rng.random((B, T)).astype(np.float32),
        logp_behavior=-np.abs(rng.normal(size=(B, T))).astype(np.float32), lag=np.array([5, 0, 7, 2]),
        fork=rng.random((B, T)) < 0.3,
    )
    seq_ids = np.array([3, 1, 2, 0])  # rows are written in seq_id order
    with RunRecorder(tmp_path, on_error="raise") as rec:
        rec.log_tokens(step=2, update=1, seq_ids=seq_ids, **d)
    df = open_run(tmp_path).tokens().collect()
    assert df["seq_id"].to_list() == sorted(df["seq_id"].to_list())
    for col, dtype in schema.TOKEN_COLUMNS.items():
        assert df.schema[col] == dtype, col
    df = df.sort(["seq_id", "pos"])
    expect = []
    for b in np.argsort(seq_ids):
        for t in np.flatnonzero(mask[b]):
            expect.append((b, t))
    bs = np.array([e[0] for e in expect]); ts = np.array([e[1] for e in expect])
    np.testing.assert_array_equal(df["logp"].to_numpy(), d["logp"][bs, ts])
    np.testing.assert_array_equal(df["logp_rollout"].to_numpy(), d["logp_rollout"][bs, ts].astype(np.float32))
    np.testing.assert_array_equal(df["advantage"].to_numpy(), d["advantages"][bs, ts])
    np.testing.assert_array_equal(df["logp_old"].to_numpy(), d["logp_old"][bs, ts])
    np.testing.assert_array_equal(df["entropy"].to_numpy(), d["entropy"][bs, ts])
    np.testing.assert_array_equal(df["loss_weight"].to_numpy(), d["loss_weight"][bs, ts])
    np.testing.assert_array_equal(df["keep_applied"].to_numpy(), d["keep_applied"][bs, ts])
    np.testing.assert_array_equal(df["reason_applied"].to_numpy(), d["reason_applied"][bs, ts])
    np.testing.assert_array_equal(df["token_id"].to_numpy(), d["token_ids"][bs, ts])
    np.testing.assert_array_equal(df["reward"].to_numpy(), d["reward"][bs])
    np.testing.assert_array_equal(df["group_id"].to_numpy(), d["group_id"][bs])
    np.testing.assert_array_equal(df["logp_behavior"].to_numpy(), d["logp_behavior"][bs, ts])
    np.testing.assert_array_equal(df["lag"].to_numpy(), d["lag"][bs])
    np.testing.assert_array_equal(df["fork"].to_numpy(), d["fork"][bs, ts])
    np.testing.assert_array_equal(np.stack(df["topk_ids"].to_list()), d["topk_ids"][bs, ts])
    np.testing.assert_array_equal(np.stack(df["topk_logp_rollout"].to_list()).astype(np.float32), d["topk_logp_rollout"][bs, ts])
    np.testing.assert_array_equal(np.stack(df["topk_logp"].to_list()).astype(np.float32), d["topk_logp"][bs, ts])
    assert df["update"].unique().to_list() == [1]
    expected_pos = [int(mask[b, : t + 1].sum()) - 1 for b, t in expect]
    assert df["pos"].to_list() == expected_pos


def test_bfloat16_and_requires_grad_inputs(tmp_path):
    d, _ = _batch(seed=5)
    logp = d["logp"].clone().requires_grad_(True)
    bf = d["logp_rollout"].to(torch.bfloat16)
    with RunRecorder(tmp_path, on_error="raise") as rec:
        rec.log_tokens(step=0, logp=logp, logp_rollout=bf, advantages=d["advantages"], response_mask=d["response_mask"])
    df = open_run(tmp_path).tokens().collect()
    m = d["response_mask"]
    np.testing.assert_array_equal(df["logp_rollout"].to_numpy(), bf.float()[m].numpy())
    np.testing.assert_array_equal(df["logp"].to_numpy(), d["logp"][m].numpy())


def test_capture_copies_inputs_so_later_inplace_changes_do_not_leak(tmp_path):
    d, _ = _batch(seed=6)
    orig = {k: v.clone() for k, v in d.items()}
    with RunRecorder(tmp_path, on_error="warn") as rec:
        rec.log_tokens(step=0, **d)
        d["logp"].fill_(123.0)  # the trainer reuses its buffer right away
        d["advantages"].zero_()
    _assert_rows(open_run(tmp_path).tokens().collect(), _expected_rows(0, orig))


def test_multiple_updates_and_microbatches_in_one_step(tmp_path):
    with RunRecorder(tmp_path, on_error="raise") as rec:
        rows = []
        for update in range(2):
            for micro in range(2):
                d, _ = _batch(B=3, seed=10 * update + micro)
                ids = np.arange(3) + 3 * micro
                rec.log_tokens(step=4, update=update, seq_ids=ids, **d)
                rows += _expected_rows(4, d, seq_ids=ids, update=update)
        rec.end_step(4)
    _assert_rows(open_run(tmp_path).tokens().collect(), sorted(rows, key=lambda r: (r["update"], r["seq_id"], r["pos"])))


def test_interleaved_microbatches_are_stored_in_seq_id_order(tmp_path):
    with RunRecorder(tmp_path, on_error="raise") as rec:
        for ids in ([0, 2, 4], [1, 3, 5]):
            d, _ = _batch(B=3, T=4, seed=ids[0])
            rec.log_tokens(step=0, seq_ids=torch.tensor(ids), **d)
    files = open_run(tmp_path).token_files()
    assert len(files) == 1
    df = pl.read_parquet(files[0])
    assert df["seq_id"].is_sorted() and df.height == df.unique(["seq_id", "pos"]).height
    assert df.group_by("seq_id").agg(pl.col("pos").diff().drop_nulls().eq(1).all())["pos"].all()


def test_auto_end_of_earlier_step_and_close_ends_last(tmp_path):
    with RunRecorder(tmp_path, on_error="raise") as rec:
        for step in range(3):
            d, _ = _batch(seed=step)
            rec.log_tokens(step=step, **d)  # never calls end_step
        assert rec.is_done(0) and rec.is_done(1) and not rec.is_done(2)
    assert open_run(tmp_path).completed_steps() == [0, 1, 2]


def test_every_n_steps_and_seq_fraction_sampling(tmp_path):
    B = 200
    with RunRecorder(tmp_path, on_error="raise", every_n_steps=2, seq_fraction=0.3) as rec:
        for step in range(4):
            for update in range(2):
                d, _ = _batch(B=B, T=4, seed=step * 7 + update)
                rec.log_tokens(step=step, update=update, **d)
            rec.log_sequences(step=step, seq_ids=np.arange(B), rewards=np.ones(B))
            rec.log_scalars(step, {"x": step})
    run = open_run(tmp_path)
    df = run.tokens().collect()
    assert sorted(df["step"].unique().to_list()) == [0, 2]
    assert run.steps()["step"].to_list() == [0, 1, 2, 3]  # scalars are never sampled
    seqs = run.sequences().collect()
    for step in (0, 2):
        want = set(np.flatnonzero(keep_sequences(step, np.arange(B), 0.3)).tolist())
        assert 0.15 * B < len(want) < 0.45 * B
        for update in (0, 1):  # every update of a step keeps the same sequences
            got = set(df.filter((pl.col("step") == step) & (pl.col("update") == update))["seq_id"].unique().to_list())
            assert got == want
        assert set(seqs.filter(pl.col("step") == step)["seq_id"].to_list()) == want
    # a different step samples different sequences
    assert set(np.flatnonzero(keep_sequences(0, np.arange(B), 0.3))) != set(np.flatnonzero(keep_sequences(2, np.arange(B), 0.3)))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(logp=torch.zeros(2, 3, 4)), "logp: expected shape (B, T) or packed (N,), found (2, 3, 4)"),
        (dict(logp_rollout=torch.zeros(2, 4)), "logp_rollout: expected shape (2, 3) (same as logp), found (2, 4)"),
        (dict(advantages=torch.zeros(3)), "advantages: expected shape (2,) per sequence or (2, 3) per token, found (3,)"),
        (dict(response_mask=torch.ones(3, 3)), "response_mask: expected shape (2, 3)"),
        (dict(logp=torch.zeros(2, 3, dtype=torch.long)), "logp: expected a floating-point dtype, found torch.int64"),
        (dict(token_ids=torch.zeros(2, 3)), "token_ids: expected an integer dtype, found torch.float32"),
        (dict(topk_ids=torch.zeros(2, 3, 4, dtype=torch.long), topk_logp=torch.zeros(2, 3, 5)), "expected the same K"),
        (dict(logp=torch.zeros(6)), "needs cu_seqlens"),
        (dict(logp_rollout="x"), "logp_rollout: expected a torch.Tensor or numpy.ndarray, found str"),
        (dict(seq_ids=torch.zeros(2)), "seq_ids: expected an integer dtype"),
    ],
)
def test_wrong_shapes_and_dtypes_name_the_tensor(tmp_path, kwargs, message):
    base = dict(logp=torch.zeros(2, 3), logp_rollout=torch.zeros(2, 3), advantages=torch.zeros(2))
    base.update(kwargs)
    if base["logp"].dim() == 1:
        base["logp_rollout"] = torch.zeros(6)
    with RunRecorder(tmp_path / "raise", on_error="raise") as rec:
        with pytest.raises(CaptureInputError) as err:
            rec.log_tokens(step=0, **base)
    assert message in str(err.value)
    with RunRecorder(tmp_path / "warn") as rec:  # warn mode: never raises, counts the drop
        with pytest.warns(RecorderWarning, match="log_tokens"):
            rec.log_tokens(step=0, **base)
        assert rec.stats["dropped_records"] == 1


def test_bad_cu_seqlens_values(tmp_path):
    with RunRecorder(tmp_path, on_error="raise") as rec:
        with pytest.raises(CaptureInputError, match="cu_seqlens: expected non-decreasing offsets from 0 to N=5"):
            rec.log_tokens(step=0, logp=torch.zeros(5), logp_rollout=torch.zeros(5), advantages=torch.zeros(2),
                           cu_seqlens=torch.tensor([0, 3, 4]))


def test_nonfinite_raise_mode_names_column_step_seq_pos(tmp_path):
    d, _ = _batch(B=3, T=5, seed=1)
    d["response_mask"][:] = True
    d["logp_rollout"][2, 3] = float("nan")
    with RunRecorder(tmp_path, on_error="raise") as rec:
        with pytest.raises(NonFiniteError, match=r"column 'logp_rollout' has 1 NaN/Inf value\(s\) at step 9 \(first at seq 2, pos 3"):
            rec.log_tokens(step=9, **d)


def test_nonfinite_warn_mode_drops_only_bad_sequences(tmp_path):
    d, _ = _batch(B=4, T=5, seed=2)
    d["response_mask"][:] = True
    d["logp"][1, 2] = float("inf")
    d["advantages"][3] = float("nan")
    with RunRecorder(tmp_path) as rec:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rec.log_tokens(step=0, **d)
            rec.flush()
        assert rec.stats["dropped_sequences_nonfinite"] == 2
    msgs = [str(w.message) for w in caught if issubclass(w.category, RecorderWarning)]
    assert any("column 'logp'" in m and "step 0" in m and "seq 1, pos 2" in m for m in msgs), msgs
    df = open_run(tmp_path).tokens().collect()
    assert sorted(df["seq_id"].unique().to_list()) == [0, 2]
    assert df["logp"].is_finite().all() and df["advantage"].is_finite().all()


def test_nan_padding_is_not_flagged(tmp_path):
    d, _ = _batch(B=3, T=6, seed=3)
    d["logp"][~d["response_mask"]] = float("nan")  # junk in padding is fine: it is never written
    with RunRecorder(tmp_path, on_error="raise") as rec:
        rec.log_tokens(step=0, **d)
    assert open_run(tmp_path).tokens().collect().height == int(d["response_mask"].sum())


def test_scalars_sequences_and_nonfinite_scalars(tmp_path):
    with RunRecorder(tmp_path, on_error="raise") as rec:
        rec.log_scalars(0, {"reward/mean": torch.tensor(0.25), "mask/cppo/frac": np.float32(0.5), "n": 3})
        rec.log_scalars(1, {"reward/mean": float("nan"), "note": "x"})
        rec.log_sequences(step=0, seq_ids=[0, 1], prompts=["a", "b"], completions=["c", "d"],
                          tokens=[["c"], ["d", "!"]], rewards=torch.tensor([1.0, 0.0]), lengths=[1, 2],
                          group_ids=[5, 5], correct=[True, False])
        with pytest.raises(CaptureInputError, match="prompts: expected 2 entries"):
            rec.log_sequences(step=0, seq_ids=[0, 1], prompts=["a"])
    run = open_run(tmp_path)
    steps = run.steps()
    assert steps["step"].to_list() == [0, 1]
    assert steps["reward/mean"].to_list() == [0.25, None]
    assert steps["mask/cppo/frac"].to_list()[0] == 0.5
    seqs = run.sequences().collect()
    assert seqs.columns == ["step", "seq_id", "rank", "group_id", "prompt", "completion", "tokens", "reward", "length", "correct"]
    assert seqs["tokens"].to_list() == [["c"], ["d", "!"]]
    assert seqs["correct"].to_list() == [True, False]
    for col, dtype in schema.SEQUENCE_COLUMNS.items():
        assert seqs.schema[col] == dtype


def test_meta_contents(tmp_path):
    with RunRecorder(tmp_path, name="m", trainer="trl", rule="cppo", rule_params={"delta": 0.1}, model="tiny",
                     task="gsm8k", anchor="old", config={"lr": 1e-6}) as rec:
        assert open_run(rec.run_dir).meta["status"] == "running"
    meta = open_run(tmp_path / "m").meta
    for key in schema.META_KEYS:
        assert key in meta, key
    assert (meta["trainer"], meta["rule"], meta["rule_params"], meta["anchor"], meta["status"]) == (
        "trl", "cppo", {"delta": 0.1}, "old", "finished")


def test_failed_run_status_and_half_step_not_marked(tmp_path):
    d, _ = _batch(seed=1)
    with pytest.raises(RuntimeError):
        with RunRecorder(tmp_path) as rec:
            rec.log_tokens(step=0, **d)
            rec.end_step(0)
            rec.log_tokens(step=1, **d)
            raise RuntimeError("training crashed")
    run = open_run(tmp_path)
    assert run.meta["status"] == "failed"
    assert run.completed_steps() == [0]


def test_null_recorder_has_the_same_methods():
    public = {n for n, v in inspect.getmembers(RunRecorder) if callable(v) and not n.startswith("_") and n != "disabled"}
    null = RunRecorder.disabled()
    assert isinstance(null, NullRecorder)
    for name in public:
        assert callable(getattr(null, name)), name
    with null as rec:
        rec.log_tokens(step=0, logp=None, logp_rollout=None, advantages=None)
        rec.log_scalars(0, {"a": 1})
        rec.log_sequences(step=0, seq_ids=[0])
        rec.end_step(0)
        assert rec.is_done(0) is False
    sig = inspect.signature(RunRecorder.log_tokens)
    assert list(sig.parameters)[1:] == [
        "step", "logp", "logp_rollout", "advantages", "response_mask", "cu_seqlens", "update", "seq_ids",
        "logp_old", "keep_applied", "reason_applied", "token_ids", "entropy", "reward", "group_id", "topk_ids",
        "topk_logp_rollout", "topk_logp", "loss_weight", "logp_behavior", "lag", "fork"]


def test_constructor_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="on_error: expected 'warn' or 'raise', found 'ignore'"):
        RunRecorder(tmp_path, on_error="ignore")
    with pytest.raises(ValueError, match="seq_fraction"):
        RunRecorder(tmp_path, seq_fraction=0)
    with pytest.raises(ValueError, match="every_n_steps"):
        RunRecorder(tmp_path, every_n_steps=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_roundtrip(tmp_path):
    d, _ = _batch(B=8, T=16, seed=7)
    cuda = {k: v.cuda() for k, v in d.items()}
    with RunRecorder(tmp_path, on_error="raise") as rec:
        rec.log_tokens(step=0, **cuda)
        cuda["logp"].add_(1.0)  # in-place change after the call is ordered after the async copy
    _assert_rows(open_run(tmp_path).tokens().collect(), _expected_rows(0, d))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_log_tokens_does_not_synchronise(tmp_path):
    d, _ = _batch(B=64, T=1024, seed=8)
    cuda = {k: v.cuda() for k, v in d.items()}
    x = torch.randn(4096, 4096, device="cuda")
    with RunRecorder(tmp_path, on_error="warn") as rec:
        rec.log_tokens(step=0, **cuda)  # warm-up: the first pinned-memory allocation may synchronise
        rec.flush()
        torch.cuda.synchronize()
        for _ in range(20):  # queue long GPU work; logp depends on it, so its copy waits behind it
            x = x @ x
            x = x / x.norm()
        logp = cuda["logp"] + 0 * x[0, 0]
        rec.log_tokens(step=1, logp=logp, logp_rollout=cuda["logp_rollout"], advantages=cuda["advantages"],
                       response_mask=cuda["response_mask"])
        still_busy = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
    assert still_busy, "log_tokens waited for the GPU (it must only enqueue a non_blocking copy)"
    df = open_run(tmp_path).tokens().collect()
    assert df.height == 2 * int(d["response_mask"].sum())
    step1 = df.filter(pl.col("step") == 1).sort(["seq_id", "pos"])
    np.testing.assert_array_equal(step1["logp_rollout"].to_numpy(), d["logp_rollout"][d["response_mask"]].numpy())


def test_warn_mode_warns_once_per_kind_and_counts_every_drop(tmp_path):
    with RunRecorder(tmp_path) as rec:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for step in range(3):
                rec.log_tokens(step=step, logp=torch.zeros(2, 3), logp_rollout=torch.zeros(2, 4), advantages=torch.zeros(2))
                d, _ = _batch(B=2, T=3, seed=step)
                d["response_mask"][:] = True
                d["logp"][0, 0] = float("nan")
                rec.log_tokens(step=step, **d)
            rec.flush()
        kinds = [str(w.message).split(":")[0] for w in caught if issubclass(w.category, RecorderWarning)]
        assert sorted(kinds) == ["cppo-diag recorder (log_tokens)", "cppo-diag recorder (nonfinite)"]
        assert rec.stats["dropped_records"] == 3
        assert rec.stats["dropped_sequences_nonfinite"] == 3
        assert rec.stats["warnings"] == {"log_tokens": 3, "nonfinite": 3}
    assert open_run(tmp_path).tokens().collect()["seq_id"].unique().to_list() == [1]



@settings(max_examples=60, deadline=None)
@given(B=st.integers(1, 6), T=st.integers(1, 8), seed=st.integers(0, 10_000), packed=st.booleans(),
       per_token_adv=st.booleans())
def test_property_staging_matches_plain_loop(B, T, seed, packed, per_token_adv):
    rng = np.random.default_rng(seed)
    mask = rng.random((B, T)) < 0.7  # arbitrary holes: any prompt/padding pattern
    logp = -np.abs(rng.normal(size=(B, T))).astype(np.float32)
    lr = -np.abs(rng.normal(size=(B, T))).astype(np.float32)
    adv = rng.normal(size=(B, T) if per_token_adv else B).astype(np.float32)
    seq_ids = rng.permutation(100)[:B]
    if packed:  # every row packed back to back, prompt/padding positions excluded through response_mask
        cu = np.arange(0, (B + 1) * T, T)
        kw = dict(logp=logp.reshape(-1), logp_rollout=lr.reshape(-1), response_mask=mask.reshape(-1),
                  cu_seqlens=cu, advantages=adv.reshape(-1) if per_token_adv else adv)
    else:
        kw = dict(logp=logp, logp_rollout=lr, response_mask=mask, advantages=adv)
    table = materialize(stage_tokens(step=3, update=0, rank=0, seq_fraction=1.0, seq_ids=seq_ids, **kw),
                        nonfinite="raise")
    rows = []
    for b in np.argsort(seq_ids):
        pos = 0
        for t in range(T):
            if mask[b, t]:
                rows.append((int(seq_ids[b]), pos, logp[b, t], lr[b, t], adv[b, t] if per_token_adv else adv[b]))
                pos += 1
    if not rows:
        assert table is None
        return
    got = list(zip(*(table.column(c).to_pylist() for c in ("seq_id", "pos", "logp", "logp_rollout", "advantage"))))
    assert [g[:2] for g in got] == [r[:2] for r in rows]
    np.testing.assert_array_equal(np.array([g[2:] for g in got], np.float32), np.array([r[2:] for r in rows], np.float32))


# -- writer settings: codecs, encodings, writer pool ------------------------------------------------------


@pytest.mark.parametrize("compression,threads", [("lz4", 1), ("zstd", 1), ("snappy", 1), ("none", 1),
                                                 ("lz4", 2), ("zstd", 3)])
def test_codecs_and_writer_threads_roundtrip_value_for_value(tmp_path, compression, threads):
    batches = {}
    with RunRecorder(tmp_path, name="r", on_error="raise", compression=compression, writer_threads=threads,
                     shard_rows=8) as rec:  # shard_rows=8: a shard per call, several in flight at once
        for step in range(6):
            for update in range(2):
                d, _ = _batch(B=7, T=11, seed=10 * step + update)
                batches[step, update] = d
                for half in (slice(0, 4), slice(4, 7)):  # two micro-batches -> two parts
                    rec.log_tokens(step=step, update=update, seq_ids=np.arange(7)[half],
                                   **{k: v[half] for k, v in d.items()})
            rec.end_step(step)
        rec.flush()  # flush = on disk: every ended step has its marker, also with a pool
        assert rec.is_done(5)
        assert open_run(tmp_path / "r").completed_steps() == list(range(6))
    run = open_run(tmp_path / "r")
    files = run.token_files()
    assert len(files) == 6 * 2 * 2  # step x update x part
    import pyarrow.parquet as pq

    md = pq.read_metadata(files[0])
    codec = {"lz4": "LZ4_RAW", "zstd": "ZSTD", "snappy": "SNAPPY", "none": "UNCOMPRESSED"}[compression]
    names = [md.schema.column(i).name for i in range(md.num_columns)]
    cols = {n: md.row_group(0).column(i) for i, n in enumerate(names)}
    assert cols["logp"].compression in (codec, "LZ4" if compression == "lz4" else codec)
    assert "BYTE_STREAM_SPLIT" in cols["logp"].encodings and "DELTA_BINARY_PACKED" in cols["pos"].encodings
    step_dict = any("DICTIONARY" in e for e in cols["step"].encodings)
    assert step_dict == (compression == "zstd")  # PLAIN with the fast codecs, dictionary with zstd
    assert cols["step"].statistics is not None and cols["logp"].statistics is None
    rows = [r for (s, u), d in batches.items() for r in _expected_rows(s, d, update=u)]
    _assert_rows(run.tokens().collect(), rows)


def test_writer_pool_all_columns_match_single_thread(tmp_path):
    rng = np.random.default_rng(1)
    B, T, K = 6, 13, 2  # 13: bool columns whose length is not a multiple of 8
    mask = rng.random((B, T)) < 0.7
    d = dict(
        logp=-np.abs(rng.normal(size=(B, T))).astype(np.float32), logp_rollout=-np.abs(rng.normal(size=(B, T))),
        advantages=rng.normal(size=B), response_mask=mask, keep_applied=rng.random((B, T)) < 0.5,
        reason_applied=rng.integers(0, 4, (B, T)), token_ids=rng.integers(0, 9, (B, T)),
        entropy=rng.random((B, T)).astype(np.float16), reward=rng.integers(0, 2, B),
        group_id=np.arange(B) // 2, topk_ids=rng.integers(0, 9, (B, T, K)),
        topk_logp=rng.normal(size=(B, T, K)).astype(np.float32),
    )
    frames = []
    for i, kw in enumerate([dict(compression="zstd"), dict(writer_threads=3, shard_rows=5)]):
        with RunRecorder(tmp_path / str(i), on_error="raise", **kw) as rec:
            for step in range(3):
                rec.log_tokens(step=step, seq_ids=np.array([5, 4, 3, 2, 1, 0]), **d)
        frames.append(open_run(tmp_path / str(i)).tokens().collect().sort(["step", "seq_id", "pos"]))
    assert frames[0].height == 3 * int(mask.sum())
    assert frames[0].equals(frames[1])
    assert frames[0]["keep_applied"].to_list() == [bool(x) for s in range(3) for b in range(5, -1, -1)
                                                   for x in d["keep_applied"][b][mask[b]]]


def test_writer_setting_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match=r"compression: expected one of .*found 'gzip'"):
        RunRecorder(tmp_path, compression="gzip")
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match=f"writer_threads: expected an integer >= 1, found {bad!r}"):
            RunRecorder(tmp_path, writer_threads=bad)


def test_writer_does_not_import_pandas(tmp_path):
    """pa.array(ndarray) imports pandas on first use (~0.25 s of writer CPU once per process); the writer
    builds Arrow arrays from numpy buffers instead."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import sys, numpy as np
        from cppo_diag import RunRecorder
        before = 'pandas' in sys.modules
        with RunRecorder({str(tmp_path)!r}, on_error="raise") as rec:
            rec.log_tokens(step=0, logp=np.zeros((2, 3), np.float32), logp_rollout=np.zeros((2, 3)),
                           advantages=np.ones(2), keep_applied=np.ones((2, 3), bool))
            rec.end_step(0)
            rec.flush()
        print(before, 'pandas' in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] == "True":
        pytest.skip("pandas is imported by cppo_diag itself; nothing to check")
    assert out == ["False", "False"]


def test_writer_pool_splits_a_step_at_sequence_boundaries(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from cppo_diag.capture import writer

    monkeypatch.setattr(writer, "MIN_PART_ROWS", 8)
    batches = {}
    with RunRecorder(tmp_path, on_error="raise", writer_threads=3) as rec:
        for step in range(4):
            d, _ = _batch(B=9, T=12, seed=step)
            batches[step] = d
            rec.log_tokens(step=step, **d)
            rec.end_step(step)
    run = open_run(tmp_path)
    assert run.completed_steps() == [0, 1, 2, 3]
    files = run.token_files()
    assert len(files) == 4 * 3  # each step's shard split into 3 parts
    owner = {}
    for f in files:
        t = pq.read_table(f)
        assert t.num_rows >= 8 or t.num_rows == 0
        for s, q in set(zip(t["step"].to_pylist(), t["seq_id"].to_pylist())):
            assert (s, q) not in owner, f"sequence {(s, q)} spans {owner.get((s, q))} and {f.name}"
            owner[s, q] = f.name
    _assert_rows(run.tokens().collect(), [r for s, d in batches.items() for r in _expected_rows(s, d)])


def test_split_by_sequence_edge_cases():
    import pyarrow as pa

    from cppo_diag.capture.writer import split_by_sequence

    t = pa.table({"seq_id": [0] * 10 + [1] * 2 + [2] * 8})
    assert [p.num_rows for p in split_by_sequence(t, 1, 1)] == [20]
    assert [p.num_rows for p in split_by_sequence(t, 4, 100)] == [20]  # too small to split
    assert [p.num_rows for p in split_by_sequence(t, 2, 5)] == [10, 10]  # cut moved back to seq 1's start
    assert [p.num_rows for p in split_by_sequence(pa.table({"seq_id": [7] * 20}), 4, 2)] == [20]  # one sequence
    parts = split_by_sequence(t, 3, 2)
    assert sum(p.num_rows for p in parts) == 20 and pa.concat_tables(parts).equals(t)


def test_updates_of_a_step_share_one_shard_and_read_back_per_update(tmp_path):
    import pyarrow.parquet as pq

    want = []
    with RunRecorder(tmp_path, on_error="raise") as rec:
        for step in range(2):
            for u in (0, 1, 2):
                d, _ = _batch(B=4, T=7, seed=10 * step + u)
                rec.log_tokens(step=step, update=u, **d)
                want += _expected_rows(step, d, update=u)
            # two micro-batches of one update with interleaved seq_ids are still sorted inside the shard
            d, _ = _batch(B=2, T=7, seed=99 + step)
            rec.log_tokens(step=step, update=3, seq_ids=torch.tensor([3, 1]), **d)
            want += _expected_rows(step, d, update=3, seq_ids=[3, 1])
            d, _ = _batch(B=2, T=7, seed=199 + step)
            rec.log_tokens(step=step, update=3, seq_ids=torch.tensor([2, 0]), **d)
            want += _expected_rows(step, d, update=3, seq_ids=[2, 0])
            rec.end_step(step)
    run = open_run(tmp_path)
    files = run.token_files()
    assert [f.name for f in files] == ["rank0-u0-000.parquet"] * 2  # one file per step, named by its first update
    t = pq.read_table(files[0]).to_pydict()
    keys = list(zip(t["update"], t["seq_id"], t["pos"]))
    assert keys == sorted(keys) and sorted(set(t["update"])) == [0, 1, 2, 3]
    _assert_rows(run.tokens().collect(), sorted(want, key=lambda r: (r["step"], r["update"], r["seq_id"], r["pos"])))


def test_shard_rows_still_bounds_a_step_buffer(tmp_path):
    with RunRecorder(tmp_path, on_error="raise", shard_rows=10) as rec:
        for u in range(3):
            d, _ = _batch(B=4, T=7, seed=u)
            d["response_mask"][:] = True  # 28 rows per call >= shard_rows: written at once
            rec.log_tokens(step=0, update=u, **d)
        rec.end_step(0)
    names = sorted(f.name for f in open_run(tmp_path).token_files())
    assert names == ["rank0-u0-000.parquet", "rank0-u1-000.parquet", "rank0-u2-000.parquet"]


def test_raise_mode_fast_check_falls_back_to_exact_errors(tmp_path):
    from cppo_diag.capture.staging import values_ok

    d, _ = _batch(B=3, T=6, seed=4)
    staged = stage_tokens(step=0, update=0, rank=0, seq_fraction=1.0, **d)
    assert values_ok(staged)
    d["logp"][~d["response_mask"]] = float("-inf")  # padding junk: not proven by the fast check ...
    staged = stage_tokens(step=0, update=0, rank=0, seq_fraction=1.0, **d)
    assert not values_ok(staged)
    assert materialize(staged, nonfinite="raise") is not None  # ... and fine in the full check
    d, _ = _batch(B=3, T=6, seed=4)
    d["reason_applied"] = torch.full((3, 6), 300, dtype=torch.int32)
    staged = stage_tokens(step=0, update=0, rank=0, seq_fraction=1.0, **d)
    assert not values_ok(staged)
    with RunRecorder(tmp_path, on_error="raise") as rec:
        with pytest.raises(CaptureInputError, match=r"reason_applied: expected codes in 0..255"):
            rec.log_tokens(step=0, **d)


def test_sequence_tokens_fast_path_matches_str_conversion(tmp_path):
    with RunRecorder(tmp_path, on_error="raise") as rec:
        rec.log_sequences(step=0, seq_ids=[0, 1, 2], tokens=[["a", "b"], [1, 2.5], ["x", None]])
        rec.log_sequences(step=1, seq_ids=[0, 1], tokens=[["a"], None])
    seqs = open_run(tmp_path).sequences().collect().sort(["step", "seq_id"])
    assert seqs["tokens"].to_list() == [["a", "b"], ["1", "2.5"], ["x", "None"], ["a"], None]
