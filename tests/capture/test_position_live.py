"""Live per-position metrics: ``pos/*`` equal the offline position analysis on the same tokens, masked fractions
equal a plain loop, padding does not move them; a bundled-trainer run shows them, and the divergence-by-position
image, in TensorBoard's own reader and in the W&B run's own transaction log."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest
import torch

from cppo_diag import metric_names as M
from cppo_diag.capture.position_live import (PositionWindow, cppo_schedule, figure_due, position_figure,
                                             position_scalars, position_tokens)


def _batch(B=12, T=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3  # (B, T)
    lr = lp + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)  # (B, T)
    lengths = torch.randint(1, T + 1, (B,), generator=g)  # (B,)
    mask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T) right padding
    keep = torch.rand(B, T, generator=g) > 0.2  # (B, T)
    return lp, lr, mask, keep


def _offline(tok) -> pl.DataFrame:
    from cppo_diag.analyses.position import position_stats

    pos = tok.pos.numpy()
    frame = pl.DataFrame({"step": np.zeros(len(pos), np.int64), "seq_id": np.cumsum(pos == 0) - 1,
                          "pos": pos.astype(np.int32), "logp": tok.logp.numpy(), "logp_rollout": tok.logp_rollout.numpy(),
                          "advantage": np.ones(len(pos), np.float32)})
    return position_stats(frame, metrics=["tv"], relative=True, n_rel_bins=3)


def test_top_decile_by_third_equals_the_offline_position_analysis():
    lp, lr, mask, keep = _batch()
    tok = position_tokens(lp, lr, mask, keep)
    live = position_scalars(tok)
    off = _offline(tok)
    assert off["count"].to_list() == [int((tok.third() == k).sum()) for k in range(3)]
    for name, v in zip(M.POS_TV_TOP10, off["top10_mean"].to_list()):
        assert live[name] == pytest.approx(v, rel=1e-5), name  # offline: float32 divergences
    assert live[M.POS_TV_TOP10_LAST_OVER_FIRST] == pytest.approx(live[M.POS_TV_TOP10[2]] / live[M.POS_TV_TOP10[0]])


def test_masked_fraction_by_third_equals_a_plain_loop():
    lp, lr, mask, keep = _batch(seed=1)
    live = position_scalars(position_tokens(lp, lr, mask, keep))
    masked, valid = [0, 0, 0], [0, 0, 0]
    for b in range(mask.shape[0]):
        T = int(mask[b].sum())
        for t in range(T):
            third = min(max(math.ceil(3 * (t + 1) / T), 1), 3) - 1
            valid[third] += 1
            masked[third] += int(not keep[b, t])
    for k, name in enumerate(M.POS_MASKED_FRAC):
        assert live[name] == pytest.approx(masked[k] / valid[k])
    assert set(live) == set(M.POS_SCALARS)


def test_left_padding_and_split_batches_give_the_same_scalars():
    lp, lr, mask, keep = _batch(seed=2)
    right = position_scalars(position_tokens(lp, lr, mask, keep))
    # the same responses left-padded: shift each row's valid tokens to the end
    B, T = mask.shape
    L = mask.sum(1)
    idx = (torch.arange(T)[None, :] - (T - L)[:, None]) % T  # (B, T)
    g = lambda x: torch.gather(x, 1, idx)  # noqa: E731
    left = position_scalars(position_tokens(g(lp), g(lr), g(mask), g(keep)))
    assert left == pytest.approx(right)
    w = PositionWindow()  # two micro-batches of different padded widths pool to the same step scalars
    w.add(lp[:5], lr[:5], mask[:5], keep[:5])
    w.add(lp[5:, :T], lr[5:, :T], mask[5:, :T], keep[5:, :T])
    w.add(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.bool), None)  # no valid token
    w.parts[-1].masked = torch.zeros(0, dtype=torch.bool)
    assert w.scalars() == pytest.approx(right)


def test_ratio_is_null_when_the_first_third_masks_nothing_and_no_mask_gives_no_fraction():
    lp, lr, mask, _ = _batch(seed=3)
    keep = torch.arange(mask.shape[1])[None, :] != (mask.sum(1) - 1)[:, None]  # (B, T) each last token masked
    s = position_scalars(position_tokens(lp, lr, mask, keep))
    assert s[M.POS_MASKED_FRAC[0]] == 0.0 and s[M.POS_MASKED_FRAC[2]] > 0
    assert math.isnan(s[M.POS_MASKED_FRAC_LAST_OVER_FIRST])
    assert not any(n.startswith("pos/masked_frac") for n in position_scalars(position_tokens(lp, lr, mask)))
    assert position_scalars(position_tokens(lp, lr, torch.zeros_like(mask))) == {}


def test_figure_threshold_is_the_rules_schedule():
    assert cppo_schedule("cppo", {"delta": 0.3}) == (0.3, 0.8)
    assert cppo_schedule("grpo_clip", {}) == cppo_schedule("cppo", {})  # reference line for other rules
    lp, lr, mask, keep = _batch(seed=4)
    from cppo_diag.analyses.plots_mpl import fig_live_position, live_position_table

    fig = position_figure(position_tokens(lp, lr, mask, keep), step=7, rule="cppo",
                          rule_params={"delta": 0.2, "w_min": 0.5}, renderer=fig_live_position)
    table = live_position_table(fig)
    assert fig.render().axes  # the renderer draws it
    assert table.height == 20 and table["count"].sum() == int(mask.sum())
    from cppo_diag.masks.schedule import threshold_schedule

    tok = position_tokens(lp, lr, mask, keep)
    thr = threshold_schedule(tok.pos.numpy(), delta=0.2, w_min=0.5, length=tok.length.numpy().astype(float))
    assert table["threshold_mean"].mean() > 0.2
    assert float(np.max(thr)) == pytest.approx(0.2 / 0.5)
    assert figure_due(0, 10) and figure_due(20, 10) and not figure_due(5, 10) and not figure_due(5, 0)


@pytest.mark.slow
def test_bundled_trainer_shows_pos_scalars_and_the_figure_in_tensorboard_and_wandb(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONFIG_DIR": str(tmp_path / "wc"),
                 "WANDB_CACHE_DIR": str(tmp_path / "wk"), "WANDB_DATA_DIR": str(tmp_path / "wd")}.items():
        monkeypatch.setenv(k, v)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from cppo_diag import open_run
    from cppo_diag.capture import sinks as sinks_mod
    from cppo_diag.cli.main import main
    from tests.capture.test_sinks import _wandb_records

    rc = main(["train", "--preset", "tiny", "--steps", "3", "--threads", "1", "--optim.updates_per_batch", "2",
               "--log.out_dir", str(tmp_path), "--log.name", "r", "--log.progress", "false",
               "--log.tensorboard", "true", "--log.wandb", "true", "--log.position_figure_every", "2"])
    assert rc in (0, None)
    run_dir = tmp_path / "r"
    steps = open_run(run_dir).steps().sort("step")
    ours = {(row["step"], n): row[n] for row in steps.iter_rows(named=True) for n in M.POS_SCALARS
            if n in row and row[n] is not None and math.isfinite(row[n])}
    assert {n for _, n in ours} >= {*M.POS_TV_TOP10, *M.POS_MASKED_FRAC}
    ea = EventAccumulator(str(run_dir / sinks_mod.TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    tb = {(e.step, t): e.value for t in ea.Tags()["scalars"] if t.startswith(M.POS) for e in ea.Scalars(t)}
    assert set(tb) == set(ours)
    for key, v in ours.items():
        assert tb[key] == pytest.approx(v, rel=1e-6), key
    images = ea.Images(M.POS_FIGURE)
    assert [e.step for e in images] == [0, 2] and all(e.width > 100 and e.height > 100 for e in images)
    assert images[0].encoded_image_string[:8] == b"\x89PNG\r\n\x1a\n"

    wb, wb_images = {}, []
    for r in _wandb_records(run_dir):
        if r["type"] == "history":
            step = r["history"]["step"].get("num", 0)
            for k, v in r["history"]["item"].items():
                if k == f"{M.POS_FIGURE}._type":  # a wandb.Image: its fields flattened under the key
                    assert v == "image-file"
                    wb_images.append(step)
                elif k.startswith(M.POS) and not k.startswith(M.POS_FIGURE):
                    wb[(step, k)] = v
    assert set(wb) == set(ours)
    for key, v in ours.items():
        assert wb[key] == pytest.approx(v, rel=1e-12), key
    assert wb_images == [0, 2]
