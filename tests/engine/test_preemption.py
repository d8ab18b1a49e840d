"""Preemption and full disks: SIGTERM in the middle of a pass (or of training) saves, says so in one line and exits
143, and the same command then ends with the results of an uninterrupted run; a write that finds no room is a
one-line error that leaves every file under its final name whole.

The signals are real: sent to this process (the scripts run in it, see tests.helpers.run) or to worker processes,
at a chosen batch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

import influence.storage
import pipeline
from example import checkpoints
from influence import InfluenceError, interrupt
from influence.storage import load_tensors
from tests import engine_worker
from tests.helpers import assert_same, assert_stopped, last_line, launch, run, signal_at, slowed_at
from tests.reference import relative_error

CASE = "ekfac_true_b7"  # true Fisher: resumed batches must sample the labels the stopped run would have
NUM_TRAIN, BATCH = 16, 8  # 2 batches per pass and per epoch
TRAIN_OPTIONS = ["--num_train", str(NUM_TRAIN), "--train_batch_size", str(BATCH)]


def assert_equal_files(found: Path, expected: Path) -> None:
    a, b = load_tensors(found), load_tensors(expected)
    assert a.keys() == b.keys()
    for key in b:
        assert torch.equal(a[key], b[key]), (found, key)


# ---- The engine, in this process and in two processes (float64) ----


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("reference")
    engine_worker.run(out, {"cases": [CASE]})
    return out


def test_sigterm_in_each_pass_saves_and_the_rerun_resumes(tmp_path, reference):
    # Passes over the training data, counted per run from the step it resumes: covariance, Lambda, one per query
    # batch (3 and 2 queries), self-influence. Without periodic saves (save_interval 120 s) everything resumed was
    # saved by the stop.
    stops = [
        ((1, 3), "Fit covariance after 4 batches (28 examples) to ", "activation_covariance.partial.safetensors"),
        ((2, 1), "Fit Lambda after 2 batches (14 examples) to ", "lambda_matrix.partial.safetensors"),
        ((2, 2), "Pairwise scores of query batch 1 after 3 batches (21 examples) to ", "pairwise_scores.partial"),
        ((3, 0), "Self-influence scores after 1 batches (7 examples) to ", "self_scores.partial.safetensors"),
    ]
    with interrupt.handling():
        for at, saved, partial in stops:
            with pytest.raises(interrupt.Interrupted) as stopped:
                engine_worker.run(tmp_path, {"cases": [CASE], "term": [*at, 0]})
            assert stopped.value.exit_status == 143
            message = stopped.value.message()
            assert message.startswith(f"interrupted by SIGTERM: saved {saved}") and partial in message, message
            assert list(tmp_path.rglob(f"{partial}*")), partial
        engine_worker.run(tmp_path, {"cases": [CASE]})
    assert_same(tmp_path / CASE, reference / CASE)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_sigterm_to_one_of_two_processes_stops_both_with_their_shares_saved(tmp_path, capsys, reference):
    # Rank 1 alone is signalled, in round 2 of the covariance pass (batches 2 and 3): both ranks finish the round,
    # sum their shares into rank 0's file, and exit 143; rank 0 says what it saved.
    results = launch(tmp_path, 2, {"cases": [CASE], "term": [1, 2, 1]})
    assert [result.returncode for result in results] == [143, 143], [r.stderr for r in results]
    assert_stopped(results[0], "Fit covariance after 4 batches (28 examples)")
    assert "interrupted" not in results[1].stderr and "error" not in results[1].stderr, results[1].stderr
    # Resumed here, in one process (results do not depend on the number of processes): the sums saved must hold
    # both ranks' shares for the results to match.
    engine_worker.run(tmp_path, {"cases": [CASE]})
    assert "Fit covariance: resuming from activation_covariance.partial.safetensors after 4 batches" in (
        capsys.readouterr().out
    )
    assert_same(tmp_path / CASE, reference / CASE)


# ---- The scripts (float32 ResNet-9 on the tiny synthetic CIFAR-10) ----


@pytest.fixture(scope="module")
def trained(fake_cifar_dir, tmp_path_factory) -> dict:
    """train.py uninterrupted: 2 epochs of 2 steps, and 1 step on corrupted labels (for detection)."""
    root = tmp_path_factory.mktemp("preemption")
    checkpoints = root / "checkpoints"
    common = ["--dataset_dir", str(fake_cifar_dir), "--checkpoint_dir", str(checkpoints), *TRAIN_OPTIONS]
    result = run("train.py", *common, "--num_train_epochs", "2")
    run("train.py", *common, "--num_train_epochs", "1", "--corrupt_percentage", "0.1", "--train_batch_size", "16")
    return {"data": str(fake_cifar_dir), "checkpoints": checkpoints, "root": root, "stdout": result.stdout}


def test_train_resumes_after_sigterm_mid_epoch_with_the_same_weights(trained, tmp_path, monkeypatch):
    checkpoints = tmp_path / "checkpoints"
    args = ["--dataset_dir", trained["data"], "--checkpoint_dir", str(checkpoints), *TRAIN_OPTIONS]
    args += ["--num_train_epochs", "2"]
    state = checkpoints / "model.partial.safetensors"
    with signal_at(monkeypatch, 3):  # epoch 2, step 1 of 2
        stopped = run("train.py", *args, expect=143)
    assert_stopped(stopped, f"the training state at epoch 2/2, step 1/2 to {state} in ")
    assert state.exists() and not (checkpoints / "model.safetensors").exists()
    resumed = run("train.py", *args)
    assert "resuming from model.partial.safetensors at epoch 2/2, step 1/2" in resumed.stdout
    assert_equal_files(checkpoints / "model.safetensors", trained["checkpoints"] / "model.safetensors")
    assert not state.exists()  # removed once the checkpoint is written
    # The epoch's loss counts the steps before the stop too.
    epoch_2 = [line for line in trained["stdout"].splitlines() if line.startswith("epoch 2: train loss")]
    assert epoch_2[0].split(" (")[0] in resumed.stdout

    # A crash (no signal, no emergency save) resumes from the last periodic save: here after every step.
    def crash_at(batch):
        original = pipeline.TensorBatches.__iter__

        def iterate(self):
            for index, item in enumerate(original(self)):
                if self.epoch == 2 and index == batch:
                    raise RuntimeError("the machine went away")
                yield item

        return iterate

    (checkpoints / "model.safetensors").unlink()
    monkeypatch.setattr(pipeline.TensorBatches, "__iter__", crash_at(1))
    with pytest.raises(RuntimeError, match="went away"):
        run("train.py", *args, "--save_interval", "0")
    monkeypatch.undo()
    # Other arguments do not resume someone else's run: one line, the state kept.
    refused = run("train.py", *args[:-1], "3", expect=2)
    assert refused.stderr.startswith(f"error: {state} holds the state of a run with num_train_epochs=2, now ")
    assert refused.stderr.count("\n") == 1 and state.exists()
    resumed = run("train.py", *args)
    assert "resuming from model.partial.safetensors at epoch 2/2, step 1/2" in resumed.stdout
    assert_equal_files(checkpoints / "model.safetensors", trained["checkpoints"] / "model.safetensors")


@pytest.mark.parametrize(
    "damage, why, momentum",
    [
        (lambda t: t.pop("extra/epoch_loss"), "it lacks extra/epoch_loss", "0"),
        (lambda t: t.update({"model/0.0.weight": torch.zeros(1)}), "it holds the weights of another model", "0"),
        (lambda t: t.update({"rng/cpu": t["rng/cpu"][:100]}), "its random-number state is missing or damaged", "0"),
        (lambda t: t.pop("optimizer/3"), "its optimiser state is not this model's", "0.9"),
    ],
)
def test_an_unusable_training_state_is_discarded_not_half_restored(
    trained, tmp_path, monkeypatch, damage, why, momentum
):
    checkpoints = tmp_path / "checkpoints"
    args = ["--dataset_dir", trained["data"], "--checkpoint_dir", str(checkpoints), *TRAIN_OPTIONS]
    args += ["--num_train_epochs", "2", "--momentum", momentum]
    state = checkpoints / "model.partial.safetensors"
    with signal_at(monkeypatch, 3):
        run("train.py", *args, expect=143)
    tensors, progress = influence.storage.load_partial(state, "cpu")
    damage(tensors)
    influence.storage.save_partial(state, tensors, progress)
    started_over = run("train.py", *args)
    assert f"discarding {state} ({why}" in started_over.stdout, started_over.stdout
    if momentum == "0":  # started over: the weights of the uninterrupted run
        assert_equal_files(checkpoints / "model.safetensors", trained["checkpoints"] / "model.safetensors")


def analyze_args(trained, results: Path, strategy: str = "diagonal") -> list[str]:
    return [
        "--dataset_dir", trained["data"], "--checkpoint_dir", str(trained["checkpoints"]), "--output_dir",
        str(results), "--factor_strategy", strategy, "--num_queries", "4", "--query_batch_size", "2", *TRAIN_OPTIONS,
    ]  # fmt: skip


def profiled_seconds(stdout: str, action: str) -> float:
    """The total time of `action`, recorded once, in the timing table a script printed with --profile."""
    row = re.search(rf"\|  {action}\s*\|  [^|]*\|  1\s*\|  ([0-9.e+-]+)", stdout)
    assert row is not None, stdout
    return float(row.group(1))


def test_analyze_resumes_after_sigterm_in_a_factor_pass_and_in_a_query_batch(trained, tmp_path, monkeypatch):
    reference, results = tmp_path / "reference", tmp_path / "results"
    run("analyze.py", *analyze_args(trained, reference))
    args = analyze_args(trained, results)
    # The diagonal strategy: a factor pass (Lambda; the covariance pass is the same code, and EK-FAC's eigenvectors
    # cost a minute of this CPU) and the pairwise passes. The engine test above stops every pass of EK-FAC.
    with signal_at(monkeypatch, 1):  # Lambda pass, batch 1 of 2
        stopped = run("analyze.py", *args, expect=143)
    assert_stopped(stopped, "Fit Lambda after 1 batches (8 examples) to ", "lambda_matrix.partial")
    # Rerun: Lambda batches 1-2, query batch 1 at 3 and its pass 4-5, query batch 2 at 6 and its pass 7-8: stopped
    # after the first training batch of query batch 2.
    # Its batch 7 comes 2 s late: time of the pairwise pass that the partial result keeps with query batch 2's.
    with slowed_at(monkeypatch, 7, 2.0), signal_at(monkeypatch, 7):
        stopped = run("analyze.py", *args, expect=143)
    assert "Fit Lambda: resuming from lambda_matrix.partial.safetensors after 1 batches" in stopped.stdout
    assert_stopped(stopped, "Pairwise scores of query batch 2 after 1 batches (8 examples) to ")
    resumed = run("analyze.py", *args, "--profile")
    assert profiled_seconds(resumed.stdout, "Compute Pairwise Score") >= 2.0  # this run: one batch of 8
    assert profiled_seconds(resumed.stdout, "Fit Lambda") > 0  # the stopped runs' pass, as its file keeps it
    assert "resuming from pairwise_scores.partial.safetensors after 1 query batches (2 queries)" in resumed.stdout
    assert "Pairwise scores of query batch 2: resuming from pairwise_scores.partial.safetensors after 1 batches" in (
        resumed.stdout
    )
    for path in sorted((reference / "cifar10").rglob("*.safetensors")):
        assert_equal_files(results / path.relative_to(reference), path)
    assert not list(results.rglob("*.partial.*")) and not list(results.rglob(".*tmp*"))


def test_detect_resumes_after_sigterm_in_the_self_influence_pass(trained, tmp_path, monkeypatch):
    args = [
        "--dataset_dir", trained["data"], "--checkpoint_dir", str(trained["checkpoints"]), "--factor_strategy",
        "diagonal", "--figure", str(tmp_path / "mislabel.png"), *TRAIN_OPTIONS,
    ]  # fmt: skip
    reference, results = tmp_path / "reference", tmp_path / "results"
    run("detect_mislabeled_dataset.py", *args, "--output_dir", str(reference))
    # Lambda pass: batches 1-2; self-influence: 3-4. The stopped run's batches 1 and 3 come 1 s late, which the
    # Lambda file and the partial result keep.
    with slowed_at(monkeypatch, 1, 1.0), slowed_at(monkeypatch, 3, 1.0), signal_at(monkeypatch, 3):
        stopped = run("detect_mislabeled_dataset.py", *args, "--output_dir", str(results), expect=143)
    assert_stopped(stopped, "Self-influence scores after 1 batches (8 examples) to ", "self_scores.partial")
    resumed = run("detect_mislabeled_dataset.py", *args, "--output_dir", str(results), "--profile")
    scores = Path("mislabeled") / "scores_diagonal" / "self_scores.safetensors"
    assert_equal_files(results / scores, reference / scores)
    # The timing table counts the stopped run's part of the pass: its 1 s, though this run did one batch of 8; and
    # the Lambda pass that run finished, which this one did not run.
    assert profiled_seconds(resumed.stdout, "Compute Self-Influence Score") >= 1.0
    assert profiled_seconds(resumed.stdout, "Fit Lambda") >= 1.0
    assert "Fit Lambda: " in resumed.stdout and " s in an earlier run of this job (kept in lambda_matrix" in (
        resumed.stdout
    )


# ---- Full disks ----


def no_space(tensors, filename, metadata=None):
    """safetensors' save_file on a full disk: part of the file written, then its error (text, no errno)."""
    Path(filename).write_bytes(b"part of a file")
    raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_a_full_disk_is_one_line_and_leaves_whole_files(trained, tmp_path, monkeypatch):
    """ENOSPC injected at the storage layer, on a partial result (saved after every batch) and on a checkpoint."""
    results = tmp_path / "results"
    args = [*analyze_args(trained, results, "diagonal"), "--save_interval", "0"]
    original = influence.storage.save_file

    def full_for_partials(tensors, filename, metadata=None):
        if ".partial." in filename:
            return no_space(tensors, filename, metadata)
        return original(tensors, filename, metadata=metadata)

    monkeypatch.setattr(influence.storage, "save_file", full_for_partials)
    failed = last_line(run("analyze.py", *args, expect=2).stderr, "error: ")
    partial = results / "cifar10" / "factors_diagonal" / "lambda_matrix.partial.safetensors"
    assert failed.startswith(f"error: cannot write {partial}: no space left on the device (it needs about "), failed
    assert failed.endswith(" free there): free some space there, or choose another --output_dir"), failed
    # Nothing under the final name, no temporary file; what was saved before is whole.
    assert sorted(path.name for path in partial.parent.iterdir()) == ["factor_arguments.json"]
    monkeypatch.undo()

    model = pipeline.construct_resnet9()
    checkpoint = tmp_path / "checkpoints" / "model.safetensors"
    checkpoints.save_model(model, checkpoint)
    monkeypatch.setattr(checkpoints, "save_file", no_space)
    with pytest.raises(InfluenceError, match=r"cannot write .*model.safetensors: no space .*--checkpoint_dir$"):
        checkpoints.save_model(pipeline.construct_resnet9(), checkpoint)
    checkpoints.load_model(checkpoint, "cpu")  # the earlier checkpoint is whole
    assert sorted(path.name for path in checkpoint.parent.iterdir()) == ["model.safetensors"]

    error = influence.storage.write_error(Path("x"), PermissionError(errno.EACCES, "Permission denied"), None, "--f")
    assert str(error) == "cannot write x: permission denied: make . writable, or choose another --f"


@contextlib.contextmanager
def small_filesystem(folder: Path, size: str):
    """A tmpfs of `size` mounted on `folder` (root only), unmounted after."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}); the injected test covers it")
    try:
        yield folder
    finally:  # lazily: tensors loaded from it may still map a file until they are collected
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root; the injected test covers it")
def test_a_real_full_disk_while_saving_factors(trained, tmp_path):
    # EK-FAC of ResNet-9: the gradient covariances (1 MB) fit in 3 MB, the activation covariances (90 MB) do not.
    with small_filesystem(tmp_path / "small", "3m") as results:
        failed = last_line(run("analyze.py", *analyze_args(trained, results, "ekfac"), expect=2).stderr, "error: ")
        factors = results / "cifar10" / "factors_ekfac"
        assert failed.startswith(
            f"error: cannot write {factors / 'activation_covariance.safetensors'}: no space left on the device "
            "(it needs about 89.9 MB, "
        ), failed
        assert failed.endswith("free there): free some space there, or choose another --output_dir"), failed
        saved = sorted(path.name for path in factors.iterdir())
        assert saved == ["factor_arguments.json", "gradient_covariance.safetensors"]
        gradient = load_tensors(factors / "gradient_covariance.safetensors")
        assert all(torch.isfinite(tensor).all() for tensor in gradient.values())
        assert relative_error(gradient["9"], gradient["9"].T) < 1e-6  # whole: the last layer's S is there, symmetric
