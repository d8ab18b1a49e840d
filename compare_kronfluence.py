"""Run the same influence job with this project's engine and with kronfluence 1.0.1 on this machine, and compare them.

Two jobs, each from nothing (a fresh temporary folder), each side a whole process of its own (this script started
again), timed by the wall clock of that process, so that the interpreter's start, the imports and the data count
alike: factors + pairwise scores of the first --num_queries test images against the first --num_train training
images, and factors + self-influence of those training images. It prints the seconds of each side, the speed-up
(kronfluence's seconds over this project's) and how well the two sides' scores agree (Spearman).

    python compare_kronfluence.py --dataset_dir ./data                                  # 512 x 32: minutes on 2 cores
    python compare_kronfluence.py --dataset_dir ./data --checkpoint ./checkpoints/cpu/model.safetensors
    python compare_kronfluence.py --dataset_dir ./data --num_train 1000 --num_queries 50 --use_half_precision
    python compare_kronfluence.py --dataset_dir ./data --num_train 50000 --num_queries 2000 --query_batch_size 1000

Both sides compute the same quantities: the same ResNet-9 weights (--checkpoint, or random weights seeded 0, as
bench.py), the same images in the same order, --factor_strategy (EK-FAC), --damping_factor added to the Lambda
averaged over the examples (1e-8; 'heuristic' is 0.1 * mean(Lambda) per layer on both), training batches of
--influence_batch_size, the training loss summed cross-entropy, the query measurement minus the summed margin
(example/task.py's ClassificationTask on both sides), and the true Fisher's labels drawn from the model with the
seed this project draws each batch's with, so that both fit their factors on the same labels. fp32 by default;
--use_half_precision runs each side's own bf16 recipe: this project's (bf16 autocast and bf16 per-example
products; covariances, sums of squares and the query preconditioning in fp32) and kronfluence's CIFAR-10
example's (all_low_precision_factor_arguments and all_low_precision_score_arguments: bf16 autocast, covariances,
per-example gradients, Lambda, preconditioning and scores in bf16), so its scores agree less.

kronfluence is not a dependency of this project: install it beside it, in a virtual environment that keeps this
torch (python -m venv --system-site-packages ENV, then ENV/bin/pip install kronfluence==1.0.1), and run this
script with that environment's python. Run it on an otherwise idle machine: each side's time is one run.

On a GPU (--device, default cuda when present) this project's side keeps the images on the GPU, as its scripts do;
kronfluence's gets them from a CPU dataset, batch by batch, as its example does (without DataLoader workers here).
The last command above is the original job's size, for a GPU.
"""

from __future__ import annotations

import signal

# Ctrl-C while torch loads (a few seconds) ends the script quietly; run_cli handles it from then on.
signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from example.checkpoints import load_model
from example.devices import get_device, place_model
from example.errors import PipelineError
from example.flags import (
    add_damping_flag,
    add_data_flags,
    add_device_flag,
    add_fisher_flags,
    add_influence_batch_flag,
    add_model_file_flag,
    add_num_queries_flag,
    add_num_train_flag,
    add_query_batch_flag,
    add_strategy_flag,
    influence_batch_size,
)
from example.hardware import device_description, keep_freed_memory
from example.lds import spearman
from example.run import ArgumentParser, run_cli, say_if_bf16_is_emulated
from example.task import ClassificationTask
from influence import (
    STRATEGY_LABELS,
    Analyzer,
    FactorArguments,
    ScoreArguments,
    batch_seed,
    first_line,
    load_tensors,
    save_tensors,
    seeded_rngs,
)
from pipeline import CifarData, TensorBatches, construct_resnet9, get_cifar10, normalize

KRONFLUENCE_VERSION = "1.0.1"
INSTALL = f"pip install kronfluence=={KRONFLUENCE_VERSION}"
SIDES = ("project", "kronfluence")
JOBS = {"pairwise": "factors + pairwise", "self": "factors + self-influence"}
SCORES_FILE = "scores.safetensors"


def parse_args(argv=None):
    # The whole docstring: what is timed, what both sides compute, and how to install kronfluence beside this project.
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_flags(parser)
    add_num_train_flag(parser, default=512)
    add_num_queries_flag(parser, default=32)
    add_model_file_flag(parser)
    parser.add_argument(
        "--jobs",
        nargs="+",
        choices=tuple(JOBS),
        default=list(JOBS),
        help="which jobs to run: pairwise (factors + pairwise scores), self (factors + self-influence); default both",
    )
    add_strategy_flag(parser)
    add_device_flag(parser)
    add_damping_flag(parser)
    add_influence_batch_flag(parser)
    add_query_batch_flag(parser, None, ", on both sides")
    parser.add_argument(
        "--use_half_precision",
        action="store_true",
        help="bf16 on both sides, each with its own recipe (see above); default fp32",
    )
    add_fisher_flags(parser)
    # One side of one job, in a process of its own: how this script runs each side (not for users).
    parser.add_argument("--side", choices=SIDES, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--job", choices=tuple(JOBS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work_dir", default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# ---- What both sides run on ----


def load_inputs(
    args: argparse.Namespace, device: torch.device, data_device: torch.device | None = None
) -> tuple[torch.nn.Module, CifarData, CifarData]:
    """The model (the checkpoint's weights, or random ones seeded 0) on `device`, and the data on `data_device`
    (default: `device`). The random weights are drawn on the CPU, so both devices get the same ones."""
    torch.manual_seed(0)
    model = load_model(args.checkpoint, device) if args.checkpoint else place_model(construct_resnet9(), device)
    data_device = data_device or device
    train = get_cifar10(args.dataset_dir, "eval_train", num_train=args.num_train, device=data_device)
    queries = get_cifar10(args.dataset_dir, "valid", device=data_device).subset(args.num_queries, "--num_queries")
    return model, train, queries


def run_project(args: argparse.Namespace, device: torch.device, work_dir: Path) -> torch.Tensor:
    """This project's side, as analyze.py and detect_mislabeled_dataset.py run it."""
    keep_freed_memory()
    model, train, queries = load_inputs(args, device)
    half = args.use_half_precision
    factor_args = FactorArguments(
        strategy=args.factor_strategy,
        use_empirical_fisher=args.use_empirical_fisher,
        use_half_precision=half,
        seed=args.fisher_seed,
    )
    score_args = ScoreArguments(damping_factor=args.damping_factor, use_half_precision=half)
    analyzer = Analyzer("compare", model, ClassificationTask(), output_dir=work_dir, disable_tqdm=True)
    batches = TensorBatches(train, args.influence_batch_size)
    analyzer.fit_all_factors("factors", batches, factor_args)
    if args.job == "pairwise":
        query_batches = TensorBatches(queries, args.query_batch_size or len(queries))
        scores = analyzer.compute_pairwise_scores(
            "scores", "factors", query_batches, batches, score_args, query_slice_size=batches.batch_size
        )
        return scores["all_modules"]
    return analyzer.compute_self_scores("scores", "factors", batches, score_args)["all_modules"]


def kronfluence_task(seed: int):
    """kronfluence's Task computing what this project's ClassificationTask does, on batches (images, labels,
    example indices): the indices give each batch's seed for the true Fisher's labels, as this project seeds it
    (the global generators of the CPU and of the batch's GPU seeded, then restored), so that both sides draw the
    very same labels."""
    from kronfluence import Task

    task = ClassificationTask()

    class SameTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            images, labels, index = batch
            if not sample:
                return task.compute_train_loss((images, labels), model)
            # The labels are drawn where the images are (kronfluence hands over batches on its device).
            with seeded_rngs(batch_seed(seed, int(index[0]), len(index)), images.device):
                return task.compute_train_loss((images, labels), model, sample=True)

        def compute_measurement(self, batch, model):
            images, labels, _ = batch
            return task.compute_measurement((images, labels), model)

    return SameTask()


def run_kronfluence(args: argparse.Namespace, device: torch.device, work_dir: Path) -> torch.Tensor:
    """kronfluence's side, as its CIFAR-10 example runs it, with the batch sizes given (not searched for)."""
    from kronfluence import Analyzer as KronfluenceAnalyzer
    from kronfluence import FactorArguments as KronfluenceFactorArguments
    from kronfluence import ScoreArguments as KronfluenceScoreArguments
    from kronfluence import prepare_model
    from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments
    from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments

    model, train, queries = load_inputs(args, device, data_device=torch.device("cpu"))
    model = model.to(memory_format=torch.contiguous_format)  # as kronfluence's example lays it out

    def dataset(data: CifarData) -> torch.utils.data.TensorDataset:
        return torch.utils.data.TensorDataset(normalize(data.images), data.labels, torch.arange(len(data)))

    if args.use_half_precision:
        factor_args = all_low_precision_factor_arguments(strategy=args.factor_strategy, dtype=torch.bfloat16)
        score_args = all_low_precision_score_arguments(damping_factor=args.damping_factor, dtype=torch.bfloat16)
    else:
        factor_args = KronfluenceFactorArguments(strategy=args.factor_strategy)
        score_args = KronfluenceScoreArguments(damping_factor=args.damping_factor)
    factor_args.use_empirical_fisher = args.use_empirical_fisher
    factor_args.covariance_max_examples = factor_args.lambda_max_examples = None  # every example, as this project

    task = kronfluence_task(args.fisher_seed)
    model = prepare_model(model, task)
    analyzer = KronfluenceAnalyzer(
        "compare", model, task, cpu=device.type == "cpu", disable_tqdm=True, output_dir=str(work_dir)
    )
    train_set, batch = dataset(train), args.influence_batch_size
    analyzer.fit_all_factors("factors", train_set, per_device_batch_size=batch, factor_args=factor_args)
    if args.job == "pairwise":
        analyzer.compute_pairwise_scores(
            scores_name="scores",
            factors_name="factors",
            query_dataset=dataset(queries),
            train_dataset=train_set,
            per_device_query_batch_size=args.query_batch_size or len(queries),
            per_device_train_batch_size=batch,
            score_args=score_args,
        )
        return analyzer.load_pairwise_scores("scores")["all_modules"]
    analyzer.compute_self_scores(
        scores_name="scores",
        factors_name="factors",
        train_dataset=train_set,
        per_device_train_batch_size=batch,
        score_args=score_args,
    )
    return analyzer.load_self_scores("scores")["all_modules"]


def run_side(args: argparse.Namespace, device: torch.device) -> None:
    """One side of one job (a process of its own): its scores go to --work_dir, in float32."""
    if args.job is None or args.work_dir is None:
        raise PipelineError("--side needs --job and --work_dir (this script passes them to the processes it starts)")
    work_dir = Path(args.work_dir)
    scores = (run_project if args.side == "project" else run_kronfluence)(args, device, work_dir)
    save_tensors(work_dir / SCORES_FILE, {"scores": scores.float()})


# ---- The comparison ----


def kronfluence_version() -> str:
    """kronfluence's version, or a one-line error saying how to install it."""
    try:
        import kronfluence
    except ImportError as e:
        raise PipelineError(
            f"kronfluence is not installed ({e}): {INSTALL}, in a virtual environment that keeps this torch "
            "(python -m venv --system-site-packages ENV), and run this script with its python"
        ) from None
    except Exception as e:  # installed, but broken: a dependency that does not fit this torch, say
        raise PipelineError(f"kronfluence could not be imported ({first_line(e, typed=True)}): {INSTALL}") from None
    version = getattr(kronfluence, "__version__", "unknown")
    if version != KRONFLUENCE_VERSION:
        print(f"note: written for kronfluence {KRONFLUENCE_VERSION}, found {version}", file=sys.stderr)
    return version


def timed_process(args: argparse.Namespace, side: str, job: str, work_dir: Path) -> tuple[float, torch.Tensor]:
    """Run one side of one job as a process of its own; (its wall-clock seconds, its scores)."""
    work_dir.mkdir(parents=True)
    command = [sys.executable, str(Path(__file__).resolve()), *sys.argv[1:]]
    command += ["--side", side, "--job", job, "--work_dir", str(work_dir)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        said = next((line.removeprefix("error: ") for line in reversed(lines) if line.startswith("error: ")), None)
        name = "this project" if side == "project" else "kronfluence"
        if said is None:  # not one of the scripts' errors: show the end of what it printed (a traceback)
            print("\n".join(lines[-20:]), file=sys.stderr)
            said = lines[-1] if lines else f"exit status {result.returncode}"
        raise PipelineError(f"{name}'s side of the {JOBS[job]} job failed: {said}")
    return seconds, load_tensors(work_dir / SCORES_FILE)["scores"]


def relative_difference(found: torch.Tensor, reference: torch.Tensor) -> float:
    """||found - reference|| / ||reference||, in float64: a difference of sign or of scale shows here, where the
    rank correlations cannot see it."""
    found, reference = found.double(), reference.double()
    return float((found - reference).norm() / reference.norm().clamp_min(torch.finfo(torch.float64).tiny))


def agreement(job: str, ours: torch.Tensor, theirs: torch.Tensor) -> str:
    if ours.shape != theirs.shape:
        raise PipelineError(f"the two sides' {job} scores differ in shape: {list(ours.shape)}, {list(theirs.shape)}")
    difference = relative_difference(ours, theirs)
    if job == "pairwise":
        per_query = spearman(ours.double().numpy(), theirs.double().numpy(), axis=1)
        return (
            f"pairwise scores: mean per-query Spearman {np.nanmean(per_query):.4f} (lowest {np.nanmin(per_query):.4f}, "
            f"{len(per_query)} queries); relative difference {difference:.2e}"
        )
    correlation = spearman(ours.double().numpy()[:, None], theirs.double().numpy()[:, None])[0]
    return (
        f"self-influence scores: Spearman {correlation:.4f} ({len(ours)} training examples); "
        f"relative difference {difference:.2e}"
    )


def main() -> None:
    args = parse_args()
    device = get_device(args.device)
    args.influence_batch_size = influence_batch_size(args, device)
    if args.side is not None:
        run_side(args, device)
        return
    args.jobs = list(dict.fromkeys(args.jobs))  # each job once, in the order given
    version = kronfluence_version()
    say_if_bf16_is_emulated(device, args.use_half_precision)
    # Bad inputs are refused here, in one line, before any side starts.
    _, train, queries = load_inputs(args, torch.device("cpu"))
    precision = "bf16" if args.use_half_precision else "fp32"
    damping = "heuristic" if args.damping_factor is None else f"{args.damping_factor:g}"
    print(
        f"ResNet-9, {STRATEGY_LABELS[args.factor_strategy]}, {precision}, {device.type}, {len(train)} training "
        f"examples, {len(queries)} queries, training batches of {args.influence_batch_size}, damping {damping}, "
        f"{'checkpoint ' + args.checkpoint if args.checkpoint else 'random weights'}"
    )
    print(f"Device: {device_description(device)}")
    print(f"kronfluence {version}, torch {torch.__version__}, Python {platform.python_version()}", flush=True)

    seconds, scores = {}, {}
    with tempfile.TemporaryDirectory(prefix="compare_kronfluence_") as work:
        for job in args.jobs:
            for side in SIDES:
                seconds[job, side], scores[job, side] = timed_process(args, side, job, Path(work) / f"{job}_{side}")

    header = f"{'job':<26}{'this project (s)':>18}{'kronfluence (s)':>17}{'speed-up':>10}"
    print(header)
    print("-" * len(header))
    for job in args.jobs:
        ours, theirs = seconds[job, "project"], seconds[job, "kronfluence"]
        print(f"{JOBS[job]:<26}{ours:>18.1f}{theirs:>17.1f}{theirs / ours:>10.2f}")
    print("Each time is the wall clock of one whole process (start, imports, data, factors, scores); speed-up is")
    print("kronfluence's time over this project's. Agreement (this project against kronfluence):")
    for job in args.jobs:
        print("  " + agreement(job, scores[job, "project"], scores[job, "kronfluence"]))


if __name__ == "__main__":
    run_cli(main)
