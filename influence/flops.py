"""A running count of the floating-point operations the engine's kernels perform, per dtype.

Each kernel adds what its contraction order costs (2 FLOPs per multiply-add), from the shapes it
was given and the dtype it ran in, so a benchmark can compare the time with the device's
matrix-multiply rate in each dtype.
"""

from __future__ import annotations

import torch

_count: dict[torch.dtype, int] = {}


def add(flops: float, dtype: torch.dtype) -> None:
    _count[dtype] = _count.get(dtype, 0) + int(flops)


def read() -> dict[torch.dtype, int]:
    return dict(_count)


def since(before: dict[torch.dtype, int]) -> dict[torch.dtype, int]:
    """The counts added after `before = read()`, per dtype."""
    return {dtype: count - before.get(dtype, 0) for dtype, count in _count.items() if count != before.get(dtype, 0)}
