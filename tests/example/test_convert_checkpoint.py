"""convert_checkpoint.py: the original example's torch.save(state_dict) file becomes a checkpoint the scripts read;
anything but tensors is refused in one line, without running it and without writing a file."""

from __future__ import annotations

import os

import torch

from example.checkpoints import load_model
from pipeline import construct_resnet9
from tests.helpers import run


class Hostile:
    """Pickles as a call of os.system, which a plain unpickler would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_the_original_checkpoint_converts_and_loads(tmp_path):
    torch.manual_seed(3)
    model = construct_resnet9()
    torch.save(model.state_dict(), tmp_path / "model.pth")  # as the original example saves it
    target = tmp_path / "checkpoints" / "model.safetensors"
    result = run("convert_checkpoint.py", str(tmp_path / "model.pth"), str(target))
    assert result.stdout.startswith(f"wrote {target}")
    loaded = load_model(target, "cpu").state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded[name], tensor), name


def test_anything_but_tensors_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    target = tmp_path / "model.safetensors"
    torch.save({"0.0.weight": Hostile(marker)}, tmp_path / "hostile.pth")
    torch.save([torch.zeros(3)], tmp_path / "list.pth")
    state = construct_resnet9().state_dict()
    state.pop("0.0.weight")
    torch.save(state, tmp_path / "short.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    state = construct_resnet9().state_dict()
    state["9.weight"][0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pth")
    for name, message in (
        ("hostile.pth", "asks for more than tensors"),
        ("list.pth", "holds list, not a dictionary of tensors"),
        ("short.pth", "does not fit ResNet-9 (missing 0.0.weight)"),
        ("nan.pth", "tensor '9.weight' holds NaN"),
        ("text.pth", "is not a state_dict saved by torch.save"),
        ("none.pth", "no file at"),
    ):
        result = run("convert_checkpoint.py", str(tmp_path / name), str(target), expect=2)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr
    assert not marker.exists() and not target.exists()
    result = run("convert_checkpoint.py", str(tmp_path / "list.pth"), str(tmp_path / "model.pt"), expect=2)
    assert "must end with .safetensors" in result.stderr
