"""Benchmark every phase of the influence engine on ResNet-9 and compare it with the device's FLOP floor.

For each phase it prints the seconds, the FLOPs the engine's kernels counted (from the layer shapes and the
contraction order actually used), the achieved GFLOP/s, the floor (each FLOP divided by the matrix-multiply
rate, measured in this run on the same device, of the precision it ran in) and the ratio of the time to that
floor, plus the peak memory (RSS on the CPU, which only grows; on a GPU the most allocated during the phase).

    python bench.py --num_train 1000 --num_queries 50 --factor_strategy ekfac             # this CPU
    python bench.py --num_train 50000 --num_queries 2000 --device cuda                    # bf16: --use_half_precision
    python bench.py --checkpoint ./checkpoints/model.safetensors --dataset_dir ./data     # a trained model, CIFAR-10
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 bench.py --num_train 1000               # split over processes

By default the model has random weights and the images are random pixels: the work, and so the time, depends
on the shapes alone. --checkpoint loads a trained ResNet-9 (a safetensors file written by train.py) and
--dataset_dir reads CIFAR-10 instead, to time the job analyze.py runs. --influence_batch_size, the training
batches of the passes, defaults to the scripts' (512 on a GPU, 128 on the CPU).

Precision: without --use_half_precision the passes run in fp32, with torch's default for fp32 on a GPU (which
the original example ran with): convolutions in TF32 on tensor cores (cuDNN), matrix products in fp32. Each
FLOP is set against the rate of its precision: fp32, TF32 (an fp32 product with TF32 allowed) or bf16.

Under each pass's line, where its time went: the model's forward and backward passes, gathering patches, the
engine's kernels (each with its own floor where it has products) and the rest of the pass. On the CPU this costs
nothing and is always shown; on a GPU it waits for the device at every stage, so it is shown with --breakdown only.

Under torchrun the FLOPs of every rank are added up and set against the sum of the ranks' matrix-multiply rates,
measured at the same time; times are rank 0's wall clock, memory the largest of the ranks.
"""

from __future__ import annotations

import signal

# Ctrl-C while torch loads (a few seconds) ends the script quietly; run_cli handles it from then on.
signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import resource
import tempfile

import torch
import torch.distributed as dist

from example.checkpoints import load_model
from example.devices import place_model
from example.flags import (
    POSITIVE_INT,
    add_device_flag,
    add_influence_batch_flag,
    add_model_file_flag,
    add_num_queries_flag,
    add_num_train_flag,
    add_process_flags,
    add_query_batch_flag,
    add_save_interval_flag,
    add_strategy_flag,
    influence_batch_size,
)
from example.hardware import bf16_hardware_note, device_description, keep_freed_memory, matmul_rate
from example.run import ArgumentParser, is_main, run_cli, say_if_bf16_is_emulated, start_processes
from example.task import ClassificationTask
from influence import (
    Analyzer,
    FactorArguments,
    ScoreArguments,
    control_group,
    flops,
    stages,
    synchronize,
    world_size,
)
from pipeline import CifarData, TensorBatches, construct_resnet9, get_cifar10

RATE_SPREAD = 0.8  # rates before and after the passes further apart than this are reported as unsteady

PHASES = {
    "Fit Covariance": "covariance",
    "Perform Eigendecomposition": "eigendecomposition",
    "Fit Lambda": "Lambda",
    "Compute Pairwise Score": "pairwise",
    "Compute Self-Influence Score": "self-influence",
}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_num_train_flag(parser, 1000, ", random images unless --dataset_dir is given")
    add_num_queries_flag(parser, 50, ", random images unless --dataset_dir is given")
    add_strategy_flag(parser)
    parser.add_argument(
        "--use_half_precision",
        action="store_true",
        help=f"bf16, as analyze.py (its bf16 products at the bf16 rate; {bf16_hardware_note()}). Without it fp32, "
        "with torch's default on a GPU: convolutions in TF32, counted at the TF32 rate, matrix products in fp32",
    )
    add_device_flag(parser, "; under torchrun, cpu means gloo")
    add_influence_batch_flag(parser)
    add_query_batch_flag(parser, default=None)
    parser.add_argument("--dataset_dir", default=None, help="use real CIFAR-10 from here (default: random images)")
    add_model_file_flag(parser)
    parser.add_argument(
        "--matmul_size",
        type=POSITIVE_INT,
        default=None,
        help="side of the square product timed for the floor (default: 2048 on the CPU, 8192 on a GPU, where a "
        "smaller one takes about as long as the timing itself)",
    )
    add_save_interval_flag(parser, "a pass's partial results")
    parser.add_argument(
        "--max_elements",
        type=parse_max_elements,
        default="auto",
        help="bound on the per-layer tensors of one chunk of a batch: a number, 'none' (whole batches) or 'auto' "
        "(the engine's default: a bound on the CPU, whole batches on a GPU)",
    )
    parser.add_argument(
        "--breakdown",
        action="store_true",
        help="on a GPU, also time each pass's stages (model, patches, kernels), which waits for the device at each "
        "stage and slows the passes; on the CPU they are always timed, at no cost",
    )
    add_process_flags(parser)
    return parser.parse_args(argv)


def parse_max_elements(text: str) -> int | str | None:
    if text in ("auto", "none"):
        return None if text == "none" else text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'none' or 'auto', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def matmul_size(args: argparse.Namespace, device: torch.device) -> int:
    return args.matmul_size or (8192 if device.type == "cuda" else 2048)


def summed(value: float, op=None) -> float:
    """A number added up (or reduced with `op`) over the ranks; itself in one process. On the CPU through gloo,
    whatever the job's backend and the model's device (see influence.distributed.route)."""
    if not dist.is_initialized():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=op or dist.ReduceOp.SUM, group=control_group())
    return tensor.item()


def precisions(device: torch.device, half: bool) -> list[flops.Precision]:
    """The precisions a run's products can take (see influence/flops.py), the same on every rank."""
    found: list[flops.Precision] = [torch.float32]
    if {flops.precision(torch.float32, device, conv) for conv in (False, True)} != {torch.float32}:
        found.append(flops.TF32)
    return found + ([torch.bfloat16] if half else [])


def measure_rates(device: torch.device, kinds: list[flops.Precision], size: int) -> dict[flops.Precision, float]:
    """The matrix-multiply rate of each precision, summed over the ranks. bf16 runs keep their covariances and
    query preconditioning in fp32, and fp32 convolutions on a GPU run in TF32: each FLOP is set against the rate
    of the precision it ran in. Every rank times its product at the same moment, so the rates add up to what the
    ranks share."""
    rates = {}
    for kind in kinds:
        if dist.is_initialized():
            dist.barrier(group=control_group())
        rates[kind] = summed(matmul_rate(device, kind, size))
    return rates


def unsteady_rate(before: float, after: float) -> str | None:
    """What to say when the rates measured before and after the passes are more than RATE_SPREAD apart."""
    low, high = sorted((before, after))
    if low >= RATE_SPREAD * high:
        return None
    return (
        f"the rate moved by {100 * (1 - low / high):.0f}% during the run: the machine is shared or throttles, and "
        "the x floor column is uncertain by as much; rerun when it is quiet"
    )


def floor_seconds(counted: dict[flops.Precision, float], rates: dict[flops.Precision, float]) -> float:
    """The time the counted FLOPs would take at the matrix-multiply rate of the precision each ran in."""
    return sum(count / rates[precision] for precision, count in counted.items() if count)


def reset_peak_memory(device: torch.device) -> None:
    """On a GPU, so that each phase reports its own peak (RSS on the CPU cannot be reset)."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


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


def breakdown(analyzer: Analyzer, kinds: list[flops.Precision], rates: dict[flops.Precision, float]) -> str:
    """Per pass, each stage's seconds (rank 0's) with its time over the floor of its FLOPs (every rank's) where it
    has products, and the rest of the pass: what the floor does not count shows up as stage time above its floor."""
    columns = (*stages.STAGES, "rest")
    header = f"{'where the time goes':<20}" + "".join(f"{name:>17}" for name in columns)
    lines = [
        "By stage (seconds, x floor): model = forward and backward, patches = gathering inputs and output "
        "gradients,\nkernels = the engine's products on them, rest = the rest of the pass (batches, sums, saves)",
        header,
        "-" * len(header),
    ]
    for action, label in PHASES.items():
        # The same actions on every rank, so that summed() meets each rank; the eigendecomposition has no stages.
        if action not in analyzer.profiler.records or label == "eigendecomposition":
            continue
        parts = analyzer.profiler.stages.get(action, {})
        cells = []
        for name in stages.STAGES:
            seconds, counts = parts.get(name, (0.0, {}))
            floor = floor_seconds({kind: summed(counts.get(kind, 0)) for kind in kinds}, rates)
            ratio = f"{seconds / floor:.2f}x" if floor > 0 else ""
            cells.append(f"{seconds:>9.2f} {ratio:>6}")
        rest = sum(analyzer.profiler.records[action]) - sum(seconds for seconds, _ in parts.values())
        cells.append(f"{rest:>9.2f} {'':>6}")
        lines.append((f"{label:<20}" + "".join(f"{cell:>17}" for cell in cells)).rstrip())
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    keep_freed_memory()
    device = start_processes(args.dist_timeout, args.device)
    world = world_size()
    args.influence_batch_size = influence_batch_size(args, device)
    say_if_bf16_is_emulated(device, args.use_half_precision)
    torch.manual_seed(0)
    # Random weights are laid out as the scripts lay out a checkpoint's (channels-last).
    model = load_model(args.checkpoint, device) if args.checkpoint else place_model(construct_resnet9(), device)
    if args.dataset_dir:
        train = get_cifar10(args.dataset_dir, "eval_train", num_train=args.num_train, device=device)
        queries = get_cifar10(args.dataset_dir, "valid", device=device).subset(args.num_queries, "--num_queries")
    else:
        train, queries = random_data(args.num_train, device, 0), random_data(args.num_queries, device, 1)

    # The fp32 rate is measured before and after the passes: on a shared machine (or one that throttles) it moves,
    # and the floor is only as good as the rate it divides by. (fp32 only: one rate shows the machine move.)
    kinds = precisions(device, args.use_half_precision)
    size = matmul_size(args, device)
    fp32_before = measure_rates(device, [torch.float32], size)[torch.float32]

    staged = device.type == "cpu" or args.breakdown
    stages.enable(device if staged else None)
    half = args.use_half_precision
    factor_args = FactorArguments(strategy=args.factor_strategy, use_half_precision=half)
    score_args = ScoreArguments(damping_factor=None, use_half_precision=half)
    with tempfile.TemporaryDirectory() as output_dir:
        analyzer = Analyzer(
            "bench",
            model,
            ClassificationTask(),
            output_dir=output_dir,
            profile=True,
            save_interval=args.save_interval,
            max_elements=args.max_elements,
        )
        batches = TensorBatches(train, args.influence_batch_size)
        query_batches = TensorBatches(queries, args.query_batch_size or len(queries))
        phase_memory = {}
        reset_peak_memory(device)
        analyzer.fit_all_factors("f", batches, factor_args)
        phase_memory["factors"] = peak_memory(device)
        reset_peak_memory(device)
        analyzer.compute_pairwise_scores(
            "p", "f", query_batches, batches, score_args, query_slice_size=batches.batch_size
        )
        phase_memory["Compute Pairwise Score"] = peak_memory(device)
        reset_peak_memory(device)
        analyzer.compute_self_scores("s", "f", batches, score_args)
        phase_memory["Compute Self-Influence Score"] = peak_memory(device)

    stages.enable(None)
    rates = measure_rates(device, kinds, size)
    fp32_after = rates[torch.float32]
    rates[torch.float32] = max(fp32_before, fp32_after)
    counted = {
        action: {kind: summed(analyzer.profiler.flops.get(action, {}).get(kind, 0)) for kind in kinds}
        for action in PHASES
    }
    by_stage = breakdown(analyzer, kinds, rates) if staged else ""  # on every rank: it sums over them
    if not is_main():
        return
    precision = "bf16" if args.use_half_precision else "fp32"
    processes = f", {world} processes" if world > 1 else ""
    print(
        f"ResNet-9, {args.factor_strategy}, {precision}, {device.type}{processes}, {len(train)} training examples, "
        f"{len(queries)} queries, training batches of {args.influence_batch_size}"
    )
    print(f"Device: {device_description(device)}")
    each = " (all processes)" if world > 1 else ""
    for kind, rate in rates.items():
        line = f"Matrix-multiply rate ({size}^2, {flops.name(kind)}){each}: {rate / 1e9:.1f} GFLOP/s"
        if kind == torch.float32:
            line += f", the better of {fp32_before / 1e9:.1f} before the passes and {fp32_after / 1e9:.1f} after"
            warning = unsteady_rate(fp32_before, fp32_after)
            line += f"\n  {warning}" if warning else ""
        print(line)
    header = f"{'phase':<20}{'seconds':>10}{'GFLOP':>12}{'GFLOP/s':>10}{'floor (s)':>11}{'x floor':>9}   peak memory"
    print(header)
    print("-" * len(header))
    for action, label in PHASES.items():
        if action not in analyzer.profiler.records:
            continue
        seconds = sum(analyzer.profiler.records[action])
        total = sum(counted[action].values())
        floor = floor_seconds(counted[action], rates)
        memory = phase_memory.get(action, phase_memory["factors"])
        ratio = f"{seconds / floor:>9.2f}" if total else f"{'-':>9}"
        print(
            f"{label:<20}{seconds:>10.2f}{total / 1e9:>12.1f}{total / seconds / 1e9:>10.1f}{floor:>11.2f}"
            f"{ratio}   {memory}"
        )
    if staged:
        print(by_stage)
    saves = analyzer.profiler.records.get("Save Partial Result", [])
    passes = sum(sum(analyzer.profiler.records.get(action, [])) for action in PHASES)
    print(
        f"Partial results saved {len(saves)} times (every {args.save_interval:g} s and after each query batch): "
        f"{sum(saves):.2f} s, {100 * sum(saves) / passes:.2f}% of the passes"
    )


if __name__ == "__main__":
    run_cli(main)
