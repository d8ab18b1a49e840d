"""Find mislabeled CIFAR-10 training images by ranking them by self-influence.

Uses the checkpoint trained on the same labels (train.py --corrupt_percentage p, or --noisy_labels), fits
factors on those training images, scores each example's influence on itself, then reports which fraction
of the mislabeled examples is found by inspecting the top 10%, 20%, ..., 90% of the ranking, and the area
under the ROC curve of each ranking, next to two baselines (highest training loss first, random order).
Draws the detection curves (one line per strategy whose self scores exist for the same data) and the
top-ranked images with their given and official labels.

Full job (GPU), after the full train.py --corrupt_percentage 0.1:
    python detect_mislabeled_dataset.py --dataset_dir ./data --checkpoint_dir ./checkpoints \
        --corrupt_percentage 0.1 --factor_strategy ekfac --profile
CPU-sized, after the CPU-sized train.py --corrupt_percentage 0.1 (see train.py):
    python detect_mislabeled_dataset.py --dataset_dir ./data --checkpoint_dir ./checkpoints/cpu \
        --output_dir ./influence_results/cpu --corrupt_percentage 0.1 --factor_strategy ekfac --num_train 2000 \
        --figure figure/mislabel_cpu.png --profile
Real annotation mistakes (CIFAR-10N's CIFAR-10_human.pt, https://github.com/UCSC-REAL/cifar-10-100n), after
train.py with the same --noisy_labels and --noisy_labels_key:
    python detect_mislabeled_dataset.py --noisy_labels CIFAR-10_human.pt --noisy_labels_key aggre_label \
        --factor_strategy ekfac
Several processes, same results:
    torchrun --nproc_per_node=2 detect_mislabeled_dataset.py --checkpoint_dir ./checkpoints/cpu \
        --output_dir ./influence_results/cpu --num_train 2000 --corrupt_percentage 0.1 --figure figure/mislabel_cpu.png
"""

from __future__ import annotations

import signal

# Ctrl-C while torch loads (a few seconds) ends the script quietly; run_cli handles it from then on.
signal.signal(signal.SIGINT, signal.SIG_DFL)

import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from example.checkpoints import checkpoint_path, load_model, train_command
from example.errors import PipelineError
from example.figures import save_figure, subplots, suptitle
from example.flags import (
    POSITIVE_INT,
    add_checkpoint_flags,
    add_data_flags,
    add_figure_flag,
    add_influence_flags,
    add_label_flags,
    corrupt_fraction,
    figure_file,
)
from example.ranking import average_ranks
from example.results import (
    check_shape,
    file_fingerprint,
    influence_arguments,
    made_from,
    make_analyzer,
    results_name,
)
from example.run import ArgumentParser, is_main, run_cli, start_influence_run
from influence import STRATEGIES, STRATEGY_LABELS
from pipeline import CLASSES, TensorBatches, get_cifar10

INSPECTED = [i / 10 for i in range(1, 10)]
# The seed of the random-order baseline (fixed: it is a reference, not a setting of the influence run).
RANDOM_ORDER_SEED = 0


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_flags(parser, num_train=True)
    add_checkpoint_flags(parser)
    add_label_flags(parser, corrupt_percentage=0.1)
    add_figure_flag(
        parser,
        None,
        "where to draw the detection curves (default figure/mislabel.png, or figure/mislabel_noisy_<key>.png with "
        "--noisy_labels)",
    )
    parser.add_argument(
        "--top_figure",
        type=figure_file,
        default=None,
        metavar="FILE",
        help="where to draw the top-ranked images (default: the --figure name with _top)",
    )
    parser.add_argument("--top_k", type=POSITIVE_INT, default=16, help="top-ranked images to draw (default 16)")
    add_influence_flags(parser)
    return parser.parse_args(argv)


# ---- Rankings ----


def detection_curve(scores: np.ndarray, mislabeled: np.ndarray, fractions: list[float]) -> list[float]:
    """Fraction of the mislabeled examples among the round(f * N) highest `scores`, for each f.

    Tied scores share their places: a cut through a group of equal scores takes that group's mislabeled examples
    in proportion to the places it takes (the mean over every order of the ties). A sort would keep tied examples
    in index order, and the corrupted labels are the first examples, so ties would "find" them."""
    scores, mislabeled = np.asarray(scores, dtype=np.float64), np.asarray(mislabeled, dtype=bool)
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], mislabeled[order].astype(np.int64)
    n = len(ranked)
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first place of each group of equal scores
    sizes = np.diff(np.r_[starts, n])
    before = np.r_[0, np.cumsum(hits)][starts]  # mislabeled examples ranked above each group
    inside = np.add.reduceat(hits, starts)
    inspected = np.array([max(round(f * n), 1) for f in fractions])
    group = np.searchsorted(starts, inspected - 1, side="right") - 1  # the group holding the last place inspected
    found = before[group] + inside[group] * (inspected - starts[group]) / sizes[group]
    return (found / max(int(mislabeled.sum()), 1)).tolist()


def roc_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for `positive`: the probability that a random positive example
    scores above a random negative one, ties counting one half (Mann-Whitney U over n_pos * n_neg)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise PipelineError("the ROC AUC needs both mislabeled and correctly labeled examples")
    if not np.isfinite(scores).all():
        raise PipelineError("the ROC AUC needs finite scores")
    ranks = average_ranks(scores)  # ties get their average rank
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def degenerate(scores: np.ndarray) -> str | None:
    """Why `scores` cannot rank the examples (NaN or inf among them, or all equal), or None. Such a ranking would
    only follow the examples' order, which puts the corrupted labels first."""
    finite = np.isfinite(scores)
    if not finite.all():
        kinds = " and ".join(name for name, bad in (("NaN", np.isnan(scores)), ("inf", np.isinf(scores))) if bad.any())
        return f"hold {kinds} for {int((~finite).sum())} of {len(scores)} examples"
    if len(scores) > 1 and scores.min() == scores.max():
        return f"are all {scores[0]:g}"
    return None


@torch.no_grad()
def per_example_loss(model: torch.nn.Module, batches: TensorBatches) -> torch.Tensor:
    # A forward pass over the whole training set: minutes on a CPU at full size, so it shows its progress.
    progress = tqdm(batches, desc="Training loss", total=len(batches), leave=False)
    return torch.cat([F.cross_entropy(model(x), y, reduction="none").float().cpu() for x, y in progress])


# ---- Figures ----


def display_name(label: str, prefix: str) -> str:
    """How a ranking is named in figures: "EK-FAC", "K-FAC (bf16)", "training loss" (not results' folder names)."""
    strategy = label.removeprefix(prefix).removesuffix("_half")
    if strategy not in STRATEGY_LABELS:
        return label
    return STRATEGY_LABELS[strategy] + (" (bf16)" if label.endswith("_half") else "")


def draw_curves(curves: dict[str, list[float]], aucs: dict[str, float], path: Path, title: str) -> None:
    """One panel per influence ranking, each beside the training loss and a random order, so that rankings whose
    curves coincide do not hide one another; the ROC AUC of each is written in its panel."""
    xs = [0.0, *INSPECTED, 1.0]
    baselines = [label for label in ("training loss", "random") if label in curves]
    ranked = [label for label in curves if label not in baselines] or baselines[:1]
    fig, axes = subplots(1, len(ranked), figsize=(3.3 * len(ranked) + 0.6, 3.6), squeeze=False, sharey=True)
    for ax, label in zip(axes[0], ranked, strict=True):
        for other in baselines:
            if other != label:
                color = {"training loss": "black", "random": "gray"}[other]
                ax.plot(
                    xs,
                    [0.0, *curves[other], 1.0],
                    linestyle="--",
                    color=color,
                    linewidth=1,
                    label=f"{other} (ROC AUC {aucs[other]:.3f})",
                )
        ax.plot(
            xs,
            [0.0, *curves[label], 1.0],
            marker="o",
            markersize=3,
            color="tab:blue",
            label=f"{label} (ROC AUC {aucs[label]:.3f})",
        )
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("fraction of training data inspected")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
    axes[0][0].set_ylabel("fraction of wrong labels found")
    suptitle(fig, title, fontsize=10)
    save_figure(fig, path)


def draw_top(images: torch.Tensor, given: list[int], official: list[int], path: Path, title: str) -> None:
    columns = min(8, len(images))
    rows = (len(images) + columns - 1) // columns
    fig, axes = subplots(rows, columns, figsize=(1.45 * columns, 1.8 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.flat):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= len(images):
            ax.axis("off")
            continue
        ax.imshow(images[i].permute(1, 2, 0).numpy())
        wrong = given[i] != official[i]
        color = "tab:red" if wrong else "tab:green"
        text = f"#{i + 1}  given: {CLASSES[given[i]]}\nofficial: {CLASSES[official[i]]}"
        ax.set_xlabel(text, fontsize=7, color=color)
        for spine in ax.spines.values():
            spine.set_edgecolor(color)
            spine.set_linewidth(2)
    suptitle(fig, title, fontsize=9)
    save_figure(fig, path)


# ---- Main ----


def main() -> None:
    args = parse_args()
    corrupt, noisy = corrupt_fraction(args), args.noisy_labels is not None
    device = start_influence_run(args)
    checkpoint = checkpoint_path(args.checkpoint_dir, corrupt, args.noisy_labels_key if noisy else None)
    model = load_model(checkpoint, device, train_command(args, corrupt))
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
    info = made_from(checkpoint, train, labels=labels)
    if noisy:  # the label file's content: its name alone would let an edited file reuse stale scores
        info["label_file_sha256"] = file_fingerprint(args.noisy_labels)
    factor_args, score_args = influence_arguments(args, info)
    prefix = f"noisy_{args.noisy_labels_key}_" if noisy else ""
    name = results_name(args.factor_strategy, args.use_half_precision, prefix)

    analyzer = make_analyzer("mislabeled", model, args)
    batches = TensorBatches(train, args.influence_batch_size)
    analyzer.fit_all_factors(name, batches, factor_args, overwrite_output_dir=args.overwrite_output_dir)
    own = analyzer.compute_self_scores(name, name, batches, score_args, overwrite_output_dir=args.overwrite_output_dir)[
        "all_modules"
    ]
    check_shape(own, (len(train),), analyzer.scores_folder(name))
    # Every strategy already scored on these exact data and weights gets a column, so runs can be compared.
    rankings: dict[str, np.ndarray] = {}
    for strategy in STRATEGIES:
        for half in (False, True):
            other = results_name(strategy, half, prefix)
            if other != name and not analyzer.has_self_scores(other):
                continue
            if analyzer.load_score_arguments(other).get("info") != info:
                continue
            rankings[other] = analyzer.load_self_scores(other)["all_modules"].double().numpy()
    if not is_main():
        return
    rankings["training loss"] = (
        per_example_loss(model, TensorBatches(train, args.influence_batch_size)).double().numpy()
    )
    generator = torch.Generator().manual_seed(RANDOM_ORDER_SEED)
    rankings["random"] = torch.rand(len(train), generator=generator, dtype=torch.float64).numpy()
    # Before any table: a ranking that cannot rank is refused (this run's) or left out (an earlier run's column).
    for label in list(rankings):
        problem = degenerate(rankings[label])
        if problem is None:
            continue
        if label in (name, "training loss"):
            hint = "check the checkpoint, or try a smaller --damping_factor or another --factor_strategy"
            raise PipelineError(f"the {label} scores {problem}: they rank nothing, so no detection is reported; {hint}")
        print(f"note: leaving out the saved {label} scores, which {problem}", file=sys.stderr)
        del rankings[label]

    truth = mislabeled.numpy()
    rankings = {display_name(label, prefix): scores for label, scores in rankings.items()}
    curves = {label: detection_curve(s, truth, INSPECTED) for label, s in rankings.items()}
    aucs = {label: roc_auc(s, truth) for label, s in rankings.items()}
    print(f"{int(mislabeled.sum())} of {len(train)} training labels are wrong ({labels}).")
    print("Fraction of mislabeled examples found when inspecting the top fraction of the ranking:")
    width = max(len(label) for label in curves) + 2
    print("inspected".ljust(11) + "".join(label.rjust(width) for label in curves))
    for i, fraction in enumerate(INSPECTED):
        print(f"{fraction:>8.0%}   " + "".join(f"{curves[label][i]:>{width}.1%}" for label in curves))
    print("ROC AUC".ljust(11) + "".join(f"{aucs[label]:>{width}.3f}" for label in curves))

    default = f"figure/mislabel_noisy_{args.noisy_labels_key}.png" if noisy else "figure/mislabel.png"
    figure = Path(args.figure or default)
    given = f"CIFAR-10N {args.noisy_labels_key}" if noisy else f"{corrupt:.0%} of labels corrupted"
    title = f"ResNet-9 on {len(train):,} CIFAR-10 training images, {given}: wrong labels found by each ranking"
    draw_curves(curves, aucs, figure, title)
    top_figure = Path(args.top_figure or figure.with_name(f"{figure.stem}_top{figure.suffix}"))
    order = torch.argsort(own, descending=True)[: min(args.top_k, len(train))].cpu()
    draw_top(
        train.images[order.to(train.images.device)].cpu(),
        train.labels.cpu()[order].tolist(),
        train.clean_labels.cpu()[order].tolist(),
        top_figure,
        f"ResNet-9 on {len(train):,} CIFAR-10 training images, {given}: the {len(order)} highest "
        f"{display_name(name, prefix)} self-influences, with the label given and the official one (red: they differ)",
    )
    print(f"Figures: {figure}, {top_figure}")
    if args.profile:
        print(analyzer.profiler.table())


if __name__ == "__main__":
    run_cli(main)
