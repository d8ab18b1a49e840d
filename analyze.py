"""Pairwise influence scores of CIFAR-10 test queries on the ResNet-9 training set.

Fits the curvature factors of --factor_strategy on the training images (no augmentation), then scores
every (query, training example) pair; results go to ./influence_results/cifar10/{factors,scores}_<strategy>.

Full job (GPU), in fp32 then in bf16 (saved as scores_ekfac_half):
    python analyze.py --query_batch_size 1000 --dataset_dir ./data --checkpoint_dir ./checkpoints \
        --factor_strategy ekfac --profile
    python analyze.py --query_batch_size 1000 --dataset_dir ./data --checkpoint_dir ./checkpoints \
        --factor_strategy ekfac --use_half_precision --profile
CPU-sized, after the CPU-sized train.py (see train.py):
    python analyze.py --dataset_dir ./data --checkpoint_dir ./checkpoints/cpu --output_dir ./influence_results/cpu \
        --factor_strategy ekfac --num_train 2000 --num_queries 100 --query_batch_size 100 --profile
Several processes (GPUs, or CPU processes), same results:
    torchrun --nproc_per_node=2 analyze.py --dataset_dir ./data --checkpoint_dir ./checkpoints/cpu \
        --output_dir ./influence_results/cpu --num_train 2000
A killed run resumes where it stopped when started again with the same arguments.
"""

from __future__ import annotations

import signal

# Ctrl-C while torch loads (a few seconds) ends the script quietly; run_cli handles it from then on.
signal.signal(signal.SIGINT, signal.SIG_DFL)

from example.checkpoints import checkpoint_path, load_model, train_command
from example.flags import (
    add_checkpoint_flags,
    add_data_flags,
    add_influence_flags,
    add_num_queries_flag,
    add_query_batch_flag,
)
from example.results import (
    check_shape,
    data_fingerprint,
    influence_arguments,
    made_from,
    make_analyzer,
    results_name,
)
from example.run import ArgumentParser, is_main, run_cli, start_influence_run
from pipeline import TensorBatches, get_cifar10


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_flags(parser, num_train=True)
    add_checkpoint_flags(parser)
    add_query_batch_flag(parser)
    add_num_queries_flag(parser)
    add_influence_flags(parser)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    device = start_influence_run(args)
    checkpoint = checkpoint_path(args.checkpoint_dir)
    model = load_model(checkpoint, device, train_command(args))
    train = get_cifar10(args.dataset_dir, "eval_train", num_train=args.num_train, device=device)
    queries = get_cifar10(args.dataset_dir, "valid", device=device).subset(args.num_queries, "--num_queries")

    data_info = made_from(checkpoint, train)
    factor_args, score_args = influence_arguments(args, data_info)
    queries_sha256 = data_fingerprint(queries.images, queries.labels)
    score_args.info = {**data_info, "num_queries": len(queries), "queries_sha256": queries_sha256}
    name = results_name(args.factor_strategy, args.use_half_precision)

    analyzer = make_analyzer("cifar10", model, args)
    train_batches = TensorBatches(train, args.influence_batch_size)
    analyzer.fit_all_factors(name, train_batches, factor_args, overwrite_output_dir=args.overwrite_output_dir)
    scores = analyzer.compute_pairwise_scores(
        name,
        name,
        TensorBatches(queries, args.query_batch_size),
        train_batches,
        score_args,
        overwrite_output_dir=args.overwrite_output_dir,
        query_slice_size=train_batches.batch_size,  # the forward batch the passes take: 1,000 queries fit in memory
    )["all_modules"]
    check_shape(scores, (len(queries), len(train)), analyzer.scores_folder(name))
    if is_main():
        print(f"Scores shape: {tuple(scores.shape)}  ({analyzer.scores_folder(name)})")
        if args.profile:
            print(analyzer.profiler.table())


if __name__ == "__main__":
    run_cli(main)
