"""Checkpoints as safetensors + JSON (no pickle, so loading never runs arbitrary code).

Layout inside the run directory::

    checkpoints/step=000009/model.safetensors   the policy's weights (shared tensors handled)
                            optim.safetensors   AdamW state tensors, keys "state.<param index>.<name>"
                            state.json          step, optimiser param groups and scalar state, lr scheduler,
                                                summary values, the resolved config
                            queue.rank<r>.safetensors   with rollout.staleness > 0: the rollout batches of
                                                rank r already sampled for later iterations (state.json
                                                -> "queue" lists them with the policy version that sampled them)

A checkpoint is written to a temporary directory and renamed into place, so a kill mid-write never leaves a
half checkpoint that resume would pick up. All randomness in the trainer derives from (seed, step, rank), so
weights + optimiser + scheduler + step (+ the queued batches of an off-policy run) are the whole state
needed for an exact resume.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

CKPT_DIR = "checkpoints"
_NAME = re.compile(r"^step=(\d+)$")


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    d = Path(run_dir) / CKPT_DIR
    if not d.exists():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and (p / "state.json").exists()]
    return sorted(found)


def queue_file(rank: int) -> str:
    return f"queue.rank{rank}.safetensors"


def save_checkpoint(run_dir: str | Path, step: int, module: torch.nn.Module, optimizer, scheduler, *,
                    extra: dict | None = None, keep: int = 1, queue: dict[str, torch.Tensor] | None = None,
                    move_in: list[Path] | None = None) -> Path:
    """``queue`` (this rank's queued batches) go to ``queue.rank0.safetensors``; ``move_in`` are files other
    ranks wrote beforehand (moved into the checkpoint before it is renamed into place, so it appears whole)."""
    from safetensors.torch import save_file, save_model

    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step={step:06d}"
    tmp = root / f".tmp-step={step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_model(module, str(tmp / "model.safetensors"))
    osd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in osd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"state.{idx}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{k}"] = v
    save_file(tensors, str(tmp / "optim.safetensors"))
    state = {"step": step, "optimizer": {"param_groups": osd["param_groups"], "scalars": scalars},
             "scheduler": scheduler.state_dict() if scheduler is not None else None, **(extra or {})}
    if queue is not None:
        save_file({k: v.detach().cpu().contiguous() for k, v in queue.items()}, str(tmp / queue_file(0)))
    for f in move_in or []:
        os.replace(f, tmp / Path(f).name)
    (tmp / "state.json").write_text(json.dumps(state, indent=1, default=str))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for _, old in list_checkpoints(run_dir)[: -keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path, module: torch.nn.Module, optimizer=None, scheduler=None) -> dict:
    """Load weights (and optimiser / scheduler state when given) in place; returns state.json."""
    from safetensors.torch import load_file, load_model

    p = Path(path)
    state = json.loads((p / "state.json").read_text())
    missing, unexpected = load_model(module, str(p / "model.safetensors"), strict=False)
    if unexpected or missing:
        raise ValueError(f"checkpoint {p}: weights do not match the model (missing {list(missing)[:5]}, unexpected {list(unexpected)[:5]})")
    if optimizer is not None:
        device = next(module.parameters()).device
        tensors = load_file(str(p / "optim.safetensors"), device=str(device))
        osd_state: dict[int, dict] = {}
        for key, v in tensors.items():
            _, idx, name = key.split(".", 2)
            osd_state.setdefault(int(idx), {})[name] = v
        for key, v in state["optimizer"]["scalars"].items():
            idx, name = key.split(".", 1)
            osd_state.setdefault(int(idx), {})[name] = v
        for st in osd_state.values():  # AdamW keeps 'step' on the CPU
            if "step" in st and torch.is_tensor(st["step"]):
                st["step"] = st["step"].cpu()
        optimizer.load_state_dict({"state": osd_state, "param_groups": state["optimizer"]["param_groups"]})
    if scheduler is not None and state.get("scheduler") is not None:
        scheduler.load_state_dict(state["scheduler"])
    return state


def load_queue(path: str | Path, rank: int, device) -> dict[str, torch.Tensor]:
    """The queued-batch tensors rank ``rank`` saved in checkpoint ``path`` (see ``queue_file``)."""
    from safetensors.torch import load_file

    f = Path(path) / queue_file(rank)
    if not f.exists():
        raise FileNotFoundError(f"checkpoint {path}: rollout.staleness > 0 but {f.name} (the queued batches) is missing")
    return load_file(str(f), device=str(device))


def drop_checkpoints(run_dir: str | Path) -> None:
    shutil.rmtree(Path(run_dir) / CKPT_DIR, ignore_errors=True)
