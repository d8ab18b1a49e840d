"""Nothing reused or reported that its inputs do not support: rankings that cannot profit from the examples' order,
results that record the data they were made from, one writer per results folder, and --overwrite_output_dir that
still resumes what the same arguments left when they were stopped."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from detect_mislabeled_dataset import INSPECTED, degenerate, detection_curve, roc_auc
from example import training
from example.checkpoints import save_model
from example.errors import PipelineError
from example.results import data_fingerprint
from influence import Analyzer, FactorArguments, InfluenceError, ScoreArguments, interrupt
from influence.precondition import LayerPreconditioner
from influence.storage import LOCK_NAME, load_tensors, read_safetensors, save_tensors
from pipeline import construct_resnet9, load_cifar10_arrays
from tests.helpers import last_line, run, write_fake_cifar10
from tests.reference import TinyTask, batches, make_model

SMALL = ["--num_train", "16", "--influence_batch_size", "8"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Untrained ResNet-9 weights under every name the scripts look for: what the tests check needs no training."""
    folder = tmp_path_factory.mktemp("reuse") / "checkpoints"
    model = construct_resnet9()
    for name in ("model", "model_corrupt_0.1", "model_noisy_human"):
        save_model(model, folder / f"{name}.safetensors")
    return folder


def one_line_error(result) -> str:
    """The one error line, last on stderr (after any progress bar)."""
    return last_line(result.stderr, "error: ")


# ---- 2. Rankings that cannot profit from order ----


def test_tied_and_nan_scores_never_detect_above_chance():
    n = 100
    mislabeled = np.arange(n) < 10  # the corrupted labels are the first examples, as train.py makes them
    # Ties that know nothing of the labels: a sort keeping index order put 5 of the 10 wrong labels first.
    parity = (np.arange(n) % 2).astype(np.float64)
    constant = np.zeros(n)
    for scores in (parity, constant):
        assert detection_curve(scores, mislabeled, INSPECTED) == pytest.approx(INSPECTED, abs=1e-12)
        assert roc_auc(scores, mislabeled) == pytest.approx(0.5)
    # Ties are only shared, not blurred: untied scores rank as before.
    perfect = -np.arange(n, dtype=np.float64)
    assert detection_curve(perfect, mislabeled, [0.1, 0.05])[0] == 1.0
    assert detection_curve(perfect, mislabeled, [0.05])[0] == 0.5
    # NaN or constant scores are refused before any curve is drawn from them.
    assert degenerate(constant) == "are all 0"
    assert degenerate(np.full(n, np.nan)) == "hold NaN for 100 of 100 examples"
    assert degenerate(np.r_[np.inf, np.arange(n - 1.0)]) == "hold inf for 1 of 100 examples"
    assert degenerate(perfect) is None
    with pytest.raises(PipelineError, match="finite"):
        roc_auc(np.full(n, np.nan), mislabeled)


def test_detection_refuses_constant_self_influence_before_any_table(fake_cifar_dir, checkpoints, tmp_path, monkeypatch):
    # Scores that are all equal (a curvature whose damping swamps it, a dead model): the table would say 100%.
    monkeypatch.setattr(LayerPreconditioner, "self_score", lambda self, a, g: torch.zeros(a.shape[0], dtype=a.dtype))
    args = ["--dataset_dir", str(fake_cifar_dir), "--checkpoint_dir", str(checkpoints), *SMALL]
    args += ["--output_dir", str(tmp_path), "--factor_strategy", "identity", "--figure", str(tmp_path / "m.png")]
    result = run("detect_mislabeled_dataset.py", *args, expect=2)
    assert one_line_error(result).startswith("error: the identity scores are all 0: they rank nothing"), result.stderr
    assert "inspected" not in result.stdout and not (tmp_path / "m.png").exists()


# ---- 3. A result records what it was made from ----


def test_the_data_fingerprint_sees_every_byte():
    images = torch.zeros(50_000, 3, 32, 32, dtype=torch.uint8)
    labels = torch.zeros(50_000, dtype=torch.int64)
    first = data_fingerprint(images, labels)
    assert data_fingerprint(images.clone(), labels.clone()) == first
    images[-1, 2, 31, 31] ^= 1
    assert data_fingerprint(images, labels) != first
    images[-1, 2, 31, 31] ^= 1
    labels[-1] = (labels[-1] + 1) % 10
    assert data_fingerprint(images, labels) != first


def test_a_changed_dataset_is_not_reused(fake_cifar_dir, checkpoints, tmp_path):
    other = write_fake_cifar10(tmp_path / "other", seed=1)  # the same sizes, other images and labels
    common = ["--checkpoint_dir", str(checkpoints), "--output_dir", str(tmp_path / "results"), *SMALL]
    common += ["--factor_strategy", "identity", "--num_queries", "2", "--query_batch_size", "2"]
    assert "Scores shape: (2, 16)" in run("analyze.py", "--dataset_dir", str(fake_cifar_dir), *common).stdout
    refused = one_line_error(run("analyze.py", "--dataset_dir", str(other), *common, expect=2))
    assert "info.data_sha256=" in refused and "overwrite_output_dir" in refused


def test_an_edited_label_file_is_not_reused(fake_cifar_dir, checkpoints, tmp_path):
    labels = load_cifar10_arrays(fake_cifar_dir, train=True)[1].numpy()
    noisy = labels.copy()
    noisy[[1, 5]] = (noisy[[1, 5]] + 1) % 10
    path = tmp_path / "noisy.npz"
    np.savez(path, human=noisy)
    args = ["--dataset_dir", str(fake_cifar_dir), "--checkpoint_dir", str(checkpoints), *SMALL, "--top_k", "1"]
    args += ["--noisy_labels", str(path), "--noisy_labels_key", "human", "--output_dir", str(tmp_path / "results")]
    args += ["--factor_strategy", "identity", "--figure", str(tmp_path / "m.png")]
    assert "2 of 16 training labels are wrong" in run("detect_mislabeled_dataset.py", *args).stdout
    noisy[100] = (noisy[100] + 1) % 10  # beyond the 16 images used: only the file's fingerprint sees it
    np.savez(path, human=noisy)
    refused = one_line_error(run("detect_mislabeled_dataset.py", *args, expect=2))
    assert "info.label_file_sha256=" in refused, refused


def test_results_without_their_argument_file_are_not_reused(tmp_path):
    model, x, y = make_model("cnn")
    analyzer = Analyzer("t", model, TinyTask(), output_dir=tmp_path, disable_tqdm=True)
    data = batches(x, y, 8)
    analyzer.fit_all_factors("f", data, FactorArguments(strategy="identity"))
    assert analyzer.compute_self_scores("s", "f", data)["all_modules"].shape == (32,)
    arguments = analyzer.scores_folder("s") / "score_arguments.json"
    arguments.unlink()
    with pytest.raises(InfluenceError, match=r"holds scores \(self_scores.safetensors\) but no score_arguments.json"):
        analyzer.compute_self_scores("s", "f", data[:2])
    assert not arguments.exists()  # nothing recorded for results it cannot vouch for
    again = analyzer.compute_self_scores("s", "f", data[:2], overwrite_output_dir=True)
    assert again["all_modules"].shape == (16,) and arguments.exists()


def test_evaluate_lds_refuses_retrainings_of_other_data(fake_cifar_dir, tmp_path, monkeypatch):
    class Trained(Exception):
        pass

    def no_training(*args, **kwargs):
        raise Trained  # the settings are checked before any model trains; nothing beyond that is needed here

    monkeypatch.setattr(training, "train_model", no_training)
    out = tmp_path / "lds"
    args = ["--output_dir", str(out), "--num_train", "16", "--num_queries", "4", "--num_subsets", "3"]
    with pytest.raises(Trained):
        run("evaluate_lds.py", "--dataset_dir", str(fake_cifar_dir), *args)
    other = write_fake_cifar10(tmp_path / "other", seed=1)
    refused = one_line_error(run("evaluate_lds.py", "--dataset_dir", str(other), *args, expect=2))
    assert refused.startswith(f"error: {out} holds retrainings with data_sha256="), refused
    # Retrainings seeded the consecutive way (their settings say nothing of unit_seeds) are not mixed in.
    masks, meta = read_safetensors(out / "masks.safetensors")
    meta["settings"].pop("unit_seeds")
    save_tensors(out / "masks.safetensors", masks, meta)
    refused = one_line_error(run("evaluate_lds.py", "--dataset_dir", str(fake_cifar_dir), *args, expect=2))
    assert "holds retrainings seeded seed + 1 + j * K + k, whose consecutive seeds share" in refused
    # Models whose settings nothing records any more are not mixed in either.
    (out / "masks.safetensors").unlink()
    (out / "units").mkdir()
    (out / "units" / "margins_0000_00.safetensors").write_bytes(b"a model's margins")
    refused = one_line_error(run("evaluate_lds.py", "--dataset_dir", str(fake_cifar_dir), *args, expect=2))
    assert "holds retrained models but no masks.safetensors" in refused


# ---- 3. One writer per results folder ----


def test_a_second_writer_is_refused_in_one_line_and_the_lock_is_released(tmp_path):
    model, x, y = make_model("cnn")
    analyzer = Analyzer("t", model, TinyTask(), output_dir=tmp_path, disable_tqdm=True)
    data, args = batches(x, y, 8), FactorArguments(strategy="diagonal")
    folder = analyzer.factors_folder("f")
    folder.mkdir(parents=True)
    hold = (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
        "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, str(os.getpid()).encode()); print('held', flush=True); "
        "time.sleep(60)"
    )
    other = subprocess.Popen([sys.executable, "-c", hold, str(folder / LOCK_NAME)], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline() == "held\n"
        with pytest.raises(InfluenceError) as refused:
            analyzer.fit_all_factors("f", data, args, overwrite_output_dir=True)
        assert str(refused.value) == (
            f"another run is writing {folder} (pid {other.pid}): wait for it to finish, or choose another output_dir"
        )
        assert sorted(path.name for path in folder.iterdir()) == [LOCK_NAME]  # the other run's files untouched
    finally:
        other.kill()
        other.wait()
    analyzer.fit_all_factors("f", data, args)  # its writer gone (however it ended), the folder is free
    assert not (folder / LOCK_NAME).exists()


# ---- 6. --overwrite_output_dir resumes what the same arguments left ----


class StopAt:
    """Batches that send SIGTERM to this process as they yield batch `at` (from 1); counts the batches yielded."""

    def __init__(self, items, at=None):
        self.items, self.at, self.yielded = items, at, 0

    def __iter__(self):
        for number, item in enumerate(self.items, 1):
            if number == self.at:
                os.kill(os.getpid(), signal.SIGTERM)
            self.yielded += 1
            yield item

    def __len__(self):
        return len(self.items)


def test_overwrite_resumes_the_partial_results_of_the_same_arguments(tmp_path, capsys):
    model, x, y = make_model("cnn")
    data = batches(x, y, 8)  # 4 batches
    args = FactorArguments(strategy="diagonal")
    reference = Analyzer("t", model, TinyTask(), output_dir=tmp_path / "reference", disable_tqdm=True)
    reference.fit_all_factors("f", data, args)
    expected = reference.compute_self_scores("s", "f", data)["all_modules"]

    analyzer = Analyzer("t", model, TinyTask(), output_dir=tmp_path / "results", disable_tqdm=True)
    folders = (analyzer.factors_folder("f"), analyzer.scores_folder("s"))
    with interrupt.handling():  # a job whose every run asks to overwrite, stopped in its self-influence pass
        analyzer.fit_all_factors("f", data, args, overwrite_output_dir=True)
        with pytest.raises(interrupt.Interrupted):
            analyzer.compute_self_scores("s", "f", StopAt(data, at=2), overwrite_output_dir=True)
    assert (folders[1] / "self_scores.partial.safetensors").exists()
    assert not any((folder / LOCK_NAME).exists() for folder in folders)  # released on the way out
    capsys.readouterr()

    # The same arguments again: the finished factors and the partial scores are what that run left; resumed.
    factor_data, score_data = StopAt(data), StopAt(data)
    analyzer.fit_all_factors("f", factor_data, args, overwrite_output_dir=True)
    resumed = analyzer.compute_self_scores("s", "f", score_data, overwrite_output_dir=True)["all_modules"]
    said = capsys.readouterr().out
    assert f"overwrite_output_dir: keeping the factors in {folders[0]}: a stopped run with these arguments" in said
    assert f"overwrite_output_dir: resuming the partial scores in {folders[1]}, which a stopped run" in said
    assert "Self-influence scores: resuming from self_scores.partial.safetensors after 2 batches" in said
    assert factor_data.yielded == 0 and torch.equal(resumed, expected)

    # Once finished, the same command recomputes everything; other arguments discard what is there.
    again = StopAt(data)
    analyzer.fit_all_factors("f", again, args, overwrite_output_dir=True)
    analyzer.compute_self_scores("s", "f", data, overwrite_output_dir=True)
    said = capsys.readouterr().out
    assert f"overwrite_output_dir: discarding the finished factors in {folders[0]} of an earlier run" in said
    assert f"overwrite_output_dir: discarding the finished scores in {folders[1]} of an earlier run" in said
    assert again.yielded == len(data)
    analyzer.compute_self_scores("s", "f", data, ScoreArguments(damping_factor=1e-3), overwrite_output_dir=True)
    assert (
        f"overwrite_output_dir: discarding the scores in {folders[1]}, made with other arguments "
        "(damping_factor=1e-08, now damping_factor=0.001)"
    ) in capsys.readouterr().out
    assert load_tensors(folders[1] / "self_scores.safetensors")["all_modules"].shape == (32,)
