"""A training run's state on disk, so that a stopped run resumes where it was: safetensors + JSON, no pickle.

Not run directly; example/training.py (the loop of train.py and of evaluate_lds.py's retrainings) uses it:

    save_training_state(path, model, optimizer, progress, epoch_loss=...)   # progress: JSON (epoch, step...)
    saved = store.resume(path, "training", use)  # the engine reads it back (influence.Store.resume)...
    not_a_training_state(tensors, progress, model, ...)   # ...where use() asks this: why not usable, or None
    restore_training_state(saved, model, optimizer)

It holds the weights and buffers, the optimiser's momentum velocities and step count (which sets the schedule's
learning rate) and the global RNG states, so that the rest of the run is the one an uninterrupted run would have
made (bit for bit on the CPU). The file is `<checkpoint>.partial.safetensors`, the engine's name for a partial result.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from example.sgd import SGD
from influence import save_partial

__all__ = ["not_a_training_state", "restore_training_state", "save_training_state"]


def save_training_state(
    path: Path, model: nn.Module, optimizer: SGD, progress: dict[str, Any], **extra: torch.Tensor
) -> None:
    """Write the state atomically; `progress` (JSON) says where the run is, `extra` are tensors to keep with it."""
    tensors = {f"model/{name}": value for name, value in model.state_dict().items()}
    velocities, steps = optimizer.state()
    tensors.update({f"optimizer/{index}": velocity for index, velocity in velocities.items()})
    tensors["rng/cpu"] = torch.get_rng_state()
    device = next(model.parameters()).device
    if device.type == "cuda":
        tensors["rng/cuda"] = torch.cuda.get_rng_state(device)
    tensors.update({f"extra/{name}": value for name, value in extra.items()})
    save_partial(path, tensors, {**progress, "run": {"optimizer_steps": steps}}, folder="--checkpoint_dir")


def not_a_training_state(
    tensors: dict[str, torch.Tensor],
    progress: dict[str, Any],
    model: nn.Module,
    extra: tuple[str, ...] = (),
    positions: tuple[str, ...] = (),
) -> str | None:
    """Why a partial result read back (tensors, progress) is not a training state of `model`'s architecture
    holding the `extra` tensors (scalars) and the `positions` in its progress, or None when it is one: checked
    before any of it is restored, so that a state that cannot be used is discarded, not half restored."""
    run = progress.get("run")
    if not isinstance(run, dict) or not any(name.startswith("model/") for name in tensors):
        return "it is not a training state"
    if not isinstance(run.get("optimizer_steps"), int):
        return "it was saved by another version of the training loop"
    weights = {f"model/{name}": value.shape for name, value in model.state_dict().items()}
    if {name: t.shape for name, t in tensors.items() if name.startswith("model/")} != weights:
        return "it holds the weights of another model"
    shapes = {str(index): parameter.shape for index, parameter in enumerate(model.parameters())}
    velocities = {name[10:]: t.shape for name, t in tensors.items() if name.startswith("optimizer/")}
    momentum = (progress.get("arguments") or {}).get("momentum", 0)
    whole = velocities == shapes if momentum and run["optimizer_steps"] else velocities.items() <= shapes.items()
    if not whole:  # SGD.load_state needs every velocity once a run with momentum has taken a step
        return "its optimiser state is not this model's"
    rng = tensors.get("rng/cpu")
    if rng is None or rng.dtype != torch.uint8 or rng.shape != torch.get_rng_state().shape:
        return "its random-number state is missing or damaged"
    cuda_rng = tensors.get("rng/cuda")
    if cuda_rng is not None and (cuda_rng.dtype != torch.uint8 or cuda_rng.dim() != 1 or not len(cuda_rng)):
        return "its random-number state is missing or damaged"
    if any(f"extra/{name}" in tensors and tensors[f"extra/{name}"].dim() != 0 for name in extra):
        return "it was saved by another version of the training loop"
    missing = [f"extra/{name}" for name in extra if f"extra/{name}" not in tensors]
    missing += [name for name in positions if not isinstance(progress.get(name), (int, float))]
    if missing:
        return f"it lacks {missing[0]} (saved by another version of the training loop)"
    return None


def restore_training_state(
    saved: tuple[dict[str, torch.Tensor], dict[str, Any]], model: nn.Module, optimizer: SGD
) -> dict[str, torch.Tensor]:
    """Put a saved state into the run's model, optimiser (and so its schedule) and RNGs; returns the extra tensors."""
    tensors, progress = saved
    model.load_state_dict({name[6:]: t for name, t in tensors.items() if name.startswith("model/")}, strict=True)
    velocities = {name[10:]: t for name, t in tensors.items() if name.startswith("optimizer/")}
    optimizer.load_state(velocities, progress["run"]["optimizer_steps"])
    torch.set_rng_state(tensors["rng/cpu"].cpu())
    device = next(model.parameters()).device
    if device.type == "cuda" and "rng/cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng/cuda"].cpu(), device)
    return {name[6:]: t for name, t in tensors.items() if name.startswith("extra/")}
