"""Hooks that hand each tracked layer's (a, g) to a callback during backward, and per-example gradients.

The callback runs as soon as a layer's output gradient is known, so a step (covariance, Lambda,
scores) consumes the layer and frees it before the next one arrives: only one layer's a and g are
expanded at a time. Parameters are frozen while capturing, so autograd computes only the gradients
with respect to activations (no dW), which is all the engine needs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, NoReturn

import torch
from torch import nn

from influence import flops, stages
from influence.errors import InfluenceError
from influence.modules import Layer, input_patches, output_gradients
from influence.products import bf16_autocast, matmul

Process = Callable[[Layer, Any, torch.Tensor], None]
Inputs = Callable[[Layer, torch.Tensor], Any]


def map_tensors(
    batch: Any, fn: Callable[[torch.Tensor], torch.Tensor], other: Callable[[Any], Any] = lambda x: x
) -> Any:
    """The (nested) batch with fn applied to each of its tensors and `other` to any other item (kept as it is by
    default), dicts, lists, tuples and named tuples kept."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {key: map_tensors(value, fn, other) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        mapped = [map_tensors(value, fn, other) for value in batch]
        return type(batch)(*mapped) if hasattr(batch, "_fields") else type(batch)(mapped)
    return other(batch)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor of a (nested) batch to `device`; a no-op for data already there."""
    # Asynchronous only towards a GPU: a copy to the host must be finished before the host reads it.
    return map_tensors(batch, lambda tensor: tensor.to(device, non_blocking=device.type == "cuda"))


def batch_length(batch: Any) -> int:
    """Examples in a batch: the leading dimension of its first tensor (nested in dicts, lists, tuples)."""
    found = _leading_dimension(batch)
    if found is None:
        raise InfluenceError(f"cannot tell how many examples a batch holds: it has no tensor ({type(batch).__name__})")
    return found


def _leading_dimension(item: Any) -> int | None:
    if isinstance(item, torch.Tensor):
        return item.shape[0] if item.dim() else 1
    items = item.values() if isinstance(item, dict) else item if isinstance(item, (list, tuple)) else ()
    for inner in items:
        found = _leading_dimension(inner)
        if found is not None:
            return found
    return None


def batch_slice(batch: Any, start: int, end: int, examples: int) -> Any:
    """Examples start:end of a batch of `examples` whose every item is a tensor with one row per example (nested
    in dicts, lists, tuples); any other item (a list of names, a tensor shared by the batch) could not be cut
    without a guess, so it is refused in one line."""

    def refuse(item: Any) -> NoReturn:
        shape = tuple(item.shape) if isinstance(item, torch.Tensor) else type(item).__name__
        raise InfluenceError(
            f"query_slice_size cuts query batches whose every item is a tensor with one row per query; this "
            f"batch of {examples} holds a {shape}: pass query_slice_size=None to run each query batch whole"
        )

    def cut(tensor: torch.Tensor) -> torch.Tensor:
        return tensor[start:end] if tensor.dim() and len(tensor) == examples else refuse(tensor)

    return map_tensors(batch, cut, refuse)


def per_example_gradient(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """G[n] = sum_t g[n, t] a[n, t]^T as [B, out, in']."""
    batch, positions, in_dim = a.shape
    flops.add(2 * batch * positions * in_dim * g.shape[2], a.dtype, a.device)
    return matmul(g.transpose(1, 2), a)


def chunk_size(layer: Layer, positions: int, max_elements: int | None, examples: int, gradients: bool = True) -> int:
    """Examples per chunk of `examples` so that a layer's largest per-chunk tensor (a, g, and G when the step
    forms per-example `gradients`) stays under max_elements, in chunks of equal size: a small last chunk would
    be a slower product of its own shape."""
    if max_elements is None:
        return max(examples, 1)
    per_example = max(positions * layer.in_dim, positions * layer.out_dim)
    if gradients:
        per_example = max(per_example, layer.out_dim * layer.in_dim)
    largest = max(1, max_elements // per_example)
    chunks = -(-examples // largest)
    return max(1, -(-examples // max(chunks, 1)))


class Capture:
    """Context manager: while open, each backward through `model` calls `process(layer, a, g)` per tracked layer.

    Every tracked layer's input must lead with the current batch's `examples` (new_batch) rows: a layer
    that sees the batch's rows otherwise (a model that reshapes [B, T, D] to [B * T, D] before it) would mix
    examples, so it is refused; `keep` (set by the caller) trims a and g to the first `keep` examples.
    With `max_elements`, a layer's examples are handed over in consecutive chunks whose a, g and per-example
    gradients hold at most that many elements each: the batch stays large for the forward and backward passes,
    while the expanded per-layer tensors stay small enough to be reused from cache instead of freshly faulted in.
    `gradients=False` says that `process` forms no per-example gradient (the covariance pass), so only a and g
    bound the chunks, and its products stay as large as the memory bound allows. `inputs` makes what `process`
    gets of a layer's input, the patches a by default (the covariance pass: shifted.covariance_input).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: list[Layer],
        process: Process,
        dtype: torch.dtype,
        max_elements: int | None = None,
        gradients: bool = True,
        inputs: Inputs = input_patches,
    ) -> None:
        self.model, self.layers, self.process, self.dtype = model, layers, process, dtype
        self.max_elements, self.gradients, self.inputs = max_elements, gradients, inputs
        self.examples: int | None = None
        self.keep: int | None = None
        self._handles: list[Any] = []
        self._called: set[str] = set()
        self._requires_grad: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> Capture:
        self._requires_grad = [(p, p.requires_grad) for p in self.model.parameters()]
        for param, _ in self._requires_grad:
            param.requires_grad_(False)
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_pre_hook(self._pre_hook))
            self._handles.append(layer.module.register_forward_hook(self._make_forward_hook(layer)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, flag in self._requires_grad:
            param.requires_grad_(flag)

    def new_batch(self, examples: int) -> None:
        self.keep, self.examples = None, examples
        self._called.clear()

    @property
    def ran(self) -> bool:
        """Whether a tracked module ran in the current batch's forward pass."""
        return bool(self._called)

    @staticmethod
    def _pre_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        # Parameters are frozen, so the first tracked layer's input must require grad for its output to get one.
        x = args[0]
        if torch.is_grad_enabled() and isinstance(x, torch.Tensor) and not x.requires_grad:
            return (x.detach().requires_grad_(True), *args[1:])
        return None

    def _make_forward_hook(self, layer: Layer) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not torch.is_grad_enabled():
                return
            if layer.name in self._called:
                raise InfluenceError(
                    f"module {layer.name!r} ran twice in one forward pass (shared weights), which the engine does "
                    "not support: leave it out of tracked_modules()"
                )
            self._called.add(layer.name)
            x = args[0].detach()  # shares the input's version counter, which on_grad checks
            if self.examples is not None and (x.dim() == 0 or x.shape[0] != self.examples):
                rows = x.shape[0] if x.dim() else "no"
                raise InfluenceError(
                    f"module {layer.name!r} got an input with {rows} rows for a batch of {self.examples} examples "
                    "(the leading dimension of the batch's first tensor): the engine needs each tracked module's "
                    "input to lead with the batch, one row per example; leave a module that sees the batch reshaped "
                    "out of tracked_modules(), or put a tensor with one row per example first in the batch"
                )
            version = x._version
            # The forward and input-gradient products; a convolution's run in cuDNN, in TF32 on a GPU by default.
            convolution = isinstance(layer.module, nn.Conv2d)
            flops.add(4 * output.numel() * layer.module.weight[0].numel(), output.dtype, output.device, convolution)

            # Rows per example: output positions of a conv, every leading position of a linear layer's input.
            positions = (
                output[0, 0].numel() if isinstance(layer.module, nn.Conv2d) else output[0].numel() // output.shape[-1]
            )

            def on_grad(grad: torch.Tensor) -> None:
                # With the parameters frozen, autograd keeps no copy of x and cannot tell that it changed.
                if x._version != version:
                    raise InfluenceError(
                        f"the input of module {layer.name!r} was changed in place after the module ran (an in-place "
                        "operation such as relu_ or += on it): the engine reads that input in the backward pass, "
                        "so compute out of place there"
                    )
                keep = self.keep if self.keep is not None else x.shape[0]
                step = chunk_size(layer, positions, self.max_elements, keep, self.gradients)
                for start in range(0, keep, step):
                    end = min(start + step, keep)
                    # Converted before the patches are gathered: they repeat each input value up to kh * kw
                    # times, so the conversion copies the input once, and in bf16 the gathering copies half the bytes.
                    with stages.stage(stages.PATCHES):
                        a = self.inputs(layer, x[start:end].to(self.dtype))
                        g = output_gradients(layer, grad[start:end].to(self.dtype))
                    with stages.stage(stages.KERNELS):
                        self.process(layer, a, g)

            output.register_hook(on_grad)

        return hook


def backward_batch(
    capture: Capture,
    model: nn.Module,
    batch: Any,
    loss_fn: Callable[[Any, nn.Module], torch.Tensor],
    half: bool,
    what: str,
    limit: int | None = None,
) -> int:
    """Forward and backward one batch through `capture`; returns how many of its examples were processed.

    `limit` caps the examples taken from this batch (for a cap on the total).
    """
    examples = batch_length(batch)
    capture.new_batch(examples)
    device_type = next(model.parameters()).device.type
    autocast = bf16_autocast(device_type) if half else nullcontext()
    with stages.stage(stages.MODEL), autocast:
        loss = loss_fn(batch, model)
    if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise InfluenceError(f"{what} must return a scalar tensor (summed over the batch), got {shape}")
    if not loss.requires_grad:  # no tracked module ran with gradients on, or the loss does not use their outputs
        raise InfluenceError(
            f"{what} does not depend on the tracked modules' outputs: does it call the model on the batch, "
            "outside torch.no_grad()?"
        )
    if not capture.ran:
        raise InfluenceError(f"{what} ran no tracked module: does it call the model on the batch?")
    capture.keep = examples if limit is None else min(limit, examples)
    with stages.stage(stages.MODEL):  # the hooks' patches and kernels inside it are timed as their own stages
        loss.backward()
    return capture.keep
