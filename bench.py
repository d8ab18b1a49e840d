"""Benchmark every phase of the influence engine on ResNet-9 and compare it with the device's FLOP floor.

For each phase it prints the seconds, the FLOPs the engine's kernels counted (from the layer shapes and the
contraction order actually used), the achieved GFLOP/s, the floor (FLOPs divided by the matrix-multiply
rate of the same device and dtype, measured in this run) and the ratio of the time to that floor, plus
the peak memory (RSS on the CPU, max allocated on a GPU).

    python bench.py --num_train 1000 --num_queries 50 --factor_strategy ekfac            # this CPU
    python bench.py --num_train 50000 --num_queries 2000 --device cuda [--use_half_precision]
"""

from __future__ import annotations

import resource
import tempfile
import time

import torch

from influence import Analyzer
from influence.profiler import synchronize
from pipeline import (
    STRATEGIES,
    ArgumentParser,
    CifarData,
    ClassificationTask,
    TensorBatches,
    construct_resnet9,
    get_cifar10,
    get_device,
    influence_arguments,
    keep_freed_memory,
    load_model,
    run_cli,
)

PHASES = {
    "Fit Covariance": "covariance",
    "Perform Eigendecomposition": "eigendecomposition",
    "Fit Lambda": "Lambda",
    "Compute Pairwise Score": "pairwise",
    "Compute Self-Influence Score": "self-influence",
}


def parse_args():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num_train", type=int, default=1000, help="training examples (default 1000)")
    parser.add_argument("--num_queries", type=int, default=50, help="query examples (default 50)")
    parser.add_argument("--factor_strategy", default="ekfac", choices=STRATEGIES, help="default ekfac")
    parser.add_argument("--use_half_precision", action="store_true", help="bf16, as analyze.py; floor at the bf16 rate")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--train_batch_size", type=int, default=250, help="training batch of the passes")
    parser.add_argument("--query_batch_size", type=int, default=None, help="default: all queries at once")
    parser.add_argument("--dataset_dir", default=None, help="use real CIFAR-10 from here (default: random images)")
    parser.add_argument("--checkpoint", default=None, help="a trained checkpoint (default: random weights)")
    parser.add_argument("--matmul_size", type=int, default=2048, help="side of the square product timed for the floor")
    return parser.parse_args()


def matmul_rate(device: torch.device, dtype: torch.dtype, size: int) -> float:
    """Best FLOP/s of a square matrix product on this device and dtype."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    best = float("inf")
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS"


def random_data(n: int, device: torch.device, seed: int) -> CifarData:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return CifarData(images.to(device), labels.to(device), labels.to(device), "random")


def main() -> None:
    args = parse_args()
    keep_freed_memory()
    device = torch.device(args.device) if args.device else get_device()
    torch.manual_seed(0)
    model = load_model(args.checkpoint, device) if args.checkpoint else construct_resnet9().to(device).eval()
    if args.dataset_dir:
        train = get_cifar10(args.dataset_dir, "eval_train", num_train=args.num_train, device=device)
        queries = get_cifar10(args.dataset_dir, "valid", device=device).subset(args.num_queries)
    else:
        train, queries = random_data(args.num_train, device, 0), random_data(args.num_queries, device, 1)

    args.use_empirical_fisher, args.damping_factor = False, None
    factor_args, score_args = influence_arguments(args, {})
    with tempfile.TemporaryDirectory() as output_dir:
        analyzer = Analyzer("bench", model, ClassificationTask(), output_dir=output_dir, profile=True)
        batches = TensorBatches(train, args.train_batch_size)
        query_batches = TensorBatches(queries, args.query_batch_size or len(queries))
        phase_memory = {}
        analyzer.fit_all_factors("f", batches, factor_args)
        phase_memory["factors"] = peak_memory(device)
        analyzer.compute_pairwise_scores("p", "f", query_batches, batches, score_args)
        phase_memory["Compute Pairwise Score"] = peak_memory(device)
        analyzer.compute_self_scores("s", "f", batches, score_args)
        phase_memory["Compute Self-Influence Score"] = peak_memory(device)

    # bf16 runs keep their covariances and query preconditioning in fp32: each FLOP is set against the rate
    # of the dtype it ran in.
    rates = {torch.float32: matmul_rate(device, torch.float32, args.matmul_size)}
    if args.use_half_precision:
        rates[torch.bfloat16] = matmul_rate(device, torch.bfloat16, args.matmul_size)
    print(
        f"ResNet-9, {args.factor_strategy}, {'bf16' if args.use_half_precision else 'fp32'}, {device.type}, "
        f"{len(train)} training examples, {len(queries)} queries, training batches of {args.train_batch_size}"
    )
    for dtype, rate in rates.items():
        name = str(dtype).removeprefix("torch.")
        print(f"Matrix-multiply rate ({args.matmul_size}^2, {name}): {rate / 1e9:.1f} GFLOP/s")
    header = f"{'phase':<20}{'seconds':>10}{'GFLOP':>12}{'GFLOP/s':>10}{'floor (s)':>11}{'x floor':>9}   peak memory"
    print(header)
    print("-" * len(header))
    for action, label in PHASES.items():
        if action not in analyzer.profiler.records:
            continue
        seconds = sum(analyzer.profiler.records[action])
        counted = analyzer.profiler.flops.get(action, {})
        total = sum(counted.values())
        floor = sum(count / rates.get(dtype, rates[torch.float32]) for dtype, count in counted.items())
        memory = phase_memory.get(action, phase_memory["factors"])
        ratio = f"{seconds / floor:>9.2f}" if total else f"{'-':>9}"
        print(
            f"{label:<20}{seconds:>10.2f}{total / 1e9:>12.1f}{total / seconds / 1e9:>10.1f}{floor:>11.2f}"
            f"{ratio}   {memory}"
        )


if __name__ == "__main__":
    run_cli(main)
