"""The influence results on disk as the scripts see them: their names, fingerprints of the data and weights they
were made from, the analyzer with the scripts' flags, and reading analyze.py's scores back."""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import torch
from tqdm import tqdm

from example.errors import PipelineError
from example.run import in_flags
from example.task import ClassificationTask
from influence import (
    PAIRWISE_SCORES,
    SCORE_ARGUMENTS,
    Analyzer,
    FactorArguments,
    Group,
    InfluenceError,
    ScoreArguments,
    Store,
    load_tensors,
    read_json,
)


def results_name(strategy: str, half: bool, prefix: str = "") -> str:
    """Factors and scores are named after the strategy, with _half for bf16 (scores_ekfac, scores_ekfac_half)."""
    return f"{prefix}{strategy}{'_half' if half else ''}"


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a checkpoint, so results made with other weights are never silently reused."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def made_from(checkpoint: str | Path, train, **more) -> dict:
    """What influence results are made from, recorded with them and checked when they are reused: the weights,
    the number of training examples, `more` (such as the labels' origin), and the images and labels used."""
    return {
        "checkpoint_sha256": file_fingerprint(checkpoint),
        "num_train": len(train),
        **more,
        "data_sha256": data_fingerprint(train.images, train.labels),
    }


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of the examples actually used (uint8 images, labels as given), with their dtypes and shapes, so that
    results made from other images or labels are never silently reused. Every byte is hashed, not a sample: an
    edited image or label anywhere changes it. 50,000 CIFAR-10 images (150 MB) take about 0.15 s."""
    digest = hashlib.sha256()
    for tensor in tensors:
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(f"{str(cpu.dtype).removeprefix('torch.')}{list(cpu.shape)};".encode())
        digest.update(cpu.reshape(-1).view(torch.uint8).numpy())  # the bytes as they are, without a copy
    return digest.hexdigest()


def check_shape(
    scores: torch.Tensor, expected: tuple[int, ...], folder: Path, fix: str = "rerun with --overwrite_output_dir"
) -> None:
    """Refuse scores whose shape is not that of the examples they are reported for (their files were replaced)."""
    if tuple(scores.shape) != expected:
        raise PipelineError(
            f"the scores in {folder} are {list(scores.shape)}, not {list(expected)} for these examples: {fix}"
        )


def make_analyzer(
    analysis_name: str, model: torch.nn.Module, args: argparse.Namespace, output_dir: str | Path | None = None
) -> Analyzer:
    """The engine on the scripts' task, with their flags (--profile, --save_interval; results under `output_dir`,
    default --output_dir), saying its lines in flags."""
    return Analyzer(
        analysis_name,
        model,
        ClassificationTask(),
        output_dir=args.output_dir if output_dir is None else output_dir,
        profile=args.profile,
        save_interval=args.save_interval,
        log=lambda message: tqdm.write(in_flags(message)),  # the engine names its arguments; users type flags
    )


def influence_arguments(args: argparse.Namespace, info: dict) -> tuple[FactorArguments, ScoreArguments]:
    factors = FactorArguments(
        strategy=args.factor_strategy,
        use_empirical_fisher=args.use_empirical_fisher,
        use_half_precision=args.use_half_precision,
        seed=args.fisher_seed,
        info=info,
    )
    scores = ScoreArguments(damping_factor=args.damping_factor, use_half_precision=args.use_half_precision, info=info)
    return factors, scores


def results_store(output_dir: str | Path, analysis_name: str) -> Store:
    """The results of an analysis for a script that reads them (one process)."""
    return Store(Path(output_dir) / analysis_name, Group(torch.device("cpu")), print)


def read_pairwise_scores(output_dir: str | Path, strategy: str, half: bool) -> tuple[torch.Tensor, dict]:
    """analyze.py's pairwise scores [queries, training examples] and the `info` they record (sizes, fingerprints),
    for the scripts that only read them; anything missing or malformed is one line saying which analyze.py
    command makes them again."""
    store = results_store(output_dir, "cifar10")
    name = results_name(strategy, half)
    path, arguments = store.scores(name, PAIRWISE_SCORES), store.scores(name, SCORE_ARGUMENTS)
    remake = f"python analyze.py --factor_strategy {strategy}{' --use_half_precision' if half else ''}"
    if not path.exists():
        raise PipelineError(f"no scores at {path}: run {remake} first")
    try:
        scores = load_tensors(path).get("all_modules")
        info = read_json(arguments).get("info") if arguments.exists() else None
    except (InfluenceError, AttributeError) as e:
        raise PipelineError(
            f"cannot read the scores in {store.scores(name)} ({e}): make them again: {remake} --overwrite_output_dir"
        ) from None
    sizes = [info.get(key) for key in ("num_queries", "num_train")] if isinstance(info, dict) else None
    if scores is None or sizes is None or not all(isinstance(size, int) for size in sizes):
        raise PipelineError(
            f"{store.scores(name)} does not hold analyze.py's scores (an [queries, training examples] "
            f"'all_modules' tensor and its {SCORE_ARGUMENTS} with 'info'): make them again: {remake} "
            "--overwrite_output_dir"
        )
    check_shape(scores, tuple(sizes), store.scores(name), f"make them again: {remake} --overwrite_output_dir")
    return scores, info
