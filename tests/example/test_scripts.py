"""The shell scripts end to end on a tiny synthetic CIFAR-10: outputs exist, have the right shapes, are finite."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from example.checkpoints import load_model
from influence.storage import load_tensors
from pipeline import load_cifar10_arrays
from tests.helpers import NUM_TRAIN, one_line_error, run, run_ranks, torchrun

NUM_QUERIES = 6


@pytest.fixture(scope="module")
def workspace(fake_cifar_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("scripts")
    paths = {
        "data": str(fake_cifar_dir),
        "checkpoints": str(root / "checkpoints"),
        "results": str(root / "influence_results"),
        "figures": root / "figure",
    }
    common = ["--dataset_dir", paths["data"], "--checkpoint_dir", paths["checkpoints"], "--train_batch_size", "64"]
    common += ["--num_train", str(NUM_TRAIN), "--num_train_epochs", "2"]
    assert not Path(paths["checkpoints"]).exists()  # train.py makes the folder
    # What train.py printed, for test_train_end_to_end: the models every test here uses are its subject too.
    paths["trained"] = run("train.py", *common).stdout
    paths["trained_corrupt"] = run("train.py", *common, "--corrupt_percentage", "0.1").stdout
    return paths


def test_train_end_to_end(workspace):
    assert "test accuracy" in workspace["trained"]
    model = load_model(Path(workspace["checkpoints"]) / "model.safetensors", "cpu")
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert "(7 with changed labels)" in workspace["trained_corrupt"]
    assert (Path(workspace["checkpoints"]) / "model_corrupt_0.1.safetensors").is_file()


def test_train_in_bf16_follows_fp32(workspace, tmp_path):
    """The same recipe under bf16 autocast (products carried in fp32 where the CPU has no bf16 kernels) ends at the
    fp32 run's training loss, to within a tenth of what the fp32 run learned after its first epoch."""
    common = ["--dataset_dir", workspace["data"], "--checkpoint_dir", str(tmp_path), "--train_batch_size", "64"]
    printed = run("train.py", *common, "--num_train", str(NUM_TRAIN), "--num_train_epochs", "2", "--use_half_precision")
    losses = {}
    for name, output in (("fp32", workspace["trained"]), ("bf16", printed.stdout)):
        # each epoch's running loss, then the final model's on its training labels
        losses[name] = [float(word) for word in re.findall(r"train loss ([0-9.]+)", output)]
    (first, _, final), bf16_final = losses["fp32"], losses["bf16"][-1]
    assert len(losses["bf16"]) == 3 and abs(bf16_final - final) < 0.1 * (first - final), losses


def analyze_args(paths, strategy, *extra):
    return [
        "--dataset_dir", paths["data"], "--checkpoint_dir", paths["checkpoints"], "--output_dir", paths["results"],
        "--factor_strategy", strategy, "--num_train", str(NUM_TRAIN), "--num_queries", str(NUM_QUERIES),
        "--query_batch_size", "3", "--influence_batch_size", "48", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
def test_analyze_every_strategy(workspace, strategy):
    result = run("analyze.py", *analyze_args(workspace, strategy, "--profile"))
    assert f"Scores shape: ({NUM_QUERIES}, {NUM_TRAIN})" in result.stdout
    assert "|  Compute Pairwise Score" in result.stdout and "|  Total" in result.stdout
    folder = Path(workspace["results"]) / "cifar10" / f"scores_{strategy}"
    scores = load_tensors(folder / "pairwise_scores.safetensors")["all_modules"]
    assert scores.shape == (NUM_QUERIES, NUM_TRAIN) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all() and scores.abs().max() > 0
    # A second run reuses what is saved; a run on other data is refused, in one line.
    again = run("analyze.py", *analyze_args(workspace, strategy, "--profile"))
    assert "|  Load Pairwise Score" in again.stdout and "|  Fit" not in again.stdout
    refused = run("analyze.py", *analyze_args(workspace, strategy)[:-6], "--num_queries", "7", expect=2)
    assert refused.stderr.startswith("error: ") and refused.stderr.count("\n") == 1
    assert "num_queries" in refused.stderr and "--overwrite_output_dir" in refused.stderr
    # The engine's lines about results it reuses or discards name the flag, not the Analyzer's argument.
    if strategy == "diagonal":  # the cheapest strategy with factors to discard
        redone = run("analyze.py", *analyze_args(workspace, strategy), "--overwrite_output_dir")
        said = redone.stdout + redone.stderr
        assert "--overwrite_output_dir: discarding the finished factors" in said, said


def test_half_precision_and_pictures(workspace, tmp_path):
    # The cheapest strategy on a few examples: the scripts' bf16 path end to end. The bf16 EK-FAC paths are
    # checked in test_engine and measured in the README.
    results = str(tmp_path / "results")
    small = ["--output_dir", results, "--num_train", "16", "--num_queries", "4", "--query_batch_size", "4"]
    run("analyze.py", *analyze_args(workspace, "identity"), *small)
    run("analyze.py", *analyze_args(workspace, "identity", "--use_half_precision"), *small)
    half = load_tensors(Path(results) / "cifar10" / "scores_identity_half" / "pairwise_scores.safetensors")
    assert half["all_modules"].shape == (4, 16) and torch.isfinite(half["all_modules"]).all()

    figure = workspace["figures"] / "half_precision.png"
    args = ["--output_dir", results, "--factor_strategy", "identity", "--figure", str(figure)]
    result = run("half_precision_analysis.py", *args)
    mean = float(result.stdout.split("mean ")[1].split()[0])
    assert 0.5 < mean <= 1.0  # the agreement itself is measured on CIFAR-10 (README) and in test_engine
    assert figure.stat().st_size > 10_000
    recorded = Path(results) / "cifar10" / "scores_identity_half" / "score_arguments.json"
    saved = json.loads(recorded.read_text())
    saved["info"]["checkpoint_sha256"] = "0" * 64  # bf16 scores of another model
    recorded.write_text(json.dumps(saved))
    refused = run("half_precision_analysis.py", *args, expect=2)
    assert "the fp32 and bf16 scores differ in checkpoint_sha256" in one_line_error(refused)

    run("analyze.py", *analyze_args(workspace, "ekfac"))
    figure = workspace["figures"] / "top_influential.png"
    args = ["--dataset_dir", workspace["data"], "--output_dir", workspace["results"], "--figure", str(figure)]
    run("top_influential.py", *args, "--queries", "0", "3", "--top_k", "3")
    assert figure.stat().st_size > 10_000
    recorded = Path(workspace["results"]) / "cifar10" / "scores_ekfac" / "score_arguments.json"
    saved = json.loads(recorded.read_text())
    recorded.write_text(json.dumps({**saved, "info": {**saved["info"], "data_sha256": "0" * 64}}))
    refused = run("top_influential.py", *args, expect=2)  # the pictures would show other images than were scored
    assert "made from other images or labels than those in" in one_line_error(refused)
    recorded.write_text(json.dumps(saved))


def test_detect_mislabeled(workspace):
    figure = workspace["figures"] / "mislabel.png"
    args = [
        "--dataset_dir",
        workspace["data"],
        "--checkpoint_dir",
        workspace["checkpoints"],
        "--output_dir",
        workspace["results"],
        "--num_train",
        str(NUM_TRAIN),
        "--train_batch_size",
        "64",
        "--figure",
        str(figure),
    ]
    run("detect_mislabeled_dataset.py", *args, "--factor_strategy", "identity")
    result = run("detect_mislabeled_dataset.py", *args, "--factor_strategy", "ekfac")
    assert "7 of 64 training labels are wrong" in result.stdout
    lines = [line for line in result.stdout.splitlines() if line.strip().endswith("%") and "inspected" not in line]
    assert len(lines) == 9
    header = next(line for line in result.stdout.splitlines() if line.startswith("inspected"))
    for column in ("identity", "EK-FAC", "training loss", "random"):
        assert column in header
    aucs = next(line for line in result.stdout.splitlines() if line.startswith("ROC AUC")).split()[2:]
    assert len(aucs) == 4
    scores = load_tensors(Path(workspace["results"]) / "mislabeled" / "scores_ekfac" / "self_scores.safetensors")
    assert scores["all_modules"].shape == (NUM_TRAIN,) and torch.isfinite(scores["all_modules"]).all()
    # The EK-FAC column is the saved self-scores' ranking of the 7 wrong labels, which are the first 7 examples.
    from detect_mislabeled_dataset import INSPECTED, detection_curve, roc_auc

    column = sorted(("identity", "EK-FAC", "training loss", "random"), key=header.find).index("EK-FAC")
    own, wrong = scores["all_modules"].double().numpy(), np.arange(NUM_TRAIN) < 7
    printed = [float(line.split()[1 + column].rstrip("%")) for line in lines]
    assert printed == pytest.approx([100 * share for share in detection_curve(own, wrong, INSPECTED)], abs=0.051)
    assert float(aucs[column]) == pytest.approx(roc_auc(own, wrong), abs=5.1e-4)
    assert (scores["all_modules"] >= 0).all()  # <P(G), G> with a positive definite P
    assert figure.stat().st_size > 10_000
    assert (figure.parent / "mislabel_top.png").stat().st_size > 10_000


def test_detect_mislabeled_with_real_label_noise(workspace, tmp_path):
    noisy = load_cifar10_arrays(workspace["data"], train=True)[1].numpy()
    noisy[[3, 10, 20]] = (noisy[[3, 10, 20]] + 1) % 10
    path = tmp_path / "noisy.npz"
    np.savez(path, human=noisy)
    common = [
        "--dataset_dir",
        workspace["data"],
        "--checkpoint_dir",
        workspace["checkpoints"],
        "--num_train",
        str(NUM_TRAIN),
        "--noisy_labels",
        str(path),
        "--noisy_labels_key",
        "human",
    ]
    run("train.py", *common, "--num_train_epochs", "1", "--train_batch_size", "64")
    figure = workspace["figures"] / "mislabel_noisy.png"
    result = run(
        "detect_mislabeled_dataset.py",
        *common,
        "--output_dir",
        workspace["results"],
        "--factor_strategy",
        "diagonal",
        "--figure",
        str(figure),
    )
    assert "3 of 64 training labels are wrong (noisy:noisy.npz:human)" in result.stdout
    assert (
        Path(workspace["results"]) / "mislabeled" / "scores_noisy_human_diagonal" / "self_scores.safetensors"
    ).exists()
    assert figure.exists()


def test_script_errors_are_one_line(workspace, tmp_path):
    cases = [
        ("analyze.py", ["--checkpoint_dir", str(tmp_path)], "run train.py first"),
        ("analyze.py", ["--factor_strategy", "ekfca"], "invalid choice"),
        (
            "analyze.py",
            ["--dataset_dir", str(tmp_path / "none"), "--checkpoint_dir", workspace["checkpoints"]],
            "copy cifar-10-batches-py/ into the dataset dir",
        ),
        ("detect_mislabeled_dataset.py", ["--checkpoint_dir", str(tmp_path)], "run train.py first"),
        ("half_precision_analysis.py", ["--output_dir", str(tmp_path)], "run python analyze.py"),
        ("top_influential.py", ["--output_dir", str(tmp_path)], "run python analyze.py"),
        ("analyze.py", ["--damping_factor", "lots"], "expected a number or 'heuristic'"),
    ]
    for script, args, hint in cases:
        result = run(script, *args, expect=2)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, (script, result.stderr)
        assert hint in result.stderr, (script, result.stderr)
    for script in (
        "analyze.py",
        "detect_mislabeled_dataset.py",
        "half_precision_analysis.py",
        "top_influential.py",
        "bench.py",
    ):
        assert "--help" in run(script, "--help").stdout


def test_roc_auc_against_hand_computed_cases():
    from detect_mislabeled_dataset import roc_auc

    # Positives score 0.9 and 0.7; negatives 0.8, 0.6, 0.5: of the 6 (positive, negative) pairs, the positive
    # ranks higher in 3 (0.9) + 2 (0.7) of them.
    assert roc_auc(np.array([0.9, 0.8, 0.7, 0.6, 0.5]), np.array([1, 0, 1, 0, 0], dtype=bool)) == pytest.approx(5 / 6)
    # A tie counts one half: the positive beats one negative and ties the other.
    assert roc_auc(np.array([1.0, 1.0, 0.0]), np.array([True, False, False])) == pytest.approx(0.75)
    assert roc_auc(np.array([3.0, 2.0, 1.0]), np.array([False, True, True])) == 0.0


# ---- Unreadable files, several processes ----


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def test_unreadable_result_files_are_one_line_errors(workspace, tmp_path):
    results = tmp_path / "results"
    args = [*analyze_args(workspace, "diagonal"), "--output_dir", str(results)]
    run("analyze.py", *args)
    analysis = results / "cifar10"
    lambda_file = analysis / "factors_diagonal" / "lambda_matrix.safetensors"
    cases = {
        lambda_file: lambda_file.read_bytes()[: lambda_file.stat().st_size // 2],  # truncated
        analysis / "scores_diagonal" / "pairwise_scores.safetensors": b"\x00garbage" * 20,
        analysis / "factors_diagonal" / "factor_arguments.json": b'{"strategy": "diag',
        analysis / "scores_diagonal" / "score_arguments.json": b"\xff\xfe not json",
    }
    for path, broken in cases.items():
        good = path.read_bytes()
        path.write_bytes(broken)
        before = snapshot(results)
        result = run("analyze.py", *args, expect=2)
        assert result.stderr.startswith("error: cannot read ") and result.stderr.count("\n") == 1, result.stderr
        assert str(path) in result.stderr and "--overwrite_output_dir" in result.stderr
        assert snapshot(results) == before, path  # nothing else written or removed
        path.write_bytes(good)

    # A broken partial result is only a lost shortcut: it is discarded, saying so, and the scores recomputed.
    scores = analysis / "scores_diagonal" / "pairwise_scores.safetensors"
    expected = load_tensors(scores)["all_modules"]
    scores.unlink()
    (scores.parent / "pairwise_scores.partial.safetensors").write_bytes(b"not a safetensors file")
    result = run("analyze.py", *args)
    assert "discarding" in result.stdout and "unreadable" in result.stdout
    assert torch.equal(load_tensors(scores)["all_modules"], expected)
    assert not (scores.parent / "pairwise_scores.partial.safetensors").exists()


def test_the_ranks_gradients_average_to_the_whole_batchs_mean():
    # DDP averages the ranks' gradients; slices of 3, 3 and 2 of a batch of 8 must not weigh their examples unequally.
    from example.training import slice_loss

    torch.manual_seed(0)
    layer = torch.nn.Linear(5, 4).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 4, (8,))

    def gradient(loss):
        layer.zero_grad()
        loss.backward()
        return layer.weight.grad.clone()

    whole = gradient(torch.nn.functional.cross_entropy(layer(x), y))
    world = 3
    summed = [torch.nn.functional.cross_entropy(layer(x[r::world]), y[r::world], reduction="sum") for r in range(3)]
    slices = [gradient(slice_loss(loss, world, 8)) for loss in summed]
    assert torch.allclose(sum(slices) / world, whole, rtol=1e-12, atol=1e-15)


def test_fewer_training_images_than_processes_is_one_line(fake_cifar_dir, tmp_path):
    args = ["--dataset_dir", str(fake_cifar_dir), "--checkpoint_dir", str(tmp_path), "--num_train", "1"]
    result = run_ranks("train.py", *args, "--num_train_epochs", "1", expect=2)
    assert "1 training images cannot be split across 2 processes" in result.stderr, result.stderr


def test_torchrun_train_and_detect_on_cpu_processes(workspace, fake_cifar_dir, tmp_path):
    """Two CPU processes (gloo), whatever GPUs the machine has; tests/gpu/test_gpu.py runs them on GPUs (nccl).
    Training is started by torchrun itself (its agent hosts the rendezvous), detection as torchrun starts its
    workers, without the launcher (rank 0 hosts it)."""
    checkpoints = tmp_path / "checkpoints"
    common = ["--dataset_dir", str(fake_cifar_dir), "--checkpoint_dir", str(checkpoints)]
    result = torchrun("train.py", *common, "--num_train", "64", "--num_train_epochs", "1", "--train_batch_size", "32")
    assert result.stdout.count("saved ") == 1 and "2 processes on cpu" in result.stdout
    assert [path.name for path in checkpoints.iterdir()] == ["model.safetensors"]
    load_model(checkpoints / "model.safetensors", "cpu")

    # Self-influence split over two processes equals the one-process scores of the same run.
    args = [
        "--dataset_dir", workspace["data"], "--checkpoint_dir", workspace["checkpoints"], "--num_train",
        str(NUM_TRAIN), "--influence_batch_size", "24", "--factor_strategy", "diagonal", "--figure",
        str(tmp_path / "mislabel.png"),
    ]  # fmt: skip
    run("detect_mislabeled_dataset.py", *args, "--output_dir", str(tmp_path / "one"))  # one process, no launcher
    result = run_ranks("detect_mislabeled_dataset.py", *args, "--output_dir", str(tmp_path / "two"))
    assert result.stdout.count("training labels are wrong") == 1  # rank 0 alone reports
    one, two = (
        load_tensors(tmp_path / name / "mislabeled" / "scores_diagonal" / "self_scores.safetensors")["all_modules"]
        for name in ("one", "two")
    )
    assert ((two - one).norm() / one.norm()).item() < 1e-5


def test_walkthrough_arguments(tmp_path):
    for args, message in (
        (["--scale", "tpu"], "invalid choice: 'tpu' (choose from 'demo', 'cpu', 'full', 'gpu')"),
        ([], "the following arguments are required: --scale"),
        (["--scale", "cpu", "--noisy_labels", str(tmp_path / "none.npz")], "is not a file"),
    ):
        result = run("walkthrough.py", *args, expect=2)
        assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
        assert message in result.stderr, result.stderr
    result = run("walkthrough.py", "--scale", "gpu", "--out_dir", str(tmp_path / "gpu"), expect=2)  # GPU hidden
    assert result.stderr == "error: --scale gpu needs a GPU and torch sees none: run --scale cpu or --scale demo here\n"
    assert not (tmp_path / "gpu").exists()
    plan = run("walkthrough.py", "--scale", "cpu", "--dry_run", "--out_dir", str(tmp_path / "cpu")).stdout
    steps = [line.split(":")[0] for line in plan.splitlines()]
    assert steps[:2] == ["train_clean", "train_corrupt"] and "train_noisy" not in steps
    assert {f"detect_{strategy}" for strategy in ("identity", "diagonal", "kfac", "ekfac")} <= set(steps)
    assert "--num_train 2000" in plan and not (tmp_path / "cpu").exists()  # a dry run writes nothing
    full = run("walkthrough.py", "--scale", "gpu", "--dry_run").stdout
    assert "--num_train" not in full.split("bench_fp32")[0]  # the full job uses every training image
    cpu_full = run("walkthrough.py", "--scale", "full", "--dry_run", "--out_dir", str(tmp_path / "full")).stdout
    names = [line.split(":")[0] for line in cpu_full.splitlines()]
    assert names[:3] == ["train_corrupt", "detect_ekfac", "detect_identity"] and "bench_fp32" not in names
    assert "--num_train" not in cpu_full and "--use_channels_last" in cpu_full
    steps = {"analyze_ekfac_bf16", "half_precision"} | {
        f"detect_{s}" for s in ("identity", "diagonal", "kfac", "ekfac")
    }
    assert steps <= set(names)
    assert str(tmp_path / "full" / "checkpoints") in cpu_full and not (tmp_path / "full").exists()
    skip = ["--skip", "analyze_ekfac_bf16", "half_precision"]
    parted = run("walkthrough.py", "--scale", "full", "--dry_run", *skip, "--out_dir", str(tmp_path / "full")).stdout
    assert [line.split(":")[0] for line in parted.splitlines()] == [n for n in names if n not in skip]


def test_default_influence_batch_size_follows_the_device():
    from argparse import Namespace

    from example.flags import influence_batch_size

    assert influence_batch_size(Namespace(influence_batch_size=None), torch.device("cuda")) == 512
    assert influence_batch_size(Namespace(influence_batch_size=None), torch.device("cpu")) == 128
    assert influence_batch_size(Namespace(influence_batch_size=48), torch.device("cuda")) == 48


def test_the_influence_batch_has_one_name_and_the_original_examples_alias():
    import analyze
    import bench
    import detect_mislabeled_dataset
    import evaluate_lds
    import train
    from example.run import in_flags

    for script in (analyze, detect_mislabeled_dataset):  # kronfluence's example calls it --train_batch_size
        assert script.parse_args(["--train_batch_size", "32"]).influence_batch_size == 32
        assert script.parse_args(["--influence_batch_size", "32"]).influence_batch_size == 32
        assert script.parse_args(["--seed", "7"]).fisher_seed == 7  # the original's name of the Fisher's seed
        assert script.parse_args(["--fisher_seed", "7"]).fisher_seed == 7
    assert bench.parse_args(["--influence_batch_size", "32"]).influence_batch_size == 32
    lds = evaluate_lds.parse_args(["--influence_batch_size", "32", "--train_batch_size", "16"])
    assert (lds.influence_batch_size, lds.train_batch_size) == (32, 16)  # the SGD batch of the retrainings
    assert train.parse_args(["--train_batch_size", "16"]).train_batch_size == 16
    assert in_flags("with batches of 8: use smaller training or query batches") == (
        "with batches of 8: use a smaller --influence_batch_size or --query_batch_size"
    )
    # train.py's own recipe is named by its keys, which are its flags: nothing to rewrite
    refusal = "x.partial.safetensors holds the state of a run with train_batch_size=512, now train_batch_size=256"
    assert in_flags(refusal) == refusal
