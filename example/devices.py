"""Where the work runs: the one place a process's device is chosen, and how the model is laid out there."""

from __future__ import annotations

import os

import torch
from torch import nn

from example.errors import PipelineError


def get_device(requested: torch.device | str | None = None) -> torch.device:
    """This process's device, the one place it is chosen: `requested` ("cpu" or "cuda"), else a GPU when torch
    sees one, else the CPU. Under torchrun (LOCAL_RANK set) a GPU process gets GPU LOCAL_RANK, made current."""
    kind = torch.device(requested).type if requested is not None else "cuda" if torch.cuda.is_available() else "cpu"
    if kind != "cuda":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PipelineError("a GPU was asked for but torch sees none: use --device cpu, or a torch build with CUDA")
    if "LOCAL_RANK" not in os.environ:
        return torch.device(requested if requested is not None else "cuda")
    local_rank = environment_int("LOCAL_RANK", 0)
    local_world = environment_int("LOCAL_WORLD_SIZE", local_rank + 1)
    device = torch.device("cuda", local_gpu(local_rank, local_world, torch.cuda.device_count()))
    torch.cuda.set_device(device)
    return device


def local_gpu(local_rank: int, local_world: int, gpus: int) -> int:
    """The GPU of a process: one each, since nccl refuses two ranks on one GPU (it would only fail later)."""
    if gpus == 0:
        raise PipelineError("a GPU was asked for but none is visible to this process (see CUDA_VISIBLE_DEVICES)")
    processes = max(local_world, local_rank + 1)
    if processes > gpus:
        raise PipelineError(
            f"{processes} processes on this machine but {gpus} GPU{'s' if gpus > 1 else ''}: nccl needs one GPU "
            f"per process: run torchrun --nproc_per_node={gpus} (or hide the GPUs, CUDA_VISIBLE_DEVICES=, for CPU "
            "processes)"
        )
    return local_rank


def place_model(model: nn.Module, device: torch.device | str) -> nn.Module:
    """The model on `device` in eval mode, channels-last (NHWC convolutions run faster on tensor cores and, in
    oneDNN, on the CPU: 10 to 15% less time in the passes' forward and backward on a 2-core EPYC; the influence
    engine reads any layout), as the scripts and the benchmark run it."""
    return model.to(torch.device(device), memory_format=torch.channels_last).eval()


def environment_int(name: str, default: int) -> int:
    """An integer from the environment (torchrun's WORLD_SIZE, RANK...), or a one-line error naming it."""
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise PipelineError(
            f"{name}={text!r} is not an integer: unset it, or start the processes with torchrun"
        ) from None
