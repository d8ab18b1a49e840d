"""Hostile or broken inputs stop in one line, before anything runs or is saved: CIFAR-10 batch files whose pickle
names code, malformed batches, checkpoints with NaN, inf or integer weights or other keys, and NaN met in a pass."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from example.checkpoints import load_model, save_model
from example.errors import PipelineError
from example.label_files import ArraysOnlyUnpickler
from example.task import ClassificationTask
from influence import Analyzer, FactorArguments, InfluenceError
from influence.storage import load_tensors
from pipeline import construct_resnet9, load_cifar10_arrays
from tests.helpers import run, write_fake_cifar10
from tests.reference import TinyTask, batches, make_model


@pytest.fixture
def cifar(tmp_path) -> Path:
    return write_fake_cifar10(tmp_path / "data", num_train=20, num_test=10)


def batch_file(root: Path, name: str = "data_batch_1") -> Path:
    return root / "cifar-10-batches-py" / name


def dump(path: Path, record, protocol: int = 2) -> None:
    with open(path, "wb") as f:
        pickle.dump(record, f, protocol=protocol)


# ---- CIFAR-10 batch files ----


class _Runs:
    def __init__(self, function, argument):
        self.function, self.argument = function, argument

    def __reduce__(self):
        return self.function, (self.argument,)


@pytest.mark.parametrize("kind", ["system", "eval"])
def test_a_batch_whose_pickle_names_code_is_refused_and_not_run(tmp_path, cifar, kind):
    marker = tmp_path / "pwned"
    payload = _Runs(os.system, f"touch {marker}") if kind == "system" else _Runs(eval, f"open({str(marker)!r}, 'w')")
    dump(batch_file(cifar), {b"data": payload, b"labels": [0]})
    result = run("train.py", "--dataset_dir", str(cifar), "--checkpoint_dir", str(tmp_path / "ckpt"), expect=2)
    asked = r"(posix|os|nt)\.system" if kind == "system" else r"(__builtin__|builtins)\.eval"
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: cannot read CIFAR-10 batch")
    assert str(batch_file(cifar)) in result.stderr
    assert re.search(f"asks for {asked}; only arrays, lists, dicts, strings and numbers are read", result.stderr)
    assert not marker.exists() and not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_batches_written_by_python_3_still_read(cifar, protocol):
    # str keys and a numpy label array, as a user's own copy may have; protocol 5 rebuilds arrays another way.
    images, labels = load_cifar10_arrays(cifar, train=False)
    record = {"data": images.numpy().reshape(len(images), -1), "labels": labels.numpy(), "batch_label": "test"}
    dump(batch_file(cifar, "test_batch"), record, protocol)
    again = load_cifar10_arrays(cifar, train=False)
    assert torch.equal(again[0], images) and torch.equal(again[1], labels)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: {**r, b"labels": 3}, r"labels are int64 \(\), not 4 integers"),
        (lambda r: {**r, b"labels": r[b"labels"][:-1]}, r"labels are int64 \(3,\), not 4 integers"),
        (lambda r: {**r, b"labels": [0.5] * 4}, r"labels are float64 \(4,\)"),
        (lambda r: {**r, b"data": r[b"data"].reshape(-1, 3, 32, 32)}, r"data is uint8 \(4, 3, 32, 32\), not uint8"),
        (lambda r: {**r, b"data": r[b"data"][:, :100]}, r"data is uint8 \(4, 100\)"),
        (lambda r: {**r, b"data": [[1, 2], [3]]}, "unexpected CIFAR-10 batch layout"),
        (lambda r: {b"data": r[b"data"]}, r"has no labels entry \(it has 'data'\)"),
        (lambda r: list(r.values()), "holds a list, not a dict"),
    ],
)
def test_malformed_batches_are_one_line_naming_the_file(cifar, edit, message):
    path = batch_file(cifar)
    with open(path, "rb") as f:
        record = ArraysOnlyUnpickler(f, encoding="bytes").load()  # the test's own fake file, read as the loader does
    dump(path, edit(record))
    with pytest.raises(PipelineError, match=message) as error:
        load_cifar10_arrays(cifar, train=True)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_a_scalar_labels_batch_is_exit_2_not_a_traceback(tmp_path, cifar):
    dump(batch_file(cifar), {b"data": np.zeros((4, 3072), np.uint8), b"labels": 7})
    result = run("train.py", "--dataset_dir", str(cifar), "--checkpoint_dir", str(tmp_path / "ckpt"), expect=2)
    assert result.stderr.count("\n") == 1 and str(batch_file(cifar)) in result.stderr, result.stderr


# ---- Checkpoints ----


def write_checkpoint(path: Path, edit=None) -> Path:
    state = {k: v.contiguous() for k, v in construct_resnet9().state_dict().items()}
    if edit is not None:
        edit(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


def set_value(name: str, value: float):
    def edit(state):
        state[name].view(-1)[3] = value

    return edit


def to_dtype(dtype: torch.dtype):
    def edit(state):
        for name, tensor in state.items():
            if tensor.is_floating_point():
                state[name] = (tensor * 100).to(dtype)

    return edit


TINY = ["--num_train", "8", "--influence_batch_size", "8", "--factor_strategy", "identity"]


@pytest.mark.parametrize("script", ["analyze.py", "detect_mislabeled_dataset.py"])
def test_a_nan_weight_checkpoint_is_refused_naming_the_tensor(tmp_path, cifar, script):
    name = "model.safetensors" if script == "analyze.py" else "model_corrupt_0.1.safetensors"
    path = write_checkpoint(tmp_path / "ckpt" / name, set_value("3.0.weight", float("nan")))
    common = ["--dataset_dir", str(cifar), "--checkpoint_dir", str(path.parent), "--output_dir", str(tmp_path / "out")]
    extra = ["--num_queries", "2", "--query_batch_size", "2"] if script == "analyze.py" else ["--top_k", "2"]
    result = run(script, *common, *TINY, *extra, expect=2)
    assert result.stderr.count("\n") == 1, result.stderr
    assert f"checkpoint {path}: tensor '3.0.weight' holds NaN in 1 of" in result.stderr
    assert "retrain it: python train.py" in result.stderr
    assert not list((tmp_path / "out").rglob("*.safetensors"))


def test_an_int32_checkpoint_is_exit_2(tmp_path, cifar):
    path = write_checkpoint(tmp_path / "ckpt" / "model.safetensors", to_dtype(torch.int32))
    common = ["--dataset_dir", str(cifar), "--checkpoint_dir", str(path.parent), "--output_dir", str(tmp_path / "out")]
    result = run("analyze.py", *common, *TINY, "--num_queries", "2", "--query_batch_size", "2", expect=2)
    assert result.stderr.count("\n") == 1 and "tensor '0.0.weight' is int32, not floating point" in result.stderr


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (set_value("2.module.0.1.running_var", float("inf")), "tensor '2.module.0.1.running_var' holds inf in 1 of"),
        (to_dtype(torch.bool), "tensor '0.0.weight' is bool, not floating point"),
        (lambda s: s.update({"0.1.num_batches_tracked": torch.tensor(1.0)}), "is float32, not an integer"),
        (lambda s: s.update({"extra": s.pop("9.weight")}), r"\(missing 9.weight; unexpected extra\)"),
        (
            lambda s: s.update({"9.weight": s["9.weight"][:, :5].contiguous()}),
            r"other shapes: 9.weight \[10, 5\] \(ResNet-9",
        ),
    ],
)
def test_unusable_checkpoints_are_one_line(tmp_path, edit, message):
    path = write_checkpoint(tmp_path / "model.safetensors", edit)
    with pytest.raises(PipelineError, match=message) as error:
        load_model(path, "cpu")
    assert str(path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_torch_save_file_named_safetensors_says_what_it_is(tmp_path, legacy):
    path = tmp_path / "model.safetensors"
    torch.save(construct_resnet9().state_dict(), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(PipelineError, match="it is not a safetensors file but a (zip archive|pickle), as torch.save"):
        load_model(path, "cpu")
    with pytest.raises(PipelineError, match=f"convert it in place \\(python convert_checkpoint.py {path} {path}\\)"):
        load_model(path, "cpu")


@pytest.mark.parametrize("kept", [5, 40])  # shorter than the header's length field; inside the header
def test_a_checkpoint_cut_short_says_to_retrain_it(tmp_path, kept):
    path = tmp_path / "model.safetensors"
    save_model(construct_resnet9(), path)
    path.write_bytes(path.read_bytes()[:kept])
    with pytest.raises(PipelineError, match=r"it is damaged or cut short: retrain it \(python train.py") as error:
        load_model(path, "cpu")
    assert "\n" not in str(error.value)


def test_sampled_labels_of_nan_logits_do_not_crash():
    # The engine, not torch.multinomial, reports the NaN: the loss stays NaN.
    def model(x):
        return x

    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])
    loss = ClassificationTask().compute_train_loss((logits, torch.tensor([0, 1])), model, sample=True)
    assert loss.isnan()


# ---- NaN met during a pass ----


def nan_batches(bad: int, size: int = 8):
    model, x, y = make_model("mlp", torch.float32)
    x = x.clone()
    x[bad * size + 2, 0] = float("nan")  # one example of batch `bad`
    return model, batches(x, y, size)


@pytest.mark.parametrize("strategy", ["kfac", "diagonal"])
def test_nan_in_a_factor_pass_stops_it_naming_the_layer(tmp_path, strategy):
    model, data = nan_batches(bad=1)
    analyzer = Analyzer("t", model, TinyTask(tracked=["4"]), output_dir=tmp_path, disable_tqdm=True, save_interval=0)
    desc = "Fit covariance" if strategy == "kfac" else "Fit Lambda"
    args = FactorArguments(strategy=strategy, use_empirical_fisher=True)
    with pytest.raises(InfluenceError, match=f"{desc}: NaN or inf in module '4' at batch 2: .* before saving"):
        analyzer.fit_all_factors(strategy, data, args)
    folder = analyzer.factors_folder(strategy)
    saved = list(folder.glob("*.safetensors"))
    # Only the partial result of batch 1, saved before batch 2 ran (save_interval=0), and it is finite.
    assert saved and all(p.name.endswith(".partial.safetensors") for p in saved), saved
    for p in saved:
        assert all(t.isfinite().all() for t in load_tensors(p).values() if t.is_floating_point())


def test_nan_in_a_score_pass_stops_it_before_any_file(tmp_path):
    model, data = nan_batches(bad=0)
    analyzer = Analyzer("t", model, TinyTask(), output_dir=tmp_path, disable_tqdm=True, save_interval=0)
    analyzer.fit_all_factors("identity", data, FactorArguments(strategy="identity"))
    with pytest.raises(
        InfluenceError, match=r"Self-influence scores: NaN or inf in module '0', module '2', module '4' at batch 1"
    ):
        analyzer.compute_self_scores("self", "identity", data)
    with pytest.raises(InfluenceError, match=r"Pairwise scores of query batch 1: NaN or inf in module '0'.* batch 1"):
        analyzer.compute_pairwise_scores("pairwise", "identity", data[1:2], data)
    assert not list(tmp_path.rglob("*.safetensors"))
