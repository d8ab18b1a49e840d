"""The CUDA and nccl paths on the GPUs present; each test is skipped, with its reason, where they are missing.

tests/engine/test_devices.py pins on the CPU the logic these rely on; gpu_check.py runs this suite and a real job.
"""

from __future__ import annotations

import pytest
import torch

import pipeline
from example import devices
from influence.storage import load_tensors, save_tensors
from tests import engine_worker
from tests.helpers import assert_same, launch, run, torchrun

pytestmark = pytest.mark.gpu  # python -m pytest -m gpu: these alone
GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
needs_gpu = pytest.mark.skipif(GPUS == 0, reason="needs a CUDA GPU")
needs_two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs (nccl: one per process); {GPUS} here")
CASES = ["ekfac_true_b7", "diagonal_empirical_b7", "kfac_true_b7"]


@needs_gpu
def test_training_batches_never_make_the_host_wait_for_the_gpu():
    n = 1000
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, device="cuda")
    labels = torch.randint(0, 10, (n,), device="cuda")
    data = pipeline.CifarData(images, labels, labels, "train")
    batches = pipeline.TensorBatches(data, 128, shuffle=True, augment=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # a host copy or a read of a GPU value raises
    try:
        for _ in range(2):
            for x, _y in batches:
                assert x.device.type == "cuda" and x.dtype == torch.float32
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_gpu
def test_models_are_channels_last_and_factors_load_onto_the_gpu(tmp_path):
    model = devices.place_model(pipeline.construct_resnet9(), "cuda")
    assert model[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    save_tensors(tmp_path / "f.safetensors", {"a": torch.ones(3)})
    assert load_tensors(tmp_path / "f.safetensors", "cuda")["a"].device.type == "cuda"


@needs_gpu
def test_seeded_rngs_seed_the_gpus_generator_and_restore_it():
    """What a batch draws on the GPU (the true Fisher's labels, here and in compare_kronfluence.py's kronfluence
    task) depends on the seed alone, and the caller's GPU generator goes on as if nothing had been drawn."""
    from influence import seeded_rngs

    torch.cuda.manual_seed(123)
    expected_next = torch.rand(4, device="cuda")
    torch.cuda.manual_seed(123)
    draws = []
    for _ in range(2):
        with seeded_rngs(7, "cuda"):
            draws.append(torch.rand(4, device="cuda"))
    assert torch.equal(draws[0], draws[1])
    assert torch.equal(torch.rand(4, device="cuda"), expected_next)


@needs_gpu
def test_bench_on_the_gpu_counts_convolutions_at_the_tf32_rate():
    out = run("bench.py", "--num_train", "64", "--num_queries", "8", "--factor_strategy", "diagonal", gpu=True).stdout
    assert "cuda" in out and "training batches of 512" in out
    assert "Matrix-multiply rate (8192^2, tf32)" in out and "GiB allocated" in out


@needs_two_gpus
@pytest.mark.parametrize("model_device", ["cuda", "cpu"])
def test_nccl_processes_give_the_one_process_results(tmp_path, model_device):
    """On two GPUs, and with the model left on the CPU in the same nccl job (its sums then go through gloo)."""
    reference = tmp_path / "reference"
    engine_worker.run(reference, {"cases": CASES, "device": model_device})
    options = {"cases": CASES, "device": "cuda", "model_device": model_device, "max_elements": 60, "save_interval": 0}
    results = launch(tmp_path / "two", 2, options)
    for rank, result in enumerate(results):
        assert result.returncode == 0, f"rank {rank}:\n{result.stdout}\n{result.stderr}"
    for case in CASES:
        assert_same(tmp_path / "two" / case, reference / case)


@needs_two_gpus
def test_a_failing_rank_is_named_under_nccl_as_under_gloo(tmp_path):
    options = {"cases": ["ekfac_true_b7"], "fail_rank": 1, "timeout": 30, "device": "cuda"}
    results = launch(tmp_path, 2, options, timeout=120)
    assert all(result.returncode != 0 for result in results)
    lines = results[0].stderr.strip().splitlines()
    assert len(lines) == 1 and "rank 1: ValueError: injected failure" in lines[0], results[0].stderr


@needs_gpu
def test_more_processes_than_gpus_is_refused_in_one_line(fake_cifar_dir, tmp_path):
    args = ["--dataset_dir", str(fake_cifar_dir), "--checkpoint_dir", str(tmp_path), "--num_train", "64"]
    result = torchrun("train.py", *args, "--num_train_epochs", "1", processes=GPUS + 1, expect=1, cpu=False)
    assert f"error: {GPUS + 1} processes on this machine but {GPUS} GPU" in result.stderr


@needs_two_gpus
def test_torchrun_trains_on_the_gpus(fake_cifar_dir, tmp_path):
    args = ["--dataset_dir", str(fake_cifar_dir), "--checkpoint_dir", str(tmp_path), "--num_train", "200"]
    result = torchrun("train.py", *args, "--num_train_epochs", "1", "--train_batch_size", "64", cpu=False)
    assert "2 processes on cuda" in result.stdout and (tmp_path / "model.safetensors").exists()
