"""Pairwise influence scores of CIFAR-10 test queries on the ResNet-9 training set.

Fits the curvature factors of --factor_strategy on the training images (no augmentation), then scores
every (query, training example) pair; results go to ./influence_results/cifar10/{factors,scores}_<strategy>.

Full job (GPU):
    python analyze.py --query_batch_size 1000 --dataset_dir ./data --checkpoint_dir ./checkpoints \
        --factor_strategy ekfac [--use_half_precision] --profile
CPU-sized:
    python analyze.py --dataset_dir ./data --checkpoint_dir ./checkpoints --factor_strategy ekfac \
        --num_train 5000 --num_queries 100 --query_batch_size 100 --train_batch_size 128 --profile
"""

from __future__ import annotations

import torch

from influence import Analyzer
from pipeline import (
    ArgumentParser,
    ClassificationTask,
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
)


def parse_args():
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset_dir", default="./data", help="folder holding cifar-10-batches-py/")
    parser.add_argument("--checkpoint_dir", default="./checkpoints", help="folder holding model.safetensors")
    parser.add_argument(
        "--query_batch_size",
        type=int,
        default=1000,
        help="queries preconditioned and held at once; each needs one pass over the training set",
    )
    parser.add_argument("--num_queries", type=int, default=2000, help="score the first Q test images (default 2000)")
    add_influence_flags(parser)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    keep_freed_memory()
    torch.manual_seed(args.seed)
    device = get_device()
    checkpoint = checkpoint_path(args.checkpoint_dir)
    model = load_model(checkpoint, device)
    train = get_cifar10(args.dataset_dir, "eval_train", num_train=args.num_train, device=device)
    queries = get_cifar10(args.dataset_dir, "valid", device=device).subset(args.num_queries)

    data_info = {"checkpoint_sha256": file_fingerprint(checkpoint), "num_train": len(train)}
    factor_args, score_args = influence_arguments(args, data_info)
    score_args.info = {**data_info, "num_queries": len(queries)}
    name = results_name(args.factor_strategy, args.use_half_precision)

    analyzer = Analyzer("cifar10", model, ClassificationTask(), output_dir=args.output_dir, profile=args.profile)
    train_batches = TensorBatches(train, args.train_batch_size)
    analyzer.fit_all_factors(name, train_batches, factor_args, overwrite_output_dir=args.overwrite_output_dir)
    scores = analyzer.compute_pairwise_scores(
        name,
        name,
        TensorBatches(queries, args.query_batch_size),
        train_batches,
        score_args,
        overwrite_output_dir=args.overwrite_output_dir,
    )["all_modules"]
    print(f"Scores shape: {tuple(scores.shape)}  ({analyzer.scores_folder(name)})")
    if args.profile:
        print(analyzer.profiler.table())


if __name__ == "__main__":
    run_cli(main)
