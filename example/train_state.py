"""A training run's state on disk, so that a stopped run resumes where it was: safetensors + JSON, no pickle.

Not run directly; example/training.py (the loop of train.py and of evaluate_lds.py's retrainings) uses it:

    save_training_state(path, model, optimizer, scheduler, progress, loss=...)   # progress: JSON (epoch, step...)
    saved = store.resume(path, "training", use)  # the engine reads it back (influence.Store.resume)...
    not_a_training_state(tensors, progress)      # ...where use() asks this: why it cannot be used, or None
    restore_training_state(saved, model, optimizer, scheduler)

It holds the weights and buffers, the optimiser's state and parameter groups, the schedule's state and the
global RNG states, so that the rest of the run is the one an uninterrupted run would have made (bit for bit on
the CPU). The file is `<checkpoint>.partial.safetensors`, the engine's name for a partial result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from influence import save_partial

__all__ = ["not_a_training_state", "restore_training_state", "save_training_state"]


def save_training_state(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    progress: dict[str, Any],
    **extra: torch.Tensor,
) -> None:
    """Write the state atomically; `progress` (JSON) says where the run is, `extra` are tensors to keep with it."""
    tensors = {f"model/{name}": value for name, value in model.state_dict().items()}
    saved = optimizer.state_dict()
    values: dict[str, dict[str, Any]] = {}  # the optimiser's per-parameter entries that are not tensors
    for index, entries in saved["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/{index}/{key}"] = value
            else:
                values.setdefault(str(index), {})[key] = value
    tensors["rng/cpu"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    tensors.update({f"extra/{name}": value for name, value in extra.items()})
    run = {
        "optimizer_groups": saved["param_groups"],
        "optimizer_values": values,
        "scheduler": scheduler.state_dict(),
    }
    save_partial(path, tensors, {**progress, "run": run}, folder="--checkpoint_dir")


def not_a_training_state(tensors: dict[str, torch.Tensor], progress: dict[str, Any]) -> str | None:
    """Why a partial result read back (tensors, progress) is not a training state, or None when it is one."""
    if not isinstance(progress.get("run"), dict) or not any(name.startswith("model/") for name in tensors):
        return "it is not a training state"
    return None


def restore_training_state(
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
) -> dict[str, torch.Tensor]:
    """Put a saved state into the run's model, optimiser, schedule and RNGs; returns the extra tensors."""
    tensors, progress = saved
    run = progress["run"]
    model.load_state_dict({name[6:]: t for name, t in tensors.items() if name.startswith("model/")}, strict=True)
    state: dict[int, dict[str, Any]] = {}
    for name, tensor in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            state.setdefault(int(index), {})[key] = tensor
    for index, entries in run["optimizer_values"].items():
        state.setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict({"state": state, "param_groups": run["optimizer_groups"]})
    scheduler.load_state_dict(run["scheduler"])
    torch.set_rng_state(tensors["rng/cpu"].cpu())
    device = next(model.parameters()).device
    if device.type == "cuda" and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"].cpu(), device)
    return {name[6:]: t for name, t in tensors.items() if name.startswith("extra/")}
