"""TRL's real configuration, vLLM server mode with its importance-sampling (IS) correction, on CPU.

A fake vLLM server (a pure-Python HTTP server on 127.0.0.1) answers TRL's own ``VLLMClient`` over HTTP with
known completions and known sampling log-probs. What is real: ``GRPOTrainer`` with ``use_vllm=True,
vllm_mode="server"``, ``VLLMGeneration.generate`` and ``VLLMClient.generate`` (the request TRL builds, the
``/v1/completions`` answer it parses), ``check_server``, ``/v1/models``, ``/server_info``, the per-step
``sync_weights`` walk over the model's parameters and ``/reset_prefix_cache``, and TRL's IS correction in every
mode. What is replaced (it needs vLLM's NCCL weight-transfer engine, absent on CPU without vLLM): TRL's
``is_vllm_available`` answers True, ``VLLMClient.init_communicator`` does nothing and
``VLLMClient.update_named_params`` consumes the parameters without broadcasting them.

Checked: vLLM's sampling log-probs are recorded as ``logp_rollout``; TRL's IS ratio is recorded as it was
applied (``loss_weight``; tokens it zeroes are masked with reason code token / sequence) under the new option
names (``vllm_importance_sampling_clip_max`` / ``_clip_min``) and the deprecated ``vllm_importance_sampling_cap``,
in every mode (token/sequence x mask/truncate); ``vllm_is_correction`` recomputes it from the recorded columns
and meta.json; with top_p / top_k the server's processed log-probs are renormalised over the kept set, so
TRL's ratio is scaled by the kept probability mass (TRL #6789), as recorded.
"""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch

trl = pytest.importorskip("trl")

from cppo_diag import open_run  # noqa: E402
from cppo_diag.integrations import trl as cd_trl  # noqa: E402
from cppo_diag.integrations.trl import CppoDiagConfig, vllm_is_correction  # noqa: E402
from cppo_diag.masks.reasons import Reason  # noqa: E402
from tests.integrations.test_integration_trl import _trainer  # noqa: E402

NEAR_UNIFORM = -math.log(16.0)  # the tiny random model's log-probs are near uniform over its 16 tokens
# per-token offsets of the sampling log-prob from NEAR_UNIFORM: rho = exp(logp_old - logp_rollout) spreads over
# ~[0.2, 5], so every mode has tokens (and responses) inside and outside [clip_min, clip_max]
OFFSETS = (1.4, -0.2, -1.3, 0.5, 0.0, -0.6, 0.9, -1.6)
COMPLETIONS = ((4, 4, 3, 1), (5, 4, 6, 7, 4, 1), (3, 3, 3, 3, 3, 3, 3, 3), (4, 5, 1), (6, 4, 4, 4, 7, 1),
               (7, 7, 1), (4, 3, 4, 3, 4, 3, 4, 1), (8, 9, 10, 1))  # token ids ('1' is id 4); 1 = EOS


class FakeVLLM:
    """A vLLM server for TRL's client: health, models, server_info, completions with log-probs, prefix cache."""

    def __init__(self, *, logprobs: bool = True, kept_mass: float = 1.0):
        self.logprobs, self.kept_mass = logprobs, kept_mass
        self.requests: list[dict] = []
        self.served: dict[tuple, list[float]] = {}  # (prompt ids, completion ids) -> the sampling log-probs sent
        self.resets = 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):  # quiet
                pass

            def _send(self, obj, code=200):
                body = json.dumps(obj).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                path = self.path.split("?")[0]
                if path == "/health":
                    return self._send({})
                if path == "/v1/models":
                    return self._send({"data": [{"id": "fake-model"}]})
                if path == "/server_info":
                    return self._send({"vllm_config": {"model_config": {"logprobs_mode": "processed_logprobs"},
                                                       "weight_transfer_config": {"backend": "nccl"}}})
                return self._send({"error": path}, 404)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(n) or b"{}")
                if self.path == "/reset_prefix_cache":
                    fake.resets += 1
                    return self._send({})
                if self.path == "/v1/completions":
                    return self._send(fake.complete(body))
                return self._send({"error": self.path}, 404)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def complete(self, body: dict) -> dict:
        self.requests.append({k: v for k, v in body.items() if k != "prompt"})
        choices = []
        for p, prompt in enumerate(body["prompt"]):
            for j in range(int(body["n"])):
                ids = list(COMPLETIONS[(p + j) % len(COMPLETIONS)])[: int(body["max_tokens"])]
                # processed log-probs: renormalised over the top-p / top-k set, log p - log(kept mass)
                lps = [NEAR_UNIFORM + OFFSETS[(t + j) % len(OFFSETS)] - math.log(self.kept_mass)
                       for t in range(len(ids))]
                self.served[(tuple(prompt), tuple(ids))] = lps
                lp = None if not self.logprobs else {"tokens": [f"token_id:{i}" for i in ids], "token_logprobs": lps,
                                                     "top_logprobs": [None] * len(ids)}
                choices.append({"index": len(choices), "prompt_token_ids": prompt, "token_ids": ids, "logprobs": lp,
                                "text": "", "finish_reason": "stop"})
        return {"id": "cmpl-fake", "object": "text_completion", "model": "fake-model", "choices": choices}

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def vllm_seam(monkeypatch):
    """The narrowest replacements that let TRL's server-mode client run without vLLM (module docstring)."""
    from trl.generation import vllm_client, vllm_generation

    monkeypatch.setattr(vllm_client, "is_vllm_available", lambda *a, **k: True)
    monkeypatch.setattr(vllm_generation, "is_vllm_available", lambda *a, **k: True)
    synced = []
    monkeypatch.setattr(vllm_client.VLLMClient, "init_communicator", lambda self, device=0: None)
    monkeypatch.setattr(vllm_client.VLLMClient, "update_named_params",
                        lambda self, metadata, params: synced.append(sum(1 for _ in params)))
    return synced


def _run(tmp_path, server, name, *, max_steps=2, rule=None, **grpo):
    trainer = _trainer(tmp_path, max_steps=max_steps, num_iterations=1, cppo_diag=CppoDiagConfig(
        run_dir=tmp_path / "runs", name=name, rule=rule, on_error="raise"),
        use_vllm=True, vllm_mode="server", vllm_server_base_url=server.url, vllm_server_timeout=5.0, **grpo)
    trainer.train()
    return open_run(tmp_path / "runs" / name)


def _batch_tensors(tok, step, update):
    """(B, T) tensors of one recorded micro-batch, rows by seq_id, columns by pos."""
    sub = tok.filter((tok["step"] == step) & (tok["update"] == update)).sort(["seq_id", "pos"])
    seqs = sorted(set(sub["seq_id"].to_list()))
    T = int(sub["pos"].max()) + 1
    out = {c: torch.zeros(len(seqs), T, dtype=torch.float64) for c in ("logp_old", "logp_rollout", "loss_weight")}
    mask = torch.zeros(len(seqs), T, dtype=torch.bool)
    keep = torch.ones(len(seqs), T, dtype=torch.bool)
    reason = torch.zeros(len(seqs), T, dtype=torch.uint8)
    row = {s: i for i, s in enumerate(seqs)}
    r = np.array([row[s] for s in sub["seq_id"].to_list()])
    p = sub["pos"].to_numpy()
    for c in out:
        out[c][r, p] = torch.tensor(sub[c].to_numpy().astype(np.float64))
    mask[r, p] = True
    keep[r, p] = torch.tensor(sub["keep_applied"].to_numpy().astype(bool))
    reason[r, p] = torch.tensor(sub["reason_applied"].to_numpy().astype(np.uint8))
    return out, mask, keep, reason


MODES = [  # (mode, GRPOConfig options, (clip_min, clip_max) TRL resolves them to)
    ("token_mask", {"vllm_importance_sampling_clip_max": 3.0, "vllm_importance_sampling_clip_min": 0.5}, (0.5, 3.0)),
    ("token_truncate", {"vllm_importance_sampling_clip_max": 2.0, "vllm_importance_sampling_clip_min": 0.5},
     (0.5, 2.0)),
    ("sequence_mask", {"vllm_importance_sampling_clip_max": 3.0, "vllm_importance_sampling_clip_min": 0.3},
     (0.3, 3.0)),
    ("sequence_truncate", {"vllm_importance_sampling_clip_max": 2.0}, (None, 2.0)),
    ("token_mask", {"vllm_importance_sampling_cap": 2.5}, (None, 2.5)),  # the deprecated name
    ("sequence_truncate", {"vllm_importance_sampling_cap": 1.5}, (None, 1.5)),
]


@pytest.mark.slow
@pytest.mark.parametrize("mode,options,bounds", MODES, ids=[f"{m}-{'cap' if 'vllm_importance_sampling_cap' in o else 'clip'}"
                                                              for m, o, _ in MODES])
def test_trl_vllm_server_records_sampling_logprobs_and_the_applied_is_correction(tmp_path, vllm_seam, mode,
                                                                                 options, bounds):
    import warnings

    with FakeVLLM() as server, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the deprecated cap says so; TRL maps it to clip_max
        run = _run(tmp_path, server, "r", vllm_importance_sampling_mode=mode, **options)
    assert server.requests and vllm_seam and server.resets >= 1  # TRL's client, the weight walk, the cache reset
    settings = run.meta["config"]["vllm_importance_sampling"]
    assert settings["mode"] == mode and (settings["clip_min"], settings["clip_max"]) == bounds
    assert settings["applied"] and settings["deprecated_cap_given"] == ("vllm_importance_sampling_cap" in options)
    assert run.meta["config"]["logp_rollout_source"].startswith("sampling_per_token_logps")

    tok = run.tokens().collect()
    # vLLM's sampling log-probs are logp_rollout: every recorded response's column equals what the server sent
    served = {ids: lps for (_, ids), lps in server.served.items()}
    for (step, upd, sid), g in tok.sort("pos").group_by(["step", "update", "seq_id"], maintain_order=True):
        ids = tuple(g["token_id"].to_list())
        assert g["logp_rollout"].to_list() == pytest.approx(served[ids], abs=1e-6)

    n_zero = n_capped = 0
    for step, update in sorted(set(zip(tok["step"].to_list(), tok["update"].to_list()))):
        cols, mask, keep, reason = _batch_tensors(tok, step, update)
        weight, masked = vllm_is_correction(cols["logp_old"], cols["logp_rollout"], mask, mode=mode,
                                            clip_min=settings["clip_min"], clip_max=settings["clip_max"])
        assert torch.allclose(cols["loss_weight"][mask], weight[mask], rtol=1e-5, atol=1e-6), (step, update)
        assert bool((~keep[masked]).all())  # every token the correction zeroed is masked ...
        code = Reason.SEQUENCE if mode.startswith("sequence") else Reason.TOKEN
        clip_masked = (reason == Reason.TOKEN) & mask & ~masked
        assert bool((reason[masked & ~clip_masked] == code).all())  # ... with the correction's reason code
        n_zero += int(masked.sum())
        n_capped += int((weight[mask] == settings["clip_max"]).sum())
    if mode.endswith("_mask"):
        assert n_zero > 0 and int((tok["loss_weight"] > 0).sum()) > 0  # both sides of the bounds occur
    else:
        assert n_zero == 0 and n_capped > 0


@pytest.mark.slow
def test_top_p_top_k_scale_trls_ratio_by_the_kept_mass(tmp_path, vllm_seam):
    """vLLM's processed log-probs are renormalised over the top-p / top-k set (log p - log m, m = kept mass) while
    TRL's pi_old is the full softmax: TRL's ratio is m times the full-distribution one, and so is the record."""
    opts = dict(vllm_importance_sampling_mode="token_truncate", vllm_importance_sampling_clip_max=100.0, max_steps=1)
    with FakeVLLM() as full:
        a = _run(tmp_path, full, "full", **opts)
    with FakeVLLM(kept_mass=0.8) as topp:
        b = _run(tmp_path, topp, "topp", top_p=0.9, top_k=5, **opts)
    assert topp.requests[0]["top_p"] == pytest.approx(0.9) and topp.requests[0]["top_k"] == 5
    assert b.meta["config"]["vllm_importance_sampling"]["top_p"] == pytest.approx(0.9)
    key = ["step", "update", "seq_id", "pos"]
    ta = a.tokens().collect().sort(key)
    tb = b.tokens().collect().sort(key)
    assert ta["token_id"].to_list() == tb["token_id"].to_list()
    assert tb["logp_rollout"].to_numpy() == pytest.approx(ta["logp_rollout"].to_numpy() - math.log(0.8), abs=1e-5)
    assert tb["logp_old"].to_numpy() == pytest.approx(ta["logp_old"].to_numpy(), abs=1e-6)  # same step-0 policy
    assert tb["loss_weight"].to_numpy() == pytest.approx(0.8 * ta["loss_weight"].to_numpy(), rel=1e-5)


@pytest.mark.slow
def test_a_server_without_logprobs_is_a_clear_error(tmp_path, vllm_seam):
    with FakeVLLM(logprobs=False) as server:
        with pytest.raises(RuntimeError, match=r"returned completions without sampling log-probs.*--max-logprobs"):
            _run(tmp_path, server, "r", max_steps=1)


def test_changed_private_hook_is_refused_at_construction(tmp_path, monkeypatch):
    from trl import GRPOTrainer

    def _compute_loss(self, model, batch):  # a TRL release that renamed the parameter
        raise AssertionError("never called: refused at construction")

    monkeypatch.setattr(GRPOTrainer, "_compute_loss", _compute_loss)
    with pytest.raises(RuntimeError, match=rf"TRL {trl.__version__} changed GRPOTrainer._compute_loss.*"
                                           r"expected parameters \['model', 'inputs'\], found \['model', 'batch'\]"):
        _trainer(tmp_path, cppo_diag=CppoDiagConfig(run_dir=tmp_path / "runs", name="r"))
    assert not (tmp_path / "runs").exists()
    monkeypatch.undo()
    cd_trl.check_trl_hooks(cd_trl.CppoDiagGRPOTrainer, vllm=True)  # the installed TRL passes

    class NoVLLMHook:  # a TRL without the vLLM generation hook: refused only when use_vllm is set
        _compute_loss, _calculate_rewards = GRPOTrainer._compute_loss, GRPOTrainer._calculate_rewards
        _get_per_token_logps_and_entropies = GRPOTrainer._get_per_token_logps_and_entropies
        _generate_and_score_completions = GRPOTrainer._generate_and_score_completions

    cd_trl.check_trl_hooks(NoVLLMHook, vllm=False)
    with pytest.raises(RuntimeError, match=rf"TRL {trl.__version__} has no GRPOTrainer._generate_single_turn"):
        cd_trl.check_trl_hooks(NoVLLMHook, vllm=True)


def test_vllm_is_correction_formula():
    lo = torch.log(torch.tensor([[0.25, 1.0, 4.0, 2.0]], dtype=torch.float64))  # rho per token
    zero = torch.zeros_like(lo)
    mask = torch.tensor([[True, True, True, False]])
    w, m = vllm_is_correction(lo, zero, mask, mode="token_mask", clip_min=0.5, clip_max=3.0)
    assert w[0, :3].tolist() == [0.0, 1.0, 0.0] and m[0].tolist() == [True, False, True, False]
    w, m = vllm_is_correction(lo, zero, mask, mode="token_truncate", clip_min=0.5, clip_max=3.0)
    assert w[0, :3].tolist() == pytest.approx([0.5, 1.0, 3.0]) and not m.any()
    w, m = vllm_is_correction(lo, zero, mask, mode="sequence_truncate", clip_min=None, clip_max=3.0)
    assert w[0, :3].tolist() == pytest.approx([1.0, 1.0, 1.0])  # 0.25 * 1 * 4 (the padding's 2 is left out)
    w, m = vllm_is_correction(lo, zero - 1.0, mask, mode="sequence_mask", clip_min=None, clip_max=3.0)
    assert m[0].tolist() == [True, True, True, False] and w[0, :3].tolist() == [0.0, 0.0, 0.0]  # e^3 > 3
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode: expected one of"):
        vllm_is_correction(lo, zero, mask, mode="token", clip_min=None, clip_max=None)
