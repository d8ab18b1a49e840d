"""Convert a checkpoint of the original example (`torch.save(model.state_dict(), "model.pth")`) to this project's
safetensors checkpoint, which every script reads:

    python convert_checkpoint.py model.pth ./checkpoints/model.safetensors
    python convert_checkpoint.py model_corrupt_0.1.pth ./checkpoints/model_corrupt_0.1.safetensors

The .pth file is read with torch.load(weights_only=True), which runs no pickle code beyond rebuilding tensors and
dictionaries; a file holding anything but a dictionary of tensors, or tensors that do not fit ResNet-9, is refused
in one line and nothing is written.
"""

from __future__ import annotations

import signal

# Ctrl-C while torch loads (a few seconds) ends the script quietly; run_cli handles it from then on.
signal.signal(signal.SIGINT, signal.SIG_DFL)


import pickle
import zipfile
from pathlib import Path

import torch

from example.checkpoints import check_state, save_model
from example.errors import PipelineError
from example.run import ArgumentParser, run_cli
from pipeline import construct_resnet9


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="the original example's checkpoint (.pth, a state_dict saved by torch.save)")
    parser.add_argument("target", help="where the safetensors checkpoint goes, e.g. ./checkpoints/model.safetensors")
    args = parser.parse_args(argv)
    if Path(args.target).suffix != ".safetensors":
        parser.error(f"{args.target}: the target's name must end with .safetensors, as the scripts look for it")
    return args


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a torch.save'd state_dict, loaded without running anything but tensor reconstruction."""
    if not path.is_file():
        raise PipelineError(f"no file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise PipelineError(
            f"{path} is not a state_dict saved by torch.save, or asks for more than tensors ({unpickler_reason(e)}); "
            "nothing in it was run"
        ) from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        kinds = sorted({type(v).__name__ for v in state.values()}) if isinstance(state, dict) else type(state).__name__
        raise PipelineError(f"{path} holds {kinds}, not a dictionary of tensors (a model's state_dict)")
    return state


def unpickler_reason(error: Exception) -> str:
    """The line of torch.load's refusal that says what the file asked for (the rest is advice to load it unsafely)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines[1:] if not line.startswith(("Check the documentation", "Please file"))]
    return (useful or lines or [type(error).__name__])[0]


def main(argv=None) -> None:
    args = parse_args(argv)
    source, target = Path(args.source), Path(args.target)
    state = read_state_dict(source)
    # The checks load_model makes (keys, shapes, dtypes, finite values), before anything is written.
    check_state(state, construct_resnet9().state_dict(), source, f"python train.py --checkpoint_dir {target.parent}")
    model = construct_resnet9()
    model.load_state_dict(state)
    save_model(model, target)
    print(f"wrote {target} ({len(state)} tensors from {source})")


if __name__ == "__main__":
    run_cli(main)
