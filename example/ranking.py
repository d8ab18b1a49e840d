"""Average ranks (ties share the mean of the ranks they span, as scipy.stats.rankdata's default), in numpy.

Not run directly; the ROC AUC of detect_mislabeled_dataset.py and the Spearman correlations of example/lds.py rank
with it:

    average_ranks(np.array([3.0, 1.0, 3.0]))      # -> [2.5, 1.0, 2.5]

Not scipy.stats.rankdata because importing scipy.stats takes 1-2 s of every start of a script on a 2-core CPU.
"""

from __future__ import annotations

import numpy as np

__all__ = ["average_ranks"]


def average_ranks(values: np.ndarray, axis: int = -1) -> np.ndarray:
    """float64 ranks from 1 of finite `values` along `axis`, each tie given the mean of the ranks it spans."""
    values = np.asarray(values)
    if values.ndim == 0 or not np.isfinite(values).all():
        raise ValueError("ranks need an array of finite values")
    moved = np.moveaxis(values, axis, -1)
    rows = moved.reshape(int(np.prod(moved.shape[:-1])), moved.shape[-1])
    count = rows.shape[1]
    ranks = np.empty(rows.shape, dtype=np.float64)
    if rows.size:
        order = np.argsort(rows, axis=1, kind="stable")
        ordered = np.take_along_axis(rows, order, axis=1)
        starts = np.ones(rows.shape, dtype=bool)  # where a run of equal values begins (every row's first too)
        starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
        group = np.cumsum(starts.ravel()) - 1  # the run of each sorted position, numbered over all rows
        sizes = np.bincount(group)
        first = np.flatnonzero(starts.ravel()) % count  # each run's first position in its row
        mean_rank = (first + 1 + (sizes - 1) / 2)[group].reshape(rows.shape)
        np.put_along_axis(ranks, order, mean_rank, axis=1)
    return np.moveaxis(ranks.reshape(moved.shape), -1, axis)
