"""Where a pass's time goes: seconds and counted FLOPs per stage, each stage's own (the stages inside it excluded).

The stages a pass runs through, per batch:

    model     the model's forward and backward passes (autograd, batch norms, activations, the loss), whose
              products flops counts in the forward hooks
    patches   gathering each layer's inputs into patches and its output gradients into rows, in the pass's dtype
    kernels   the engine's own work on them (covariance updates, per-example gradients, rotations, scores)

What a pass spends outside them (moving batches, reductions, saves) is the rest of its time. Off until
`enable(device)`: a disabled stage costs one check. Enabled on a GPU, every stage boundary waits for the device,
which slows the passes it measures; on the CPU it costs two clock reads per stage.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from influence import flops

MODEL, PATCHES, KERNELS = "model", "patches", "kernels"
STAGES = (MODEL, PATCHES, KERNELS)

_device: torch.device | None = None
_seconds: dict[str, float] = {}
_flops: dict[str, dict[flops.Precision, int]] = {}
_open: list[tuple[float, dict[flops.Precision, int]]] = []  # per open stage: its children's seconds and FLOPs


def enable(device: torch.device | None) -> None:
    """Time the stages from now on (None: stop timing them)."""
    global _device
    _device = None if device is None else torch.device(device)


def _wait() -> None:
    if _device is not None and _device.type == "cuda":
        torch.cuda.synchronize(_device)


@contextmanager
def stage(name: str) -> Iterator[None]:
    if _device is None:
        yield
        return
    _wait()
    start, counted = time.perf_counter(), flops.read()
    _open.append((0.0, {}))
    try:
        yield
    finally:
        _wait()
        elapsed, spent = time.perf_counter() - start, flops.since(counted)
        children_seconds, children_flops = _open.pop()
        _seconds[name] = _seconds.get(name, 0.0) + elapsed - children_seconds
        own = _flops.setdefault(name, {})
        for key, count in spent.items():
            own[key] = own.get(key, 0) + count - children_flops.get(key, 0)
        if _open:
            parent_seconds, parent_flops = _open[-1]
            for key, count in spent.items():
                parent_flops[key] = parent_flops.get(key, 0) + count
            _open[-1] = (parent_seconds + elapsed, parent_flops)


def read() -> dict[str, tuple[float, dict[flops.Precision, int]]]:
    """Each stage's own seconds and FLOPs so far."""
    return {name: (seconds, dict(_flops.get(name, {}))) for name, seconds in _seconds.items()}


def since(
    before: dict[str, tuple[float, dict[flops.Precision, int]]],
) -> dict[str, tuple[float, dict[flops.Precision, int]]]:
    """Each stage's own seconds and FLOPs added after `before = read()`."""
    added = {}
    for name, (seconds, counts) in read().items():
        seconds_before, counts_before = before.get(name, (0.0, {}))
        extra = {key: count - counts_before.get(key, 0) for key, count in counts.items()}
        if seconds != seconds_before or any(extra.values()):
            added[name] = (seconds - seconds_before, {key: count for key, count in extra.items() if count})
    return added
