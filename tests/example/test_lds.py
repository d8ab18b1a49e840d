"""The linear datamodeling score: its math against cases worked by hand, and evaluate_lds.py at tiny scale on the
synthetic CIFAR-10 (files, a killed run resumed, two processes against one)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from example import lds
from example.task import ClassificationTask
from pipeline import construct_resnet9, get_cifar10
from tests.helpers import assert_stopped, run, run_ranks, signal_at

M, K, N, Q = 3, 2, 32, 4  # M = 3: the fewest subsets a rank correlation takes


# ---- The math ----


def test_lds_of_a_case_worked_by_hand():
    # Scores of 3 training examples for one query; 4 subsets. Predictions: 1+2=3, 2+4=6, 1+4=5, 1.
    scores = torch.tensor([[1.0, 2.0, 4.0]])
    masks = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 1], [1, 0, 0]], dtype=torch.bool)
    predicted = lds.predicted_margins(scores, masks)
    assert predicted[:, 0].tolist() == [3.0, 6.0, 5.0, 1.0]
    # Two seeds, mean margins 0.1, 0.4, 0.3, 0.2: ranks 1 4 3 2 against 2 4 3 1, sum d^2 = 2, 1 - 6*2/(4*15) = 0.8.
    margins = torch.tensor([[0.0, 0.2], [0.4, 0.4], [0.5, 0.1], [0.3, 0.1]]).view(4, 2, 1)
    assert lds.lds_per_query(predicted, margins) == pytest.approx([0.8])
    # Ties take average ranks (scipy's spearmanr agrees); a constant query is NaN, left out of the mean and counted.
    x, y = np.array([[1.0, 1.0], [2.0, 1.0], [2.0, 1.0], [3.0, 1.0]]), np.array([[1.0, 2], [3, 1], [2, 3], [4, 4]])
    found = lds.spearman(x, y)
    assert found[0] == pytest.approx(0.9486832980505138) and math.isnan(found[1])
    summary = lds.summarize(np.array([0.8, np.nan, 0.4]))
    assert summary["mean"] == pytest.approx(0.6) and summary["queries_left_out"] == 1
    assert summary["per_query"] == [0.8, None, 0.4]
    low, high = summary["interval_95"]
    assert 0.4 <= low <= 0.6 <= high <= 0.8


@pytest.mark.parametrize(("shape", "axis"), [((9,), 0), ((5, 9), 0), ((5, 9), 1), ((3, 4, 6), 1), ((2, 0), 1)])
def test_average_ranks_are_scipys_rankdata(shape, axis):
    from scipy.stats import rankdata

    from example.ranking import average_ranks

    values = np.random.default_rng(0).integers(0, 4, size=shape).astype(np.float64)  # many ties
    found = average_ranks(values, axis=axis)
    assert found.dtype == np.float64 and np.array_equal(found, rankdata(values, axis=axis))
    assert average_ranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    with pytest.raises(ValueError, match="finite"):
        average_ranks(np.array([1.0, np.nan]))


def test_masks_hold_exactly_alpha_n_examples_drawn_from_the_seed():
    masks = lds.draw_masks(10, 7, 0.5, seed=3)
    assert masks.dtype == torch.bool and masks.shape == (10, 7)
    assert (masks.sum(dim=1) == 4).all()  # round(3.5) = 4
    assert torch.equal(masks, lds.draw_masks(10, 7, 0.5, seed=3))
    assert not torch.equal(masks, lds.draw_masks(10, 7, 0.5, seed=4))


def test_scores_exactly_linear_in_the_subset_give_1_and_random_scores_about_0():
    generator = torch.Generator().manual_seed(0)
    masks = lds.draw_masks(200, 100, 0.5, seed=0)
    scores = torch.randn(50, 100, generator=generator, dtype=torch.float64)
    # Each seed's margin is the linear model plus a constant of its own: the mean over seeds is exactly linear.
    margins = (masks.double() @ scores.T)[:, None, :] + torch.tensor([0.0, 5.0]).view(1, 2, 1)
    exact = lds.summarize(lds.lds_per_query(lds.predicted_margins(scores, masks), margins))
    assert exact["mean"] == pytest.approx(1.0) and exact["interval_95"] == pytest.approx([1.0, 1.0])
    random = lds.summarize(lds.lds_per_query(lds.predicted_margins(lds.random_scores(50, 100, 1), masks), margins))
    assert abs(random["mean"]) < 0.03 and random["interval_95"][0] < 0 < random["interval_95"][1]
    assert lds.seed_agreement(margins) == pytest.approx(np.ones(50))


def test_a_paired_difference_cancels_the_spread_the_queries_share():
    # Two strategies whose LDS differ by exactly 0.1 on every query, over queries spread from -0.5 to 0.9: each
    # mean alone has a wide interval, their difference none. Queries left out by either are left out of both.
    reference = np.linspace(-0.5, 0.8, 40)
    better = reference + 0.1
    reference[3], better[7] = np.nan, np.nan
    difference = lds.paired_difference(better, reference)
    assert difference["mean"] == pytest.approx(0.1) and difference["interval_95"] == pytest.approx([0.1, 0.1])
    assert difference["queries_used"] == 38
    alone = lds.summarize(better)["interval_95"]
    assert alone[1] - alone[0] > 0.2
    # Against a hand-checked case: differences 0.3, -0.1, 0.4 (the NaN query dropped), mean 0.2.
    found = lds.paired_difference(np.array([0.5, 0.1, np.nan, 0.6]), np.array([0.2, 0.2, 0.3, 0.2]))
    low, high = found["interval_95"]
    assert found["mean"] == pytest.approx(0.2) and -0.1 - 1e-12 <= low < 0.2 < high <= 0.4 + 1e-12


def test_the_margins_are_the_measurement_analyze_scores(fake_cifar_dir):
    from evaluate_lds import query_margins

    torch.manual_seed(0)
    model = construct_resnet9().eval()
    queries = get_cifar10(fake_cifar_dir, "valid", device="cpu").subset(6)
    margins = query_margins(model, queries, batch_size=4)
    x, y = queries.images, queries.labels
    from pipeline import normalize

    with torch.no_grad():
        for i in range(6):
            measurement = ClassificationTask().compute_measurement((normalize(x[i : i + 1]), y[i : i + 1]), model)
            assert margins[i].item() == pytest.approx(-measurement.item(), abs=1e-5)


def test_no_two_retrainings_share_an_epochs_order_and_augmentation():
    from evaluate_lds import unit_seed

    # A run seeds epoch e's generator with its seed + e: the units' [seed, seed + epochs) must not meet, nor the
    # full model's (seed 1004).
    epochs = 1000
    starts = sorted([1004] + [unit_seed(1004, j, k) for j in range(100) for k in range(2)])
    assert all(b - a >= epochs for a, b in zip(starts[:-1], starts[1:], strict=True)) and starts[-1] + epochs < 2**63
    assert unit_seed(1004, 3, 1) == unit_seed(1004, 3, 1) != unit_seed(1005, 3, 1)  # reproducible, from --seed


# ---- evaluate_lds.py, tiny ----


def lds_args(data: Path, out: Path, *strategies: str) -> list[str]:
    return [
        "--dataset_dir", str(data), "--output_dir", str(out), "--num_train", str(N), "--num_queries", str(Q),
        "--num_subsets", str(M), "--seeds_per_subset", str(K), "--train_batch_size", "16", "--num_train_epochs",
        "2", "--factor_strategy", *strategies, "--save_interval", "1000",
    ]  # fmt: skip


@pytest.fixture(scope="module")
def reference(fake_cifar_dir, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("lds") / "reference"
    damping = ["--damping_factor", "0.001", "heuristic"]
    result = run("evaluate_lds.py", *lds_args(fake_cifar_dir, out, "identity", "diagonal"), *damping)
    return {"out": out, "stdout": result.stdout, "data": fake_cifar_dir}


def test_evaluate_lds_writes_files_readable_on_their_own(reference):
    out = reference["out"]
    masks = load_file(out / "masks.safetensors")["masks"]
    margins = load_file(out / "margins.safetensors")["margins"]
    assert masks.dtype == torch.bool and masks.shape == (M, N) and (masks.sum(dim=1) == N // 2).all()
    assert margins.dtype == torch.float32 and margins.shape == (M, K, Q) and torch.isfinite(margins).all()
    assert f"models: 0 of {M * K + 1} done, {M * K + 1} to train" in reference["stdout"]
    summary = json.loads((out / "lds.json").read_text())
    assert (summary["num_train"], summary["num_queries"], summary["num_subsets"]) == (N, Q, M)
    assert summary["recipe"]["num_train_epochs"] == 2 and summary["seconds_per_retrained_model"] > 0
    assert set(summary["query_accuracy"]) == {"full_model", "retrained_models"}
    assert 0 <= summary["query_accuracy"]["retrained_models"] <= 1
    rows = {(row["scores"], row["damping"]): row for row in summary["results"]}
    assert set(rows) == {
        ("identity", "0.001"), ("identity", "heuristic"), ("diagonal", "0.001"), ("diagonal", "heuristic"),
        ("random", None), ("seed agreement", None),
    }  # fmt: skip
    for row in rows.values():
        assert len(row["per_query"]) == Q and row["queries_used"] + row["queries_left_out"] == Q
        assert row["queries_used"] > 0, row  # else the interval below would check nothing
        assert -1 <= row["interval_95"][0] <= row["mean"] <= row["interval_95"][1] <= 1
    # The LDS of saved scores, recomputed from the files alone.
    scores = load_file(
        out / "influence_results" / "lds" / "scores_diagonal_damping_0.001" / "pairwise_scores.safetensors"
    )
    per_query = lds.lds_per_query(lds.predicted_margins(scores["all_modules"], masks), margins)
    assert lds.summarize(per_query)["per_query"] == rows[("diagonal", "0.001")]["per_query"]
    # Each strategy beside identity on the same queries, in the JSON and the table.
    paired = lds.paired_difference(per_query, np.array(rows[("identity", "0.001")]["per_query"], dtype=np.float64))
    found = rows[("diagonal", "0.001")]["vs_identity"]
    assert found["mean"] == pytest.approx(paired["mean"], nan_ok=True) and "vs_identity" not in rows[("random", None)]
    assert "minus identity (paired, 95%)" in (out / "lds.md").read_text()
    assert "| diagonal | heuristic |" in (out / "lds.md").read_text() and (out / "lds.png").stat().st_size > 10_000
    assert not list(out.rglob("*.partial.safetensors"))  # the models themselves are not kept, nor their states


def test_a_killed_run_resumes_without_retraining_finished_models(reference, tmp_path, monkeypatch):
    out = tmp_path / "killed"
    args = lds_args(reference["data"], out, "identity")
    # Batches counted: the full model 2 epochs x 2, then per model 2 training steps, 1 of margins and 1 of
    # accuracy; batch 9 is the first step of model (0, 1).
    with signal_at(monkeypatch, 9):
        stopped = run("evaluate_lds.py", *args, expect=143)
    state = out / "units" / "margins_0000_01.partial.safetensors"
    assert_stopped(stopped, f"the training state at epoch 1/2, step 1/1 to {state} in ")
    assert torch.equal(
        load_file(out / "masks.safetensors")["masks"], load_file(reference["out"] / "masks.safetensors")["masks"]
    )
    resumed = run("evaluate_lds.py", *args)
    assert f"models: 2 of {M * K + 1} done, {M * K - 1} to train" in resumed.stdout
    assert "resuming from margins_0000_01.partial.safetensors at epoch 1/2, step 1/1" in resumed.stdout
    found, expected = (load_file(path / "margins.safetensors")["margins"] for path in (out, reference["out"]))
    assert torch.equal(found, expected)
    # Another run's settings in the same folder: one line, nothing touched.
    refused = run("evaluate_lds.py", *args, "--alpha", "0.25", expect=2)
    assert (
        refused.stderr == f"error: {out} holds retrainings with alpha=0.5, now alpha=0.25: choose another "
        "--output_dir, or delete it to start over\n"
    )


def test_two_processes_give_the_margins_of_one(reference, tmp_path):
    out = tmp_path / "two"
    result = run_ranks("evaluate_lds.py", *lds_args(reference["data"], out, "identity"))
    assert result.stdout.count("| identity |") == 1  # rank 0 alone reports
    for name, key in (("masks", "masks"), ("margins", "margins")):
        found = load_file(out / f"{name}.safetensors")[key]
        expected = load_file(reference["out"] / f"{name}.safetensors")[key]
        assert torch.allclose(found.float(), expected.float(), atol=1e-5), (
            name,
            (found.float() - expected.float()).abs().max(),
        )


def test_help_shows_the_commands_and_a_bad_flag_is_one_line():
    shown = run("evaluate_lds.py", "--help").stdout
    assert "torchrun --nproc_per_node=2 evaluate_lds.py --dataset_dir ./data --output_dir ./lds_results/cpu" in shown
    for flag, value, message in (
        ("--alpha", "1.5", "--alpha must be between 0 and 1, got 1.5"),
        ("--num_subsets", "2", "--num_subsets must be at least 3 for a rank correlation, got 2"),
        (
            "--damping_factor",
            "-1",
            "argument --damping_factor: damping must be a finite number >= 0 or 'heuristic', got -1",
        ),
    ):
        refused = run("evaluate_lds.py", flag, value, expect=2)
        assert refused.stderr == f"error: {message} (see --help)\n", refused.stderr
