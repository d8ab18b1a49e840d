"""Several processes (gloo on the CPU, started here on a free port) and interrupted runs give the one-process results.

Each test runs tests/engine_worker.py: in this process for the reference, in 2 or 3 child processes otherwise.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from influence.storage import load_tensors
from tests import engine_worker
from tests.helpers import assert_same, launch
from tests.reference import relative_error


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """Every case in this one process, whole batches, no partial saves."""
    out = tmp_path_factory.mktemp("reference")
    engine_worker.run(out, {})
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_processes_give_the_one_process_results(tmp_path, reference, world):
    # Chunks of a few examples inside each batch, and a partial save after every round, change nothing either.
    results = launch(tmp_path, world, {"max_elements": 60, "save_interval": 0})
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout}\n{result.stderr}"
    for case in engine_worker.cases():
        assert_same(tmp_path / case, reference / case)
        expected = load_tensors(reference / f"returned_rank0_{case}.safetensors")
        for rank in range(world):  # every rank got the full results back
            returned = load_tensors(tmp_path / f"returned_rank{rank}_{case}.safetensors")
            for key, tensor in expected.items():
                assert relative_error(returned[key], tensor) < 1e-10, (rank, case, key)


def test_a_killed_run_resumes_each_pass_where_it_stopped(tmp_path, reference, capsys):
    """SIGKILL in the middle of each of the four passes in turn; every rerun resumes the pass killed before it.
    The killed runs are processes of their own; the last one, which is not killed, runs in this process."""
    case = "ekfac_true_b7"  # true Fisher: the resumed batches must sample the labels the killed run would have
    options = {"cases": [case], "save_interval": 0}
    # Passes over the training data (counted per run): covariance, Lambda, one per query batch, self-influence.
    kills = [
        ((1, 3), None),  # covariance, after 3 of 5 batches
        ((2, 2), "Fit covariance: resuming from activation_covariance.partial.safetensors after 3 batches (21 ex"),
        ((3, 4), "Fit Lambda: resuming from lambda_matrix.partial.safetensors after 2 batches (14 examples)"),
        ((2, 1), "Pairwise scores: resuming from pairwise_scores.partial.safetensors after 1 query batches (3 q"),
    ]
    for kill, resumed in kills:
        (result,) = launch(tmp_path, 1, {**options, "kill": kill})
        assert result.returncode == -9, result.stderr  # killed, not finished
        if resumed is not None:
            assert resumed in result.stdout, result.stdout
    capsys.readouterr()
    engine_worker.run(tmp_path, options)
    resumed = "Self-influence scores: resuming from self_scores.partial.safetensors after 1 batches (7 examples)"
    assert resumed in capsys.readouterr().out
    assert_same(tmp_path / case, reference / case)


def test_a_failing_rank_stops_every_process_and_is_named(tmp_path):
    # Ranks 0 and 2 must end with the error naming rank 1 (their group's 30 s timeout bounds the wait), not be
    # killed by launch's 120 s limit.
    results = launch(tmp_path, 3, {"cases": ["ekfac_true_b7"], "fail_rank": 1, "timeout": 30}, timeout=120)
    assert all(result.returncode != 0 for result in results), [r.returncode for r in results]
    assert "ValueError: injected failure" in results[1].stderr
    for rank in (0, 2):
        lines = results[rank].stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), results[rank].stderr
        assert "rank 1: ValueError: injected failure" in lines[0]


def test_processes_share_a_sibling_eigenbasis(tmp_path, reference):
    # K-FAC then EK-FAC in one analysis: EK-FAC takes K-FAC's covariances and eigenbasis, which rank 0 finds and
    # every rank must learn about.
    cases = ["kfac_true_b7", "ekfac_true_b7"]
    results = launch(tmp_path, 2, {"cases": cases, "analysis": "shared"})
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout}\n{result.stderr}"
    taken = "factors_ekfac_true_b7: the covariances and eigendecomposition are those of factors_kfac_true_b7"
    assert taken in results[0].stdout, results[0].stdout
    for case in cases:
        expected = load_tensors(reference / f"returned_rank0_{case}.safetensors")
        for rank in range(2):
            returned = load_tensors(tmp_path / f"returned_rank{rank}_{case}.safetensors")
            for key, tensor in expected.items():
                assert relative_error(returned[key], tensor) < 1e-10, (rank, case, key)
