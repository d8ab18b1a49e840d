"""CIFAR-10N label files: the release's torch archive is read without running its pickle; .npz still works."""

from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from example.errors import PipelineError
from example.label_files import LabelFileError, read_label_arrays
from pipeline import load_cifar10_arrays, load_noisy_labels
from tests.helpers import NUM_TRAIN, run


def release_like(clean: np.ndarray) -> dict[str, np.ndarray]:
    """The keys and dtypes of CIFAR-10_human.pt: int64 arrays, the human ones differing from clean in places."""
    arrays = {"clean_label": clean.astype(np.int64)}
    for i, key in enumerate(("aggre_label", "worse_label", "random_label1", "random_label2", "random_label3")):
        noisy = arrays["clean_label"].copy()
        noisy[i::7] = (noisy[i::7] + 1 + i) % 10
        arrays[key] = noisy
    return arrays


def rewrite_pickle(path: Path, edit) -> None:
    """Replace the data.pkl inside a torch archive by edit(its bytes), keeping the other members."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    name = next(n for n in members if n.endswith("/data.pkl"))
    members[name] = edit(members[name])
    with zipfile.ZipFile(path, "w") as archive:
        for member, payload in members.items():
            archive.writestr(member, payload)


def test_release_archive_reads_as_written(tmp_path):
    arrays = release_like(np.arange(50) % 10)
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save(arrays, path)  # how the release was written: a dict of numpy arrays, pickled by torch
    read = read_label_arrays(path)
    assert sorted(read) == sorted(arrays)
    for key, value in arrays.items():
        assert read[key].dtype == value.dtype and np.array_equal(read[key], value)
    np.savez(tmp_path / "labels.npz", **arrays)
    assert np.array_equal(read_label_arrays(tmp_path / "labels.npz")["worse_label"], arrays["worse_label"])


@pytest.mark.parametrize("numpy_module", [b"numpy.core", b"numpy._core"])
def test_archives_from_numpy_1_and_2_both_read(tmp_path, numpy_module):
    # numpy 1.x pickles arrays as numpy.core.multiarray._reconstruct, numpy 2.x as numpy._core.multiarray: the
    # release predates numpy 2, a user's own copy may not.
    arrays = release_like(np.arange(30) % 10)
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save(arrays, path)
    installed = b"numpy._core" if np.__version__ >= "2" else b"numpy.core"

    def swap(payload: bytes) -> bytes:
        assert installed + b".multiarray" in payload
        return payload.replace(installed + b".multiarray", numpy_module + b".multiarray")

    rewrite_pickle(path, swap)
    assert np.array_equal(read_label_arrays(path)["aggre_label"], arrays["aggre_label"])


class _RunsCommand:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_asks_for_more_than_arrays_is_refused_and_not_run(tmp_path, fake_cifar_dir):
    marker = tmp_path / "ran"
    path = tmp_path / "CIFAR-10_human.pt"
    torch.save({"aggre_label": np.zeros(5, dtype=np.int64)}, path)
    rewrite_pickle(path, lambda _: pickle.dumps({"aggre_label": _RunsCommand(marker)}, protocol=2))
    with pytest.raises(LabelFileError, match=r"asks for (posix|os|nt)\.system; only numpy arrays are read"):
        read_label_arrays(path)
    assert not marker.exists()

    result = run(
        "train.py", "--dataset_dir", str(fake_cifar_dir), "--checkpoint_dir", str(tmp_path / "ckpt"),
        "--noisy_labels", str(path), expect=2,
    )  # fmt: skip
    assert result.stderr.startswith("error: cannot read") and result.stderr.count("\n") == 1, result.stderr
    assert str(path) in result.stderr and "system" in result.stderr
    assert not marker.exists() and not (tmp_path / "ckpt").exists()


def test_other_files_are_one_line_errors(tmp_path):
    torch.save({"aggre_label": torch.zeros(5, dtype=torch.long)}, tmp_path / "tensors.pt")
    with pytest.raises(LabelFileError, match=r"asks for torch\._utils\._rebuild_tensor_v2; only numpy arrays"):
        read_label_arrays(tmp_path / "tensors.pt")
    (tmp_path / "text.pt").write_text("not labels")
    with pytest.raises(LabelFileError, match="cannot read .*text.pt as .npz or as the CIFAR-10N .pt release"):
        read_label_arrays(tmp_path / "text.pt")


def test_clean_label_must_match_the_dataset(tmp_path, fake_cifar_dir):
    clean = load_cifar10_arrays(fake_cifar_dir, train=True)[1]
    arrays = release_like(clean.numpy())
    torch.save(arrays, tmp_path / "good.pt")
    assert load_noisy_labels(tmp_path / "good.pt", "aggre_label", clean).tolist() == arrays["aggre_label"].tolist()
    arrays["clean_label"][[4, 9, 11]] = (arrays["clean_label"][[4, 9, 11]] + 3) % 10
    torch.save(arrays, tmp_path / "shuffled.pt")
    with pytest.raises(PipelineError, match=f"differs from the dataset's labels at 3 of {len(clean)} images"):
        load_noisy_labels(tmp_path / "shuffled.pt", "aggre_label", clean)


def test_train_reads_the_release_file(tmp_path, fake_cifar_dir):
    clean = load_cifar10_arrays(fake_cifar_dir, train=True)[1]
    path = tmp_path / "CIFAR-10_human.pt"
    arrays = release_like(clean.numpy())
    torch.save(arrays, path)
    checkpoints = tmp_path / "checkpoints"
    result = run(
        "train.py", "--dataset_dir", str(fake_cifar_dir), "--checkpoint_dir", str(checkpoints), "--noisy_labels",
        str(path), "--noisy_labels_key", "worse_label", "--num_train", str(NUM_TRAIN), "--num_train_epochs", "1",
        "--train_batch_size", "64", "--eval_batch_size", "100",
    )  # fmt: skip
    changed = int((arrays["worse_label"][:NUM_TRAIN] != arrays["clean_label"][:NUM_TRAIN]).sum())
    assert f"training on {NUM_TRAIN} examples ({changed} with changed labels)" in result.stdout + result.stderr
    assert (checkpoints / "model_noisy_worse_label.safetensors").is_file()


def test_missing_checkpoint_hint_runs_as_printed(tmp_path, fake_cifar_dir):
    checkpoints = tmp_path / "checkpoints"
    common = ["--dataset_dir", str(fake_cifar_dir), "--checkpoint_dir", str(checkpoints), "--num_train", "8"]
    result = run("detect_mislabeled_dataset.py", *common, "--corrupt_percentage", "0.2", expect=2)
    command = result.stderr.split("run train.py first: ", 1)[1].strip()
    assert command.startswith("python train.py ") and "--corrupt_percentage 0.2" in command, command
    missing = checkpoints / "model_corrupt_0.2.safetensors"
    assert str(missing) in result.stderr and not missing.exists()
    run("train.py", *command.split()[2:])  # exactly as printed: 25 epochs of one 8-image batch
    assert missing.is_file()

    result = run("analyze.py", *common, expect=2)
    command = result.stderr.split("run train.py first: ", 1)[1].strip()
    assert command == f"python train.py --dataset_dir {fake_cifar_dir} --checkpoint_dir {checkpoints} --num_train 8"
