"""Import prime-rl's per-token export (trainer log-probs included) or its filesystem-transport batches.

**Token export** (preferred; upstream ``src/prime_rl/trainer/rl/token_export.py``, added by PR #2592, read at
revisions d2f82fa and 004274ec): with the trainer's token export on (``enable_token_export``, first
``experimental.token_export``) every trainer rank writes ``{output_dir}/token_exports/step_<n>/rank_<r>.jsonl``
(multi-run: ``{run_id}/token_exports/...``), one JSON object per packed sample with ``schema_version`` 1,
``step``, ``rank``, ``micro_step``, ``export_sequence_idx`` and per-token lists ``token_ids``,
``position_ids``, ``loss_mask``, ``advantages``, ``inference_logprobs``, ``trainer_logprobs``, ``entropy``,
``is_masked`` / ``is_masked_high`` / ``is_masked_low`` (+ ``rewards``, ``mismatch_kl``, importance ratios,
``prob_delta``; later revisions add ``export_step``, ``run_id`` and per-token loss channels ``losses``, and
touch ``STABLE`` in a step directory once every rank has flushed it). Index i of every list is token i (the
trainer shifts its log-probs and entropy right by one; prompt positions have ``loss_mask`` False);
non-finite floats are null. Mapping: ``logp`` = ``trainer_logprobs`` (pi at loss time), ``logp_rollout`` =
``inference_logprobs`` (mu), valid tokens = the ``rl`` channel's mask in ``losses`` when present (tokens
trained only by another loss such as CE are not RL tokens), else ``loss_mask``; ``keep_applied`` = not
``is_masked`` (prime-rl's default loss masks a token when ``exp(pi) - exp(mu)`` exceeds ``dppo_mask_high``
with A > 0 or falls below ``-dppo_mask_low`` otherwise: our ``dppo`` rule with ``divergence='binary_tv'``),
``reason_applied`` = 1 (token) where masked; ``entropy``; ``reward`` when a sample's ``rewards`` agree.
``step`` = n of ``step_<n>``, ``rank`` = r of ``rank_<r>.jsonl``, ``update`` = the record's micro-step (its
index among the file's (step, micro_step) pairs), ``seq_id`` = ``export_sequence_idx``. Samples without an
RL loss (no ``rl`` channel, ``training_mode`` "sft") or with a null value on a trained token are skipped and
counted; where the export uses ``STABLE`` markers, step directories without one are still being written and
are skipped.

**Filesystem transport** (older dumps, no trainer log-probs): upstream (PrimeIntellect-ai/prime-rl): with the filesystem transport (``src/prime_rl/transport/filesystem.py``)
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

Which policy is which (transport files): prime-rl ships only the inference engine's log-probs (``inference_logprobs`` /
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

from cppo_diag.masks.logratio import prob_diff
from cppo_diag.masks.reasons import Reason
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

EXPORT_SCHEMA_VERSION = 1
PRIME_DPPO_DEFAULTS = {"delta_low": 0.2, "delta_high": 0.2}  # prime-rl DefaultLossConfig.dppo_mask_low / _high
EXPORT_REQUIRED = ("token_ids", "loss_mask", "inference_logprobs", "trainer_logprobs")
_EXPORT_FILE = re.compile(r"rank_(\d+)\.jsonl$")
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
    """Convert prime-rl's ``token_exports/step_*/rank_*.jsonl`` under ``src`` into a run; without them, its
    ``rollouts/step_*/rank_*.bin`` (or ``rollouts.bin``)."""
    exports = [p for p in iter_files(Path(src), ("rank_*.jsonl",)) if _STEP_DIR.search(p.parent.name)]
    if exports:
        return import_token_export(exports, src, dst, name=name, group_size=group_size, model=model, task=task,
                                   overwrite=overwrite, progress=progress)
    files = iter_files(Path(src), ("rank_*.bin", "rollouts.bin", "train_rollouts.bin"))
    if not files:
        raise ImportFormatError(f"{src}: no prime-rl token_exports/step_<n>/rank_<r>.jsonl, "
                                "rollouts/step_<n>/rank_<r>.bin or rollouts.bin files found")
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


# -- token export ------------------------------------------------------------------------------------------------
def _floats(name: str, values, where: str) -> np.ndarray:
    """A per-token float list whose nulls (the exporter's non-finite values) become NaN."""
    if not isinstance(values, list):
        raise ImportFormatError(f"{where}: field '{name}': expected a list of numbers, found {type(values).__name__}")
    return as_float_array(name, [np.nan if v is None else v for v in values], where)


def _flags(name: str, values, n: int, where: str) -> np.ndarray | None:
    """A per-token bool list, or None when the exporter wrote nulls (the field does not apply)."""
    if values is None or all(v is None for v in values):
        return None
    if any(v is None for v in values):
        raise ImportFormatError(f"{where}: field '{name}': expected booleans or all null, found a mix")
    arr = np.asarray(values, dtype=bool)
    check_length(name, arr, n, where)
    return arr


def _rl_mask(rec: dict, loss_mask: np.ndarray, n: int, where: str) -> np.ndarray | None:
    """The tokens trained by the RL loss: the ``rl`` channel of ``losses`` when the record has channels (None:
    no RL channel), else ``loss_mask`` (None for an ``sft`` micro-batch of the first export revision)."""
    losses = rec.get("losses")
    if losses is None:
        return None if rec.get("training_mode") == "sft" else loss_mask
    if not isinstance(losses, list) or len(losses) != n:
        raise ImportFormatError(f"{where}: field 'losses': expected {n} per-token channel maps, found "
                                f"{len(losses) if isinstance(losses, list) else type(losses).__name__}")
    if not any("rl" in ch for ch in losses):
        return None
    return np.asarray([bool(ch.get("rl", {}).get("mask", False)) for ch in losses], dtype=bool)


def token_export_sequences(rec: dict, where: str, counts: dict) -> list[ImportedSequence]:
    """One token-export record -> its sample's response (first to last RL token); [] when it has none."""
    if not isinstance(rec, dict):
        raise ImportFormatError(f"{where}: expected a JSON object, found {type(rec).__name__}")
    version = rec.get("schema_version")
    if version != EXPORT_SCHEMA_VERSION:
        raise ImportFormatError(f"{where}: schema_version: expected {EXPORT_SCHEMA_VERSION} (the prime-rl token "
                                f"export this importer reads), found {version!r}")
    missing = [f for f in EXPORT_REQUIRED if f not in rec]
    if missing:
        raise ImportFormatError(f"{where}: missing field(s) {missing}; found {sorted(rec)}")
    ids = as_int_array("token_ids", rec["token_ids"], where)
    n = ids.shape[0]
    loss_mask = _flags("loss_mask", rec["loss_mask"], n, where)
    if loss_mask is None:
        raise ImportFormatError(f"{where}: field 'loss_mask': expected {n} booleans, found nulls")
    if rec.get("position_ids") is not None:
        pos = as_int_array("position_ids", rec["position_ids"], where)
        check_length("position_ids", pos, n, where)
        if len(split_packed(pos)) > 1:
            raise ImportFormatError(f"{where}: field 'position_ids' restarts at 0 inside the record: expected one "
                                    "sample per record (prime-rl splits micro-batches by sequence_lengths)")
    valid = _rl_mask(rec, loss_mask, n, where)
    if valid is None or not valid.any():
        counts["no_rl"] += 1
        return []
    cols = {}
    for name in ("trainer_logprobs", "inference_logprobs", "advantages", "entropy"):
        if rec.get(name) is not None:
            cols[name] = _floats(name, rec[name], where)
            check_length(name, cols[name], n, where)
    if "advantages" not in cols:
        raise ImportFormatError(f"{where}: missing field 'advantages' for a sample trained by the RL loss")
    idx = np.flatnonzero(valid)
    a, b = int(idx[0]), int(idx[-1]) + 1  # the response span
    if any(np.isnan(cols[k][a:b][valid[a:b]]).any() for k in ("trainer_logprobs", "inference_logprobs", "advantages")):
        counts["null_values"] += 1
        return []
    entropy = cols.get("entropy")
    entropy = entropy[a:b] if entropy is not None and not np.isnan(entropy[a:b][valid[a:b]]).any() else None
    masked = _flags("is_masked", rec.get("is_masked"), n, where)
    if masked is not None:  # does prime-rl's mask match its default thresholds? (they are not in the export)
        v = valid[a:b]
        delta = prob_diff(cols["trainer_logprobs"][a:b], cols["inference_logprobs"][a:b])  # pi - mu
        default = np.where(cols["advantages"][a:b] > 0, delta > PRIME_DPPO_DEFAULTS["delta_high"],
                           delta < -PRIME_DPPO_DEFAULTS["delta_low"])
        counts["mask_checked"] += int(v.sum())
        counts["mask_differs"] += int((default != masked[a:b])[v].sum())
    reward = None
    if rec.get("rewards") is not None:
        r = _floats("rewards", rec["rewards"], where)[a:b][valid[a:b]]
        if r.size and not np.isnan(r).any() and np.all(r == r[0]):
            reward = float(r[0])
    seq_id = rec.get("export_sequence_idx")
    return [ImportedSequence(
        valid=valid[a:b], logp=cols["trainer_logprobs"][a:b], logp_rollout=cols["inference_logprobs"][a:b],
        advantage=np.nan_to_num(cols["advantages"][a:b]), token_ids=ids[a:b], entropy=entropy,
        keep_applied=None if masked is None else ~masked[a:b],
        reason_applied=None if masked is None else np.where(masked[a:b], Reason.TOKEN, Reason.KEPT).astype(np.uint8),
        reward=reward, seq_id=None if seq_id is None else int(seq_id),
    )]


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    import json

    out = []
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{i}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ImportFormatError(f"{path}:{i}: not a JSON line ({exc})") from None
    return out


def import_token_export(files: list[Path], src, dst, *, name=None, group_size=None, model=None, task=None,
                        overwrite=False, progress=True):
    """Convert prime-rl ``token_exports/step_<n>/rank_<r>.jsonl`` files into a run (see the module docstring)."""
    from tqdm import tqdm

    by_step: dict[int, list[Path]] = {}
    for path in files:
        if not _EXPORT_FILE.search(path.name):
            continue
        by_step.setdefault(int(_STEP_DIR.search(path.parent.name).group(1)), []).append(path)
    notes = []
    if any((p.parent / "STABLE").exists() for paths in by_step.values() for p in paths):
        unstable = sorted(s for s, paths in by_step.items() if not (paths[0].parent / "STABLE").exists())
        for s in unstable:
            del by_step[s]
        if unstable:
            notes.append(f"step(s) {unstable} have no STABLE marker (prime-rl was still writing them): skipped")
    if not by_step:
        raise ImportFormatError(f"{src}: no prime-rl token export files token_exports/step_<n>/rank_<r>.jsonl")
    legacy = [p for p in iter_files(Path(src), ("rank_*.bin", "rollouts.bin"))
              if p.suffix == ".bin" and _STEP_DIR.search(p.parent.name)]
    if legacy:
        notes.append(f"{len(legacy)} rollouts/ transport file(s) ignored: the token export holds the same samples "
                     "with the trainer's log-probs")
    first = _read_jsonl(sorted(by_step[min(by_step)], key=natural_key)[0])
    has_mask = any(r.get("is_masked") is not None and any(v is not None for v in r["is_masked"]) for _, r in first)
    config = {
        "source": str(src),
        "source_format": "prime-rl token export: token_exports/step_<n>/rank_<r>.jsonl, one JSON object per "
                         f"sample, schema_version {EXPORT_SCHEMA_VERSION} (src/prime_rl/trainer/rl/token_export.py)",
        "logp_source": "prime-rl trainer_logprobs (the trainer's log-probs at loss time, pi)",
        "logp_rollout_source": "prime-rl inference_logprobs (inference engine, mu)",
        "keep_applied_source": "not is_masked: prime-rl's default-loss token mask (exp(pi) - exp(mu) > "
                               "dppo_mask_high with A > 0, < -dppo_mask_low otherwise) = rule dppo, binary_tv; "
                               "the thresholds are not in the export: rule_params hold prime-rl's defaults "
                               "(0.2 / 0.2), see the import notes for whether the mask matches them" if has_mask
                               else "none: the export's is_masked is null (a loss other than prime-rl's default)",
        "valid_source": "the rl channel's mask in losses when present, else loss_mask",
        "keys": "step = n of step_<n>; rank = r of rank_<r>.jsonl; update = micro_step (index of the (step, "
                "micro_step) pair in the file); seq_id = export_sequence_idx",
        "group_size": group_size,
    }
    counts = {"no_rl": 0, "null_values": 0, "mask_checked": 0, "mask_differs": 0}
    run_ids: set = set()
    with RunWriter(dst, name=name, trainer="prime-rl", config=config, anchor="rollout", model=model, task=task,
                   overwrite=overwrite, rule="dppo" if has_mask else None,
                   rule_params={"divergence": "binary_tv", **PRIME_DPPO_DEFAULTS} if has_mask else None) as writer:
        for step in tqdm(sorted(by_step), desc="prime-rl token export", unit="step", disable=not progress):
            for path in sorted(by_step[step], key=natural_key):
                rank = int(_EXPORT_FILE.search(path.name).group(1))
                batches: dict[tuple, list[ImportedSequence]] = {}
                for where, rec in _read_jsonl(path):
                    run_ids.add(rec.get("run_id"))
                    declared = rec.get("export_step", rec.get("step"))
                    if declared is not None and declared != step:
                        notes.append(f"{where}: export step {declared} differs from directory step {step}; "
                                     "the directory's is used")
                    key = (rec.get("step"), rec.get("micro_step", 0))
                    batches.setdefault(key, []).extend(token_export_sequences(rec, where, counts))
                for update, seqs in enumerate(batches.values()):
                    if group_size:
                        for s in seqs:
                            s.group_id = None if s.seq_id is None else s.seq_id // group_size
                    writer.write(step=step, rank=rank, update=update, sequences=seqs)
                writer.end_step(step, rank)
                writer.stats.files += 1
        run_ids.discard(None)
        if len(run_ids) > 1:
            raise ImportFormatError(f"{src}: token exports of several prime-rl runs {sorted(run_ids)}; point SRC "
                                    "at one run's directory")
        writer.stats.skipped_sequences += counts["no_rl"] + counts["null_values"]
        if counts["no_rl"]:
            notes.append(f"{counts['no_rl']} sample(s) without an RL loss (CE/SFT only) skipped")
        if counts["null_values"]:
            notes.append(f"{counts['null_values']} sample(s) with a null log-prob or advantage on a trained token "
                         "skipped")
        if counts["mask_differs"]:
            notes.append(f"prime-rl's is_masked differs from dppo_mask_low/high = 0.2/0.2 (its defaults) on "
                         f"{counts['mask_differs']} of {counts['mask_checked']} trained tokens: this run set other "
                         "thresholds; pass them to `cppo-diag recompute` (rule dppo, divergence binary_tv)")
        elif counts["mask_checked"]:
            notes.append(f"prime-rl's is_masked matches its default thresholds 0.2/0.2 on all "
                         f"{counts['mask_checked']} trained tokens")
        writer.stats.notes.extend(notes)
    return writer.run_dir, writer.stats
