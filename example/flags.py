"""The scripts' flags, declared once: value types that refuse a bad value while the flags are read, and the
groups each script adds in one line (add_data_flags, add_checkpoint_flags, add_label_flags, add_results_flags,
add_influence_flags, add_process_flags), and the single flags several scripts share (add_strategy_flag,
add_influence_batch_flag, add_damping_flag, add_fisher_flags, add_save_interval_flag). A default the engine has
(damping, save interval, Fisher seed) is read from it, not repeated.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import torch

from example.hardware import bf16_hardware_note
from influence import DEFAULT_DAMPING, DEFAULT_SAVE_INTERVAL, DEFAULT_STRATEGY, STRATEGIES, FactorArguments
from pipeline import check_label_options

# ---- Flag types: a bad value is refused while the flags are read, in one line, before any work starts ----


def number(low: float = 0.0, positive: bool = False, kind: type = float) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` at least `low` (above it when `positive`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (float("-inf") < value < float("inf")) or value < low or (positive and value == low):
            expected = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"expected {expected} {'>' if positive else '>='} {low:g}, got {text}")
        return value

    return parse


POSITIVE_INT = number(0, positive=True, kind=int)
NON_NEGATIVE_INT = number(0, kind=int)
NON_NEGATIVE = number(0)
POSITIVE = number(0, positive=True)


def seed(text: str) -> int:
    """An argparse type: a seed torch.manual_seed takes (0 <= seed < 2**63)."""
    value = NON_NEGATIVE_INT(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"a seed must be below 2**63, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a fraction strictly between 0 and 1 (of the training labels to corrupt)."""
    value = POSITIVE(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (0.1 is 10%), got {text}")
    return value


def folder(text: str) -> str:
    """An argparse type: a folder that is there or can be made, so that no file stands where it or a parent goes."""
    path = Path(text).expanduser()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                raise argparse.ArgumentTypeError(f"{place} is a file, not a folder: choose another folder")
            break
    return str(path)


FIGURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "tif", "tiff", "webp", "eps", "ps")


def figure_file(text: str) -> str:
    """An argparse type: a picture's file name, whose extension is a format matplotlib writes."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder: give a file name, such as {path / 'figure.png'}")
    if path.suffix.lower().lstrip(".") not in FIGURE_FORMATS:
        raise argparse.ArgumentTypeError(f"{path}: end the name with .png, .pdf or .svg (the format to draw in)")
    folder(str(path.parent))
    return str(path)


def add_figure_flag(parser: argparse.ArgumentParser, default: str | None, help: str) -> None:
    """--figure: the picture's file, checked (figure_file) as the command line is read, not after the work."""
    parser.add_argument("--figure", type=figure_file, default=default, metavar="FILE", help=help)


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dist_timeout",
        type=POSITIVE,
        default=600.0,
        help="under torchrun: seconds a process waits for another before it stops with an error (default 600)",
    )


# What "fp32" means on a GPU: torch's default, which the original example ran with (docs/gpu.md).
FP32_POLICY = "fp32, with torch's default on a GPU: convolutions in TF32 (cuDNN), matrix products in fp32"


# ---- Flag groups: each script adds the ones it needs in one line ----


def add_data_flags(parser: argparse.ArgumentParser, num_train: bool = False) -> None:
    """--dataset_dir, and --num_train for the scripts that train on, or score, the training set."""
    parser.add_argument("--dataset_dir", default="./data", help="folder holding cifar-10-batches-py/ (default ./data)")
    if num_train:
        add_num_train_flag(parser)


def add_num_train_flag(parser: argparse.ArgumentParser, default: int | None = None, note: str = "") -> None:
    """--num_train: all 50,000 training images by default, as the original; the benchmarks take fewer."""
    said = "all 50,000" if default is None else f"{default}"
    parser.add_argument(
        "--num_train",
        type=POSITIVE_INT,
        default=default,
        metavar="N",
        help=f"use the first N training examples{note} (default: {said})",
    )


def add_num_queries_flag(parser: argparse.ArgumentParser, default: int = 2000, note: str = "") -> None:
    """--num_queries: the original's 2,000 test images by default; the benchmarks take fewer."""
    parser.add_argument(
        "--num_queries",
        type=POSITIVE_INT,
        default=default,
        metavar="Q",
        help=f"score the first Q test images as queries{note} (default: {default})",
    )


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint_dir",
        type=folder,
        default="./checkpoints",
        help="folder of the trained checkpoints, created by train.py if missing (default ./checkpoints)",
    )


def add_label_flags(parser: argparse.ArgumentParser, corrupt_percentage: float | None = None) -> None:
    """The training labels a checkpoint was trained on, which also pick its file in --checkpoint_dir.

    --corrupt_percentage is None unless given, so that giving it with --noisy_labels can be refused (see
    corrupt_fraction); `corrupt_percentage` is the fraction used when neither is given."""
    parser.add_argument(
        "--corrupt_percentage",
        type=fraction,
        default=None,
        help="fraction p of training labels corrupted: train.py gives the first ceil(p*N) examples a wrong label "
        f"and saves model_corrupt_{{p}}.safetensors (default {corrupt_percentage}"
        + (" without --noisy_labels)" if corrupt_percentage is not None else ")"),
    )
    parser.set_defaults(default_corrupt_percentage=corrupt_percentage)
    parser.add_argument(
        "--noisy_labels",
        default=None,
        help="file of given training labels (.npz, or CIFAR-10N's CIFAR-10_human.pt); replaces "
        "--corrupt_percentage; train.py saves model_noisy_{key}.safetensors",
    )
    parser.add_argument(
        "--noisy_labels_key", default="aggre_label", help="array to use in --noisy_labels (default: aggre_label)"
    )


def corrupt_fraction(args: argparse.Namespace) -> float | None:
    """The fraction of corrupted labels the flags of add_label_flags ask for (None: clean or human labels);
    --corrupt_percentage with --noisy_labels is refused."""
    check_label_options(args.corrupt_percentage, args.noisy_labels)
    if args.noisy_labels is not None or args.corrupt_percentage is not None:
        return args.corrupt_percentage
    return args.default_corrupt_percentage


def add_results_flags(parser: argparse.ArgumentParser) -> None:
    """Where factors and scores are, and which: the flags of the scripts that compute them and of those that read."""
    parser.add_argument(
        "--output_dir", type=folder, default="./influence_results", help="where factors and scores are saved"
    )
    add_strategy_flag(parser)


def add_strategy_flag(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """--factor_strategy: one strategy (default ekfac), or with `several` one or more (default: all of them)."""
    if several:
        parser.add_argument(
            "--factor_strategy",
            nargs="+",
            choices=STRATEGIES,
            default=list(STRATEGIES),
            metavar="STRATEGY",
            help=f"one or more curvatures used to precondition gradients, of {', '.join(STRATEGIES)} (default: all)",
        )
        return
    parser.add_argument(
        "--factor_strategy",
        default=DEFAULT_STRATEGY,
        choices=STRATEGIES,
        help=f"curvature used to precondition gradients (default: {DEFAULT_STRATEGY})",
    )


def add_influence_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of analyze.py and detect_mislabeled_dataset.py, which fit factors and compute scores."""
    add_results_flags(parser)
    parser.add_argument(
        "--use_half_precision",
        action="store_true",
        help="bf16 autocast for forward/backward and bf16 pairwise products (results saved as *_half; "
        f"{bf16_hardware_note()}); without it {FP32_POLICY}",
    )
    add_profile_flag(parser)
    add_influence_batch_flag(parser, original_name=True)
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="recompute factors and scores even if saved ones exist"
    )
    add_damping_flag(parser)
    add_fisher_flags(parser, original_name=True)
    add_save_interval_flag(parser, "a pass's partial results, from which a killed run resumes")
    add_process_flags(parser)


def add_profile_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--profile", action="store_true", help="print the engine's timing table (the original's format) at the end"
    )


# Training examples per batch of the influence passes when --influence_batch_size is not given, per device type.
INFLUENCE_BATCH_SIZE = {"cuda": 512, "cpu": 128}


def add_eval_batch_flag(parser: argparse.ArgumentParser) -> None:
    """--eval_batch_size (train.py's accuracies, evaluate_lds.py's margins): the original's 1024."""
    parser.add_argument(
        "--eval_batch_size",
        type=POSITIVE_INT,
        default=1024,
        help="images per forward pass when evaluating (accuracies, margins; default 1024)",
    )


def add_model_file_flag(parser: argparse.ArgumentParser) -> None:
    """--checkpoint (bench.py, compare_kronfluence.py): one checkpoint file, or random weights (the same cost)."""
    parser.add_argument(
        "--checkpoint",
        default=None,
        metavar="FILE.safetensors",
        help="a ResNet-9 checkpoint written by train.py, e.g. ./checkpoints/model.safetensors (default: random "
        "weights seeded 0, which cost the same)",
    )


def add_device_flag(parser: argparse.ArgumentParser, note: str = "") -> None:
    """--device (bench.py, compare_kronfluence.py; the other scripts take the GPU when torch sees one)."""
    parser.add_argument(
        "--device", default=None, choices=("cpu", "cuda"), help=f"cpu or cuda (default: cuda when present){note}"
    )


def add_influence_batch_flag(parser: argparse.ArgumentParser, original_name: bool = False) -> None:
    """--influence_batch_size; with `original_name` also --train_batch_size, its name in kronfluence's example
    (analyze.py, detect_mislabeled_dataset.py). Not in the scripts that train, where --train_batch_size is SGD's."""
    names = ["--influence_batch_size", "--train_batch_size"] if original_name else ["--influence_batch_size"]
    alias = "; --train_batch_size is its name in the original kronfluence example" if original_name else ""
    parser.add_argument(
        *names,
        dest="influence_batch_size",
        type=POSITIVE_INT,
        default=None,
        metavar="N",
        help="training examples per forward/backward in the influence passes (default: "
        f"{INFLUENCE_BATCH_SIZE['cuda']} on a GPU, {INFLUENCE_BATCH_SIZE['cpu']} on the CPU, which keeps a pass's "
        f"memory low; 512 may run up to 9%% faster there for about 1 GiB more){alias}",
    )


def add_query_batch_flag(parser: argparse.ArgumentParser, default: int | None = 1000, note: str = "") -> None:
    """--query_batch_size: 1000 in the original example's scripts (analyze.py, evaluate_lds.py), all the queries
    at once (None) in the benchmarks, whose jobs are small."""
    said = f"default {default}" if default is not None else "default: all the queries at once"
    parser.add_argument(
        "--query_batch_size",
        type=POSITIVE_INT,
        default=default,
        metavar="B",
        help=f"queries preconditioned and held at once; each such batch is one pass over the training data{note} "
        f"({said})",
    )


def influence_batch_size(args: argparse.Namespace, device: torch.device) -> int:
    """--influence_batch_size, or the device's default: a GPU wants large batches; on a 2-core CPU 128 keeps the
    peak memory of a full-size pass low, and 512 ran up to 9% faster for about 1 GiB more (docs/performance.md)."""
    if args.influence_batch_size is not None:
        return args.influence_batch_size
    return INFLUENCE_BATCH_SIZE["cuda" if device.type == "cuda" else "cpu"]


def add_damping_flag(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """--damping_factor: one value, or with `several` one or more (a list); default the engine's DEFAULT_DAMPING."""
    what = "one or more numbers" if several else "number"
    parser.add_argument(
        "--damping_factor",
        nargs="+" if several else None,
        type=parse_damping,
        default=[DEFAULT_DAMPING] if several else DEFAULT_DAMPING,
        metavar="DAMPING",
        help=f"{what} added to the curvature eigenvalues, or 'heuristic' for 0.1 * mean(Lambda) "
        f"(default {str(DEFAULT_DAMPING).replace('e-0', 'e-')})",
    )


def add_fisher_flags(parser: argparse.ArgumentParser, original_name: bool = False) -> None:
    """Which Fisher the factors are fitted with: --use_empirical_fisher, --fisher_seed; with `original_name` also
    --seed, its name in kronfluence's example (analyze.py, detect_mislabeled_dataset.py). Not in the scripts that
    train, where --seed seeds the training."""
    parser.add_argument(
        "--use_empirical_fisher",
        action="store_true",
        help="fit factors with the dataset labels instead of labels sampled from the model",
    )
    names = ["--fisher_seed", "--seed"] if original_name else ["--fisher_seed"]
    alias = "; --seed is its name in the original kronfluence example" if original_name else ""
    parser.add_argument(
        *names,
        dest="fisher_seed",
        type=seed,
        default=FactorArguments.seed,
        help="seed of the labels sampled from the model for the true Fisher (ignored with --use_empirical_fisher; "
        f"default {FactorArguments.seed}){alias}",
    )


def add_save_interval_flag(parser: argparse.ArgumentParser, saved: str) -> None:
    """--save_interval: seconds between saves of `saved` (default the engine's DEFAULT_SAVE_INTERVAL)."""
    parser.add_argument(
        "--save_interval",
        type=NON_NEGATIVE,
        default=DEFAULT_SAVE_INTERVAL,
        help=f"seconds between saves of {saved} (default {DEFAULT_SAVE_INTERVAL:g})",
    )


def parse_damping(text: str) -> float | None:
    if text == "heuristic":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'heuristic', got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"damping must be a finite number >= 0 or 'heuristic', got {text}")
    return value
