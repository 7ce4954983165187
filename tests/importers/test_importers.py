"""Importers: fixture dumps written in prime-rl / slime / NeMo-RL formats convert into runs that read back
value for value (alignment, packing, loss-mask holes, skipped samples, ranks)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from cppo_diag import open_run
from cppo_diag.cli.main import main as cli_main
from cppo_diag.importers import ImportFormatError, import_run

pytest.importorskip("msgspec")

_spec = importlib.util.spec_from_file_location(
    "make_importer_fixtures", Path(__file__).resolve().parents[1] / "fixtures" / "importers" / "make_fixtures.py"
)
fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fixtures)


@pytest.fixture(scope="module")
def dumps(tmp_path_factory):
    root = tmp_path_factory.mktemp("dumps")
    return root, fixtures.write_all(root)


def _check_run(run_dir: Path, expected: dict, *, trainer: str, has_old: bool, has_reward: bool):
    run = open_run(run_dir)
    assert run.meta["trainer"] == trainer
    assert run.meta["anchor"] == "rollout"
    tok = run.tokens().collect().sort(["step", "rank", "update", "seq_id", "pos"])
    got_keys = set(tok.select(["step", "rank", "update", "seq_id"]).unique().iter_rows())
    assert got_keys == set(expected), (sorted(got_keys - set(expected)), sorted(set(expected) - got_keys))
    for (step, rank, update, seq_id), part in tok.group_by(["step", "rank", "update", "seq_id"], maintain_order=True):
        exp = expected[(step, rank, update, seq_id)]
        where = (step, rank, update, seq_id)
        assert part["pos"].to_list() == exp["pos"], where
        np.testing.assert_allclose(part["logp"].to_numpy(), exp["logp"], rtol=0, atol=1e-6, err_msg=str(where))
        np.testing.assert_allclose(part["logp_rollout"].to_numpy(), exp["logp_rollout"], rtol=0, atol=1e-6)
        np.testing.assert_allclose(part["advantage"].to_numpy(), exp["advantage"], rtol=0, atol=1e-6)
        assert part["token_id"].to_list() == exp["token_id"], where
        if has_old:
            np.testing.assert_allclose(part["logp_old"].to_numpy(), exp["logp_old"], rtol=0, atol=1e-6)
        if has_reward:
            assert part["reward"].unique().to_list() == [pytest.approx(exp["reward"])]
    steps = sorted({k[0] for k in expected})
    assert run.completed_steps() == steps
    return run, tok


def test_prime_rl_micro_batches_and_training_batch(dumps, tmp_path):
    root, expected = dumps
    run_dir, stats = import_run("prime-rl", root / "prime-rl", tmp_path, name="prime", progress=False)
    run, tok = _check_run(run_dir, expected["prime-rl"], trainer="prime-rl", has_old=False, has_reward=False)
    assert "copy of inference_logprobs" in run.meta["config"]["logp_source"]
    assert sorted(tok["rank"].unique().to_list()) == [0, 1]  # rank_<r>.bin -> rank
    # tokens with loss_mask False inside a response are not written (pos counts trained tokens)
    assert tok.height == sum(len(e["pos"]) for e in expected["prime-rl"].values())
    assert stats.sequences == len(expected["prime-rl"])


def _check_token_export_extras(tok: pl.DataFrame, expected: dict) -> None:
    for (step, rank, update, seq_id), part in tok.group_by(["step", "rank", "update", "seq_id"], maintain_order=True):
        exp = expected[(step, rank, update, seq_id)]
        np.testing.assert_allclose(part["entropy"].to_numpy(), exp["entropy"], rtol=0, atol=1e-6)
        assert part["keep_applied"].to_list() == exp["keep_applied"], (step, rank, update, seq_id)
        assert part["reason_applied"].to_list() == [0 if k else 1 for k in exp["keep_applied"]]


def test_prime_rl_token_export_has_the_trainer_logprobs_in_logp(dumps, tmp_path, capsys):
    """Done-when of issue 16: the token export imports with trainer_logprobs in logp, prime-rl's mask in
    keep_applied, and meta.json saying so; our dppo rule (binary TV) recomputes prime-rl's mask exactly."""
    root, expected = dumps
    exp = expected["prime-rl-token-export"]
    rc = cli_main(["import", "--from", "prime-rl", str(root / "prime-rl-token-export"), str(tmp_path),
                   "--name", "te", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "step(s) [2] have no STABLE marker" in out  # step 2 is still being written
    assert "4 sample(s) without an RL loss" in out  # the CE-only sample of each (step 0/1, rank 0/1) file
    assert "matches its default thresholds 0.2/0.2" in out
    run, tok = _check_run(tmp_path / "te", exp, trainer="prime-rl", has_old=False, has_reward=True)
    _check_token_export_extras(tok, exp)
    cfg = run.meta["config"]
    assert cfg["logp_source"].startswith("prime-rl trainer_logprobs")
    assert cfg["logp_rollout_source"].startswith("prime-rl inference_logprobs")
    assert cfg["keep_applied_source"].startswith("not is_masked")
    assert run.meta["rule"] == "dppo"
    assert run.meta["rule_params"] == {"divergence": "binary_tv", "delta_low": 0.2, "delta_high": 0.2}
    assert (tok["logp"] - tok["logp_rollout"]).abs().max() > 0.5  # a real divergence, not a copy of mu
    assert 0 < (~tok["keep_applied"]).sum() < tok.height
    assert sorted(tok["rank"].unique().to_list()) == [0, 1] and sorted(tok["update"].unique().to_list()) == [0, 1]

    rc = cli_main(["recompute", str(tmp_path / "te"), "--rule", "dppo", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["agreement"]["agreement"] == 1.0 and report["agreement"]["n_compared"] == tok.height


def test_prime_rl_token_export_first_revision_and_transport_files_beside_it(dumps, tmp_path):
    """The export as first released (no loss channels, export_step, run_id or STABLE; an sft micro-batch with
    null mask fields) imports too, and transport files next to an export are ignored, not mixed in."""
    root, expected = dumps
    src = root / "prime-rl-token-export-first"
    step = src / "rollouts" / "step_3"
    step.mkdir(parents=True, exist_ok=True)
    import msgspec

    (step / "rank_0.bin").write_bytes(msgspec.msgpack.encode([[[1, 2], [True, True], [0.5, 0.5], [-1.0, -1.0]]]))
    run_dir, stats = import_run("prime-rl", src, tmp_path, name="first", progress=False)
    exp = expected["prime-rl-token-export-first"]
    run, tok = _check_run(run_dir, exp, trainer="prime-rl", has_old=False, has_reward=False)
    _check_token_export_extras(tok, exp)
    assert stats.skipped_sequences == 3  # the sft micro-batch
    assert any("transport file(s) ignored" in n for n in stats.notes)


def test_prime_rl_token_export_errors_name_the_line_and_field(tmp_path):
    step = tmp_path / "token_exports" / "step_0"
    step.mkdir(parents=True)
    rec = {"schema_version": 1, "token_ids": [1, 2, 3], "loss_mask": [False, True, True],
           "inference_logprobs": [0.0, -1.0, -2.0], "trainer_logprobs": [-3.0, -1.1], "advantages": [0.0, 1.0, 1.0]}
    (step / "rank_0.jsonl").write_text(json.dumps(rec) + "\n")
    with pytest.raises(ImportFormatError, match=r"rank_0\.jsonl:1: field 'trainer_logprobs': expected 3 values"):
        import_run("prime-rl", tmp_path, tmp_path / "out", name="bad", progress=False)
    (step / "rank_0.jsonl").write_text(json.dumps({**rec, "schema_version": 2}) + "\n")
    with pytest.raises(ImportFormatError, match=r"rank_0\.jsonl:1: schema_version: expected 1 .* found 2"):
        import_run("prime-rl", tmp_path, tmp_path / "out", name="bad2", progress=False)


def test_slime_train_dumps(dumps, tmp_path):
    root, expected = dumps
    run_dir, stats = import_run("slime", root / "slime", tmp_path, name="slime", group_size=5, progress=False)
    run, tok = _check_run(run_dir, expected["slime"], trainer="slime", has_old=True, has_reward=True)
    assert "pi_old" in run.meta["config"]["logp_source"]
    assert tok["group_id"].unique().to_list() == [0]  # 5 samples per dump, group size 5
    # |pi_old - mu| is the mismatch the run measures
    assert (tok["logp"] - tok["logp_rollout"]).abs().max() > 0


def test_nemo_rl_jsonl_via_cli(dumps, tmp_path, capsys):
    root, expected = dumps
    rc = cli_main(["import", "--from", "nemo-rl", str(root / "nemo-rl"), str(tmp_path), "--name", "nemo",
                   "--group-size", "2", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "2 sequences skipped" in out  # sample_loss_mask == 0 in each of the two files
    run, tok = _check_run(tmp_path / "nemo", expected["nemo-rl"], trainer="nemo-rl", has_old=True, has_reward=True)
    seqs = run.sequences().collect()
    assert set(seqs["completion"].to_list()) == {"answer 0", "answer 1", "answer 2"}
    assert seqs.filter(pl.col("seq_id") == 2)["group_id"].to_list() == [1, 1]  # idx 2 // group size 2


def test_existing_run_is_not_overwritten_without_flag(dumps, tmp_path):
    root, _ = dumps
    import_run("nemo-rl", root / "nemo-rl", tmp_path, name="x", progress=False)
    with pytest.raises(FileExistsError, match="already holds a run"):
        import_run("nemo-rl", root / "nemo-rl", tmp_path, name="x", progress=False)
    run_dir, _ = import_run("nemo-rl", root / "nemo-rl", tmp_path, name="x", overwrite=True, progress=False)
    assert open_run(run_dir).completed_steps() == [1, 2]


def test_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "logs"
    bad.mkdir()
    (bad / "train_data_step3.jsonl").write_text(json.dumps({"content": ["q"], "rewards": [1.0]}) + "\n")
    with pytest.raises(ImportFormatError, match=r"train_data_step3\.jsonl:1: missing field\(s\) \['token_loss_mask'"):
        import_run("nemo-rl", bad, tmp_path / "out", name="bad", progress=False)

    step = tmp_path / "rollouts" / "step_0"
    step.mkdir(parents=True)
    import msgspec

    (step / "rank_0.bin").write_bytes(msgspec.msgpack.encode([[[1, 2], [True, True]]]))  # 2 fields, needs >= 4
    with pytest.raises(ImportFormatError, match=r"rank_0\.bin micro-batch 0: MicroBatch: expected an array of 4\.\.5"):
        import_run("prime-rl", tmp_path / "rollouts", tmp_path / "out", name="bad2", progress=False)

    (tmp_path / "empty").mkdir()
    with pytest.raises(ImportFormatError, match="no slime train dumps"):
        import_run("slime", tmp_path / "empty", tmp_path / "out", name="bad3", progress=False)
    with pytest.raises(ValueError, match="source: expected one of"):
        import_run("openrlhf", tmp_path, tmp_path / "out")
    assert cli_main(["import", "--from", "slime", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
