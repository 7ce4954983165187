"""Import slime's training dumps (``--save-debug-train-data``) into a cppo-diag run.

Upstream (THUDM/slime): ``slime/utils/train_dump_utils.py::save_debug_train_data`` writes, once per rollout
and per training rank, ``torch.save({"rollout_id", "rank", "rollout_data"}, path)`` with
``path = args.save_debug_train_data.format(rollout_id=..., rank=...)``. ``rollout_data`` is the actor's
per-sample dict after ``compute_advantages_and_returns`` and training
(``slime/backends/megatron_utils/actor.py``): lists with one entry per sample of

=====================  ===========================================================================
``tokens``             prompt + response token ids (length ``total_lengths[i]``)
``response_lengths``   number of response tokens
``loss_masks``         per response token, 1 = trained (0 e.g. on tool output in multi-turn samples)
``log_probs``          per response token: the actor's recomputed log-probs before the update (pi_old)
``rollout_log_probs``  per response token: the inference engine's log-probs (mu, SGLang)
``advantages``         per response token
``rewards``            per sample (``raw_reward`` when present is the unnormalised one)
=====================  ===========================================================================

Alignment: slime stores the response-only slices, so index ``i`` of every per-token list is response token
``i`` (``tokens[total_length - response_length + i]``); no shift is needed. With context parallelism the
dump holds the restored full response only in slime versions that gather CP shards before saving.

Which policy is which: the dump has no loss-time log-probs of the updated policy, so ``logp`` (pi) is set to
``log_probs`` (pi_old, equal to pi at the first optimiser step of the rollout) and ``logp_old`` too;
``logp_rollout`` is ``rollout_log_probs``. The run therefore measures the trainer/inference mismatch
|pi_old - mu| that slime's TIS/MIS corrections act on. When ``log_probs`` is absent (``--use-rollout-logprobs``
runs may skip the recompute) ``logp`` falls back to ``rollout_log_probs`` and ``meta.json`` says so.

Safety: dumps are loaded with ``torch.load(weights_only=True)`` (tensors, numbers, strings, lists, tuples, dicts),
so a crafted ``.pt`` cannot run code on import; a file holding other Python objects is refused with an
``ImportFormatError`` naming it.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from cppo_diag.importers.common import (
    ImportedSequence,
    ImportFormatError,
    RunWriter,
    as_float_array,
    as_int_array,
    check_length,
    iter_files,
)

PATTERNS = ("*.pt",)
REQUIRED = ("response_lengths", "rollout_log_probs", "advantages")


def _load(path: Path) -> dict:
    import torch

    import pickle

    # weights_only: tensors, numbers, strings, lists, tuples and dicts only; never an arbitrary pickled object,
    # whose unpickling could run code from the dump.
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()
        detail = next((ln.strip() for ln in first if "GLOBAL" in ln or "Unsupported" in ln), first[0] if first else "")
        raise ImportFormatError(
            f"{path}: refused: the file holds Python objects beyond tensors, numbers, strings, lists and dicts, "
            f"and cppo-diag never unpickles those (a safe weights-only load failed: {detail[:200]}). "
            "Re-save the dump with plain tensors/lists/dicts"
        ) from None
    except Exception as exc:  # noqa: BLE001 - name the file in the error
        raise ImportFormatError(f"{path}: cannot be read with torch.load ({type(exc).__name__}: "
                                f"{' '.join(str(exc).split())[:300]})") from None
    if not isinstance(obj, dict) or "rollout_data" not in obj:
        found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise ImportFormatError(f"{path}: expected slime's train dump dict with 'rollout_id', 'rank', "
                                f"'rollout_data'; found {found}")
    return obj


def _step_from(path: Path, obj: dict) -> int:
    if obj.get("rollout_id") is not None:
        return int(obj["rollout_id"])
    m = re.search(r"(\d+)", path.stem)
    if m is None:
        raise ImportFormatError(f"{path}: field 'rollout_id' missing and no number in the file name")
    return int(m.group(1))


def convert_file(path: Path, obj: dict, *, group_size: int | None):
    data = obj["rollout_data"]
    missing = [k for k in REQUIRED if k not in data]
    if missing:
        raise ImportFormatError(f"{path}: rollout_data: missing field(s) {missing}; found {sorted(data)}")
    n = len(data["response_lengths"])
    has_old = "log_probs" in data
    seqs = []
    for i in range(n):
        where = f"{path} sample {i}"
        length = int(data["response_lengths"][i])
        mu = as_float_array("rollout_log_probs", data["rollout_log_probs"][i], where)
        check_length("rollout_log_probs", mu, length, where)
        adv = as_float_array("advantages", data["advantages"][i], where)
        if adv.shape[0] == 1 and length != 1:
            adv = np.full(length, adv[0])
        check_length("advantages", adv, length, where)
        if "loss_masks" in data:
            valid = as_int_array("loss_masks", data["loss_masks"][i], where) > 0
            check_length("loss_masks", valid, length, where)
        else:
            valid = np.ones(length, dtype=bool)
        old = None
        if has_old:
            old = as_float_array("log_probs", data["log_probs"][i], where)
            check_length("log_probs", old, length, where)
        ids = None
        if "tokens" in data:
            tokens = as_int_array("tokens", data["tokens"][i], where)
            ids = tokens[tokens.shape[0] - length:] if length else tokens[:0]
        reward_src = data.get("raw_reward", data.get("rewards"))
        reward = float(reward_src[i]) if reward_src is not None else None
        group = None
        if "group_indices" in data:
            group = int(data["group_indices"][i])
        elif group_size:
            group = i // group_size
        seqs.append(ImportedSequence(
            valid=valid, logp=old if old is not None else mu, logp_rollout=mu, advantage=adv, logp_old=old,
            token_ids=ids, reward=reward, group_id=group,
        ))
    return seqs, has_old


def import_slime(src, dst, *, name=None, group_size=None, model=None, task=None, overwrite=False, progress=True):
    """Convert slime train dumps under ``src`` (a ``.pt`` file or a directory) into a run at ``dst``/``name``."""
    files = iter_files(Path(src), PATTERNS)
    if not files:
        raise ImportFormatError(f"{src}: no slime train dumps (*.pt from --save-debug-train-data) found")
    from tqdm import tqdm

    config = {
        "source": str(src), "source_format": "slime --save-debug-train-data (torch.save dict per rollout/rank)",
        "logp_source": "slime log_probs (actor-recomputed pi_old before the update); rollout_log_probs in dumps "
                       "without log_probs",
        "logp_rollout_source": "slime rollout_log_probs (SGLang sampler)",
        "keys": "step = rollout_id; rank = training rank of the dump; seq_id = sample index in the dump",
        "group_size": group_size,
    }
    any_without_old = False
    with RunWriter(dst, name=name, trainer="slime", config=config, anchor="rollout", model=model, task=task,
                   overwrite=overwrite) as writer:
        for path in tqdm(files, desc="slime dumps", unit="file", disable=not progress):
            obj = _load(path)
            step = _step_from(path, obj)
            rank = int(obj.get("rank") or 0)
            seqs, has_old = convert_file(path, obj, group_size=group_size)
            any_without_old |= not has_old
            writer.write(step=step, rank=rank, update=0, sequences=seqs)
            writer.end_step(step, rank)
            writer.stats.files += 1
        if any_without_old:
            writer.stats.notes.append("some dumps have no 'log_probs': logp copied from rollout_log_probs there")
    return writer.run_dir, writer.stats
