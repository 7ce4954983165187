"""Import prime-rl's filesystem-transport batches into a cppo-diag run.

Upstream (PrimeIntellect-ai/prime-rl): with the filesystem transport (``src/prime_rl/transport/filesystem.py``)
the orchestrator writes ``{output_dir}/rollouts/step_{n}/rollouts.bin`` (one ``TrainingBatch``) and the packer
writes ``{output_dir}/rollouts/step_{n}/rank_{r}.bin`` (the ``list[MicroBatch]`` for data rank ``r``), both
msgpack-encoded with ``msgspec``. The structs (``src/prime_rl/transport/types.py``) are ``array_like=True``,
so each is a msgpack array in field order:

* ``TrainingBatch = [examples, temperature, seq_len, step]`` with
  ``TrainingExample = [prompt_ids, prompt_mask, completion_ids, completion_mask, completion_logprobs, advantage]``
* ``MicroBatch = [input_ids, loss_mask, advantages, inference_logprobs, position_ids]``: several samples
  packed into one row; ``position_ids`` restart at 0 where a sample starts.

Both layouts are read (a msgpack map with those field names is accepted too). Alignment: in a micro-batch
every list has one entry per ``input_ids`` token and index ``i`` belongs to token ``i`` (prompt positions carry
logprob 0 and ``loss_mask`` False; the trainer shifts logits, ids, mask and logprobs together). Samples are
cut where ``position_ids`` returns to 0; trailing padding (``loss_mask`` False everywhere) is dropped.

Which policy is which: prime-rl ships only the inference engine's log-probs (``inference_logprobs`` /
``completion_logprobs`` = mu) to the trainer; the trainer's own log-probs exist only inside its loss and are
not written. ``logp_rollout`` is therefore mu and ``logp`` is a copy of it, flagged in ``meta.json``
(``config.logp_source``): such a run supports position/advantage/length analyses and offline rules whose
inputs are mu only, not divergence measurements. When both ``rank_*.bin`` and ``rollouts.bin`` exist for a
step, the micro-batches are used (they are what the trainer consumed).

The prime-rl format changes often (later releases add per-token temperatures, rewards, loss channels and
routed experts to ``MicroBatch``); layouts this module does not recognise are refused with an error naming
the file and the struct arity found.
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
    natural_key,
)

MICRO_FIELDS = ("input_ids", "loss_mask", "advantages", "inference_logprobs", "position_ids")
EXAMPLE_FIELDS = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "completion_logprobs", "advantage")
BATCH_FIELDS = ("examples", "temperature", "seq_len", "step")
_STEP_DIR = re.compile(r"step_(\d+)$")
_RANK_FILE = re.compile(r"rank_(\d+)\.bin$")


def _decode(path: Path):
    try:
        import msgspec
    except ImportError as exc:  # pragma: no cover
        raise ImportError("the prime-rl importer needs msgspec (pip install msgspec)") from exc
    try:
        return msgspec.msgpack.decode(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - name the file
        raise ImportFormatError(f"{path}: not a msgpack file ({exc!r})") from None


def _fields(obj, names: tuple[str, ...], what: str, where: str, required: int) -> dict:
    """An array_like struct (list in field order, optional trailing fields omitted) or a map -> dict."""
    if isinstance(obj, dict):
        missing = [n for n in names[:required] if n not in obj]
        if missing:
            raise ImportFormatError(f"{where}: {what}: missing field(s) {missing}; found {sorted(obj)}")
        return {n: obj.get(n) for n in names}
    if isinstance(obj, (list, tuple)):
        if not (required <= len(obj) <= len(names)):
            raise ImportFormatError(
                f"{where}: {what}: expected an array of {required}..{len(names)} fields {list(names)}, found "
                f"{len(obj)} fields (a prime-rl release whose struct layout this importer does not know)"
            )
        return {n: (obj[i] if i < len(obj) else None) for i, n in enumerate(names)}
    raise ImportFormatError(f"{where}: {what}: expected a msgpack array or map, found {type(obj).__name__}")


def split_packed(position_ids: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) spans of the samples packed in one row: a sample starts where position_ids == 0."""
    starts = np.flatnonzero(position_ids == 0)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    ends = np.concatenate([starts[1:], [position_ids.shape[0]]])
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def micro_batch_sequences(obj, where: str) -> list[ImportedSequence]:
    mb = _fields(obj, MICRO_FIELDS, "MicroBatch", where, required=4)
    ids = as_int_array("input_ids", mb["input_ids"], where)
    n = ids.shape[0]
    loss_mask = as_int_array("loss_mask", mb["loss_mask"], where) > 0
    adv = as_float_array("advantages", mb["advantages"], where)
    mu = as_float_array("inference_logprobs", mb["inference_logprobs"], where)
    for name, arr in (("loss_mask", loss_mask), ("advantages", adv), ("inference_logprobs", mu)):
        check_length(name, arr, n, where)
    if mb["position_ids"] is None:
        spans = [(0, n)]
    else:
        pos = as_int_array("position_ids", mb["position_ids"], where)
        check_length("position_ids", pos, n, where)
        spans = split_packed(pos)
    out = []
    for s, e in spans:
        idx = np.flatnonzero(loss_mask[s:e])
        if idx.size == 0:  # prompt-only or padding span
            continue
        a, b = s + int(idx[0]), s + int(idx[-1]) + 1  # the response span of this sample
        out.append(ImportedSequence(valid=loss_mask[a:b], logp=mu[a:b], logp_rollout=mu[a:b],
                                    advantage=adv[a:b], token_ids=ids[a:b]))
    return out


def training_batch_sequences(obj, where: str) -> tuple[int | None, list[ImportedSequence]]:
    batch = _fields(obj, BATCH_FIELDS, "TrainingBatch", where, required=1)
    examples = batch["examples"]
    if not isinstance(examples, list):
        raise ImportFormatError(f"{where}: TrainingBatch.examples: expected a list, found {type(examples).__name__}")
    out = []
    for i, ex in enumerate(examples):
        w = f"{where} example {i}"
        f = _fields(ex, EXAMPLE_FIELDS, "TrainingExample", w, required=5)
        ids = as_int_array("completion_ids", f["completion_ids"], w)
        n = ids.shape[0]
        mask = as_int_array("completion_mask", f["completion_mask"], w) > 0
        mu = as_float_array("completion_logprobs", f["completion_logprobs"], w)
        check_length("completion_mask", mask, n, w)
        check_length("completion_logprobs", mu, n, w)
        adv = float(f["advantage"]) if f["advantage"] is not None else 0.0
        out.append(ImportedSequence(valid=mask, logp=mu, logp_rollout=mu, advantage=adv, token_ids=ids))
    step = batch["step"]
    return (int(step) if step is not None else None), out


def _step_of(path: Path) -> int:
    for part in (path.parent.name, path.name):
        m = _STEP_DIR.search(part)
        if m:
            return int(m.group(1))
    raise ImportFormatError(f"{path}: expected it inside a step_<n> directory (prime-rl's rollouts/step_<n>/)")


def import_prime_rl(src, dst, *, name=None, group_size=None, model=None, task=None, overwrite=False, progress=True):
    """Convert prime-rl ``rollouts/step_*/rank_*.bin`` (or ``rollouts.bin``) under ``src`` into a run."""
    files = iter_files(Path(src), ("rank_*.bin", "rollouts.bin", "train_rollouts.bin"))
    if not files:
        raise ImportFormatError(f"{src}: no prime-rl rollouts/step_<n>/rank_<r>.bin or rollouts.bin files found")
    by_step: dict[int, dict[str, list[Path]]] = {}
    for path in files:
        kind = "micro" if _RANK_FILE.search(path.name) else "batch"
        by_step.setdefault(_step_of(path), {}).setdefault(kind, []).append(path)
    from tqdm import tqdm

    config = {
        "source": str(src),
        "source_format": "prime-rl filesystem transport: rollouts/step_<n>/rank_<r>.bin (list[MicroBatch]) or "
                         "rollouts.bin (TrainingBatch), msgspec msgpack array_like",
        "logp_source": "none: prime-rl writes no trainer log-probs; logp is a copy of inference_logprobs",
        "logp_rollout_source": "prime-rl inference_logprobs / completion_logprobs (inference engine)",
        "keys": "step = n of step_<n>; rank = r of rank_<r>.bin; update = micro-batch index; "
                "seq_id = running sample index within (step, rank)",
        "group_size": group_size,
    }
    with RunWriter(dst, name=name, trainer="prime-rl", config=config, anchor="rollout", model=model, task=task,
                   overwrite=overwrite) as writer:
        for step in tqdm(sorted(by_step), desc="prime-rl steps", unit="step", disable=not progress):
            kinds = by_step[step]
            if "micro" in kinds:
                for path in sorted(kinds["micro"], key=natural_key):
                    rank = int(_RANK_FILE.search(path.name).group(1))
                    micro_batches = _decode(path)
                    if not isinstance(micro_batches, list):
                        raise ImportFormatError(f"{path}: expected a msgpack array of MicroBatch, found "
                                                f"{type(micro_batches).__name__}")
                    offset = 0
                    for update, mb in enumerate(micro_batches):
                        seqs = micro_batch_sequences(mb, f"{path} micro-batch {update}")
                        if group_size:
                            for j, s in enumerate(seqs):
                                s.group_id = (offset + j) // group_size
                        writer.write(step=step, rank=rank, update=update, sequences=seqs, seq_id_offset=offset)
                        offset += len(seqs)
                    writer.end_step(step, rank)
                    writer.stats.files += 1
            else:
                path = kinds["batch"][0]
                declared, seqs = training_batch_sequences(_decode(path), str(path))
                if declared is not None and declared != step:
                    writer.stats.notes.append(f"{path}: TrainingBatch.step={declared} differs from directory step "
                                              f"{step}; the directory's is used")
                if group_size:
                    for j, s in enumerate(seqs):
                        s.group_id = j // group_size
                writer.write(step=step, rank=0, update=0, sequences=seqs)
                writer.end_step(step, 0)
                writer.stats.files += 1
        writer.stats.notes.append("prime-rl dumps hold no trainer log-probs: logp = logp_rollout in this run")
    return writer.run_dir, writer.stats
