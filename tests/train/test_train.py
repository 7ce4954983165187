"""The bundled trainer: config, tasks, the tiny GPT's KV cache, mu == pi before the first update, checkpoints,
an end-to-end run with the offline-recompute parity check, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
import torch

from cppo_diag import compute_mask, open_run
from cppo_diag import metric_names as M
from cppo_diag.train import build_config, train
from cppo_diag.train.checkpoint import list_checkpoints, load_checkpoint, save_checkpoint
from cppo_diag.train.config import TrainConfig, add_config_arguments, overrides_from_args
from cppo_diag.train.models import build_policy, warmstart_dir
from cppo_diag.train.models.tiny_gpt import CharTokenizer, TinyGPT, TinyGPTConfig
from cppo_diag.train.rollout import TorchSampler, top_p_filter
from cppo_diag.train.tasks import ArithmeticTask, ChainTask, extract_boxed, normalize_answer, warmstart_key
from cppo_diag.train.tasks.chain import SEED_LEN, chain_digits
from cppo_diag.train.trainer import group_advantages, pack_queue, sequence_logprobs, unpack_queue

torch.set_num_threads(1)
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def tiny_cfg(tmp_path, **over):
    base = {"log": {"out_dir": str(tmp_path), "progress": False}, "threads": 1}
    for k, v in over.items():
        if isinstance(v, dict):
            base.setdefault(k, {}).update(v)
        else:
            base[k] = v
    return build_config("tiny", overrides=base)


# -- config --------------------------------------------------------------------------------------------------
def test_config_precedence_file_and_cli(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('steps = 7\n[rule]\nname = "dppo"\nparams = { delta = 0.1 }\n[optim]\nlr = 0.01\n')
    import argparse

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    args = p.parse_args(["--optim.lr", "0.5", "--rule.param", "delta=0.3", "--rule.param", "w_min=0.9",
                         "--optim.adv_std_norm", "true"])
    cfg = build_config("demo", str(f), overrides_from_args(args))
    assert cfg.steps == 7 and cfg.rule.name == "dppo"
    assert cfg.optim.lr == 0.5 and cfg.optim.adv_std_norm is True
    assert cfg.rule.params == {"delta": 0.3, "w_min": 0.9}
    assert cfg.rollout.n == build_config("demo").rollout.n  # from the preset
    y = tmp_path / "c.yaml"
    y.write_text("rollout:\n  n: 3\n")
    assert build_config(None, str(y)).rollout.n == 3


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match=r"'optim.lrr' is unknown.*'lr'"):
        build_config(overrides={"optim": {"lrr": 1}})
    with pytest.raises(ValueError, match=r"rollout.n: expected an integer, found 'x'"):
        build_config(overrides={"rollout": {"n": "x"}})
    with pytest.raises(ValueError, match="preset"):
        build_config("nope")


@pytest.mark.parametrize("over, message", [
    ({"device": "tpu"}, "device: expected auto | cpu | cuda, found 'tpu'"),
    ({"precision": "fp16"}, "precision: expected auto | fp32 | bf16, found 'fp16'"),
    ({"rollout": {"precision": "int8"}}, "rollout.precision: expected auto | fp32 | bf16, found 'int8'"),
    ({"rollout": {"engine": "vllm"}}, "rollout.engine: expected torch, found 'vllm'"),
    ({"rollout": {"n": 0}}, "rollout.n: expected an integer >= 1, found 0"),
    ({"rollout": {"top_p": 1.5}}, r"rollout.top_p: expected a value in \(0, 1\], found 1.5"),
    ({"rollout": {"staleness": -1}}, "rollout.staleness: expected an integer >= 0, found -1"),
    ({"optim": {"epochs": 0}}, "optim.epochs: expected an integer >= 1, found 0"),
    ({"optim": {"updates_per_batch": 0}}, "optim.updates_per_batch: expected an integer >= 1, found 0"),
    ({"optim": {"schedule": "step"}}, "optim.schedule: expected constant | cosine | linear, found 'step'"),
    ({"optim": {"agg": "mean"}}, "optim.agg: expected token-mean | .* found 'mean'"),
    ({"optim": {"trunc_cap": 0}}, "optim.trunc_cap: expected a number > 0, found 0"),
    ({"log": {"every_n_steps": 0}}, "log.every_n_steps: expected an integer >= 1, found 0"),
    ({"log": {"record": False, "tensorboard": True}}, "log.tensorboard: .*needs log.record true"),
    ({"log": {"position_figure_every": -1}}, "log.position_figure_every: expected an integer >= 0, found -1"),
    ({"rule": {"anchor": "pi_old"}}, "rule.anchor: expected rollout | old, found 'pi_old'"),
    ({"rule": {"name": "cppo", "params": {"detla": 0.1}}}, r"rule.params: unknown parameter\(s\) \['detla'\]"),
])
def test_config_validate_names_field_expected_and_found(over, message):
    cfg = build_config("tiny", overrides=over)  # building merges; validate() judges the whole config
    with pytest.raises(ValueError, match=message):
        cfg.validate()
    assert build_config("tiny").validate().steps == 3  # a valid config passes and is returned
    from cppo_diag.train import PRESETS

    for preset in PRESETS:  # every shipped preset is valid
        build_config(preset).validate()


def test_a_sink_whose_package_is_missing_is_refused_naming_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed
    cfg = build_config("tiny", overrides={"log": {"wandb": True}})
    with pytest.raises(ImportError, match=r"^log.wandb: sink 'wandb' needs the wandb package; install it with: "
                                          r"pip install 'cppo-diag\[wandb\]'$"):
        cfg.validate()


def test_table3_presets_match_spec():
    c = build_config("table3-qwen3-30b-a3b-base")
    assert (c.rollout.prompts_per_step, c.rollout.n, c.optim.updates_per_batch) == (256, 16, 8)
    assert c.rule.params["delta"] == 0.20 and c.optim.lr == 1e-6
    c = build_config("table3-qwen3-1.7b")
    assert c.rule.params["delta_b_mode"] == "fixed" and c.rule.params["delta_b"] == 0.015


# -- tasks ---------------------------------------------------------------------------------------------------
def test_fib_task_answers_and_partial_reward():
    t = ArithmeticTask("fib", min_terms=8, max_terms=16, digits=1, eval_size=8)
    for p in t.sample(20, np.random.default_rng(0)):
        a, b = (int(x) for x in p.prompt.split(";")[0].split(","))
        k = int(p.prompt.split(";")[1].rstrip("="))
        terms = [int(x) for x in p.answer.split(",")]
        assert len(terms) == k and terms[0] == (a + b) % 10 and terms[1] == (b + terms[0]) % 10
        assert 8 <= k <= 16 and p.prompt not in {e.prompt for e in t.eval_set()}
    p = t.eval_set()[0]
    assert t.score(p, p.answer) == (1.0, True)
    wrong = p.answer.split(",")
    wrong[-1] = "xx"
    r, c = t.score(p, ",".join(wrong))
    assert not c and r == pytest.approx((len(wrong) - 1) / len(wrong))
    assert ArithmeticTask("fib", reward="exact", eval_size=1).score(p, ",".join(wrong)) == (0.0, False)


def test_chain_task_recurrence_prefix_reward_and_disjoint_held_out():
    t = ChainTask(min_len=128, max_len=192, eval_size=300, eval_seed=3)
    ev = {p.prompt for p in t.eval_set()}
    assert len(ev) == 300  # drawn without replacement
    for p in t.sample(50, np.random.default_rng(0)):
        seed, n = p.prompt.rstrip("=").split(";")
        xs = [int(c) for c in seed + p.answer]
        assert len(seed) == SEED_LEN and len(p.answer) == int(n) and 128 <= int(n) <= 192
        assert all(xs[i] == (xs[i - 1] + 1 + xs[i - SEED_LEN] % 2) % 10 for i in range(SEED_LEN, len(xs)))
        assert p.prompt not in ev and seed not in {e.split(";")[0] for e in ev}
    assert chain_digits([1, 0, 0, 0, 0, 9], 3) == [1, 2, 3]
    p = t.eval_set()[0]
    assert t.score(p, p.answer) == (1.0, True)
    slip = p.answer[:40] + str((int(p.answer[40]) + 1) % 10) + p.answer[41:]
    assert t.score(p, slip) == (pytest.approx(40 / len(p.answer)), False)  # credit = correct prefix only
    assert t.score(p, p.answer + "12")[0] == pytest.approx(len(p.answer) / (len(p.answer) + 2))
    assert ChainTask(reward="exact", eval_size=1).score(p, slip) == (0.0, False)
    with pytest.raises(ValueError, match="task.min_terms/max_terms"):
        ChainTask(min_len=10, max_len=5)


def test_boxed_extraction_and_normalisation():
    assert extract_boxed(r"so \boxed{\frac{1}{2}} and then \boxed{x^{2}+1}") == "x^{2}+1"
    assert extract_boxed(r"\boxed{3") is None and extract_boxed("no box") is None
    assert normalize_answer(r"\dfrac{3}{4}") == normalize_answer("3/4")
    assert normalize_answer("1,000") == "1000" and normalize_answer("$5.0$") == "5"
    assert normalize_answer(r"\text{ 12 }") == "12"


# -- model and sampler ---------------------------------------------------------------------------------------
def _tiny_model(seed=0):
    torch.manual_seed(seed)
    tok = CharTokenizer()
    return tok, TinyGPT(TinyGPTConfig(vocab_size=tok.vocab_size, n_layer=2, n_head=2, n_embd=32, block_size=48)).eval()


def test_kv_cache_matches_full_forward_with_left_padding():
    tok, m = _tiny_model()
    ids = torch.tensor([[0, 0, 1, 5, 6, 7, 8, 9], [1, 4, 5, 6, 7, 8, 9, 10]])  # row 0 left-padded
    attn = ids != 0
    pos = (attn.long().cumsum(1) - 1).clamp(min=0)
    full, _ = m(ids, attention_mask=attn, position_ids=pos)
    logits, cache = m(ids[:, :4], attention_mask=attn[:, :4], position_ids=pos[:, :4], cache=m.empty_cache())
    steps = [logits[:, -1]]
    for t in range(4, 8):
        logits, cache = m(ids[:, t : t + 1], attention_mask=attn[:, : t + 1], position_ids=pos[:, t : t + 1], cache=cache)
        steps.append(logits[:, -1])
    torch.testing.assert_close(torch.stack(steps[:-1], 1)[0, 1:], full[0, 4:7], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.stack(steps, 1)[:, 1:], full[:, 4:], rtol=1e-5, atol=1e-5)


def test_sampler_mu_equals_recomputed_pi_and_stops_at_eos():
    tok, m = _tiny_model(1)

    class P:
        pad_id, eos_id = tok.pad_id, tok.eos_id
        forward = staticmethod(lambda mod, i, a, p, cache=None, use_cache=False: mod(i, attention_mask=a, position_ids=p, cache=cache))

    s = TorchSampler(lambda i, a, p, c: m(i, attention_mask=a, position_ids=p, cache=c), eos_id=tok.eos_id,
                     pad_id=tok.pad_id, device="cpu", empty_cache=m.empty_cache)
    g = torch.Generator().manual_seed(0)
    prompts = [tok.encode_prompt("1,3;12="), tok.encode_prompt("1+2=")]
    rb = s.generate(prompts * 4, max_new_tokens=20, generator=g)
    logp, ent = sequence_logprobs(P, m, rb, temperature=1.0, autocast=None, with_entropy=True)
    torch.testing.assert_close(logp[rb.response_mask], rb.logp_rollout[rb.response_mask], rtol=0, atol=2e-5)
    assert (ent[rb.response_mask] > 0).all()
    for ids, mask in zip(rb.response_ids.tolist(), rb.response_mask.tolist()):
        valid = [t for t, v in zip(ids, mask) if v]
        assert tok.eos_id not in valid[:-1]  # nothing generated after EOS
        assert all(t == tok.pad_id for t, v in zip(ids, mask) if not v)


def test_top_p_filter_keeps_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]
    assert torch.isfinite(top_p_filter(logits, 1.0)).all()


def test_group_advantages_and_zero_variance():
    r = np.array([1, 0, 1, 0, 0.5, 0.5, 0.5, 0.5], dtype=np.float32)
    adv, zero = group_advantages(r, 4, std_norm=False)
    assert adv[:4].tolist() == [0.5, -0.5, 0.5, -0.5] and (adv[4:] == 0).all()
    assert zero.tolist() == [False] * 4 + [True] * 4
    adv, _ = group_advantages(r, 4, std_norm=True)
    assert adv[0] == pytest.approx(1.0, rel=1e-4)


def test_checkpoint_roundtrip_is_exact(tmp_path):
    tok, m = _tiny_model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    m(torch.tensor([[1, 4, 5]]))[0].sum().backward()
    opt.step()
    sch.step()
    save_checkpoint(tmp_path, 3, m, opt, sch, extra={"summary": {"x": 1.0}})
    save_checkpoint(tmp_path, 4, m, opt, sch, keep=1)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    _, m2 = _tiny_model(seed=5)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    sch2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1.0 / (s + 1))
    state = load_checkpoint(list_checkpoints(tmp_path)[-1][1], m2, opt2, sch2)
    assert state["step"] == 4
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)
    assert sch2.last_epoch == sch.last_epoch and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.rglob("*"))


def test_queued_rollouts_roundtrip_through_safetensors(tmp_path):
    from cppo_diag.train.rollout import RolloutBatch

    g = torch.Generator().manual_seed(0)
    b = RolloutBatch(prompt_ids=[[1, 5, 6], [1, 7]], response_ids=torch.randint(3, 20, (2, 4), generator=g),
                     response_mask=torch.tensor([[True] * 4, [True, True, False, False]]),
                     logp_rollout=-torch.rand(2, 4, generator=g))
    tok, m = _tiny_model()
    opt = torch.optim.AdamW(m.parameters())
    save_checkpoint(tmp_path, 0, m, opt, None, queue=pack_queue({3: (b, 1), 4: (b, 2)}))
    from cppo_diag.train.checkpoint import load_queue

    q = unpack_queue(load_queue(list_checkpoints(tmp_path)[-1][1], 0, "cpu"))
    assert sorted(q) == [3, 4] and q[3][1] == 1 and q[4][1] == 2
    for k in ("response_ids", "response_mask", "logp_rollout"):
        assert torch.equal(getattr(q[4][0], k), getattr(b, k))
    assert q[3][0].prompt_ids == b.prompt_ids
    with pytest.raises(FileNotFoundError, match="queue.rank1"):
        load_queue(list_checkpoints(tmp_path)[-1][1], 1, "cpu")


def test_staleness_and_bf16_rollouts_in_a_run(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=4, rollout={"staleness": 2, "precision": "bf16"}, log={"name": "st"},
                   rule={"name": "dppo", "params": {"delta": 0.05}})
    train(cfg)
    run = open_run(tmp_path / "st")
    assert run.steps()["rollout/staleness"].to_list() == [0, 1, 2, 2]
    assert run.meta["config"]["rollout"]["staleness"] == 2 and run.meta["config"]["rollout"]["precision"] == "bf16"
    toks = run.tokens().filter(pl.col("update") == 0).collect()
    # update 0 of step 0 is on-policy but sampled in bf16: mu != pi in the low bits; later steps are 1-2 rounds old
    d0 = (toks.filter(pl.col("step") == 0)["logp"] - toks.filter(pl.col("step") == 0)["logp_rollout"]).abs()
    assert 0 < d0.max() < 0.2
    d3 = (toks.filter(pl.col("step") == 3)["logp"] - toks.filter(pl.col("step") == 3)["logp_rollout"]).abs()
    assert d3.mean() > d0.mean()
    from cppo_diag.train.parity import check_parity

    parity = check_parity(tmp_path / "st")
    assert parity["tokens"] > 0 and parity["keep_mismatch"] == 0 and parity["reason_mismatch"] == 0
    with pytest.raises(ValueError, match="rollout.precision"):
        train(tiny_cfg(tmp_path, rollout={"precision": "fp16"}))
    with pytest.raises(ValueError, match="rollout.staleness"):
        train(tiny_cfg(tmp_path, rollout={"staleness": -1}))


@pytest.mark.parametrize("kind", ["fib", "chain_forks"])
def test_shipped_warm_start_loads_and_is_small(kind):
    d = warmstart_dir(kind)
    assert (d / "model.safetensors").stat().st_size < 5e6
    meta = json.loads((d / "config.json").read_text())
    assert 0.0 < meta["measured"]["eval/greedy_acc"] < 1.0  # partial accuracy: headroom for RL
    pol = build_policy(TrainConfig().model, kind, "cpu")
    assert pol.encode_prompt("1,3;12=")[0] == pol.tokenizer.bos_id
    if kind == "chain_forks":  # the long preset's warm start: its task, and its answers fit the model's context
        cfg = build_config("long")
        assert warmstart_key(cfg.task) == kind and meta["task"]["forks"] == cfg.task.forks
        assert meta["task"]["max_terms"] == cfg.task.max_terms and 0.3 <= meta["measured"]["eval/greedy_acc"] <= 0.6
        assert pol.module.cfg.block_size >= 1 + 6 + 5 + cfg.rollout.max_new_tokens


# -- end to end ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("rule,params", [("cppo", {"delta": 0.05, "delta_b": 0.01}), ("cppo_shuffled", {"delta": 0.05}),
                                         ("dppo", {"delta": 0.05})])
def test_run_logs_tokens_and_offline_recompute_matches_keep_applied(tmp_path, rule, params):
    from cppo_diag.train.parity import check_parity

    cfg = tiny_cfg(tmp_path, rule={"name": rule, "params": params}, optim={"lr": 3e-3, "epochs": 3},
                   log={"name": "r"})
    summary = train(cfg)
    assert 0.0 <= summary["summary/greedy_acc_before"] <= 1.0 and "summary/greedy_acc_after" in summary
    run = open_run(tmp_path / "r")
    assert run.meta["rule"] == rule and run.meta["status"] == "finished"
    assert run.completed_steps() == [0, 1, 2]
    parity = check_parity(tmp_path / "r")
    assert parity["tokens"] > 0 and parity["keep_mismatch"] == 0 and parity["reason_mismatch"] == 0
    toks = run.tokens().collect()
    assert set(toks["update"].unique().to_list()) == {0, 1, 2}  # epochs=3, full batch: 3 updates
    assert (~toks["keep_applied"]).sum() > 0  # pi left mu far enough for the rule to act
    steps = run.steps()
    for col in ("reward/mean", "acc/mean", "response/len_mean", "policy/entropy", f"mask/{rule}/frac",
                "div/tv/mean", "optim/lr", "time/rollout_s", "time/update_s", "eval/heldout_size"):
        assert col in steps.columns, col
    assert "mask/frac" not in steps.columns  # one name per quantity: mask/<rule>/frac
    assert steps[f"mask/{rule}/frac"].max() > 0
    seqs = run.sequences().collect()
    # every update's token rows name the sequence row of the same response: same length
    tl = toks.group_by("step", "update", "seq_id").agg(pl.len().alias("n"))
    j = tl.join(seqs.select("step", "seq_id", "length", "tokens"), on=["step", "seq_id"])
    assert len(j) == len(tl) and (j["n"] == j["length"]).all()


def test_train_cli_help_and_run(tmp_path, capsys):
    from cppo_diag.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--rule.param KEY=VALUE" in out and "responses sampled per prompt" in out
    rc = main(["train", "--preset", "tiny", "--steps", "1", "--log.out_dir", str(tmp_path), "--log.name", "c",
               "--rule.name", "grpo_clip", "--threads", "1"])
    assert rc == 0 and open_run(tmp_path / "c").meta["rule"] == "grpo_clip"


def test_unknown_rule_or_parameter_is_rejected_before_training(tmp_path):
    with pytest.raises(Exception, match="cppo"):
        train(tiny_cfg(tmp_path, rule={"name": "not_a_rule"}))
    with pytest.raises(ValueError, match=r"rule.params: unknown parameter\(s\) \['detla'\].*'delta'"):
        train(tiny_cfg(tmp_path, rule={"name": "cppo", "params": {"detla": 0.1}}))
    assert not (tmp_path / "cppo-fib-s0").exists()


def test_math_dataset_task_from_jsonl_and_parquet(tmp_path):
    from cppo_diag.train.config import TaskConfig
    from cppo_diag.train.tasks import build_task

    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]
    rows[0]["prompt"] = [{"role": "user", "content": "What is 0 + 0?"}]  # DAPO-style chat prompt
    f = tmp_path / "m.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    t = build_task(TaskConfig(kind="dataset", path=str(f), eval_size=4))
    assert len(t.eval_set()) == 4 and "\\boxed{}" in t.eval_set()[0].prompt
    p = t.sample(1, np.random.default_rng(0))[0]
    assert t.score(p, f"so the answer is \\boxed{{{p.answer}}}.") == (1.0, True)
    assert t.score(p, "no box here") == (0.0, False)
    pq = tmp_path / "m.parquet"
    pl.DataFrame({"question": ["1+1?", "2+2?", "3+3?", "4+4?", "5+5?"], "sol": ["2", "4", "6", "8", "10"]}).write_parquet(pq)
    t2 = build_task(TaskConfig(kind="dataset", path=str(pq), prompt_field="question", answer_field="sol"))
    assert len(t2.eval_set()) == 1
    with pytest.raises(ValueError, match="has no field 'prompt'"):
        build_task(TaskConfig(kind="dataset", path=str(pq)))


def test_reasoning_gym_task_scores_with_its_checker():
    pytest.importorskip("reasoning_gym")
    from cppo_diag.train.config import TaskConfig
    from cppo_diag.train.tasks import build_task

    t = build_task(TaskConfig(kind="reasoning_gym", rg_name="basic_arithmetic", eval_size=4))
    p = t.sample(1, np.random.default_rng(0))[0]
    assert t.score(p, f"\\boxed{{{p.answer}}}")[1] is True
    assert t.score(p, "\\boxed{not a number}")[1] is False


def test_hf_model_kv_cache_rollout_matches_recomputed_pi():
    pytest.importorskip("transformers")
    from cppo_diag.train.config import ModelConfig
    from cppo_diag.train.models.hf import build_random_hf

    torch.manual_seed(0)
    pol = build_random_hf("llama-tiny", ModelConfig(kind="hf"))
    m = pol.module.eval()
    s = TorchSampler(lambda i, a, p, c: pol.forward(m, i, a, p, c, use_cache=True), eos_id=pol.eos_id,
                     pad_id=pol.pad_id, device="cpu", empty_cache=pol.empty_cache)
    prompts = [pol.encode_prompt("1,2;9="), pol.encode_prompt("3+4,5+6=")] * 2  # different lengths: left padding
    rb = s.generate(prompts, max_new_tokens=12, generator=torch.Generator().manual_seed(0))
    logp, _ = sequence_logprobs(pol, m, rb, temperature=1.0, autocast=None, with_entropy=False)
    assert rb.response_mask.sum() > 8
    torch.testing.assert_close(logp[rb.response_mask], rb.logp_rollout[rb.response_mask], rtol=0, atol=1e-5)


# -- issue 11 "numbers you can trust": the done-when run ------------------------------------------------------
def _pooled_fractions(g: pl.DataFrame, rule_params: dict, trunc_cap: float) -> dict[str, float]:
    """Every fraction and share of one step, recomputed from its pooled token rows (all updates, or the updates
    after the first) with plain loops: the reference CPPO loop for delta_b, and c_t written out per token."""
    from reference_loop import DEFAULTS, _weight, reference

    P = {**DEFAULTS["cppo"], **rule_params}
    n = g.height
    keep = g["keep_applied"].to_numpy()
    reason = g["reason_applied"].to_numpy()
    adv = g["advantage"].to_numpy()
    lp = torch.tensor(g["logp"].to_numpy())
    lr = torch.tensor(g["logp_rollout"].to_numpy())
    rho = torch.exp((lp - lr).clamp(-20, 20)).numpy()  # float32, as the rule and the loss compute it
    masked = ~keep
    n_m = int(masked.sum())
    resp = g.group_by("update", "seq_id", maintain_order=True).agg("pos", "logp", "logp_rollout", "advantage",
                                                                     "keep_applied")
    n_resp = len(resp)
    db_min = db_cap = c_neg = 0
    db_sum = 0.0
    for r in resp.iter_rows(named=True):
        order = np.argsort(r["pos"])
        lp_r = torch.tensor(np.asarray(r["logp"], np.float32)[order])[None]
        lr_r = torch.tensor(np.asarray(r["logp_rollout"], np.float32)[order])[None]
        ref = reference("cppo", lp_r, lr_r, torch.tensor([r["advantage"][0]]), **rule_params)
        db = ref["delta_b"][0]
        db_sum += db
        db_min += db <= P["delta_b"]
        db_cap += db >= P["delta_b"] * P["delta_b_cap"]
        T = len(order)
        S = W = 0.0
        for i in range(T):
            w = _weight(i, T, P["w_min"], "sequence", None)
            d = abs(float(torch.exp(lp_r[0, i])) - float(torch.exp(lr_r[0, i])))
            c_neg += min(P["delta"], P["delta"] + db * W - S) < 0
            S += w * d
            W += w
    return {
        "mask/cppo/frac": n_m / n,
        "mask/cppo/frac_pos_adv": int((masked & (adv > 0)).sum()) / int((adv > 0).sum()),
        "mask/cppo/frac_neg_adv": int((masked & (adv < 0)).sum()) / int((adv < 0).sum()),
        "mask/cppo/away_frac": int((adv * (rho - 1) > 0).sum()) / n,
        "mask/cppo/budget_share": int((reason == 2).sum()) / n_m if n_m else 0.0,
        "mask/cppo/token_share": int((reason == 1).sum()) / n_m if n_m else 0.0,
        "mask/cppo/seq_frac": sum(not all(k) for k in resp["keep_applied"].to_list()) / n_resp,
        "cppo/delta_b_mean": db_sum / n_resp,
        "cppo/delta_b_at_min_frac": db_min / n_resp,
        "cppo/delta_b_at_cap_frac": db_cap / n_resp,
        "cppo/c_neg_frac": c_neg / n,
        "loss/kept_frac": int(keep.sum()) / n,
        "loss/trunc_frac": int((rho > trunc_cap).sum()) / n,
    }


def test_demo_preset_with_minibatches_logs_numbers_you_can_trust(tmp_path):
    """Issue 11's done-when run: the demo preset (CPPO), shortened, with 2 minibatches x 2 epochs.

    1. keep_applied equals SPEC's CPPO computed token by token (tests/reference_loop.py) on each update's rows;
    2. every fraction and share in the step scalars equals its value recomputed from the step's pooled tokens
       (all updates; and ``after_first/`` over the updates after the first);
    3. every token row names the sequence row of its response, of the same length (one seq_id per response)."""
    from reference_loop import reference

    from cppo_diag.cli.main import main

    rc = main(["train", "--preset", "demo", "--steps", "3", "--optim.updates_per_batch", "2", "--optim.epochs", "2",
               "--rollout.prompts_per_step", "4", "--task.eval_size", "8", "--log.eval_every", "0",
               "--log.out_dir", str(tmp_path), "--log.name", "d", "--log.progress", "false", "--threads", "1"])
    assert rc == 0
    run = open_run(tmp_path / "d")
    params = run.meta["rule_params"]
    assert run.meta["rule"] == "cppo"
    toks = run.tokens().sort("step", "update", "seq_id", "pos").collect()
    assert sorted(toks["update"].unique().to_list()) == [0, 1, 2, 3]

    # 1. the mask the trainer applied is SPEC's CPPO, token by token
    for _, g in toks.group_by("step", "update", maintain_order=True):
        for _, r in g.group_by("seq_id", maintain_order=True):
            lp = torch.tensor(r["logp"].to_numpy())[None]
            lr = torch.tensor(r["logp_rollout"].to_numpy())[None]
            ref = reference("cppo", lp, lr, torch.tensor([r["advantage"][0]]), **params)
            assert ref["keep"][0] == r["keep_applied"].to_list()
            assert ref["reason"][0] == r["reason_applied"].to_list()
    assert (~toks["keep_applied"]).sum() > 0

    # 2. every fraction and share in the step scalars = recomputed from the step's pooled tokens
    steps = run.steps().filter(pl.col("mask/cppo/frac").is_not_null()).sort("step")
    names = [c for c in steps.columns if ("frac" in c or "share" in c) and c != "time/rollout_frac"]
    trunc_cap = run.meta["config"]["optim"]["trunc_cap"]
    checked = set()
    for row in steps.iter_rows(named=True):
        g = toks.filter(pl.col("step") == row["step"])
        for prefix, part in (("", g), ("after_first/", g.filter(pl.col("update") > 0))):
            for k, v in _pooled_fractions(part, params, trunc_cap).items():
                assert row[prefix + k] == pytest.approx(v, rel=1e-6, abs=1e-9), (row["step"], prefix + k)  # float32 sums
                checked.add(prefix + k)
        # live per-position fractions (cppo_diag/capture/position_live.py): masked / valid per third of t / T
        third = ((pl.col("pos") + 1) / pl.len().over("update", "seq_id") * 3).ceil().clip(1, 3).cast(pl.Int64) - 1
        per = g.group_by(third.alias("third")).agg((~pl.col("keep_applied")).mean().alias("f")).sort("third")
        for k, f in zip(M.POS_MASKED_FRAC, per["f"].to_list()):
            assert row[k] == pytest.approx(f, rel=1e-9), (row["step"], k)
            checked.add(k)
        first, last = per["f"][0], per["f"][-1]
        if first > 0:
            assert row[M.POS_MASKED_FRAC_LAST_OVER_FIRST] == pytest.approx(last / first)
        checked.add(M.POS_MASKED_FRAC_LAST_OVER_FIRST)
    assert set(names) <= checked, sorted(set(names) - checked)  # no fraction left unchecked

    # 3. one seq_id per response per step: token rows of every update name a sequence row of the same length
    seqs = run.sequences().collect()
    assert seqs.group_by("step").agg(pl.col("seq_id").n_unique()).sort("step")["seq_id"].to_list() == [32] * 3
    per = toks.group_by("step", "update", "seq_id").agg(pl.len().alias("n"), pl.col("group_id").first())
    j = per.join(seqs.select("step", "seq_id", "length", "group_id"), on=["step", "seq_id"], how="left")
    assert j["length"].null_count() == 0
    assert (j["n"] == j["length"]).all() and (j["group_id"] == j["group_id_right"]).all()
    assert (per.group_by("step", "seq_id").len()["len"] == 2).all()  # each trained response: once per epoch


def test_minibatch_tokens_and_sampled_sequences_share_seq_ids(tmp_path):
    """Issue 11 item 2: with several minibatches and seq_fraction < 1, both tables keep the same responses and
    every token row names the sequence row of its response (same length, same group)."""
    cfg = tiny_cfg(tmp_path, steps=1, optim={"updates_per_batch": 2, "epochs": 1}, log={"name": "s", "seq_fraction": 0.6},
                   rollout={"prompts_per_step": 4, "n": 4})
    train(cfg)
    run = open_run(tmp_path / "s")
    toks = run.tokens().group_by("step", "update", "seq_id").agg(pl.len().alias("n"), pl.col("group_id").first()).collect()
    seqs = run.sequences().collect()
    assert set(toks["update"].to_list()) == {0, 1} and 0 < len(seqs) < 16
    j = toks.join(seqs, on=["step", "seq_id"], how="left")
    assert j["length"].null_count() == 0 and (j["n"] == j["length"]).all() and (j["group_id"] == j["group_id_right"]).all()


def test_soft_and_cispo_runs_log_the_weight_the_loss_applied(tmp_path):
    """Issue 11 item 7: keep_applied is all-valid for cppo_soft and cispo; loss_weight holds the gate / the
    truncated IS weight the loss multiplied each token by (recomputed here from the logged tokens)."""
    from cppo_diag.analyses.recomputation import iter_batches, run_rule

    for rule, params in (("cppo_soft", {"delta": 0.05}), ("cispo", {"eps_high": 0.1})):
        train(tiny_cfg(tmp_path, steps=1, optim={"lr": 3e-3, "epochs": 3}, rule={"name": rule, "params": params},
                       log={"name": rule}))
        run = open_run(tmp_path / rule)
        toks = run.tokens().collect()
        assert toks["keep_applied"].all() and "loss_weight" in toks.columns
        assert toks.filter(pl.col("update") > 0)["loss_weight"].min() < 1.0  # some tokens were down-weighted
        for batch in iter_batches(run):
            res = run_rule(batch, rule, params)
            np.testing.assert_allclose(batch.unpad(res.weight), toks.filter(
                (pl.col("step") == batch.step) & (pl.col("update") == batch.update)).sort("seq_id", "pos")["loss_weight"],
                rtol=1e-6)
    train(tiny_cfg(tmp_path, steps=1, log={"name": "plain"}))
    assert "loss_weight" not in open_run(tmp_path / "plain").tokens().collect_schema().names()  # cppo: keep alone


def test_top_p_mu_is_the_truncated_distribution(tmp_path):
    """Issue 11 item 8: with top_p < 1 the recorded mu is the log-prob under the nucleus, renormalised (the
    distribution actually sampled from), not the full softmax."""
    tok, m = _tiny_model(2)
    s = TorchSampler(lambda i, a, p, c: m(i, attention_mask=a, position_ids=p, cache=c), eos_id=tok.eos_id,
                     pad_id=tok.pad_id, device="cpu", empty_cache=m.empty_cache)
    prompts = [tok.encode_prompt("1,3;12=")] * 6
    rb = s.generate(prompts, max_new_tokens=6, top_p=0.5, generator=torch.Generator().manual_seed(0))

    class P:
        pad_id, eos_id = tok.pad_id, tok.eos_id
        forward = staticmethod(lambda mod, i, a, p, cache=None, use_cache=False: mod(i, attention_mask=a, position_ids=p, cache=cache))

    full, _ = sequence_logprobs(P, m, rb, temperature=1.0, autocast=None, with_entropy=False)  # untruncated pi
    ids = torch.cat([torch.tensor(prompts), rb.response_ids], 1)
    logits, _ = m(ids)
    Lp = len(prompts[0])
    for t in range(rb.response_ids.shape[1]):
        kept = top_p_filter(logits[:, Lp - 1 + t].float(), 0.5).log_softmax(-1)  # (B, V) the nucleus, renormalised
        want = kept.gather(1, rb.response_ids[:, t:t + 1]).squeeze(1)
        v = rb.response_mask[:, t]
        torch.testing.assert_close(rb.logp_rollout[v, t], want[v], rtol=0, atol=2e-5)
    assert (rb.logp_rollout[rb.response_mask] >= full[rb.response_mask] - 1e-5).all()
    assert (rb.logp_rollout[rb.response_mask] > full[rb.response_mask] + 1e-3).any()  # truncation mattered
    with pytest.raises(ValueError, match=r"rollout.top_p: expected a value in \(0, 1\], found 1.5"):
        train(tiny_cfg(tmp_path, rollout={"top_p": 1.5}))


def test_held_out_set_is_distinct_disjoint_and_sized(tmp_path):
    """Issue 11 item 4: the held-out prompts are drawn without replacement, never trained on, and the domain
    size is stated next to the accuracy."""
    t = ArithmeticTask("fib", eval_size=512)  # 900 distinct prompts with the defaults
    held = {p.prompt for p in t.eval_set()}
    assert t.domain_size == 900 and len(held) == len(t.eval_set()) == 512
    rng = np.random.default_rng(0)
    assert not held & {p.prompt for p in t.sample(2000, rng)}
    with pytest.raises(ValueError, match="task.eval_size: expected fewer held-out problems than the task's 900"):
        ArithmeticTask("fib", eval_size=900)
    from cppo_diag.train.config import TaskConfig
    from cppo_diag.train.tasks import build_task

    rows = [{"prompt": f"q{i % 30}", "answer": str(i % 30)} for i in range(120)]  # every prompt 4 times
    f = tmp_path / "dup.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows))
    d = build_task(TaskConfig(kind="dataset", path=str(f), eval_size=6))
    ev = {p.prompt for p in d.eval_set()}
    assert len(ev) == len(d.eval_set()) == 6 and d.domain_size == 30
    assert not ev & {p.prompt for p in d.sample(500, rng)}  # duplicates of a held-out prompt never train
    summary = train(tiny_cfg(tmp_path, steps=1, log={"name": "h"}))
    assert summary["summary/heldout_size"] == 16 and summary["summary/domain_size"] == 900
    ev_rows = open_run(tmp_path / "h").steps().filter(pl.col("eval/greedy_acc").is_not_null())
    assert (ev_rows["eval/heldout_size"] == 16).all() and (ev_rows["eval/domain_size"] == 900).all()


def test_help_escapes_percent_signs(capsys):
    """Issue 11 item 9: a '%' in a field doc is printed as is, not %-formatted into argparse's dict."""
    from cppo_diag.cli.main import main

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "gradient checkpointing (less memory, ~30% slower updates) [default: False]" in out
    assert "option_strings" not in out


def test_long_preset_runs_and_check_script_reads_it(tmp_path):
    import importlib.util

    cfg = build_config("long")
    assert (cfg.task.kind, cfg.rollout.staleness, cfg.rollout.precision, cfg.rule.name) == ("chain", 10, "bf16", "dppo")
    assert (cfg.task.forks, cfg.task.detour_credit, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.schedule) == (
        0.5, 0.0, 2.5e-4, 6, "cosine")
    assert (cfg.rollout.prompts_per_step, cfg.rollout.n) == (16, 8)
    assert cfg.rule.params == {"delta": 0.1}  # the regime's DPPO threshold (config.PRESET_RULE_PARAMS)
    assert cfg.log.behavior_logp and cfg.task.eval_size == 512  # attribution on; the less noisy held-out set
    run_cfg = build_config("long", overrides={
        "steps": 3, "threads": 1, "rollout": {"prompts_per_step": 2, "n": 4}, "task": {"eval_size": 8},
        "log": {"out_dir": str(tmp_path), "name": "long", "progress": False, "eval_every": 0}, "ckpt": {"every": 0}})
    train(run_cfg)
    spec = importlib.util.spec_from_file_location("check_long_preset", ROOT / "scripts" / "check_long_preset.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.long_criteria(tmp_path / "long")
    assert c["finished"] and c["steps"] == 3 and set(c["pass"]) == {"masked", "tails", "length", "accuracy"}
    assert c["response_len_mean"] > 128 and 0.0 <= c["masked_frac_after_first_update"] <= 1.0
    assert c["tv_top10_first_third"] >= 0 and "want >= 1.5x" in mod.report(c)
    assert mod.top_decile_mean(np.array([0.0] * 9 + [1.0])) == 1.0


def test_lr_decay_floor():
    from cppo_diag.train.config import build_config
    from cppo_diag.train.runtime import lr_lambda

    for kind in ("linear", "cosine"):
        cfg = build_config("tiny", overrides={"steps": 11, "optim": {"schedule": kind, "warmup_steps": 1}})
        f = lr_lambda(cfg.validate())
        assert f(1) == pytest.approx(1.0) and f(11) == pytest.approx(0.0)  # to 0 by default
        cfg = build_config("tiny", overrides={"steps": 11, "optim": {"schedule": kind, "warmup_steps": 1,
                                                                      "min_lr_ratio": 0.5}})
        f = lr_lambda(cfg.validate())
        assert f(1) == pytest.approx(1.0) and f(6) == pytest.approx(0.75) and f(11) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="optim.min_lr_ratio"):
        build_config("tiny", overrides={"optim": {"min_lr_ratio": 1.5}}).validate()
