"""Check that bf16 pairwise scores rank training examples like the fp32 ones.

Reads influence_results/cifar10/scores_<strategy>/ and scores_<strategy>_half/ (made by analyze.py with and
without --use_half_precision), prints the mean, lowest and highest per-query Spearman correlation, and
draws figure/half_precision.png: bf16 against fp32 scores of one query.

    python half_precision_analysis.py --factor_strategy ekfac --query_index 0
"""

from __future__ import annotations

import signal

# Ctrl-C while torch loads (a few seconds) ends the script quietly; run_cli handles it from then on.
signal.signal(signal.SIGINT, signal.SIG_DFL)

from pathlib import Path

import numpy as np

from example.errors import PipelineError
from example.figures import save_figure, subplots
from example.flags import add_figure_flag, add_results_flags
from example.lds import spearman
from example.results import read_pairwise_scores
from example.run import ArgumentParser, run_cli
from influence import STRATEGY_LABELS


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_results_flags(parser)
    parser.add_argument("--query_index", type=int, default=0, help="query whose scores are drawn")
    add_figure_flag(parser, "figure/half_precision.png", "where to draw the scatter plot (default %(default)s)")
    return parser.parse_args(argv)


def draw(full: np.ndarray, half: np.ndarray, correlation: float, query: int, path: Path, sizes: str) -> None:
    fig, ax = subplots(figsize=(4.6, 4.4))
    ax.scatter(full, half, s=4, alpha=0.5, edgecolors="none")
    low, high = min(full.min(), half.min()), max(full.max(), half.max())
    ax.plot([low, high], [low, high], color="gray", linewidth=0.8, linestyle="--", label="y = x")
    ax.ticklabel_format(style="sci", scilimits=(-3, 3))  # scores run to 1e4..1e6: no overlapping tick labels
    ax.set_xlabel("fp32 influence score")
    ax.set_ylabel("bf16 influence score")
    ax.set_title(f"{sizes}\nbf16 vs fp32 scores of query {query} (Spearman {correlation:.3f})", fontsize=9)
    ax.legend(loc="upper left")
    save_figure(fig, path)


def main() -> None:
    args = parse_args()
    (full, full_info), (half, half_info) = (
        read_pairwise_scores(args.output_dir, args.factor_strategy, h) for h in (False, True)
    )
    differs = [key for key in sorted(full_info.keys() | half_info.keys()) if full_info.get(key) != half_info.get(key)]
    if differs:
        raise PipelineError(
            f"the fp32 and bf16 scores differ in {', '.join(differs)} (their model, images or sizes): rerun analyze.py "
            "with and without --use_half_precision with the same flags"
        )
    full, half = full.numpy(), half.numpy()
    if not 0 <= args.query_index < full.shape[0]:
        raise PipelineError(f"--query_index must be below {full.shape[0]}")
    correlations = spearman(full, half, axis=1)  # per query
    print(f"Per-query Spearman correlation of bf16 with fp32 scores over {full.shape[0]} queries:")
    print(f"  mean {correlations.mean():.4f}   lowest {correlations.min():.4f}   highest {correlations.max():.4f}")
    query = args.query_index
    strategy = STRATEGY_LABELS[args.factor_strategy]
    sizes = f"ResNet-9, {strategy}, {full.shape[0]:,} queries x {full.shape[1]:,} training images"
    draw(full[query], half[query], correlations[query], query, Path(args.figure), sizes)
    print(f"Figure: {args.figure}")


if __name__ == "__main__":
    run_cli(main)
