"""A running count of the floating-point operations the engine's kernels perform.

Each kernel adds what its contraction order costs (2 FLOPs per multiply-add), from the shapes it
was given, so a benchmark can divide by time and compare with the device's matrix-multiply rate.
"""

_count = {"flops": 0}


def add(flops: int | float) -> None:
    _count["flops"] += int(flops)


def read() -> int:
    return _count["flops"]


def reset() -> None:
    _count["flops"] = 0
