"""End-to-end tests of the TRL plug-in: a real ``GRPOTrainer`` on CPU with a tiny random model and a tokenizer
built offline, then the run is read back with ``open_run``."""

from __future__ import annotations

import os

import numpy as np
import polars as pl
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

trl = pytest.importorskip("trl")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from cppo_diag import open_run  # noqa: E402
from cppo_diag.integrations.trl import CppoDiagConfig, CppoDiagGRPOTrainer  # noqa: E402
from cppo_diag.masks.reasons import Reason  # noqa: E402

CHARS = list("0123456789+= ")


def _tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, **{c: i + 3 for i, c in enumerate(CHARS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per character
    tk.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")


def _model(vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )
    return LlamaForCausalLM(cfg)


def _count_ones(completions, **kwargs):
    """Toy reward: how many '1' characters the completion has (varies within a group -> non-zero advantages)."""
    return [float(str(c).count("1")) for c in completions]


def _trainer(tmp_path, *, cppo_diag, max_steps=4, grad_acc=1, num_iterations=2, **grpo):
    from datasets import Dataset
    from trl import GRPOConfig

    tok = _tokenizer()
    ds = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)]})
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl_out"), use_cpu=True, bf16=False, per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_acc, num_generations=4, max_completion_length=8,
        num_iterations=num_iterations, max_steps=max_steps, logging_steps=1, report_to="none", save_strategy="no",
        learning_rate=5e-2, seed=0, disable_tqdm=True, **grpo,
    )
    return CppoDiagGRPOTrainer(
        model=_model(len(tok)), reward_funcs=_count_ones, args=args, train_dataset=ds, processing_class=tok,
        cppo_diag=cppo_diag,
    )


def _train(tmp_path, **kwargs):
    trainer = _trainer(tmp_path, **kwargs)
    trainer.train()
    return trainer


@pytest.mark.slow
def test_grpo_trainer_records_every_step(tmp_path):
    trainer = _train(tmp_path, cppo_diag=CppoDiagConfig(run_dir=tmp_path / "runs", name="trl-rec"), grad_acc=2)
    run = open_run(tmp_path / "runs" / "trl-rec")
    assert run.meta["trainer"] == "trl"
    assert run.meta["anchor"] == "old"  # no vLLM: logp_rollout is TRL's old_per_token_logps
    assert "trl loss_type=dapo" in run.meta["config"]["loss"]
    assert "old_per_token_logps" in run.meta["config"]["logp_rollout_source"]
    assert run.completed_steps() == [0, 1, 2, 3]

    tok = run.tokens().collect()
    for col in ("step", "update", "seq_id", "pos", "logp", "logp_rollout", "logp_old", "advantage", "token_id",
                "entropy", "reward", "group_id", "keep_applied"):
        assert col in tok.columns, col
    # 4 optimiser steps x 2 micro-batches (gradient accumulation) x 4 sequences
    per_step = tok.group_by("step").agg(pl.col("update").n_unique().alias("u"), pl.col("seq_id").n_unique().alias("s"))
    assert sorted(per_step["u"].to_list()) == [2, 2, 2, 2]
    assert sorted(per_step["s"].to_list()) == [8, 8, 8, 8]
    assert tok["logp"].is_finite().all() and (tok["logp"] <= 0).all()
    # pi_old is what TRL anchors to without vLLM
    assert (tok["logp_rollout"] == tok["logp_old"]).all()
    # num_iterations=2: the second pass over a generation batch is after an optimiser step -> pi != pi_old
    second_pass = tok.filter(pl.col("step") % 2 == 1)
    assert (second_pass["logp"] - second_pass["logp_rollout"]).abs().max() > 1e-4
    # positions are 0..T-1 per sequence and T <= max_completion_length
    lengths = tok.group_by(["step", "update", "seq_id"]).agg(pl.len().alias("n"), pl.col("pos").max().alias("m"))
    assert (lengths["m"] + 1 == lengths["n"]).all() and (lengths["n"] <= 8).all()
    # groups: 4 generations per prompt, advantage = reward - group mean (scale_rewards="group" divides by std)
    seqs = tok.group_by(["step", "update", "seq_id"]).agg(
        pl.col("reward").first(), pl.col("advantage").first(), pl.col("group_id").first()
    )
    for _, grp in seqs.group_by(["step", "group_id"]):
        r = grp["reward"].to_numpy()
        a = grp["advantage"].to_numpy()
        if len(r) == 4 and r.std() > 0:
            expected = (r - r.mean()) / (r.std(ddof=1) + 1e-4)
            np.testing.assert_allclose(a, expected, rtol=1e-4, atol=1e-4)
    # rewards recorded per token equal the toy reward of the decoded completion
    seq_tab = run.sequences().collect()
    assert {"prompt", "completion", "tokens", "reward", "length"} <= set(seq_tab.columns)
    for row in seq_tab.iter_rows(named=True):
        assert row["reward"] == pytest.approx(float(row["completion"].count("1")))
        assert len(row["tokens"]) == row["length"]
        # the completion is the text the reward saw: no special tokens (the EOS keeps its token row)
        assert "<eos>" not in row["completion"] and "<pad>" not in row["completion"]
        assert "<bos>" not in row["prompt"] and "<pad>" not in row["prompt"]
    assert any(row["tokens"][-1] == "<eos>" for row in seq_tab.iter_rows(named=True))
    # TRL's own metrics arrive as step scalars
    steps = run.steps()
    assert "trl/loss" in steps.columns and steps.height == 4
    # keep_applied reproduces TRL's own clip fractions
    clip_logged = steps.filter(pl.col("step") == 1)["trl/clip_ratio/region_mean"][0]
    # (TRL logs the mean over micro-batches of each micro-batch's clipped fraction)
    per_micro = (tok.filter(pl.col("step") == 1).group_by("update")
                 .agg((1.0 - pl.col("keep_applied").cast(pl.Float64).mean()).alias("clip")))
    assert per_micro["clip"].mean() == pytest.approx(clip_logged, abs=1e-6)
    assert per_micro["clip"].max() > 0  # the second pass really clips something
    # Beside TRL's own values (trl/...), the same quantities under TRL's names, computed from the recorded
    # mask: they agree with TRL's dashboard on every step.
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        np.testing.assert_allclose(steps[name].to_numpy(), steps[f"trl/{name}"].to_numpy(), atol=1e-6)
    assert steps["clip_ratio/region_mean"].max() > 0
    # TRL's clip is grpo_clip at TRL's epsilons (epsilon=0.2, epsilon_high unset -> 0.2), anchored to pi_old
    assert run.meta["rule"] == "grpo_clip" and run.meta["rule_params"] == {"eps_low": 0.2, "eps_high": 0.2}
    assert trainer.state.global_step == 4
    # the live doctor's tail (DoctorGuardCallback reads it from TRL's logs): finite, > 0 once pi moved from mu
    tails = [h["cppo_diag/div_tail_top10"] for h in trainer.state.log_history if "cppo_diag/div_tail_top10" in h]
    assert len(tails) == 4 and all(np.isfinite(tails)) and max(tails) > 0


@pytest.mark.slow
def test_grpo_trainer_trains_with_cppo_rule(tmp_path):
    from cppo_diag.masks import compute_mask

    params = {"delta": 0.01, "w_min": 0.8, "delta_b": 0.002}  # tiny vocab: |pi - mu| is small
    _train(tmp_path, cppo_diag=CppoDiagConfig(run_dir=tmp_path / "runs", name="trl-cppo", rule="cppo",
                                               rule_params=params))
    run = open_run(tmp_path / "runs" / "trl-cppo")
    assert run.meta["rule"] == "cppo" and run.meta["rule_params"]["delta"] == 0.01
    tok = run.tokens().collect().sort(["step", "update", "seq_id", "pos"])
    assert "keep_applied" in tok.columns and "reason_applied" in tok.columns
    assert (~tok["keep_applied"]).sum() > 0  # the rule bites on the second pass over each batch
    # masked tokens carry a reason (token threshold or prefix budget), kept ones 0
    assert set(tok.filter(~pl.col("keep_applied"))["reason_applied"].unique().to_list()) <= {1, 2}
    assert tok.filter(pl.col("keep_applied"))["reason_applied"].unique().to_list() == [Reason.KEPT]
    # offline recompute from the recorded columns reproduces the mask the trainer applied
    for (step, update), part in tok.group_by(["step", "update"], maintain_order=True):
        ids = part["seq_id"].unique().sort().to_list()
        width = int(part["pos"].max()) + 1
        shape = (len(ids), width)
        logp = torch.zeros(shape)
        mu = torch.zeros(shape)
        valid = torch.zeros(shape, dtype=torch.bool)
        adv = torch.zeros(len(ids))
        keep_applied = torch.zeros(shape, dtype=torch.bool)
        row_of = {s: i for i, s in enumerate(ids)}
        for r in part.iter_rows(named=True):
            i, t = row_of[r["seq_id"]], r["pos"]
            logp[i, t], mu[i, t], valid[i, t] = r["logp"], r["logp_rollout"], True
            adv[i] = r["advantage"]
            keep_applied[i, t] = r["keep_applied"]
        res = compute_mask("cppo", logp=logp, logp_rollout=mu, advantages=adv, response_mask=valid, **params)
        assert torch.equal(res.keep[valid], keep_applied[valid]), (step, update)
    # the rule's metrics are logged as step scalars (and through TRL's logs)
    steps = run.steps()
    assert "mask/cppo/frac" in steps.columns
    assert not [c for c in steps.columns if c.startswith("trl/mask/")]  # not recorded twice
    assert run.meta["anchor"] == "rollout"  # the rule's ratio is taken against logp_rollout


def test_unknown_rule_is_refused(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig

    tok = _tokenizer()
    args = GRPOConfig(output_dir=str(tmp_path / "o"), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=4, max_steps=1, report_to="none")
    with pytest.raises((KeyError, ValueError), match="cppo"):
        CppoDiagGRPOTrainer(model=_model(len(tok)), reward_funcs=_count_ones, args=args,
                            train_dataset=Dataset.from_dict({"prompt": ["1+1="] * 4}), processing_class=tok,
                            cppo_diag=CppoDiagConfig(rule="no_such_rule"))


@pytest.mark.slow
def test_record_only_default_iterations_reports_and_recomputes_without_options(tmp_path, capsys):
    """TRL's defaults (num_iterations=1, no vLLM): TRL skips pi_old (== pi). The run still names what its
    clip used, so `cppo-diag recompute RUN` and `cppo-diag report RUN --out DIR` work with no options, and the
    recomputed grpo_clip (at TRL's epsilon, from meta.json) agrees with TRL's mask on every token."""
    import json

    from cppo_diag.cli.main import main

    _train(tmp_path, cppo_diag=CppoDiagConfig(run_dir=tmp_path / "runs", name="trl-n1"), num_iterations=1,
           max_steps=2)
    path = tmp_path / "runs" / "trl-n1"
    run = open_run(path)
    assert run.meta["anchor"] == "old" and run.meta["rule"] == "grpo_clip"
    tok = run.tokens().collect()
    assert (tok["logp_old"] == tok["logp"]).all()  # what TRL's ratio used: pi_old := pi

    capsys.readouterr()  # drop the trainer's log lines
    assert main(["recompute", str(path), "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rule"] == "grpo_clip" and res["params"] == {"eps_low": 0.2, "eps_high": 0.2}
    assert res["agreement"]["agreement"] == 1.0 and res["agreement"]["n_compared"] == tok.height

    assert main(["report", str(path), "--out", str(tmp_path / "report"), "--no-progress"]) == 0
    page = (tmp_path / "report" / "report.html").read_text()
    assert "applied:grpo_clip" in page and "applied:?" not in page


def test_bad_plugin_options_fail_when_the_trainer_is_built(tmp_path):
    bad = [
        (dict(rule="cppo", rule_params={"delt": 0.1}), r"rule_params: rule 'cppo' takes .*unknown key\(s\) \['delt'\]"),
        (dict(rule="cppo", rule_params={"delta": -1}), r"rule_params of rule 'cppo': delta: expected >= 0"),
        (dict(rule="cppo", agg="mean"), r"CppoDiagConfig.agg: expected one of"),
        (dict(rule_params={"delta": 0.1}), r"rule_params: expected \{\} when rule is None"),
        (dict(if_exists="append"), r"if_exists: expected one of \['error', 'overwrite', 'resume'\]"),
    ]
    for kwargs, message in bad:
        with pytest.raises(ValueError, match=message):
            CppoDiagGRPOTrainer(cppo_diag=CppoDiagConfig(run_dir=tmp_path, name="x", **kwargs))  # before TRL
    assert not (tmp_path / "x").exists()


def test_reusing_a_run_name_is_refused_unless_told(tmp_path):
    from cppo_diag import RunRecorder

    with RunRecorder(tmp_path, name="taken", trainer="trl") as rec:
        rec.log_scalars(0, {"x": 1.0})
    with pytest.raises(FileExistsError, match="if_exists='overwrite'.*if_exists='resume'"):
        _trainer(tmp_path, cppo_diag=CppoDiagConfig(run_dir=tmp_path, name="taken"), max_steps=1)
    trainer = _trainer(tmp_path, cppo_diag=CppoDiagConfig(run_dir=tmp_path, name="taken", if_exists="overwrite"),
                       max_steps=1)
    trainer._cd_recorder.close()
    assert "x" not in open_run(tmp_path / "taken").steps().columns  # the old run was replaced


@pytest.mark.slow
def test_cppo_shuffled_through_trl_recomputes_offline(tmp_path, capsys):
    """The plug-in gives compute_mask the step and seq_ids it logs, so cppo_shuffled's permutation (keyed on
    them) is reproduced by the offline recompute on every token."""
    import json

    from cppo_diag.cli.main import main

    params = {"delta": 0.002, "w_min": 0.5}  # tiny vocab: |pi - mu| is small
    _train(tmp_path, cppo_diag=CppoDiagConfig(run_dir=tmp_path / "runs", name="trl-shuf", rule="cppo_shuffled",
                                               rule_params=params), grad_acc=2)
    path = tmp_path / "runs" / "trl-shuf"
    tok = open_run(path).tokens().collect()
    assert (~tok["keep_applied"]).sum() >= 5  # the rule bites, so the permutation matters
    assert tok["update"].max() > 0  # several micro-batches per step: seq_id is not the row
    capsys.readouterr()
    assert main(["recompute", str(path), "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["rule"] == "cppo_shuffled"
    assert res["agreement"]["agreement"] == 1.0 and res["agreement"]["n_compared"] == tok.height
