"""Import NeMo-RL's GRPO training logs (``train_data_step{N}.jsonl``) into a cppo-diag run.

Upstream (NVIDIA-NeMo/RL): ``nemo_rl/algorithms/grpo.py`` builds ``log_data`` after each step and calls
``logger.log_batched_dict_as_jsonl(log_data, f"train_data_step{N}.jsonl")``; ``nemo_rl/utils/logger.py``
writes one JSON object per sample from ``make_microbatch_iterator(1)``, so every field is a length-1 list
(per-token fields a list holding one padded row) plus an ``idx``. Fields used (recent releases):

=========================  ====================================================================================
``token_ids``              prompt + response ids, padded to the batch width (``input_ids``)
``input_lengths``          unpadded length of the sample
``token_loss_mask``        1 on generated tokens the loss uses (``token_mask``)
``sample_loss_mask``       0 for samples dropped from the loss (e.g. filtered), else 1
``generation_logprobs``    the generation backend's log-probs (mu, vLLM)
``prev_logprobs``          the policy's log-probs computed before the update (pi_old; ClippedPGLossFn's anchor)
``advantages``             per token
``rewards``, ``content``   per sample reward and the message text
=========================  ====================================================================================

Alignment: NeMo-RL's ``get_logprobs`` prepends a 0 ("Prepend 0 logprob for first token to maintain same
sequence length as input", ``nemo_rl/models/policy/*_policy_worker.py``) and the loss slices ``[:, 1:]`` of
logprobs, token mask and advantages together, so index ``i`` of every per-token list belongs to token ``i``.
The response is the span of ``token_loss_mask``; tokens outside the mask (tool/environment turns inside a
multi-turn response) are not written and, as everywhere in the run format, ``pos`` counts trained tokens.
Step ``N`` of the file name becomes ``step`` as is (recent releases name
the file after ``total_steps + 1``, i.e. 1-based).

Which policy is which: the log has no loss-time log-probs, so ``logp`` = ``logp_old`` = ``prev_logprobs``
(pi_old) and ``logp_rollout`` = ``generation_logprobs`` (mu): the run measures the train/inference mismatch
that NeMo-RL's importance-sampling correction acts on. Samples with ``sample_loss_mask == 0`` are skipped.
Older releases log only ``content``/``rewards``/``generation_logprobs``/``prev_logprobs``/``input_lengths``:
without ``token_loss_mask`` and ``advantages`` those files are refused with an error naming the field.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from cppo_diag.importers.common import (
    ImportedSequence,
    ImportFormatError,
    RunWriter,
    as_float_array,
    as_int_array,
    iter_files,
)

PATTERNS = ("train_data_step*.jsonl",)
REQUIRED = ("token_loss_mask", "generation_logprobs", "prev_logprobs", "advantages")
_STEP = re.compile(r"train_data_step(\d+)\.jsonl$")


def _unwrap(value, per_token: bool):
    """NeMo writes batch-size-1 slices: [x] for per-sample fields, [[...]] for per-token ones."""
    if per_token:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], list):
            return value[0]
        return value
    if isinstance(value, list) and len(value) == 1:
        return value[0]
    return value


def _text(content):
    content = _unwrap(content, per_token=False) if isinstance(content, list) and len(content) == 1 else content
    if content is None:
        return None, None
    if isinstance(content, str):
        return None, content
    if isinstance(content, list) and content:
        parts = [c if isinstance(c, str) else json.dumps(c) for c in content]
        return "\n".join(parts[:-1]) or None, parts[-1]
    return None, json.dumps(content)


def convert_line(row: dict, where: str, *, group_size: int | None, index: int) -> ImportedSequence | None:
    missing = [k for k in REQUIRED if k not in row]
    if missing:
        raise ImportFormatError(
            f"{where}: missing field(s) {missing} (found {sorted(row)}); per-token import needs a NeMo-RL release "
            "that logs token_loss_mask and advantages in train_data_step*.jsonl"
        )
    mask = as_int_array("token_loss_mask", _unwrap(row["token_loss_mask"], True), where) > 0
    width = mask.shape[0]
    length = int(_unwrap(row.get("input_lengths", width), False) or width)
    fields = {}
    for key in ("generation_logprobs", "prev_logprobs", "advantages"):
        arr = as_float_array(key, _unwrap(row[key], True), where)
        if arr.shape[0] < min(width, length):
            raise ImportFormatError(
                f"{where}: field '{key}': expected {min(width, length)} values, found {arr.shape[0]}"
            )
        fields[key] = arr
    mask = mask[:length]
    sample_mask = row.get("sample_loss_mask")
    if sample_mask is not None and float(_unwrap(sample_mask, False)) == 0.0:
        return None
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return None
    start, stop = int(idx[0]), int(idx[-1]) + 1  # response span (holes stay invalid)
    ids = None
    if "token_ids" in row:
        ids = as_int_array("token_ids", _unwrap(row["token_ids"], True), where)[start:stop]
    reward = row.get("rewards")
    prompt, completion = _text(row.get("content"))
    old = fields["prev_logprobs"][start:stop]
    return ImportedSequence(
        valid=mask[start:stop], logp=old, logp_rollout=fields["generation_logprobs"][start:stop],
        advantage=fields["advantages"][start:stop], logp_old=old, token_ids=ids,
        reward=float(_unwrap(reward, False)) if reward is not None else None,
        group_id=(index // group_size) if group_size else None, prompt=prompt, completion=completion,
    )


def import_nemo_rl(src, dst, *, name=None, group_size=None, model=None, task=None, overwrite=False, progress=True):
    """Convert NeMo-RL ``train_data_step*.jsonl`` logs under ``src`` into a run at ``dst``/``name``."""
    files = iter_files(Path(src), PATTERNS)
    if not files:
        raise ImportFormatError(f"{src}: no NeMo-RL train_data_step*.jsonl files found")
    from tqdm import tqdm

    config = {
        "source": str(src), "source_format": "NeMo-RL train_data_step{N}.jsonl (log_batched_dict_as_jsonl)",
        "logp_source": "NeMo-RL prev_logprobs (policy log-probs before the update, pi_old)",
        "logp_rollout_source": "NeMo-RL generation_logprobs (generation backend, e.g. vLLM)",
        "keys": "step = N of train_data_step{N}.jsonl; seq_id = line index (idx) in the file",
        "group_size": group_size,
    }
    with RunWriter(dst, name=name, trainer="nemo-rl", config=config, anchor="rollout", model=model, task=task,
                   overwrite=overwrite) as writer:
        for path in tqdm(files, desc="NeMo-RL logs", unit="file", disable=not progress):
            m = _STEP.search(path.name)
            if m is None:
                raise ImportFormatError(f"{path}: file name does not match train_data_step<N>.jsonl")
            step = int(m.group(1))
            seqs, ids = [], []
            with open(path, encoding="utf-8") as fh:
                for lineno, line in enumerate(fh):
                    if not line.strip():
                        continue
                    where = f"{path}:{lineno + 1}"
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise ImportFormatError(f"{where}: not valid JSON ({exc})") from None
                    index = int(row.get("idx", lineno))
                    seq = convert_line(row, where, group_size=group_size, index=index)
                    if seq is None:
                        writer.stats.skipped_sequences += 1
                        continue
                    seqs.append(seq)
                    ids.append(index)
            _write_with_ids(writer, step, seqs, ids)
            writer.end_step(step, 0)
            writer.stats.files += 1
    return writer.run_dir, writer.stats


def _write_with_ids(writer: RunWriter, step: int, seqs, ids) -> None:
    """Keep the file's sample index as seq_id (runs of consecutive ids are written as one batch each)."""
    start = 0
    while start < len(seqs):
        end = start + 1
        while end < len(seqs) and ids[end] == ids[end - 1] + 1:
            end += 1
        writer.write(step=step, rank=0, update=0, sequences=seqs[start:end], seq_id_offset=ids[start])
        start = end
