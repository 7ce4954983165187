"""The storage layer's batch convention: ``Run.batches()`` / ``batch_from_frame`` rebuild exactly the batches the
trainer gave its rule, and ``Batch.token_frame`` / ``frame_values`` go back to token rows."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from cppo_diag import compute_mask, open_run
from cppo_diag.storage import batch_from_frame, batches_from_frame
from cppo_diag.train import build_config, train

torch.set_num_threads(1)


def _record_rule_calls(monkeypatch) -> list[dict]:
    """Wrap the trainer's ``compute_mask``: keep a CPU copy of every call's inputs and keep/reason."""
    import cppo_diag.train.phases as trainer  # the update phase calls the rule

    calls: list[dict] = []

    def spy(rule, **kw):
        res = compute_mask(rule, **kw)
        calls.append({k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                     | {"keep": res.keep.cpu().clone(), "reason": res.reason.cpu().clone()})
        return res

    monkeypatch.setattr(trainer, "compute_mask", spy)
    return calls


@pytest.mark.parametrize("rule,params,anchor,updates", [("cppo_shuffled", {"delta": 0.5, "delta_b": 0.001}, "rollout", 2),
                                                        ("cppo", {"delta": 0.05, "delta_b": 0.01}, "old", 1)])
def test_rebuilt_batches_are_the_trainers_batches(tmp_path, monkeypatch, rule, params, anchor, updates):
    calls = _record_rule_calls(monkeypatch)
    cfg = build_config("tiny", overrides={
        "log": {"out_dir": str(tmp_path), "progress": False, "name": "r"}, "threads": 1, "steps": 2,
        "rule": {"name": rule, "params": params, "anchor": anchor},
        "optim": {"lr": 3e-3, "epochs": 2, "updates_per_batch": updates}})
    train(cfg)
    run = open_run(tmp_path / "r")
    batches = list(run.batches())
    assert len(batches) == len(calls) == 2 * 2 * updates  # steps x epochs x minibatches, one rank
    seen_update: dict[int, int] = {}
    n_masked = 0
    for b, call in zip(batches, calls):
        assert b.step == call["step"] and b.rank == 0
        assert b.update == seen_update.get(b.step, 0)  # (step, update) order
        seen_update[b.step] = b.update + 1
        trainer_ids = call["seq_ids"].numpy()
        np.testing.assert_array_equal(b.seq_ids, np.sort(trainer_ids))  # seq_id order, the trainer's subset
        rows = np.searchsorted(b.seq_ids, trainer_ids)  # trainer row i == rebuilt row rows[i]
        mask = call["response_mask"]
        lengths = mask.sum(1).numpy()
        np.testing.assert_array_equal(b.response_mask.sum(1).numpy()[rows], lengths)
        assert b.response_mask.shape[1] == lengths.max()

        def rebuilt(x):  # the rebuilt (B, T) values of the trainer's rows, valid positions, trainer order
            x = x.numpy() if isinstance(x, torch.Tensor) else x
            return np.concatenate([x[r, :n] for r, n in zip(rows, lengths)])

        for name in ("logp", "logp_rollout", "logp_old"):
            if call[name] is None:
                assert getattr(b, name) is None
                continue
            np.testing.assert_array_equal(rebuilt(getattr(b, name)), call[name][mask].float().numpy(), err_msg=name)
        adv = call["advantages"]
        np.testing.assert_array_equal(rebuilt(b.advantages), adv[:, None].expand_as(mask)[mask].numpy())
        np.testing.assert_array_equal(rebuilt(b.keep_applied), call["keep"][mask].numpy())
        np.testing.assert_array_equal(rebuilt(b.reason_applied), call["reason"][mask].numpy())
        # the rule on the rebuilt batch reproduces what the trainer applied, token for token
        res = compute_mask(rule, anchor=anchor, **b.rule_inputs(), **params)
        np.testing.assert_array_equal(b.unpad(res.keep), b.unpad(b.keep_applied))
        np.testing.assert_array_equal(b.unpad(res.reason), b.unpad(b.reason_applied))
        n_masked += int((~b.unpad(b.keep_applied)).sum())
    assert n_masked > 0  # the rule acted, so the comparison is not vacuous
    assert (anchor == "old") == (batches[0].logp_old is not None)
    # a step range reads only those steps
    assert [b.step for b in run.batches(step_range=(1, None))] == [b.step for b in batches if b.step >= 1]


def _frame() -> pl.DataFrame:
    rng = np.random.default_rng(0)
    rows = [(u, s, p) for u in (1, 0) for s in (7, 2, 5) for p in range(int(rng.integers(1, 5)))]
    rng.shuffle(rows)
    u, s, p = map(np.array, zip(*rows))
    n = len(rows)
    return pl.DataFrame({"step": np.full(n, 3, np.int64), "update": u.astype(np.int32), "rank": np.zeros(n, np.int32),
                         "seq_id": s.astype(np.int64), "pos": p.astype(np.int32),
                         "logp": -rng.random(n).astype(np.float32), "logp_rollout": -rng.random(n).astype(np.float32),
                         "advantage": np.repeat(np.float32(0.5), n)})


def test_batches_from_frame_and_back_to_rows():
    frame = _frame()
    batches = list(batches_from_frame(frame))
    assert [(b.step, b.update) for b in batches] == [(3, 0), (3, 1)]
    for b in batches:
        part = frame.filter(pl.col("update") == b.update)
        np.testing.assert_array_equal(b.seq_ids, [2, 5, 7])
        np.testing.assert_array_equal(b.frame_values(b.logp), part["logp"].to_numpy())  # back to the frame's order
        rows = b.token_frame({"logp": b.logp, "seq_value": torch.arange(3.0)})
        want = part.sort("seq_id", "pos")
        assert rows.select("step", "update", "rank", "seq_id", "pos").equals(
            want.select("step", "update", "rank", "seq_id", "pos"))
        np.testing.assert_array_equal(rows["logp"].to_numpy(), want["logp"].to_numpy())
        np.testing.assert_array_equal(rows["seq_value"].to_numpy(), np.searchsorted([2, 5, 7], want["seq_id"]))
        with pytest.raises(ValueError, match=r"column 'bad': expected shape \(3, \d+\).*found \(2,\)"):
            b.token_frame({"bad": np.zeros(2)})
        assert "bad" not in b.token_frame({"bad": np.zeros(2)}, skip_other_shapes=True).columns
    assert list(batches_from_frame(frame.head(0))) == []
    with pytest.raises(ValueError, match="logged twice"):
        batch_from_frame(pl.concat([frame.head(1), frame.head(1)]))
