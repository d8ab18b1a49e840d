"""Several processes (gloo on the CPU, started here on a free port) and interrupted runs give the one-process results.

Each test runs tests/engine_worker.py: in this process for the reference, in 2 or 3 child processes otherwise.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from influence.storage import load_tensors
from tests import engine_worker
from tests.reference import relative_error

WORKER = Path(engine_worker.__file__)
REPO_ROOT = WORKER.parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(out: Path, world: int, options: dict, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start `world` worker processes the way torchrun would (RANK, WORLD_SIZE, MASTER_*), wait for all of them."""
    port = free_port()
    processes = []
    for rank in range(world):
        env = {
            **os.environ,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        if world == 1:
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key)
        command = [sys.executable, str(WORKER), str(out), json.dumps(options)]
        processes.append(
            subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        )
    results = []
    deadline = time.monotonic() + timeout
    for process in processes:
        try:
            stdout, stderr = process.communicate(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for other in processes:
                other.kill()
            raise AssertionError(f"worker processes did not finish within {timeout} s") from None
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def result_files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every factor and score file of a case, except the eigenvectors (defined up to sign)."""
    return {
        str(path.relative_to(folder)): load_tensors(path)
        for path in sorted(folder.rglob("*.safetensors"))
        if "eigenvectors" not in path.name
    }


def assert_same(case_folder: Path, reference_folder: Path) -> None:
    found, expected = result_files(case_folder), result_files(reference_folder)
    assert found.keys() == expected.keys()
    assert not [name for name in found if ".partial." in name]
    for name, tensors in expected.items():
        assert found[name].keys() == tensors.keys(), name
        for key, tensor in tensors.items():
            if tensor.dtype == torch.int64 or tensor.abs().max() == 0:
                assert torch.equal(found[name][key], tensor), (name, key)
            else:
                assert relative_error(found[name][key], tensor) < 1e-10, (name, key)


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


def test_a_killed_run_resumes_each_pass_where_it_stopped(tmp_path, reference):
    """SIGKILL in the middle of each of the four passes in turn; every rerun resumes the pass killed before it."""
    case = "ekfac_true_b7"  # true Fisher: the resumed batches must sample the labels the killed run would have
    options = {"cases": [case], "save_interval": 0}
    # Passes over the training data (counted per run): covariance, Lambda, one per query batch, self-influence.
    kills = [
        ((1, 3), None),  # covariance, after 3 of 5 batches
        ((2, 2), "Fit covariance: resuming from activation_covariance.partial.safetensors after 3 batches (21 ex"),
        ((3, 4), "Fit Lambda: resuming from lambda_matrix.partial.safetensors after 2 batches (14 examples)"),
        ((2, 1), "Pairwise scores: resuming from pairwise_scores.partial.safetensors after 1 query batches (3 q"),
        (None, "Self-influence scores: resuming from self_scores.partial.safetensors after 1 batches (7 examples)"),
    ]
    for kill, resumed in kills:
        (result,) = launch(tmp_path, 1, {**options, "kill": kill})
        if kill is not None:
            assert result.returncode == -9, result.stderr  # killed, not finished
        else:
            assert result.returncode == 0, result.stderr
        if resumed is not None:
            assert resumed in result.stdout, result.stdout
    assert_same(tmp_path / case, reference / case)


def test_a_failing_rank_stops_every_process_and_is_named(tmp_path):
    start = time.monotonic()
    results = launch(tmp_path, 3, {"cases": ["ekfac_true_b7"], "fail_rank": 1, "timeout": 30}, timeout=120)
    assert time.monotonic() - start < 60
    assert all(result.returncode != 0 for result in results), [r.returncode for r in results]
    assert "ValueError: injected failure" in results[1].stderr
    for rank in (0, 2):
        lines = results[rank].stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), results[rank].stderr
        assert "rank 1: ValueError: injected failure" in lines[0]
