"""Checkpoints: their names in --checkpoint_dir, writing them whole, and reading them back with every check that
keeps a bad file from reaching the analyses."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from example.devices import get_device, place_model
from example.errors import PipelineError
from influence import first_line, safetensors_size, write_atomically
from pipeline import check_label_options, construct_resnet9


def checkpoint_path(
    checkpoint_dir: str | Path, corrupt_percentage: float | None = None, noisy_labels_key: str | None = None
) -> Path:
    """model.safetensors; model_corrupt_{p}.safetensors (p as given, e.g. 0.1); model_noisy_{key}.safetensors."""
    check_label_options(corrupt_percentage, noisy_labels_key)
    if corrupt_percentage is not None:
        return Path(checkpoint_dir) / f"model_corrupt_{corrupt_percentage}.safetensors"
    if noisy_labels_key is not None:
        return Path(checkpoint_dir) / f"model_noisy_{noisy_labels_key}.safetensors"
    return Path(checkpoint_dir) / "model.safetensors"


def save_model(model: nn.Module, path: str | Path) -> None:
    """Write the state_dict whole or not at all (a temporary file in the same folder, then a rename); a full disk
    or a folder without write permission is a one-line error."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    write_atomically(path, lambda tmp: save_file(state, str(tmp)), safetensors_size(state), "--checkpoint_dir")


def load_model(path: str | Path, device: torch.device | str | None = None, remake: str | None = None) -> nn.Module:
    """A ResNet-9 with the checkpoint's weights, on `device`, in eval mode.

    `remake` is the train.py command that writes this checkpoint (train_command), shown when it is missing or
    unusable.
    """
    path = Path(path)
    device = torch.device(device) if device is not None else get_device()
    command = remake or f"python train.py --checkpoint_dir {path.parent}"
    if not path.is_file():
        raise PipelineError(f"no checkpoint at {path}: run train.py first: {command}")
    try:  # read on the CPU: the model is built there, and a GPU out of memory is not an unreadable file
        state = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        damaged = f"; it is damaged or cut short: retrain it ({command})" if isinstance(e, SafetensorError) else ""
        reason = _not_safetensors(path, command) or f"{first_line(e)}{damaged}"
        raise PipelineError(f"cannot read checkpoint {path}: {reason}") from e
    model = construct_resnet9()
    check_state(state, model.state_dict(), path, command)
    model.load_state_dict(state)
    return place_model(model, device)


def _not_safetensors(path: Path, command: str) -> str | None:
    """What a file that safetensors cannot read is instead, when it is plainly not a safetensors file (whose first
    8 bytes are the header's length, then the JSON header): safetensors itself says only "header too large"."""
    try:
        with open(path, "rb") as f:
            start = f.read(9)
    except OSError:
        return None
    if start.startswith(b"PK\x03\x04"):
        kind = "a zip archive, as torch.save writes"
    elif len(start) > 1 and start[0] == 0x80 and 2 <= start[1] <= 5:
        kind = "a pickle, as torch.save (legacy format) or pickle.dump write"
    elif len(start) >= 9 and start[8:9] != b"{":
        kind = "something else"
    else:  # a safetensors file, or too short to tell: damaged or cut short
        return None
    # convert_checkpoint.py reads with torch.load(weights_only=True) and writes atomically, so in place is safe.
    return (
        f"it is not a safetensors file but {kind}: convert it in place (python convert_checkpoint.py {path} {path}) "
        f"or retrain it ({command})"
    )


def _few(names: list[str], shown: int = 4) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def check_state(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path, command: str) -> None:
    """Refuse, in one line naming the tensor, a checkpoint that load_state_dict would take but the analyses could
    not use: other keys or shapes, integer or bool weights (load_state_dict casts them silently, giving all-zero or
    NaN scores) and NaN or inf values (every pass would turn them into NaN scores or a crash far from the cause)."""
    missing = [name for name in expected if name not in state]
    unexpected = [name for name in state if name not in expected]
    shapes = [
        f"{name} {list(state[name].shape)} (ResNet-9: {list(tensor.shape)})"
        for name, tensor in expected.items()
        if name in state and state[name].shape != tensor.shape
    ]
    if missing or unexpected or shapes:
        found = [f"missing {_few(missing)}"] if missing else []
        found += [f"unexpected {_few(unexpected)}"] if unexpected else []
        found += [f"other shapes: {_few(shapes, 2)}"] if shapes else []
        raise PipelineError(
            f"checkpoint {path} does not fit ResNet-9 ({'; '.join(found)}): it was saved from another model; "
            f"retrain it: {command}"
        )
    for name, tensor in state.items():
        floating = expected[name].is_floating_point()
        if tensor.is_floating_point() != floating or tensor.dtype == torch.bool:
            kind = "floating point" if floating else "an integer"
            raise PipelineError(
                f"checkpoint {path}: tensor {name!r} is {str(tensor.dtype).removeprefix('torch.')}, not {kind}: "
                f"it was not written by train.py; retrain it: {command}"
            )
    # One bool per tensor, so that a whole ResNet-9 is checked in a few milliseconds on the CPU.
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        tensor = state[bad[0]]
        kind = "NaN" if torch.isnan(tensor).any() else "inf"
        count = int((~torch.isfinite(tensor)).sum())
        others = f" (so do {len(bad) - 1} more tensors)" if len(bad) > 1 else ""
        raise PipelineError(
            f"checkpoint {path}: tensor {bad[0]!r} holds {kind} in {count} of {tensor.numel()} values{others}: "
            f"the training that wrote it diverged or the file was changed; retrain it: {command}"
        )


def train_command(args: argparse.Namespace, corrupt_percentage: float | None = None) -> str:
    """The train.py command that writes the checkpoint these flags look for, for missing-checkpoint hints."""
    parts = ["python train.py", f"--dataset_dir {args.dataset_dir}", f"--checkpoint_dir {args.checkpoint_dir}"]
    if getattr(args, "num_train", None) is not None:
        parts.append(f"--num_train {args.num_train}")
    if getattr(args, "noisy_labels", None) is not None:
        parts += [f"--noisy_labels {args.noisy_labels}", f"--noisy_labels_key {args.noisy_labels_key}"]
    elif corrupt_percentage is not None:
        parts.append(f"--corrupt_percentage {corrupt_percentage}")
    return " ".join(parts)
