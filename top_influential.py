"""Picture the training images that most help and most harm a few test queries.

Reads the pairwise scores analyze.py saved (influence_results/cifar10/scores_<strategy>) and draws, for each
chosen query, the query image, its top-k most helpful (highest score) and most harmful (lowest score)
training images with their labels and scores, into figure/top_influential.png.

    python top_influential.py --dataset_dir ./data --factor_strategy ekfac --queries 0 1 2 3 --top_k 5
"""

from __future__ import annotations

import signal

# Ctrl-C while torch loads (a few seconds) ends the script quietly; run_cli handles it from then on.
signal.signal(signal.SIGINT, signal.SIG_DFL)

from pathlib import Path

import torch

from example.errors import PipelineError
from example.figures import save_figure, subplots
from example.flags import NON_NEGATIVE_INT, POSITIVE_INT, add_data_flags, add_figure_flag, add_results_flags
from example.results import data_fingerprint, read_pairwise_scores
from example.run import ArgumentParser, run_cli
from influence import STRATEGY_LABELS
from pipeline import CLASSES, get_cifar10


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_flags(parser)
    add_results_flags(parser)
    parser.add_argument("--use_half_precision", action="store_true", help="read the bf16 scores")
    parser.add_argument(
        "--queries", type=NON_NEGATIVE_INT, nargs="+", default=[0, 1, 2, 3], help="query indices to show"
    )
    parser.add_argument("--top_k", type=POSITIVE_INT, default=5, help="helpful and harmful images per query")
    add_figure_flag(parser, "figure/top_influential.png", "where to draw the picture (default %(default)s)")
    return parser.parse_args(argv)


def draw(rows: list[dict], path: Path, top_k: int, heading: str) -> None:
    columns = 1 + 2 * top_k
    fig, axes = subplots(len(rows), columns, figsize=(1.25 * columns, 1.75 * len(rows) + 0.5), squeeze=False)
    for r, row in enumerate(rows):
        cells = [("query", row["query"], row["query_label"], None)]
        cells += [("helpful", img, lab, s) for img, lab, s in row["helpful"]]
        cells += [("harmful", img, lab, s) for img, lab, s in row["harmful"]]
        for c, (kind, image, label, score) in enumerate(cells):
            ax = axes[r, c]
            ax.imshow(image.permute(1, 2, 0).numpy())
            ax.set_xticks([])
            ax.set_yticks([])
            color = {"query": "black", "helpful": "tab:green", "harmful": "tab:red"}[kind]
            text = CLASSES[label] if score is None else f"{CLASSES[label]}\n{score:.3g}"
            ax.set_xlabel(text, fontsize=7, color=color)
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(2 if kind == "query" else 1)
            if r == 0:
                title = {"query": "Query", "helpful": "Most helpful", "harmful": "Most harmful"}[kind]
                if kind == "query" or c in (1, 1 + top_k):
                    ax.set_title(title, fontsize=8, loc="left")
    fig.suptitle(heading, fontsize=9)
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    scores, info = read_pairwise_scores(args.output_dir, args.factor_strategy, args.use_half_precision)
    train = get_cifar10(args.dataset_dir, "eval_train", num_train=info["num_train"], device="cpu")
    queries = get_cifar10(args.dataset_dir, "valid", device="cpu").subset(info["num_queries"])
    shown = {"data_sha256": (train.images, train.labels), "queries_sha256": (queries.images, queries.labels)}
    if any(key in info and info[key] != data_fingerprint(*tensors) for key, tensors in shown.items()):
        raise PipelineError(
            f"the scores in {args.output_dir} were made from other images or labels than those in "
            f"{args.dataset_dir}: give the --dataset_dir analyze.py used"
        )
    bad = [q for q in args.queries if not 0 <= q < scores.shape[0]]
    if bad:
        raise PipelineError(f"query indices {bad} are outside the {scores.shape[0]} scored queries")
    k = min(args.top_k, scores.shape[1])
    rows = []
    for q in args.queries:
        order = torch.argsort(scores[q], descending=True)
        chosen = {"helpful": order[:k], "harmful": order.flip(0)[:k]}
        row = {"query": queries.images[q], "query_label": int(queries.labels[q])}
        for kind, indices in chosen.items():
            row[kind] = [(train.images[i], int(train.labels[i]), scores[q, i].item()) for i in indices.tolist()]
        rows.append(row)
    precision = ", bf16" if args.use_half_precision else ""
    heading = (
        f"ResNet-9, {STRATEGY_LABELS[args.factor_strategy]}{precision}, {info['num_train']:,} training images: the "
        f"most helpful and harmful for {len(rows)} of {info['num_queries']:,} test queries\n"
        "score = rise of the query's margin when the image's loss is up-weighted (a sum over all images, not a mean)"
    )
    draw(rows, Path(args.figure), k, heading)
    print(f"Figure: {args.figure}")


if __name__ == "__main__":
    run_cli(main)
