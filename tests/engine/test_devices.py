"""The logic the GPU and nccl paths rely on, pinned on the CPU: which wire each collective takes, which generator
draws the augmentation, what is counted at which rate, what a GPU out of memory is reported as.

tests/gpu/test_gpu.py runs the same paths on a GPU where there is one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from argparse import Namespace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

import pipeline
from example import devices
from example.devices import get_device, local_gpu
from example.errors import PipelineError
from influence import Analyzer, FactorArguments, InfluenceError, flops, stages, storage
from influence import distributed as influence_distributed
from influence.capture import Capture, backward_batch, per_example_gradient
from influence.modules import find_layers
from influence.profiler import Profiler
from pipeline import CifarData, TensorBatches
from tests.helpers import REPO_ROOT, run
from tests.reference import TinyTask, batches, make_model

CPU, GPU = torch.device("cpu"), torch.device("cuda", 1)  # a device object needs no GPU; no tensor is put on it


# ---- 1. Which wire each collective takes ----


def test_sums_and_shared_tensors_take_nccl_only_for_a_model_on_a_gpu():
    assert influence_distributed.route("nccl", GPU) == (GPU, True)
    assert influence_distributed.route("cpu:gloo,cuda:nccl", GPU) == (GPU, True)
    # A CPU model in an nccl job (the float64 tests, bench.py --device cpu under torchrun on a GPU host): gloo.
    assert influence_distributed.route("nccl", CPU) == (CPU, False)
    assert influence_distributed.route("gloo", CPU) == (CPU, False)
    assert influence_distributed.route("gloo", GPU) == (CPU, False)  # gloo reduces CPU tensors only


class FakeJob:
    """A two-process job's collectives as seen from rank 0, recorded instead of run."""

    def __init__(self, monkeypatch, backend: str) -> None:
        self.calls: list[tuple[str, str]] = []
        monkeypatch.setattr(influence_distributed, "_control_groups", {})
        monkeypatch.setattr(influence_distributed, "active", lambda: True)
        for name, value in {"get_world_size": 2, "get_rank": 0, "get_backend": backend}.items():
            monkeypatch.setattr(dist, name, lambda *args, value=value, **kwargs: value)
        monkeypatch.setattr(dist, "new_group", lambda **kwargs: "gloo group")
        for op in ("reduce", "broadcast", "all_reduce", "barrier"):
            monkeypatch.setattr(dist, op, self.recorder(op))

    def recorder(self, op: str):
        def record(*args, group=None, **kwargs):
            self.calls.append((op, "world" if group is None else group))

        return record


def test_an_nccl_job_with_a_cpu_model_reduces_and_shares_through_gloo(monkeypatch):
    job = FakeJob(monkeypatch, "nccl")
    group = influence_distributed.Group(CPU)
    group.sum_to_main([torch.ones(3), torch.ones(2)])
    assert job.calls == [("reduce", "gloo group"), ("reduce", "gloo group")]  # nothing CPU-side goes to nccl
    job.calls.clear()
    assert torch.equal(group.share({"x": torch.arange(3)})["x"], torch.arange(3))
    assert job.calls == [("broadcast", "gloo group")] * 3


def test_nccl_reductions_are_preceded_by_a_gloo_meeting(monkeypatch):
    """nccl does not block the host: the ranks meet on gloo first, where a stopped rank is noticed and named."""
    job = FakeJob(monkeypatch, "nccl")
    # A model on a GPU (its tensors stay on the CPU here, where there is no GPU to put them on).
    monkeypatch.setattr(influence_distributed, "route", lambda backend, device: (CPU, True))
    group = influence_distributed.Group(CPU)
    group.sum_to_main([torch.ones(3), torch.ones(2)])
    assert job.calls == [("barrier", "gloo group"), ("reduce", "world"), ("reduce", "world")]
    job.calls.clear()
    group.share({"x": torch.arange(3)})
    assert job.calls == [("broadcast", "gloo group"), ("broadcast", "gloo group"), ("broadcast", "world")]
    job.calls.clear()
    group.sync_round(False)
    assert job.calls == [("all_reduce", "gloo group")]


def test_a_gloo_job_needs_no_extra_meeting(monkeypatch):
    job = FakeJob(monkeypatch, "gloo")
    influence_distributed.Group(CPU).sum_to_main([torch.ones(3)])
    assert job.calls == [("reduce", "world")]


# ---- 2. One GPU per process ----


def test_fewer_gpus_than_processes_is_refused_in_one_line():
    assert local_gpu(1, 2, 2) == 1 and local_gpu(0, 1, 8) == 0
    with pytest.raises(PipelineError, match=r"^2 processes on this machine but 1 GPU: .*--nproc_per_node=1") as error:
        local_gpu(1, 2, 1)
    assert "\n" not in str(error.value)
    with pytest.raises(PipelineError, match="3 processes on this machine but 2 GPUs"):
        local_gpu(0, 3, 2)
    with pytest.raises(PipelineError, match="none is visible"):
        local_gpu(0, 1, 0)


def test_processes_asked_for_on_the_cpu_stay_there(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert get_device("cpu") == CPU  # and so gloo, however many GPUs the machine has


# ---- 3. Training batches without host copies ----


class RecordOps(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append((func.overloadpacket.__name__, dict(kwargs or {})))
        return func(*args, **(kwargs or {}))


def _data(n: int) -> CifarData:
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 10
    return CifarData(images, labels, labels.clone(), "train")


def test_augmentation_is_drawn_on_the_datas_device_and_constants_are_made_once(monkeypatch):
    batches = TensorBatches(_data(20), batch_size=8, shuffle=True, augment=True, seed=5)
    generator = batches.epoch_generator(3)
    assert generator.device == batches.images.device
    assert torch.equal(generator.get_state(), torch.Generator().manual_seed(8).get_state())  # seeded seed + epoch
    seen, real = [], pipeline.random_crop_flip
    spy = lambda x, gen, **kw: seen.append(gen.device == x.device) or real(x, gen, **kw)  # noqa: E731
    monkeypatch.setattr(pipeline, "random_crop_flip", spy)
    with RecordOps() as ops:
        list(batches)
    assert seen == [True] * 3
    # No tensor is made from host data per batch (the normalisation constants were), nothing changes device,
    # and every random draw is made on the data's device by a generator there.
    assert "lift_fresh" not in [name for name, _ in ops.calls]
    assert all(kwargs.get("device") in (None, CPU) for name, kwargs in ops.calls if name == "_to_copy")
    draws = [kwargs for name, kwargs in ops.calls if name in ("randint", "rand", "randperm")]
    assert len(draws) == 1 + 3 * 3 and all(d["device"] == CPU and d["generator"].device == CPU for d in draws)
    assert pipeline.normalisation(CPU)[0] is pipeline.normalisation("cpu")[0]


def test_a_generator_on_another_device_than_the_images_is_refused():
    images = torch.empty(2, 3, 32, 32, dtype=torch.uint8, device="meta")
    with pytest.raises(PipelineError, match="generator is on cpu, the images on meta"):
        pipeline.random_crop_flip(images, torch.Generator())


def test_models_are_channels_last_on_every_device():
    model = devices.place_model(pipeline.construct_resnet9(), "cpu")
    weight = model[0][0].weight
    assert not model.training and weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()


# ---- 4. What is counted at which rate ----


def test_fp32_on_a_gpu_counts_convolutions_at_the_tf32_rate_by_torchs_default(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert flops.precision(torch.float32, GPU, convolution=True) == flops.TF32
    assert flops.precision(torch.float32, GPU) == torch.float32  # matrix products stay fp32
    assert flops.precision(torch.float32, CPU, convolution=True) == torch.float32
    assert flops.precision(torch.bfloat16, GPU, convolution=True) == torch.bfloat16
    assert flops.precision(torch.float64, GPU, convolution=True) == torch.float64
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert flops.precision(torch.float32, GPU) == flops.TF32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert flops.precision(torch.float32, GPU, convolution=True) == torch.float32


def test_the_models_convolutions_are_counted_as_convolutions(monkeypatch):
    """Every tracked convolution's forward and input-gradient FLOPs, and only those, are flagged as cuDNN's."""
    monkeypatch.setattr(flops, "precision", lambda dtype, device, convolution=False: "conv" if convolution else dtype)
    model, x, y = make_model("cnn", dtype=torch.float32)
    layers = find_layers(model, None)
    before = flops.read()
    with Capture(model, layers, lambda layer, a, g: None, torch.float32) as capture:
        backward_batch(capture, model, (x[:4], y[:4]), TinyTask().compute_train_loss, False, "loss")
    counted = flops.since(before)
    # conv 2->3 (k3, s2, p1) on 7x7: 4x4 outputs; conv 3->4 (k2): 3x3 outputs; 4 FLOPs per multiply-add pair.
    expected = 4 * 4 * (3 * 16 * 2 * 9 + 4 * 9 * 3 * 4)
    assert counted["conv"] == expected and counted[torch.float32] == 4 * 4 * 3 * 36


def test_a_stage_keeps_its_own_seconds_and_flops_without_those_of_the_stages_inside_it(monkeypatch):
    clock = iter([10.0, 11.0, 14.0, 20.0])  # outer opens, inner opens, inner closes, outer closes
    monkeypatch.setattr(stages.time, "perf_counter", lambda: next(clock))
    stages.enable(CPU)
    try:
        before = stages.read()
        with stages.stage("outer"):
            flops.add(5, torch.float32)
            with stages.stage("inner"):
                flops.add(7, torch.float32)
                flops.add(2, torch.bfloat16)
    finally:
        stages.enable(None)
    spent = stages.since(before)
    assert spent["outer"] == (pytest.approx(10.0 - 3.0), {torch.float32: 5})
    assert spent["inner"] == (pytest.approx(3.0), {torch.float32: 7, torch.bfloat16: 2})
    with stages.stage("outer"):  # disabled: nothing is timed
        flops.add(1, torch.float32)
    assert stages.since(before) == spent


def test_a_backward_batch_splits_into_the_models_products_patches_and_kernels():
    """The model's forward and input-gradient FLOPs land in its stage, the kernels' in theirs, none in patches,
    and the profiler keeps each record's stages."""
    model, x, y = make_model("cnn", dtype=torch.float32)
    layers = find_layers(model, None)
    profiler = Profiler(True, CPU)
    stages.enable(CPU)
    try:
        with (
            profiler.record("pass"),
            Capture(model, layers, lambda layer, a, g: per_example_gradient(a, g), torch.float32) as capture,
        ):
            backward_batch(capture, model, (x[:4], y[:4]), TinyTask().compute_train_loss, False, "loss")
    finally:
        stages.enable(None)
    parts = profiler.stages["pass"]
    assert set(parts) == set(stages.STAGES)
    # conv 2->3 (k3, bias) on 4x4 outputs, conv 3->4 (k2, no bias) on 3x3, linear 36->3 (bias), 4 examples: the
    # forward and input-gradient products, 4 FLOPs per weight and output position; per-example gradients, 2 per
    # position and entry of out x in' (in' counts the bias column).
    model_flops = 4 * 4 * (3 * 16 * 2 * 9 + 4 * 9 * 3 * 4 + 3 * 36)
    kernel_flops = 2 * 4 * (16 * 19 * 3 + 9 * 12 * 4 + 37 * 3)
    assert parts[stages.MODEL][1] == {torch.float32: model_flops}
    assert parts[stages.KERNELS][1] == {torch.float32: kernel_flops}
    assert parts[stages.PATCHES][1] == {}
    assert all(seconds > 0 for seconds, _ in parts.values())
    assert sum(seconds for seconds, _ in parts.values()) <= sum(profiler.records["pass"])


def test_the_benchmark_floor_counts_each_flop_at_its_precisions_rate():
    import bench

    counted = {torch.float32: 2e9, flops.TF32: 8e9, torch.bfloat16: 0}
    rates = {torch.float32: 1e9, flops.TF32: 4e9, torch.bfloat16: 1e10}
    assert bench.floor_seconds(counted, rates) == pytest.approx(4.0)
    assert bench.precisions(CPU, half=False) == [torch.float32]
    assert bench.precisions(GPU, half=True) == [torch.float32, flops.TF32, torch.bfloat16]  # torch's default flags
    assert bench.matmul_size(Namespace(matmul_size=None), GPU) == 8192
    assert bench.matmul_size(Namespace(matmul_size=None), CPU) == 2048
    # Rates before and after the passes: within 20% of each other nothing is said, further apart by how much.
    assert bench.unsteady_rate(100e9, 85e9) is None and bench.unsteady_rate(150e9, 300e9).startswith(
        "the rate moved by 50% during the run"
    )


def test_bench_on_the_cpu_with_the_scripts_batch_size_and_whole_batches():
    out = run(
        "bench.py", "--device", "cpu", "--num_train", "12", "--num_queries", "3", "--factor_strategy", "diagonal",
        "--max_elements", "none", "--matmul_size", "256",
    ).stdout  # fmt: skip
    assert "diagonal, fp32, cpu, 12 training examples, 3 queries, training batches of 128" in out
    assert "Matrix-multiply rate (256^2, float32): " in out and "tf32" not in out
    lines = out.splitlines()
    table = lines[[line.split()[0] if line.strip() else "" for line in lines].index("phase") + 2 :]
    assert [line.split()[0] for line in table[:3]] == ["Lambda", "pairwise", "self-influence"]
    # The stage table, one row per pass with the model's, the patches', the kernels' and the rest's seconds.
    staged = lines[[line.split()[:1] for line in lines].index(["where"]) + 2 :]
    assert [line.split()[0] for line in staged[:3]] == ["Lambda", "pairwise", "self-influence"]
    assert all(float(cell) >= 0 for cell in staged[0].split()[1:] if not cell.endswith("x"))
    err = run("bench.py", "--max_elements", "lots", expect=2).stderr
    assert err.startswith("error: argument --max_elements: expected a number, 'none' or 'auto'")
    assert err.count("\n") == 1
    help_text = run("bench.py", "--help").stdout
    assert "--checkpoint FILE.safetensors" in help_text and "TF32" in help_text


# ---- 7, 8. Out of memory is its own error ----


def test_tensors_are_read_on_the_cpu_and_a_gpu_out_of_memory_is_not_an_unreadable_file(tmp_path, monkeypatch):
    path = tmp_path / "lambda_matrix.partial.safetensors"
    storage.save_partial(path, {"a": torch.ones(2)}, {"batches": 1})
    read_on = []
    real = storage.load_file
    monkeypatch.setattr(storage, "load_file", lambda name, device: read_on.append(device) or real(name, device))
    assert storage.load_tensors(path, "meta")["a"].device.type == "meta" and read_on == ["cpu"]

    def out_of_memory(tensors, device):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(storage, "move", out_of_memory)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        storage.load_partial(path, "cuda")
    assert path.exists()  # kept for the rerun, not discarded as unreadable


def test_out_of_memory_in_a_pass_is_one_line(tmp_path, monkeypatch):
    model, x, y = make_model("mlp")

    def out_of_memory(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("influence.analyzer.backward_batch", out_of_memory)
    analyzer = Analyzer("oom", model, TinyTask(), output_dir=tmp_path, disable_tqdm=True)
    expected = r"^out of memory on cpu in 'Fit covariance' with batches of 8: use smaller training or query batches$"
    with pytest.raises(InfluenceError, match=expected):
        analyzer.fit_all_factors("f", batches(x, y, 8), FactorArguments(strategy="kfac"))


# ---- The GPU check ----


def test_the_gpu_check_refuses_without_a_gpu_in_one_line():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "gpu_check.py"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("error: no GPU visible here") and result.stderr.count("\n") == 1


def test_the_gpu_check_plan():
    import gpu_check

    one = [name for name, _ in gpu_check.steps(gpu_check.parse_args(["--gpus", "1"]), 1)]
    assert one[0] == "tests" and {"analyze_fp32", "analyze_bf16", "detect", "bench_fp32", "bench_bf16"} <= set(one)
    several = gpu_check.steps(gpu_check.parse_args(["--gpus", "4", "--skip_tests"]), 4)
    names = [name for name, _ in several]
    assert "tests" not in names
    assert names[-4:] == ["train_4gpus", "analyze_fp32_4gpus", "detect_4gpus", "bench_fp32_4gpus"]
    assert all("--nproc_per_node=4" in command for name, command in several if name.endswith("4gpus"))
    assert all(not part.startswith("..") for _, command in several for part in command)  # inside the repository


@pytest.mark.parametrize("stopped_by", ["its time", "SIGTERM"])
def test_a_gpu_check_step_is_stopped_with_its_workers(tmp_path, stopped_by):
    worker = tmp_path / "worker.pid"  # a step that starts a worker of its own, as torchrun does, and outlives 1 s
    script = (
        "import subprocess, sys, time; "
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(worker)!r}, 'w').write(str(p.pid)); time.sleep(60)"
    )
    timeout = 1 if stopped_by == "its time" else 60
    check = (
        "import sys, pathlib, gpu_check; "
        f"gpu_check.run_step('slow', [sys.executable, '-c', {script!r}], pathlib.Path({str(tmp_path)!r}), {timeout})"
    )
    process = subprocess.Popen([sys.executable, "-c", check], cwd=REPO_ROOT, stderr=subprocess.PIPE, text=True)
    if stopped_by == "SIGTERM":
        for _ in range(100):
            if worker.exists() and worker.read_text():
                break
            time.sleep(0.1)
        process.terminate()
    _, stderr = process.communicate(timeout=60)
    if stopped_by == "SIGTERM":
        assert process.returncode == 128 + signal.SIGTERM, stderr
    else:
        assert process.returncode == 1 and "step slow ran past 1 s" in stderr, stderr
    stat = Path(f"/proc/{worker.read_text()}/stat")
    for _ in range(50):  # killed: gone, or a zombie where nothing reaps the orphans (a container without init)
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
        except FileNotFoundError:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the step's worker ({stat.parent.name}) outlived it")
