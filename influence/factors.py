"""Fitting the curvature: covariances A and S, their eigendecomposition, and Lambda.

Accumulators keep sums (not means) and their counts, so partial results from several passes or
processes add up; `finish` divides once.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from scipy.linalg import blas

from influence import flops
from influence.capture import per_example_gradient
from influence.modules import Layer
from influence.precondition import rotated_gradient, squares, wide
from influence.shifted import ShiftedInput, add_shifted

# Seconds per row each CPU kernel took for a covariance update of one shape (rows, columns, dtype, threads). The
# lower triangle needs half the FLOPs of a general product, but which kernel gets there fastest depends on the
# machine and the shape: on a 2-core Xeon scipy's symmetric rank-k update ran 2 to 5 times slower than torch's
# general product for ResNet-9's gradient covariances (27 to 256 columns) and up to 1.9 times faster for its
# widest activation covariances (1,600 and 2,304 columns); block rows of general products (`blocked`, (k + 1) / 2k
# of the general product's FLOPs for k blocks) ran faster than either at 577 and 1,153 columns. So the first
# update of each shape splits its rows between the kernels, one share each (rows^T rows is the sum of the shares'
# products), and the later ones use the fastest per row: a pass of a few batches does not pay for whole updates
# run with the slower kernels.
KERNEL_SECONDS: dict[tuple[int, int, torch.dtype, int], dict[str, float]] = {}
BLOCK_COLUMNS = 256  # columns per block row of the `blocked` kernel
TRIAL_ROWS = 64  # the least rows per kernel for a trial worth timing; smaller updates use the general product


def cpu_kernels(dim: int) -> tuple[str, ...]:
    """The covariance kernels worth trying for `dim` columns (blocks only where there are two or more)."""
    return ("syrk", "general", "blocked") if dim > BLOCK_COLUMNS else ("syrk", "general")


def _syrk(total: torch.Tensor, rows: torch.Tensor) -> None:
    rows = rows.contiguous()
    update = blas.ssyrk if total.dtype == torch.float32 else blas.dsyrk
    # rows^T as a Fortran-ordered [dim, count] view, total^T as a Fortran-ordered target: no copies.
    target = total.numpy().T
    result = update(1.0, rows.numpy().T, beta=1.0, c=target, trans=0, lower=0, overwrite_c=1)
    if not np.shares_memory(result, target):
        target[...] = result


def _blocked(total: torch.Tensor, rows: torch.Tensor) -> None:
    dim = rows.shape[1]
    for first in range(0, dim, BLOCK_COLUMNS):
        last = min(first + BLOCK_COLUMNS, dim)
        total[first:last, :last].addmm_(rows[:, first:last].T, rows[:, :last])


def _general(total: torch.Tensor, rows: torch.Tensor) -> None:
    total.addmm_(rows.T, rows)


CPU_KERNELS = {"syrk": _syrk, "general": _general, "blocked": _blocked}


def syrk_update(total: torch.Tensor, rows: torch.Tensor) -> None:
    """total += rows^T rows, filling at least the lower triangle of `total` (symmetrise with `symmetrised`).

    On the CPU, the fastest for this shape of BLAS's symmetric update, a general product and block rows of
    general products (KERNEL_SECONDS). The FLOPs counted are the symmetric update's, the least the product needs,
    whichever kernel runs.
    """
    count, dim = rows.shape
    flops.add(flops.symmetric_update(count, dim), total.dtype, total.device)
    if total.device.type != "cpu" or total.dtype not in (torch.float32, torch.float64):
        total.addmm_(rows.T, rows)
        return
    key = (count, dim, total.dtype, torch.get_num_threads())
    kernels = cpu_kernels(dim)
    if key in KERNEL_SECONDS:
        seconds = KERNEL_SECONDS[key]
        CPU_KERNELS[min(seconds, key=seconds.__getitem__)](total, rows)
    elif count < TRIAL_ROWS * len(kernels):
        CPU_KERNELS["general"](total, rows)
    else:
        seconds = KERNEL_SECONDS[key] = {}
        for kernel, share in zip(kernels, torch.tensor_split(rows, len(kernels)), strict=True):
            start = time.perf_counter()
            CPU_KERNELS[kernel](total, share)
            seconds[kernel] = (time.perf_counter() - start) / share.shape[0]


def symmetrised(lower: torch.Tensor) -> torch.Tensor:
    return torch.tril(lower) + torch.tril(lower, -1).T


class Sums:
    """Running sums whose tensors add up across processes and across resumed runs (see distributed.Group)."""

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def start_at(self, examples: int) -> None:
        """A resumed pass: the sums of the first `examples` came from the partial result (nothing to do)."""

    def reset(self) -> None:
        for tensor in self.tensors().values():
            tensor.zero_()

    def finite(self) -> tuple[list[str], torch.Tensor] | None:
        """One flag per floating sum, on the device, that it holds no NaN or inf, named by its module (read by
        passes.Loop a batch later). The sums, not the batch's a and g: once non-finite a sum stays so, and one
        check per sum per batch costs a fraction of the products that fill it."""
        sums = {key: tensor for key, tensor in self.tensors().items() if tensor.is_floating_point()}
        if not sums:
            return None
        names = [f"module {key.split('/', 1)[-1]!r}" for key in sums]
        return names, torch.stack([torch.isfinite(tensor).all() for tensor in sums.values()])

    def flush(self, group, examples: int) -> None:  # noqa: ARG002 (same call as the score columns')
        """Sum every rank's share into rank 0's (see distributed.Group.sum_to_main)."""
        group.sum_to_main(list(self.tensors().values()))

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        """Start from sums saved by an interrupted run (a KeyError or shape mismatch means they do not fit)."""
        for key, tensor in self.tensors().items():
            if saved[key].shape != tensor.shape:
                raise KeyError(key)
            tensor.copy_(saved[key])


class CovarianceAccumulator(Sums):
    """Sums of a a^T and g g^T over every row (example x position) of every tracked layer."""

    def __init__(self, layers: list[Layer], dtype: torch.dtype, device: torch.device) -> None:
        self.activation = {
            layer.name: torch.zeros(layer.in_dim, layer.in_dim, dtype=dtype, device=device) for layer in layers
        }
        self.gradient = {
            layer.name: torch.zeros(layer.out_dim, layer.out_dim, dtype=dtype, device=device) for layer in layers
        }
        self.rows = {layer.name: torch.zeros((), dtype=torch.int64, device=device) for layer in layers}
        self.layers = {layer.name: layer for layer in layers}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            **{f"activation/{name}": total for name, total in self.activation.items()},
            **{f"gradient/{name}": total for name, total in self.gradient.items()},
            **{f"rows/{name}": count for name, count in self.rows.items()},
        }

    def update(self, layer: Layer, a: torch.Tensor | ShiftedInput, g: torch.Tensor) -> None:
        """Add a chunk's rows: a as patches [B, T, in'], or a convolution's input laid out by shifted.shifted_input."""
        if isinstance(a, ShiftedInput):
            add_shifted(self.activation[layer.name], layer, a)
        else:
            syrk_update(self.activation[layer.name], a.reshape(-1, a.shape[-1]))
        syrk_update(self.gradient[layer.name], g.reshape(-1, g.shape[-1]))
        self.rows[layer.name] += g.shape[0] * g.shape[1]

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, int]]:
        rows = {name: int(count.item()) for name, count in self.rows.items()}
        activation = {
            name: self.layers[name].to_weight_order(symmetrised(total), dims=(0, 1)) / rows[name]
            for name, total in self.activation.items()
        }
        gradient = {name: symmetrised(total) / rows[name] for name, total in self.gradient.items()}
        return activation, gradient, rows


def eigendecomposition(covariance: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues, eigenvectors) computed in float64, returned in `dtype`."""
    values, vectors = torch.linalg.eigh(covariance.to(torch.float64))
    return values.to(dtype), vectors.to(dtype)


class LambdaAccumulator(Sums):
    """Sum over examples of the squared per-example gradient, in the eigenbasis (ekfac) or as it is (diagonal)."""

    def __init__(
        self, layers: list[Layer], dtype: torch.dtype, device: torch.device, eigenvectors: dict | None
    ) -> None:
        """`eigenvectors`: {module: (Q_A, Q_S)} in the weight's column order, or None for the diagonal strategy."""
        self.layers = {layer.name: layer for layer in layers}
        self.eigenvectors = None
        if eigenvectors is not None:
            self.eigenvectors = {
                name: (self.layers[name].to_engine(q_a, dims=(0,)), q_s) for name, (q_a, q_s) in eigenvectors.items()
            }
        self.sums = {
            layer.name: torch.zeros(layer.out_dim, layer.in_dim, dtype=dtype, device=device) for layer in layers
        }
        self.examples = {layer.name: torch.zeros((), dtype=torch.int64, device=device) for layer in layers}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {
            **{f"lambda/{name}": total for name, total in self.sums.items()},
            **{f"examples/{name}": count for name, count in self.examples.items()},
        }

    def update(self, layer: Layer, a: torch.Tensor, g: torch.Tensor) -> None:
        if self.eigenvectors is None:
            gradient = per_example_gradient(a, g)
        else:
            gradient = rotated_gradient(a, g, *self.eigenvectors[layer.name])
        flops.add(2 * gradient.numel(), wide(gradient.dtype), gradient.device)
        self.sums[layer.name] += squares(gradient).sum(dim=0)
        self.examples[layer.name] += a.shape[0]

    def finish(self) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
        examples = {name: int(count.item()) for name, count in self.examples.items()}
        lambdas = {name: total / examples[name] for name, total in self.sums.items()}
        if self.eigenvectors is None:  # in the eigenbasis, columns are eigenvectors: no reordering
            lambdas = {name: self.layers[name].to_weight_order(lam) for name, lam in lambdas.items()}
        return lambdas, examples


def kfac_lambda(gradient_eigenvalues: torch.Tensor, activation_eigenvalues: torch.Tensor) -> torch.Tensor:
    """K-FAC's eigenvalues of S (x) A: Lambda[i, j] = l_S[i] * l_A[j]."""
    return torch.outer(gradient_eigenvalues, activation_eigenvalues)
