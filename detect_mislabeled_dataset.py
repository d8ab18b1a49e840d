"""Find mislabeled CIFAR-10 training images by ranking them by self-influence.

Uses the checkpoint trained on the same labels (train.py --corrupt_percentage p, or --noisy_labels), fits
factors on those training images, scores each example's influence on itself, then reports which fraction
of the mislabeled examples is found by inspecting the top 10%, 20%, ..., 90% of the ranking, next to two
baselines (highest training loss first, random order). Writes figure/mislabel.png with one line per
strategy whose self scores exist for the same data.

Full job (GPU):
    python detect_mislabeled_dataset.py --dataset_dir ./data --checkpoint_dir ./checkpoints \
        --corrupt_percentage 0.1 --factor_strategy ekfac --profile
CPU-sized (after train.py --num_train 5000 --num_train_epochs 10 --corrupt_percentage 0.1):
    python detect_mislabeled_dataset.py --dataset_dir ./data --checkpoint_dir ./checkpoints \
        --corrupt_percentage 0.1 --factor_strategy ekfac --num_train 5000 --train_batch_size 128 --profile
Real annotation mistakes (CIFAR-10N), after train.py with the same two flags:
    python detect_mislabeled_dataset.py --noisy_labels ../shared/cifar10/cifar10n_train_labels.npz \
        --noisy_labels_key aggre_label --factor_strategy ekfac
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from influence import STRATEGIES, Analyzer
from pipeline import (
    ArgumentParser,
    ClassificationTask,
    PipelineError,
    TensorBatches,
    add_influence_flags,
    checkpoint_path,
    file_fingerprint,
    get_cifar10,
    get_device,
    influence_arguments,
    keep_freed_memory,
    load_model,
    results_name,
    run_cli,
    save_figure,
)

INSPECTED = [i / 10 for i in range(1, 10)]


def parse_args():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", default="./data", help="folder holding cifar-10-batches-py/")
    parser.add_argument("--checkpoint_dir", default="./checkpoints", help="folder holding the trained checkpoints")
    parser.add_argument(
        "--corrupt_percentage",
        type=float,
        default=0.1,
        help="fraction of labels corrupted, as given to train.py (default 0.1)",
    )
    parser.add_argument(
        "--noisy_labels",
        default=None,
        help=".npz of given training labels (e.g. CIFAR-10N); replaces --corrupt_percentage",
    )
    parser.add_argument("--noisy_labels_key", default="aggre_label", help="array to use in --noisy_labels")
    parser.add_argument("--figure", default="figure/mislabel.png", help="where to draw the detection curves")
    add_influence_flags(parser)
    return parser.parse_args()


# ---- Ranking ----


def detection_curve(ranking: torch.Tensor, mislabeled: torch.Tensor, fractions: list[float]) -> list[float]:
    """Fraction of the mislabeled examples among the first round(f * N) of `ranking`, for each f."""
    found = torch.cumsum(mislabeled[ranking].double(), 0)
    total = max(int(mislabeled.sum()), 1)
    return [found[max(round(f * len(ranking)), 1) - 1].item() / total for f in fractions]


@torch.no_grad()
def per_example_loss(model: torch.nn.Module, batches: TensorBatches) -> torch.Tensor:
    return torch.cat([F.cross_entropy(model(x), y, reduction="none").float().cpu() for x, y in batches])


# ---- Figure ----


def draw(curves: dict[str, list[float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    xs = [0.0, *INSPECTED, 1.0]
    for label, ys in curves.items():
        baseline = {"training loss": "black", "random": "gray"}.get(label)
        style = {"linestyle": "--", "color": baseline} if baseline else {"marker": "o", "markersize": 3}
        ax.plot(xs, [0.0, *ys, 1.0], label=label, **style)
    ax.set_xlabel("Fraction of training data inspected")
    ax.set_ylabel("Fraction of mislabeled examples found")
    ax.set_title(title)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    keep_freed_memory()
    torch.manual_seed(args.seed)
    device = get_device()
    noisy = args.noisy_labels is not None
    corrupt = None if noisy else args.corrupt_percentage
    checkpoint = checkpoint_path(args.checkpoint_dir, corrupt, args.noisy_labels_key if noisy else None)
    model = load_model(checkpoint, device)
    train = get_cifar10(
        args.dataset_dir,
        "eval_train",
        num_train=args.num_train,
        corrupt_percentage=corrupt,
        noisy_labels=args.noisy_labels,
        noisy_labels_key=args.noisy_labels_key,
        device=device,
    )
    mislabeled = train.changed.cpu()
    if not mislabeled.any():
        raise PipelineError("no training label differs from the dataset's: nothing to detect")
    labels = f"noisy:{Path(args.noisy_labels).name}:{args.noisy_labels_key}" if noisy else f"corrupt:{corrupt}"
    info = {"checkpoint_sha256": file_fingerprint(checkpoint), "num_train": len(train), "labels": labels}
    factor_args, score_args = influence_arguments(args, info)
    prefix = f"noisy_{args.noisy_labels_key}_" if noisy else ""
    name = results_name(args.factor_strategy, args.use_half_precision, prefix)

    analyzer = Analyzer("mislabeled", model, ClassificationTask(), output_dir=args.output_dir, profile=args.profile)
    batches = TensorBatches(train, args.train_batch_size)
    analyzer.fit_all_factors(name, batches, factor_args, overwrite_output_dir=args.overwrite_output_dir)
    analyzer.compute_self_scores(name, name, batches, score_args, overwrite_output_dir=args.overwrite_output_dir)

    # Every strategy already scored on these exact data and weights gets a line, so runs can be compared.
    curves = {}
    for strategy in STRATEGIES:
        for half in (False, True):
            other = results_name(strategy, half, prefix)
            folder = analyzer.scores_folder(other)
            if not (folder / "self_scores.safetensors").exists():
                continue
            saved = analyzer.load_score_arguments(other)
            if saved.get("info") != info:
                continue
            scores = analyzer.load_self_scores(other)["all_modules"]
            curves[other] = detection_curve(torch.argsort(scores, descending=True), mislabeled, INSPECTED)
    losses = per_example_loss(model, TensorBatches(train, args.train_batch_size))
    curves["training loss"] = detection_curve(torch.argsort(losses, descending=True), mislabeled, INSPECTED)
    generator = torch.Generator().manual_seed(args.seed)
    curves["random"] = detection_curve(torch.randperm(len(train), generator=generator), mislabeled, INSPECTED)

    print(f"{int(mislabeled.sum())} of {len(train)} training labels are wrong ({labels}).")
    print("Fraction of mislabeled examples found when inspecting the top fraction of the ranking:")
    width = max(len(label) for label in curves) + 2
    print("inspected".ljust(11) + "".join(label.rjust(width) for label in curves))
    for i, fraction in enumerate(INSPECTED):
        print(f"{fraction:>8.0%}   " + "".join(f"{curves[label][i]:>{width}.1%}" for label in curves))
    title = f"Mislabeled data detection ({labels}, N={len(train)})"
    draw(curves, Path(args.figure), title)
    print(f"Figure: {args.figure}")
    if args.profile:
        print(analyzer.profiler.table())


if __name__ == "__main__":
    run_cli(main)
