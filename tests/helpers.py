"""What several test modules share: how they run the scripts (in this process, or under torchrun), how they start
the engine's worker processes and compare their results, how they stop a run with a signal, and a tiny synthetic
CIFAR-10. Imported one way everywhere: `from tests.helpers import run`.

The float64 oracle the engine is held to is tests/reference.py; the worker processes run tests/engine_worker.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import runpy
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple
from unittest import mock

import numpy as np
import torch

import pipeline
from influence.storage import load_tensors
from tests.reference import relative_error

REPO_ROOT = Path(__file__).resolve().parent.parent
NUM_TRAIN = 64  # the training images of the scripts' tests (tests/example/test_scripts.py's workspace)


# ---- The scripts, in this process or under torchrun ----


class Result(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


def run(script: str, *args: str, expect: int = 0, gpu: bool = False) -> Result:
    """Run a script's __main__ in this process (no interpreter start-up per call) and capture what it prints.

    Without `gpu` the script sees no GPU even on a GPU host, as `torchrun(cpu=True)`'s processes: the tests that
    compare runs bit for bit (resumed with uninterrupted, two processes with one) hold on the CPU, whose kernels
    are deterministic, and would otherwise set a GPU run against a CPU one. tests/gpu asks for the GPU."""
    stdout, stderr = io.StringIO(), io.StringIO()
    code = 0
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), contextlib.ExitStack() as hidden:
            if not gpu:  # from this process and from the processes the script starts
                hidden.enter_context(mock.patch.object(torch.cuda, "is_available", return_value=False))
                hidden.enter_context(mock.patch.object(torch.cuda, "device_count", return_value=0))
                hidden.enter_context(mock.patch.dict(os.environ, {"CUDA_VISIBLE_DEVICES": ""}))
            runpy.run_path(str(REPO_ROOT / script), run_name="__main__")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        sys.argv = argv
    result = Result(code, stdout.getvalue(), stderr.getvalue())
    assert result.returncode == expect, f"{script} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(script: str, *args: str, processes: int = 2, expect: int = 0, cpu: bool = True):
    """Run a script under torchrun; with `cpu`, on CPU processes (gloo) even on a GPU host, its GPUs hidden."""
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}"]
    command += [f"--master_port={free_port()}", str(REPO_ROOT / script), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} | ({"CUDA_VISIBLE_DEVICES": ""} if cpu else {})
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == expect, f"{result.stdout}\n{result.stderr}"
    return result


# ---- The engine's worker processes (tests/engine_worker.py) and their results ----


def start_ranks(
    command: list[str], world: int, timeout: float = 240, hide_gpus: bool = False
) -> list[subprocess.CompletedProcess]:
    """Start `world` processes of `command` from the repository root with the environment torchrun gives its
    workers (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_*; none of them for one process) and one
    thread each, without torchrun's launcher (its import alone takes seconds); wait for all of them. With
    `hide_gpus`, CUDA_VISIBLE_DEVICES is empty: CPU processes (gloo) even on a GPU host."""
    port = free_port()
    processes = []
    for rank in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1"} | ({"CUDA_VISIBLE_DEVICES": ""} if hide_gpus else {})
        if world > 1:
            env |= {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
            env |= {"LOCAL_WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        else:
            for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
                env.pop(key, None)
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
            raise AssertionError(f"processes did not finish within {timeout} s") from None
        results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
    return results


def run_ranks(script: str, *args: str, processes: int = 2, expect: int = 0) -> Result:
    """Run a script as `processes` CPU processes (gloo) the way torchrun starts them (see start_ranks), GPUs
    hidden; returns rank 0's output. torchrun itself is tested by test_torchrun_train_and_detect_on_cpu_processes."""
    command = [sys.executable, str(REPO_ROOT / script), *args]
    results = start_ranks(command, processes, hide_gpus=True)
    for rank, result in enumerate(results):
        assert result.returncode == expect, f"rank {rank} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return Result(results[0].returncode, results[0].stdout, results[0].stderr)


def launch(out: Path, world: int, options: dict, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start `world` engine worker processes (tests/engine_worker.py), as a module from the repository root so
    that they import `tests` and the engine as this process does; wait for all of them."""
    return start_ranks([sys.executable, "-m", "tests.engine_worker", str(out), json.dumps(options)], world, timeout)


def result_files(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Every factor and score file of a case, except the eigenvectors (defined up to sign)."""
    return {
        str(path.relative_to(folder)): load_tensors(path)
        for path in sorted(folder.rglob("*.safetensors"))
        if "eigenvectors" not in path.name
    }


def assert_same(case_folder: Path, reference_folder: Path) -> None:
    found, expected = result_files(case_folder), result_files(reference_folder)
    assert expected, f"no result files in {reference_folder}: nothing to compare"
    assert found.keys() == expected.keys()
    assert not [name for name in found if ".partial." in name]
    for name, tensors in expected.items():
        assert found[name].keys() == tensors.keys(), name
        for key, tensor in tensors.items():
            if tensor.dtype == torch.int64 or tensor.abs().max() == 0:
                assert torch.equal(found[name][key], tensor), (name, key)
            else:
                assert relative_error(found[name][key], tensor) < 1e-10, (name, key)


# ---- Stopping a run with a signal ----


@contextlib.contextmanager
def at_batch(monkeypatch, batch: int, do):
    """Call `do()` when the scripts' batches (pipeline.TensorBatches, every instance of a run counted together,
    from 1) yield their `batch`-th batch. Nested, the outer and the inner count the same batches."""
    original = pipeline.TensorBatches.__iter__
    count = 0

    def iterate(self):
        nonlocal count
        for item in original(self):
            count += 1
            if count == batch:
                do()
            yield item

    with monkeypatch.context() as patch:
        patch.setattr(pipeline.TensorBatches, "__iter__", iterate)
        yield


def signal_at(monkeypatch, batch: int, signum: int = signal.SIGTERM):
    """Send `signum` to this process when the scripts' batches yield their `batch`-th batch (see at_batch)."""
    return at_batch(monkeypatch, batch, lambda: os.kill(os.getpid(), signum))


def slowed_at(monkeypatch, batch: int, seconds: float):
    """The scripts' `batch`-th batch (see at_batch) comes `seconds` late."""
    return at_batch(monkeypatch, batch, lambda: time.sleep(seconds))


def one_line_error(result) -> str:
    """stderr, which must be one line saying `error: ...` (the scripts' refusal of bad input, before any work)."""
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    return result.stderr


def last_line(stderr: str, start: str) -> str:
    """The one line of stderr that starts with `start`, which must be the last one (after the progress bars)."""
    lines = [line for line in re.split(r"[\r\n]", stderr) if line.strip()]
    assert sum(line.startswith(start) for line in lines) == 1 and lines[-1].startswith(start), stderr
    return lines[-1]


def assert_stopped(result, *saved: str) -> None:
    """Exit status 143 and one line on stderr saying what was saved and that the same command resumes it."""
    assert result.returncode == 143, result
    line = last_line(result.stderr, "interrupted")
    assert line.startswith("interrupted by SIGTERM: saved "), line
    assert line.endswith("; run the same command again to resume"), line
    for text in saved:
        assert text in line, line


# ---- A tiny synthetic CIFAR-10, in the layout torchvision downloads, for tests that must not need the real data ----
#
#     write_fake_cifar10(tmp_dir)  # -> tmp_dir/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # Learnable: each class has its own mean colour; noise keeps it from being trivial.
    colours = np.random.default_rng(1234).integers(30, 226, size=(10, 3))
    base = colours[labels][:, :, None, None]  # [n, 3, 1, 1]
    noise = rng.normal(0, 25, size=(len(labels), 3, 32, 32))
    return np.clip(base + noise, 0, 255).astype(np.uint8).reshape(len(labels), 3 * 32 * 32)


def _dump(path: Path, record: dict) -> None:
    # Pickle is written here only because it is the official CIFAR-10 format (bytes keys, as in the release).
    with open(path, "wb") as f:
        pickle.dump(record, f, protocol=2)


def write_fake_cifar10(root: str | Path, num_train: int = 200, num_test: int = 100, seed: int = 0) -> Path:
    """Write root/cifar-10-batches-py with num_train images split over five batches and num_test test images."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    train_labels = rng.integers(0, 10, size=num_train)
    train_images = _images(train_labels, rng)
    bounds = np.linspace(0, num_train, 6).astype(int)
    for b in range(5):
        lo, hi = bounds[b], bounds[b + 1]
        _dump(
            folder / f"data_batch_{b + 1}",
            {b"data": train_images[lo:hi], b"labels": train_labels[lo:hi].tolist()},
        )
    test_labels = rng.integers(0, 10, size=num_test)
    _dump(folder / "test_batch", {b"data": _images(test_labels, rng), b"labels": test_labels.tolist()})
    _dump(folder / "batches.meta", {b"label_names": [c.encode() for c in CLASSES], b"num_vis": 3072})
    return Path(root)
