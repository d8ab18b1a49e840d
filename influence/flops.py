"""A running count of the floating-point operations the engine's kernels perform, per precision.

Each kernel adds what its contraction order costs (2 FLOPs per multiply-add), from the shapes it
was given and the precision it ran in, so a benchmark can compare the time with the device's
matrix-multiply rate in each precision.

The precision is the tensors' dtype, except for fp32 products on a GPU that torch lets run on TF32 tensor
cores (`TF32`): by torch's default, which this project keeps (it is what the original example ran with),
convolutions do (cuDNN) and matrix products do not. So in an "fp32" run on a GPU the model's convolutions,
forward and backward, run in TF32, and the engine's own products (per-example gradients, rotations, covariances,
scores) in fp32. `torch.backends.cudnn.allow_tf32` and `torch.backends.cuda.matmul.allow_tf32` change this, and
the counts follow them.
"""

from __future__ import annotations

import torch

TF32 = "tf32"
Precision = torch.dtype | str

_count: dict[Precision, int] = {}


def precision(dtype: torch.dtype, device: torch.device | str | None, convolution: bool = False) -> Precision:
    """What a product of `dtype` tensors on `device` runs in: `dtype`, or TF32 for fp32 on a GPU where allowed."""
    if dtype == torch.float32 and device is not None and torch.device(device).type == "cuda":
        allowed = torch.backends.cudnn.allow_tf32 if convolution else torch.backends.cuda.matmul.allow_tf32
        if allowed:
            return TF32
    return dtype


def name(key: Precision) -> str:
    return key if isinstance(key, str) else str(key).removeprefix("torch.")


def add(flops: float, dtype: torch.dtype, device: torch.device | str | None = None, convolution: bool = False) -> None:
    """Count `flops` of a product of `dtype` tensors on `device` (a cuDNN convolution when `convolution`)."""
    key = precision(dtype, device, convolution)
    _count[key] = _count.get(key, 0) + int(flops)


def symmetric_update(rows: int, columns: int) -> int:
    """FLOPs of rows^T rows for a [rows, columns] matrix, lower triangle and diagonal only: the least it needs."""
    return rows * columns * (columns + 1)


def read() -> dict[Precision, int]:
    return dict(_count)


def since(before: dict[Precision, int]) -> dict[Precision, int]:
    """The counts added after `before = read()`, per precision."""
    return {key: count - before.get(key, 0) for key, count in _count.items() if count != before.get(key, 0)}
