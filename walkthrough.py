"""Run everything the README reports, at one scale, in one command, keeping every log.

    python walkthrough.py --scale demo                                  # about 4 minutes on a 2-core CPU
    python walkthrough.py --scale cpu --noisy_labels CIFAR-10_human.pt  # about 3.5 hours on 2 cores
    python walkthrough.py --scale full --noisy_labels CIFAR-10_human.pt  # the original job on a CPU: hours to days
    python walkthrough.py --scale gpu --noisy_labels CIFAR-10_human.pt  # the original full job, on a GPU

Everything a walk-through makes goes under --out_dir (default ./walkthrough/<scale>): checkpoints/,
influence_results/, figures/ and logs/, where logs/<step>.log holds each step's output and logs/summary.md
collects every step's printed results (training accuracies, timing tables, the bf16 check, detection tables
with ROC AUC, benchmarks) with its wall time and peak memory. A step that finished is skipped when the
walk-through is started again with the same command (a step whose command changed runs again; --force reruns
them all), so an interrupted walk-through continues where it stopped, as do the passes inside a step.
SIGTERM or SIGINT is passed on to the running step, which saves its progress before the walk-through stops.

Scales:
  demo: 500 training images and a short training, EK-FAC pairwise scores for 16 test images with the picture of
        their most influential training images, and mislabel detection with its figure.
  cpu:  a model that fits its labels on a subset a 2-core CPU trains in under an hour, every strategy for mislabel
        detection, EK-FAC pairwise scores, bf16 checked on a smaller subset, the benchmark, the same jobs split
        over 2 processes, and the LDS of every strategy against 60 retrainings (about an hour more).
  full: the original example's full job on a CPU (on 2 cores, hours with AMX and more than a day without:
        docs/full_size.md): the 10%-corrupted model trained with the original recipe and its detection with every
        strategy first (EK-FAC in fp32, as the original; the other strategies in bf16 where the models train in
        bf16), then the clean model,
        EK-FAC pairwise scores of 2,000 queries x 50,000 in fp32 and bf16 and their agreement (on a CPU without
        bf16 units bf16 is emulated, at about the fp32 speed), the most influential images, and the CIFAR-10N
        model and its detection. The models train with channels-last, in bf16 where this CPU's bf16 products are
        faster than fp32 (see --train_precision), else in fp32.
  gpu:  the original example's full job: 25 epochs on 50,000 images, 2,000 x 50,000 pairwise scores in fp32
        and bf16, self-influence of all 50,000, every strategy, the full-size benchmark, and the LDS against 200
        retrainings on halves of the 50,000 (about half an hour of training on one H100 by an estimate: docs/lds.md).
The CIFAR-10N steps (training and detection on human label mistakes) run when --noisy_labels names the
release's CIFAR-10_human.pt (https://github.com/UCSC-REAL/cifar-10-100n, folder data/) or an .npz with an
aggre_label array; without it they are skipped with a line saying so.
"""

from __future__ import annotations

import signal

# Ctrl-C while torch loads (a few seconds) ends the script quietly; run_cli handles it from then on.
signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from example.errors import PipelineError
from example.flags import POSITIVE_INT, add_data_flags, folder
from example.hardware import cpu_bf16_units, matmul_rate
from example.run import ArgumentParser, run_cli
from influence import STRATEGIES, write_atomically

# The CPU walk-through's bf16 check: 200 training images, 20 queries
HALF_CHECK = ["--num_train", "200", "--num_queries", "20", "--query_batch_size", "20"]
# The benchmark at the original job's size (the gpu scale)
FULL_BENCH = ["--num_train", "50000", "--num_queries", "2000", "--query_batch_size", "1000"]
# Training recipes: the original optimiser and schedule (SGD, learning rate 0.4 reached linearly at 20% of the
# steps then decayed linearly to 0, weight decay 1e-3, crops and flips); the CPU recipe takes a subset small enough
# to train in minutes and enough steps (small batches) for the model to fit its own labels, wrong ones included.
# Every step gets --dataset_dir.
SCALES = {
    "demo": {
        "train": ["--num_train", "500", "--train_batch_size", "32", "--num_train_epochs", "8", "--num_test", "1000"],
        "influence": ["--num_train", "500"],
        "queries": ["--num_queries", "16", "--query_batch_size", "16"],
    },
    "cpu": {
        "train": ["--num_train", "2000", "--train_batch_size", "32", "--num_train_epochs", "35"],
        "influence": ["--num_train", "2000"],
        "queries": ["--num_queries", "100", "--query_batch_size", "100"],
        "half_check": HALF_CHECK,
        "bench": ["--num_train", "1000", "--num_queries", "50"],
        # a short look at bf16 beside the fp32 benchmark above
        "bench_bf16": ["--num_train", "32", "--num_queries", "8"],
        # 4 batches, so that 2 processes get 2 each
        "scaling": ["--num_train", "512", "--influence_batch_size", "128"],
        "scaling_queries": ["--num_queries", "32", "--query_batch_size", "32"],
        # LDS (docs/lds.md says why): 30 halves of 500 images, 2 seeds each, 20 epochs in batches of 32, 100 queries
        "lds": ["--num_train", "500", "--num_queries", "100", "--num_subsets", "30", "--seeds_per_subset", "2"]
        + ["--train_batch_size", "32", "--num_train_epochs", "20"],
    },
    "full": {
        "train": ["--use_channels_last"],  # and --use_half_precision where bf16 pays: training_precision()
        "influence": [],
        # the original's 1,000 queries per batch: their preconditioned gradients hold 9.1 GB in fp32 (analyze.py
        # peaked at 11.5 GB on 1,000 training images), which a 24 GiB machine keeps; each batch is one pass
        "queries": ["--query_batch_size", "1000"],
    },
    "gpu": {
        "train": ["--use_channels_last"],
        "influence": [],
        "queries": ["--query_batch_size", "1000"],
        "half_check": ["--query_batch_size", "1000"],  # the same job as analyze_ekfac, whose fp32 scores it reuses
        "bench": FULL_BENCH,
        "bench_bf16": FULL_BENCH,
        # LDS at full size: 100 halves of the 50,000 images, 2 seeds each, the original recipe, 2,000 queries
        "lds": ["--num_subsets", "100", "--seeds_per_subset", "2", "--num_queries", "2000", "--use_channels_last"],
    },
}
SPENT_INTERVAL = 30  # seconds between saves of a running step's time so far (<name>.spent)
# The full job on a CPU outlasts a working session: the headline result (detection on the corrupted labels) first.
FULL_ORDER = ["train_corrupt", "detect_ekfac", "detect_identity", "detect_diagonal", "detect_kfac", "train_clean"]
FULL_ORDER += ["analyze_ekfac", "analyze_ekfac_bf16", "half_precision"]
FULL_ORDER += ["top_influential"]
FULL_ORDER += ["train_noisy", "detect_noisy_ekfac"]
BF16_PAYS = 1.2  # bf16 training at the full scale where bf16 products run this many times the fp32 rate
CIFAR10N_HINT = "download CIFAR-10_human.pt from https://github.com/UCSC-REAL/cifar-10-100n (folder data/)"


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--scale",
        required=True,
        choices=SCALES,
        help="demo (minutes), cpu (the README's walk-through), full (the original job on a CPU) or gpu",
    )
    add_data_flags(parser)
    parser.add_argument(
        "--noisy_labels",
        default=None,
        help=f"CIFAR-10N labels for the real-noise steps: CIFAR-10_human.pt or an .npz ({CIFAR10N_HINT})",
    )
    parser.add_argument(
        "--out_dir",
        type=folder,
        default=None,
        help="where checkpoints/, influence_results/, figures/ and logs/ go (default ./walkthrough/<scale>)",
    )
    parser.add_argument(
        "--train_precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="full scale: the precision the three models train in, and the identity, diagonal and K-FAC "
        "detections run in (default auto: bf16 if this CPU's bf16 matrix "
        f"products run at least {BF16_PAYS:g} times its fp32 rate, else fp32 as the original; measured at the first "
        "run and kept in <out_dir>/logs/train_precision.txt, so that a resumed run trains as it began)",
    )
    parser.add_argument(
        "--num_queries",
        type=POSITIVE_INT,
        default=None,
        help="full scale: score the first Q test images in analyze_ekfac and analyze_ekfac_bf16 (default 2000, the "
        "original job; every 1,000 queries cost one more pass of per-example gradients over the 50,000 training "
        "images, and fewer queries make each pass shorter, so that the clean model's steps fit a shorter session)",
    )
    parser.add_argument("--force", action="store_true", help="rerun steps that already finished")
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="STEP",
        help="steps not to run, by the names --dry_run prints (e.g. --skip lds: at gpu scale the LDS retrains 200 "
        "models, about half an hour of training on one GPU by an estimate, plus each model's start and evaluation)",
    )
    parser.add_argument("--dry_run", action="store_true", help="print the steps without running them")
    args = parser.parse_args(argv)
    args.out_dir = Path(args.out_dir or f"./walkthrough/{args.scale}")
    if args.num_queries is not None and args.scale != "full":
        parser.error("--num_queries is for --scale full (the other scales fix their jobs' sizes)")
    return args


def check_inputs(args) -> None:
    if args.noisy_labels is not None and not Path(args.noisy_labels).is_file():
        raise PipelineError(f"--noisy_labels {args.noisy_labels} is not a file ({CIFAR10N_HINT})")
    if args.scale == "gpu" and not args.dry_run and not torch.cuda.is_available():
        raise PipelineError("--scale gpu needs a GPU and torch sees none: run --scale cpu or --scale demo here")


def training_precision(args, log_dir: Path) -> bool:
    """Whether the full scale trains in bf16: the choice kept from the run's start, else --train_precision, where
    auto measures this CPU's matrix-product rates (bf16 units do not always make bf16 faster: on a 2-core Xeon with
    AVX-512 BF16 and no AMX, bf16 products run at under half the fp32 rate). Kept unless --dry_run."""
    if args.scale != "full":
        return False
    kept = log_dir / "train_precision.txt"
    recorded = kept.read_text().split()[:1] if kept.is_file() and not args.force else []
    if recorded in (["bf16"], ["fp32"]):
        return recorded == ["bf16"]
    choice, why = args.train_precision, "given by --train_precision"
    if choice == "auto" and cpu_bf16_units() is None:
        choice, why = "fp32", "this CPU has no bf16 units"
    elif choice == "auto":
        cpu = torch.device("cpu")
        fp32, bf16 = (matmul_rate(cpu, dtype, 1024) / 1e9 for dtype in (torch.float32, torch.bfloat16))
        choice = "bf16" if bf16 >= BF16_PAYS * fp32 else "fp32"
        why = f"matrix products at {bf16:.0f} GFLOP/s in bf16 and {fp32:.0f} in fp32 on this CPU"
    line = f"{choice} ({why})"
    print(f"training precision: {line}", file=sys.stderr, flush=True)
    if not args.dry_run:
        write_atomically(kept, lambda tmp: tmp.write_text(line + "\n"), folder="--out_dir")
    return choice == "bf16"


def steps(args) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, command, extra environment) of every step, in order."""
    scale = SCALES[args.scale]
    py = [sys.executable]
    out = args.out_dir
    figures = out / "figures"
    dataset = ["--dataset_dir", args.dataset_dir]
    data = [*dataset, "--checkpoint_dir", str(out / "checkpoints")]
    results = ["--output_dir", str(out / "influence_results")]
    noisy = ["--noisy_labels", args.noisy_labels, "--noisy_labels_key", "aggre_label"] if args.noisy_labels else None
    one_thread = {"OMP_NUM_THREADS": "1"}
    torchrun = [*py, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    top_influential = [*py, "top_influential.py", *dataset, *results, "--queries", "0", "1", "2", "3"]
    top_influential += ["--figure", f"{figures}/top_influential.png"]
    detect = [*py, "detect_mislabeled_dataset.py", *data, *results, *scale["influence"], "--profile"]
    analyze = [*py, "analyze.py", *data, *results, *scale["influence"], "--factor_strategy", "ekfac", "--profile"]

    train = [*py, "train.py", *data, *scale["train"], *(["--use_half_precision"] if args.train_in_bf16 else [])]
    found = [
        ("train_clean", train, {}),
        ("train_corrupt", [*train, "--corrupt_percentage", "0.1"], {}),
    ]
    if args.scale == "demo":
        return found + [
            ("analyze_ekfac", [*analyze, *scale["queries"]], {}),
            ("top_influential", top_influential, {}),
            ("detect_ekfac", [*detect, "--figure", f"{figures}/mislabel.png", "--factor_strategy", "ekfac"], {}),
        ]
    if noisy:
        found.append(("train_noisy", [*train, *noisy], {}))
    if args.num_queries is not None:
        analyze += ["--num_queries", str(args.num_queries)]
    found.append(("analyze_ekfac", [*analyze, *scale["queries"]], {}))
    half_figure = ["--figure", f"{figures}/half_precision.png"]
    if args.scale == "full":  # the same job in bf16, its fp32 scores from analyze_ekfac
        found += [
            ("analyze_ekfac_bf16", [*analyze, *scale["queries"], "--use_half_precision"], {}),
            ("half_precision", [*py, "half_precision_analysis.py", *results, *half_figure], {}),
        ]
    else:  # at cpu scale bf16 is compared on a smaller subset of its own; on a GPU, on the full job above
        own_folder = [*results[:1], str(out / "influence_results_half_check")]
        half = own_folder if args.scale == "cpu" else results
        half_data = [*py, "analyze.py", *data, *half, "--factor_strategy", "ekfac", "--profile", *scale["half_check"]]
        found += [
            ("half_check_fp32", half_data, {}),
            ("half_check_bf16", [*half_data, "--use_half_precision"], {}),
            ("half_precision", [*py, "half_precision_analysis.py", *half, *half_figure], {}),
        ]
    found.append(("top_influential", top_influential, {}))
    # At the full scale on a CPU whose bf16 pays (the training precision's test), only EK-FAC detects in fp32 as
    # the original: the other strategies in bf16, which halves their time there.
    cheaper_in_bf16 = ["--use_half_precision"] if args.scale == "full" and args.train_in_bf16 else []
    for strategy in STRATEGIES:  # the last run prints the columns of every strategy
        figure = ["--figure", f"{figures}/mislabel.png"]
        precision = [] if strategy == "ekfac" else cheaper_in_bf16
        found.append((f"detect_{strategy}", [*detect, *figure, "--factor_strategy", strategy, *precision], {}))
    if noisy:
        figure = ["--figure", f"{figures}/mislabel_noisy_aggre_label.png"]
        found.append(("detect_noisy_ekfac", [*detect, *noisy, *figure, "--factor_strategy", "ekfac"], {}))
    if args.scale == "full":  # the benchmark and the LDS at this size are GPU work
        return sorted(found, key=lambda step: FULL_ORDER.index(step[0]))
    bench = [*py, "bench.py", *dataset, *scale["bench"]]
    found.append(("bench_fp32", [*bench, "--save_interval", "15"], {}))
    found.append(("bench_bf16", [*py, "bench.py", *dataset, *scale["bench_bf16"], "--use_half_precision"], {}))
    if args.scale == "cpu":
        # The CPU's default batch of 128 against the GPU's 512 and others, on the same job.
        for size in (512, 256, 128, 64):
            where = out / f"influence_results_batch_{size}"
            given = ["--output_dir", str(where), "--overwrite_output_dir", "--figure", str(where / "mislabel.png")]
            command = [*py, "detect_mislabeled_dataset.py", *data, "--num_train", "512", "--profile", *given]
            found.append((f"batch_size_{size}", [*command, "--influence_batch_size", str(size)], {}))
    if args.scale == "cpu":
        # The same jobs on one thread in one process, and split over 2 processes of one thread each.
        for name, script, extra in (
            ("bench", "bench.py", [*dataset, *scale["bench"]]),
            ("detect", "detect_mislabeled_dataset.py", [*data, *scale["scaling"], "--factor_strategy", "ekfac"]),
            (
                "analyze",
                "analyze.py",
                [*data, *scale["scaling"], *scale["scaling_queries"], "--factor_strategy", "ekfac"],
            ),
        ):
            for processes, launcher in ((1, py), (2, torchrun)):
                where = out / f"influence_results_scaling_{processes}"
                profile = ["--output_dir", str(where), "--overwrite_output_dir", "--profile"]
                profile = [] if script == "bench.py" else profile
                if script == "detect_mislabeled_dataset.py":
                    profile += ["--figure", str(where / "mislabel.png")]
                found.append((f"scaling_{name}_{processes}proc", [*launcher, script, *extra, *profile], one_thread))
    # Do the scores predict retraining? On the CPU two one-thread processes share the retrainings.
    lds = [*dataset, "--output_dir", str(out / "lds_results"), *scale["lds"], "--damping_factor", "1e-8", "heuristic"]
    lds += ["--figure", f"{figures}/lds.png", "--profile"]
    launcher, env = (torchrun, one_thread) if args.scale == "cpu" else (py, {})
    found.append(("lds", [*launcher, "evaluate_lds.py", *lds], env))
    return found


def run_step(name: str, command: list[str], env: dict[str, str], log_dir: Path, shown: str) -> tuple[float, float]:
    """Run one step: results (stdout) to <name>.log, progress bars (stderr) to <name>.err.

    SIGTERM and SIGINT are passed on to the step, whose scripts save their progress and exit; the walk-through
    waits for it, then stops too, so that no step is left running on its own. While the step runs, its time so far
    is kept in <name>.spent (every SPENT_INTERVAL seconds, and when it stops), so that even a walk-through killed
    without warning (SIGKILL, a machine shut down at the end of a session) leaves it: the next run of the same
    command adds it to its own time and appends to the step's log. Returns (seconds, peak resident memory of the
    step's processes in GiB, over the parts that ended by themselves or by a forwarded signal).
    """
    log, err = log_dir / f"{name}.log", log_dir / f"{name}.err"
    spent = log_dir / f"{name}.spent"  # earlier parts' seconds and peak memory, for a step resumed across sessions
    earlier = recorded(spent, shown)
    before_seconds, before_peak = earlier or (0.0, 0.0)
    print(f"== {name}: {shown}", flush=True)
    start = time.monotonic()
    record(spent, before_seconds, before_peak, shown)
    # A resumed step appends to its log, so that the output of every part of a long step is kept.
    with open(log, "w" if earlier is None else "a") as out, open(err, "w") as progress:
        out.write(f"$ {shown}\n")
        out.flush()
        process = subprocess.Popen(command, stdout=out, stderr=progress, env={**os.environ, **env})
        stopped = []

        def forward(signum, frame):
            stopped.append(signum)
            process.send_signal(signum)

        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            # wait4 gives the rusage of this step's processes alone. Polled, so that the time so far reaches disk
            # while the step runs; a forwarded signal does not end the wait, so the walk-through waits for the step
            # to save.
            kept = start
            while not (waited := os.wait4(process.pid, os.WNOHANG))[0]:
                if time.monotonic() - kept >= SPENT_INTERVAL:
                    kept = time.monotonic()
                    record(spent, before_seconds + kept - start, before_peak, shown)
                time.sleep(0.1)
            _, status, usage = waited
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    seconds = before_seconds + time.monotonic() - start
    peak = max(before_peak, usage.ru_maxrss / 2**20)
    code = os.waitstatus_to_exitcode(status)
    print(log.read_text().split("\n", 1)[1], end="", flush=True)
    if stopped or code != 0:  # the next run of this command resumes it (or tries again): its time so far counts
        record(spent, seconds, peak, shown)
    if stopped:
        raise PipelineError(f"stopped during step {name}, which saved its progress: run the same command again")
    if code != 0:
        print(err.read_text()[-4000:], file=sys.stderr)
        raise PipelineError(f"step {name} failed (exit status {code}); its logs: {log}, {err}")
    record(log_dir / f"{name}.done", seconds, peak, shown)
    spent.unlink(missing_ok=True)
    print(f"== {name}: {seconds:.0f} s, peak memory {peak:.2f} GiB", flush=True)
    return seconds, peak


def record(path: Path, seconds: float, peak: float, shown: str) -> None:
    """A step's time and peak memory, with the command they belong to (<name>.done, <name>.spent), whole or absent."""
    write_atomically(path, lambda tmp: tmp.write_text(f"{seconds:.1f} {peak:.2f}\n{shown}\n"), folder="--out_dir")


def recorded(path: Path, shown: str) -> tuple[float, float] | None:
    """(seconds, peak GiB) that `record` wrote for this very command, else None."""
    lines = path.read_text().splitlines() if path.is_file() else []
    try:
        seconds, peak = (float(v) for v in lines[0].split())
    except (IndexError, ValueError):
        return None
    return (seconds, peak) if lines[1:2] == [shown] else None


def finished_before(marker: Path, shown: str) -> tuple[float, float] | None:
    """(seconds, peak GiB) of a step that finished with this very command, else None (it runs again)."""
    return recorded(marker, shown) if marker.with_suffix(".log").is_file() else None


def write_summary(args, done: list[tuple[str, list[str], float, float]], log_dir: Path) -> Path:
    lines = [f"# Walk-through at scale {args.scale}", ""]
    total = sum(seconds for _, _, seconds, _ in done)
    lines += [f"Total: {total / 60:.1f} minutes over {len(done)} steps.", ""]
    lines += ["| step | seconds | peak memory (GiB) |", "| --- | --- | --- |"]
    lines += [f"| {name} | {seconds:.0f} | {peak:.2f} |" for name, _, seconds, peak in done]
    for name, _, seconds, _ in done:
        text = (log_dir / f"{name}.log").read_text()
        lines += ["", f"## {name} ({seconds:.0f} s)", "", "```", text.rstrip(), "```"]
    path = log_dir / "summary.md"
    write_atomically(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"), folder="--out_dir")
    return path


def shown_command(command: list[str], env: dict[str, str]) -> str:
    return f"{' '.join(f'{k}={v}' for k, v in env.items())} {' '.join(command)}".strip()


def main() -> None:
    args = parse_args()
    check_inputs(args)
    log_dir = args.out_dir / "logs"
    args.train_in_bf16 = training_precision(args, log_dir)
    plan = steps(args)
    # At full scale, a step another machine runs instead of this one's (bf16 at full size or on a subset) is known.
    known = {name for name, _, _ in plan} | (set(FULL_ORDER) if args.scale == "full" else set())
    unknown = sorted(set(args.skip) - known)
    if unknown:
        raise PipelineError(f"--skip {' '.join(unknown)}: no such step at scale {args.scale} (--dry_run lists them)")
    plan = [step for step in plan if step[0] not in args.skip]
    if args.scale != "demo" and args.noisy_labels is None:
        print(f"CIFAR-10N steps skipped: no --noisy_labels ({CIFAR10N_HINT})", file=sys.stderr, flush=True)
    if args.dry_run:
        for name, command, env in plan:
            print(f"{name}: {shown_command(command, env)}")
        return
    log_dir.mkdir(parents=True, exist_ok=True)
    done = []
    for name, command, env in plan:
        shown = shown_command(command, env)
        before = None if args.force else finished_before(log_dir / f"{name}.done", shown)
        if before is not None:
            seconds, peak = before
            print(f"== {name}: done before ({seconds:.0f} s), skipped")
        else:
            seconds, peak = run_step(name, command, env, log_dir, shown)
        done.append((name, command, seconds, peak))
    print(f"Summary: {write_summary(args, done, log_dir)}")


if __name__ == "__main__":
    run_cli(main)
