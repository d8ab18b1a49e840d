"""Check a GPU machine end to end in one command (a few minutes on one H100), before the full job.

    python gpu_check.py                      # then: python walkthrough.py --scale gpu
    python gpu_check.py --dry_run --gpus 2   # the steps, without running them (any machine)

Steps, each a subprocess whose output goes to walkthrough/gpu_check/logs/<step>.log (progress bars to .err):
  tests        python -m pytest -q: the whole suite, with the GPU tests (tests/gpu/test_gpu.py) that a CPU skips
  train_*      ResNet-9 on the first 10,000 CIFAR-10 images for 5 epochs, with clean and with 10% corrupted labels
  analyze_*    EK-FAC factors and 500 x 10,000 pairwise scores in fp32, then in bf16 (--profile: the timing tables)
  half         how well the bf16 scores rank training images like the fp32 ones
  detect       self-influence of the 10,000 corrupted-label images, as mislabel detection
  bench_*      the benchmark of the same job in fp32 and bf16: each phase's time against its FLOP floor
With N > 1 GPUs the training, the fp32 scores, the detection and the benchmark run again under
torchrun --nproc_per_node=N, and the pairwise scores of N processes are compared with those of one.
A table of every step's time ends it. Without a GPU it refuses in one line (exit 2).
"""

from __future__ import annotations

import signal

# Ctrl-C while torch loads (a few seconds) ends the script quietly; run_cli handles it from then on.
signal.signal(signal.SIGINT, signal.SIG_DFL)

import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from example.errors import PipelineError
from example.flags import POSITIVE_INT, add_data_flags
from example.run import ArgumentParser, run_cli
from influence import load_tensors, write_atomically
from pipeline import load_cifar10_arrays

NUM_TRAIN, NUM_QUERIES, EPOCHS = "10000", "500", "5"
CHECK = "gpu_check"


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_flags(parser)
    parser.add_argument("--log_dir", default=f"./walkthrough/{CHECK}/logs", help="where the logs go")
    parser.add_argument(
        "--gpus", type=POSITIVE_INT, default=None, help="GPUs to use under torchrun (default: all visible)"
    )
    parser.add_argument("--skip_tests", action="store_true", help="leave out the test suite (it ran already)")
    parser.add_argument("--step_timeout", type=float, default=600.0, help="seconds a step may take (default 600)")
    parser.add_argument("--dry_run", action="store_true", help="print the steps without running them")
    args = parser.parse_args(argv)
    if args.gpus is not None and args.gpus < 1:
        parser.error(f"--gpus must be positive, got {args.gpus}")
    return args


def steps(args, gpus: int) -> list[tuple[str, list[str]]]:
    """(name, command) of every step, in order."""
    py = [sys.executable]
    torchrun = [*py, "-m", "torch.distributed.run", f"--nproc_per_node={gpus}"]
    data = ["--dataset_dir", args.dataset_dir]
    model = [*data, "--checkpoint_dir", f"./checkpoints/{CHECK}"]
    results = ["--output_dir", f"./influence_results/{CHECK}"]
    subset = ["--num_train", NUM_TRAIN]
    queries = ["--num_queries", NUM_QUERIES, "--query_batch_size", NUM_QUERIES]
    train = ["train.py", *subset, "--num_train_epochs", EPOCHS, "--use_channels_last"]
    analyze = ["analyze.py", *model, *subset, *queries, "--factor_strategy", "ekfac", "--profile"]
    figures = f"{args.log_dir}/figures"
    detect = ["detect_mislabeled_dataset.py", *model, *subset, "--factor_strategy", "ekfac", "--profile"]
    bench = ["bench.py", *data, *subset, *queries, "--checkpoint", f"./checkpoints/{CHECK}/model.safetensors"]
    found = [("tests", [*py, "-m", "pytest", "-q"])] if not args.skip_tests else []
    found += [
        ("train_clean", [*py, *train, *model]),
        ("train_corrupt", [*py, *train, *model, "--corrupt_percentage", "0.1"]),
        ("analyze_fp32", [*py, *analyze, *results, "--overwrite_output_dir"]),
        ("analyze_bf16", [*py, *analyze, *results, "--overwrite_output_dir", "--use_half_precision"]),
        ("half", [*py, "half_precision_analysis.py", *results, "--figure", f"{figures}/half_precision.png"]),
        ("detect", [*py, *detect, *results, "--overwrite_output_dir", "--figure", f"{figures}/mislabel.png"]),
        ("bench_fp32", [*py, *bench]),
        ("bench_bf16", [*py, *bench, "--use_half_precision"]),
    ]
    if gpus > 1:
        several = ["--output_dir", f"./influence_results/{CHECK}_{gpus}gpus", "--overwrite_output_dir"]
        own_model = ["--checkpoint_dir", f"./checkpoints/{CHECK}_{gpus}gpus"]
        found += [
            (f"train_{gpus}gpus", [*torchrun, *train, *data, *own_model]),
            (f"analyze_fp32_{gpus}gpus", [*torchrun, *analyze, *several]),
            (f"detect_{gpus}gpus", [*torchrun, *detect, *several, "--figure", f"{figures}/mislabel_{gpus}gpus.png"]),
            (f"bench_fp32_{gpus}gpus", [*torchrun, *bench]),
        ]
    return found


def stop(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def run_step(name: str, command: list[str], log_dir: Path, timeout: float) -> float:
    """Run one step, its output to <name>.log (shown when it ends) and <name>.err; returns its seconds."""
    log, err = log_dir / f"{name}.log", log_dir / f"{name}.err"
    print(f"== {name}: {' '.join(command)}", flush=True)
    start = time.monotonic()
    with open(log, "w") as out, open(err, "w") as progress:
        # A session of its own, so that a step past its time, or the check stopped (Ctrl-C, SIGTERM, SIGHUP: each
        # raised here), is stopped with torchrun's workers, which would otherwise keep their GPUs.
        process = subprocess.Popen(command, stdout=out, stderr=progress, start_new_session=True)
        stops = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGHUP)}
        try:
            code = process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            code = None
        finally:
            for sig, handler in stops.items():
                signal.signal(sig, handler)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    seconds = time.monotonic() - start
    print(log.read_text(), end="", flush=True)
    if code != 0:
        print(err.read_text()[-4000:], file=sys.stderr)
        reason = f"ran past {timeout:.0f} s" if code is None else f"failed (exit status {code})"
        raise PipelineError(f"step {name} {reason}; its logs: {log}, {err}")
    print(f"== {name}: {seconds:.0f} s", flush=True)
    return seconds


def compare_processes(gpus: int) -> str:
    """How far the pairwise scores of `gpus` processes are from those of one (the same model and data)."""
    name = Path("cifar10") / "scores_ekfac" / "pairwise_scores.safetensors"
    one = load_tensors(Path(f"./influence_results/{CHECK}") / name)["all_modules"]
    several = load_tensors(Path(f"./influence_results/{CHECK}_{gpus}gpus") / name)["all_modules"]
    error = ((several - one).norm() / one.norm()).item()
    return f"pairwise scores, {gpus} processes against 1: relative difference {error:.2e}"


def main() -> None:
    args = parse_args()
    gpus = args.gpus or max(torch.cuda.device_count(), 1)
    plan = steps(args, gpus)
    if args.dry_run:
        for name, command in plan:
            print(f"{name}: {' '.join(command)}")
        return
    if not torch.cuda.is_available():
        raise PipelineError("no GPU visible here: gpu_check.py checks a GPU machine (on the CPU: python -m pytest)")
    if gpus > torch.cuda.device_count():
        raise PipelineError(f"--gpus {gpus}, but {torch.cuda.device_count()} GPUs are visible")
    load_cifar10_arrays(args.dataset_dir, train=False)  # the data is there (or downloaded) before anything runs
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    print(f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}", flush=True)
    times = [(name, run_step(name, command, log_dir, args.step_timeout)) for name, command in plan]
    lines = ["| step | seconds |", "| --- | --- |"] + [f"| {name} | {seconds:.0f} |" for name, seconds in times]
    lines.append(f"| total | {sum(seconds for _, seconds in times):.0f} |")
    if gpus > 1:
        lines += ["", compare_processes(gpus)]
    lines += ["", "next: python walkthrough.py --scale gpu"]
    write_atomically(log_dir / "summary.md", lambda tmp: tmp.write_text("\n".join(lines) + "\n"), folder="--log_dir")
    print("\n".join(lines))


if __name__ == "__main__":
    os.chdir(Path(__file__).resolve().parent)  # the steps' paths are the repository's
    run_cli(main)
