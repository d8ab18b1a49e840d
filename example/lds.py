"""The linear datamodeling score (LDS, Park et al. 2023, "TRAK"): the math, apart from any training.

Not run directly; evaluate_lds.py uses it, and so can anyone holding scores and the retrainings' files:

    from example.lds import draw_masks, lds_per_query, paired_difference, predicted_margins, summarize
    masks = draw_masks(num_subsets=100, num_train=50_000, alpha=0.5, seed=0)   # bool [M, N]
    per_query = lds_per_query(predicted_margins(scores, masks), margins)       # scores [Q, N], margins [M, K, Q]
    summarize(per_query)                                                       # mean, 95% bootstrap interval
    paired_difference(per_query, other_per_query)                              # one strategy against another

LDS(q) is the Spearman correlation, over the M subsets, between the predicted effect of subset j on query q,
sum over i in subset j of score[q, i], and the measured margin of q (mean over the K seeds). A query whose
predictions or margins are constant over the subsets has no correlation: it is NaN here, left out of the mean,
and counted.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from example.ranking import average_ranks


def subset_size(num_train: int, alpha: float) -> int:
    """round(alpha * N) examples in every subset."""
    return int(round(alpha * num_train))


def draw_masks(num_subsets: int, num_train: int, alpha: float, seed: int) -> torch.Tensor:
    """Bool [M, N]: row j holds exactly round(alpha * N) examples, drawn without replacement from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    size = subset_size(num_train, alpha)
    masks = torch.zeros(num_subsets, num_train, dtype=torch.bool)
    for row in masks:
        row[torch.randperm(num_train, generator=generator)[:size]] = True
    return masks


def predicted_margins(scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[M, Q] float64: p[j, q] = sum over i in subset j of scores[q, i] (positive scores help the margin)."""
    return masks.double() @ scores.double().T


def spearman(x: np.ndarray, y: np.ndarray, axis: int = 0) -> np.ndarray:
    """Spearman correlation of every column of x [M, Q] with the same column of y (with axis=1: of every row),
    average ranks for ties; NaN where either is constant."""
    rx, ry = average_ranks(x, axis=axis), average_ranks(y, axis=axis)
    rx, ry = rx - rx.mean(axis=axis, keepdims=True), ry - ry.mean(axis=axis, keepdims=True)
    norm = np.sqrt((rx**2).sum(axis=axis) * (ry**2).sum(axis=axis))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 0, (rx * ry).sum(axis=axis) / np.where(norm > 0, norm, 1.0), np.nan)


def lds_per_query(predicted: torch.Tensor, margins: torch.Tensor) -> np.ndarray:
    """LDS of each query [Q]: Spearman over subsets of predicted [M, Q] against margins [M, K, Q] (mean over K)."""
    if predicted.shape[0] != margins.shape[0] or predicted.shape[1] != margins.shape[2]:
        raise ValueError(f"predictions {tuple(predicted.shape)} do not fit margins {tuple(margins.shape)}")
    measured = margins.double().mean(dim=1)
    return spearman(predicted.double().numpy(), measured.numpy())


def seed_agreement(margins: torch.Tensor) -> np.ndarray:
    """Per query [Q], with K >= 2 seeds: Spearman over subsets between two seeds' margins, averaged over the
    pairs of seeds: r, the share of one retraining's margin that follows the subset at all. With independent seed
    noise no attribution correlates better than about sqrt(r) with one seed's margin (more with a mean of seeds)."""
    k = margins.shape[1]
    if k < 2:
        raise ValueError("seed agreement needs at least 2 seeds per subset")
    values = margins.double().numpy()
    pairs = [spearman(values[:, a], values[:, b]) for a in range(k) for b in range(a + 1, k)]
    return np.mean(pairs, axis=0)


def random_scores(num_queries: int, num_train: int, seed: int) -> torch.Tensor:
    """Gaussian scores [Q, N] that know nothing of the model: their LDS is about 0."""
    return torch.randn(num_queries, num_train, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def bootstrap_interval(values: np.ndarray, level: float = 0.95, samples: int = 2000, seed: int = 0) -> tuple:
    """Percentile bootstrap interval of the mean of the finite values, resampling queries."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if len(values) == 0:
        return (math.nan, math.nan)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    tail = (1 - level) / 2
    return (float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail)))


def paired_difference(per_query: np.ndarray, reference: np.ndarray, seed: int = 0) -> dict:
    """Mean over queries of per_query - reference, on the queries where both are finite, with its 95% bootstrap
    interval. Both are measured on the same queries and retrainings, so the query-to-query spread they share
    cancels: the difference of two strategies is known better than either LDS alone."""
    difference = np.asarray(per_query, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    summary = summarize(difference, seed=seed)
    return {name: summary[name] for name in ("mean", "interval_95", "queries_used")}


def summarize(per_query: np.ndarray, seed: int = 0) -> dict:
    """Mean over the queries with a correlation, its 95% bootstrap interval, and how many were left out."""
    per_query = np.asarray(per_query, dtype=np.float64)
    finite = np.isfinite(per_query)
    mean = float(per_query[finite].mean()) if finite.any() else math.nan
    low, high = bootstrap_interval(per_query, seed=seed)
    return {
        "mean": mean,
        "interval_95": [low, high],
        "queries_used": int(finite.sum()),
        "queries_left_out": int((~finite).sum()),
        "per_query": [float(v) if np.isfinite(v) else None for v in per_query],
    }
