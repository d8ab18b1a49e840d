"""(F + d I)^-1 for one layer, and the contractions it needs: rotations into an eigenbasis, squared norms.

Each strategy (influence.strategies) builds a layer's LayerPreconditioner from its factors and applies it with
these kernels: in an eigenbasis, F = (Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T, so
P(G) = Q_S [(Q_S^T G Q_A) / (Lambda + d)] Q_A^T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from influence import flops
from influence.capture import per_example_gradient
from influence.products import matmul

if TYPE_CHECKING:
    from influence.strategies import Strategy


def rotated_gradient(a: torch.Tensor, g: torch.Tensor, q_a: torch.Tensor, q_s: torch.Tensor) -> torch.Tensor:
    """Q_S^T G[n] Q_A for every example, as [B, out, in'], in the fewest multiply-adds.

    G[n] = g^T a costs B*T*out*in' however it is rotated, and each side's rotation is chosen on its own: Q_A
    rotates the T rows of a (B*T*in'^2) or the out rows of G (B*out*in'^2), Q_S the T rows of g (B*T*out^2)
    or the in' columns of G (B*in'*out^2), whichever has fewer rows. So a side is rotated before G is formed
    where positions are few (linear layers, late convolutions) and after where they are many; on ResNet-9's
    middle convolutions (T = 256 positions, 128 to 256 channels) Q_S rotates g's rows and Q_A rotates G.
    """
    batch, positions, in_dim = a.shape
    out_dim = g.shape[2]
    q_a, q_s = q_a.to(a.dtype), q_s.to(a.dtype)  # bf16 passes rotate in bf16
    a_rows_first, g_rows_first = positions < out_dim, positions < in_dim
    flops.add(
        2 * batch * (in_dim**2 * min(positions, out_dim) + out_dim**2 * min(positions, in_dim)), a.dtype, a.device
    )
    if a_rows_first:
        a = matmul(a.reshape(-1, in_dim), q_a).view(batch, positions, in_dim)
    if g_rows_first:
        g = matmul(g.reshape(-1, out_dim), q_s).view(batch, positions, out_dim)
    gradient = per_example_gradient(a, g)
    if not a_rows_first:
        gradient = matmul(gradient, q_a)
    if not g_rows_first:
        gradient = matmul(q_s.T, gradient)
    return gradient


def heuristic_damping(lambda_matrix: torch.Tensor) -> float:
    return 0.1 * lambda_matrix.mean().item()


@dataclass
class LayerPreconditioner:
    """(F + d I)^-1 of one layer: the tensors its strategy prepared from the layer's factors (see
    influence.strategies), applied by that strategy. `inverse` holds 1 / (Lambda + d) (None for identity); `q_a`
    and `q_s` the eigenbases of A (in the engine's column order) and S, for the strategies that have them."""

    strategy: Strategy
    inverse: torch.Tensor | None = None
    q_a: torch.Tensor | None = None
    q_s: torch.Tensor | None = None

    def precondition(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """P(G[n]) as [B, out, in'] for the examples whose patches and output gradients are a and g."""
        return self.strategy.precondition(self, a, g)

    def self_score(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """<P(G[n]), G[n]> for every example."""
        return self.strategy.self_score(self, a, g)


def squared_gradient_norm(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||G[n]||_F^2, via position Gram matrices (sum_tt' (g_t.g_t')(a_t.a_t')) when that is cheaper than forming G."""
    batch, positions, in_dim = a.shape
    out_dim = g.shape[2]
    if positions * (in_dim + out_dim) < out_dim * in_dim:
        flops.add(2 * batch * positions * positions * (in_dim + out_dim), a.dtype, a.device)
        return (widened(matmul(g, g.transpose(1, 2))) * widened(matmul(a, a.transpose(1, 2)))).sum(dim=(1, 2))
    gradient = per_example_gradient(a, g)
    flops.add(2 * gradient.numel(), wide(gradient.dtype), gradient.device)
    return squares(gradient).sum(dim=(1, 2))


def wide(dtype: torch.dtype) -> torch.dtype:
    """The precision squares and sums of `dtype` values are taken in: fp32 for bf16 and fp16, else `dtype`."""
    return torch.promote_types(dtype, torch.float32)


def widened(tensor: torch.Tensor) -> torch.Tensor:
    """bf16 products are squared and summed in fp32: the sums are of positive terms, the rounding stays relative."""
    return tensor.to(wide(tensor.dtype))


def squares(temporary: torch.Tensor) -> torch.Tensor:
    """The elementwise squares of a tensor the caller no longer needs, widened (bf16 squared in fp32): squared in
    place when it is already wide, so that no second tensor of its size is written and read."""
    return widened(temporary).square_()


def weighted_square_sums(temporary: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_ij T[n, i, j]^2 W[i, j] for every n, T consumed (see squares): one matrix-vector product over the
    squares, which reads them once, where multiplying by W and then summing writes a third tensor and reads two."""
    return squares(temporary).flatten(1) @ weights.flatten().to(wide(weights.dtype))
