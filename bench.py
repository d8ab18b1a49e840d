"""Benchmark every phase of the influence engine on ResNet-9 and compare it with the device's FLOP floor.

For each phase it prints the seconds, the FLOPs the engine's kernels counted (from the layer shapes and the
contraction order actually used), the achieved GFLOP/s, the floor (FLOPs divided by the matrix-multiply
rate of the same device and dtype, measured in this run) and the ratio of the time to that floor, plus
the peak memory (RSS on the CPU, max allocated on a GPU).

    python bench.py --num_train 1000 --num_queries 50 --factor_strategy ekfac            # this CPU
    python bench.py --num_train 50000 --num_queries 2000 --device cuda [--use_half_precision]
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bench.py ...                              # split over processes

Under torchrun the FLOPs of every rank are added up and set against the sum of the ranks' matrix-multiply rates,
measured at the same time; times are rank 0's wall clock, memory the largest of the ranks.
"""

from __future__ import annotations

import resource
import tempfile
import time

import torch
import torch.distributed as dist

from cli import (
    ArgumentParser,
    add_process_flags,
    influence_arguments,
    is_main,
    keep_freed_memory,
    run_cli,
    start_processes,
)
from influence import STRATEGIES, Analyzer
from influence.profiler import synchronize
from pipeline import CifarData, ClassificationTask, TensorBatches, construct_resnet9, get_cifar10, load_model

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
    parser.add_argument(
        "--save_interval", type=float, default=120.0, help="seconds between partial saves of a pass (default 120)"
    )
    parser.add_argument(
        "--max_elements",
        default="auto",
        help="bound on the per-layer tensors of one chunk of a batch: a number, 'none' (whole batches) or 'auto'",
    )
    add_process_flags(parser)
    return parser.parse_args()


def summed(value: float, op=None) -> float:
    """A number added up (or reduced with `op`) over the ranks; itself in one process."""
    if not dist.is_initialized():
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM)
    return tensor.item()


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
        used = summed(torch.cuda.max_memory_allocated(device) / 2**30, dist.ReduceOp.MAX)
        return f"{used:.2f} GiB allocated"
    return f"{summed(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, dist.ReduceOp.MAX):.2f} GiB RSS"


def random_data(n: int, device: torch.device, seed: int) -> CifarData:
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=generator)
    return CifarData(images.to(device), labels.to(device), labels.to(device), "random")


def main() -> None:
    args = parse_args()
    keep_freed_memory()
    device = start_processes(args.dist_timeout)
    if args.device:
        device = torch.device(args.device)
    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.manual_seed(0)
    model = load_model(args.checkpoint, device) if args.checkpoint else construct_resnet9().to(device).eval()
    if args.dataset_dir:
        train = get_cifar10(args.dataset_dir, "eval_train", num_train=args.num_train, device=device)
        queries = get_cifar10(args.dataset_dir, "valid", device=device).subset(args.num_queries)
    else:
        train, queries = random_data(args.num_train, device, 0), random_data(args.num_queries, device, 1)

    args.use_empirical_fisher, args.damping_factor, args.seed = False, None, 0
    factor_args, score_args = influence_arguments(args, {})
    max_elements = {"auto": "auto", "none": None}.get(args.max_elements) or int(args.max_elements)
    with tempfile.TemporaryDirectory() as output_dir:
        analyzer = Analyzer(
            "bench",
            model,
            ClassificationTask(),
            output_dir=output_dir,
            profile=True,
            save_interval=args.save_interval,
            max_elements=max_elements,
        )
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
    # of the dtype it ran in. Every rank times its product at the same moment, so the rates add up to what
    # the ranks share.
    dtypes = [torch.float32] + ([torch.bfloat16] if args.use_half_precision else [])
    rates = {}
    for dtype in dtypes:
        if dist.is_initialized():
            dist.barrier()
        rates[dtype] = summed(matmul_rate(device, dtype, args.matmul_size))
    counted = {
        action: {dtype: summed(analyzer.profiler.flops.get(action, {}).get(dtype, 0)) for dtype in dtypes}
        for action in PHASES
    }
    if not is_main():
        return
    precision = "bf16" if args.use_half_precision else "fp32"
    processes = f", {world} processes" if world > 1 else ""
    print(
        f"ResNet-9, {args.factor_strategy}, {precision}, {device.type}{processes}, {len(train)} training examples, "
        f"{len(queries)} queries, training batches of {args.train_batch_size}"
    )
    for dtype, rate in rates.items():
        name = str(dtype).removeprefix("torch.")
        each = " (all processes)" if world > 1 else ""
        print(f"Matrix-multiply rate ({args.matmul_size}^2, {name}){each}: {rate / 1e9:.1f} GFLOP/s")
    header = f"{'phase':<20}{'seconds':>10}{'GFLOP':>12}{'GFLOP/s':>10}{'floor (s)':>11}{'x floor':>9}   peak memory"
    print(header)
    print("-" * len(header))
    for action, label in PHASES.items():
        if action not in analyzer.profiler.records:
            continue
        seconds = sum(analyzer.profiler.records[action])
        total = sum(counted[action].values())
        floor = sum(count / rates[dtype] for dtype, count in counted[action].items())
        memory = phase_memory.get(action, phase_memory["factors"])
        ratio = f"{seconds / floor:>9.2f}" if total else f"{'-':>9}"
        print(
            f"{label:<20}{seconds:>10.2f}{total / 1e9:>12.1f}{total / seconds / 1e9:>10.1f}{floor:>11.2f}"
            f"{ratio}   {memory}"
        )
    saves = analyzer.profiler.records.get("Save Partial Result", [])
    passes = sum(sum(analyzer.profiler.records.get(action, [])) for action in PHASES)
    print(
        f"Partial results saved {len(saves)} times (every {args.save_interval:g} s and after each query batch): "
        f"{sum(saves):.2f} s, {100 * sum(saves) / passes:.2f}% of the passes"
    )


if __name__ == "__main__":
    run_cli(main)
