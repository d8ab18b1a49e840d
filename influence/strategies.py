"""The curvature strategies, one object each: which factors it fits, and how it preconditions a layer's gradients.

    strategy   fits                                              P(G) = (F + d I)^-1 G
    identity   nothing                                           G
    diagonal   Lambda = E[G * G] (second moments, elementwise)   G / (Lambda + d)
    kfac       A, S and their eigenbases; Lambda = l_S l_A^T      Q_S [(Q_S^T G Q_A) / (Lambda + d)] Q_A^T
    ekfac      A, S and their eigenbases; Lambda fitted in them   the same, Lambda = E[(Q_S^T G Q_A)^2]

The analyzer asks a strategy what to fit (`eigenbasis`: the covariance pass and the eigendecomposition;
`fits_lambda`: the pass that fits Lambda, in the eigenbasis when there is one) and which files it leaves
(`factor_kinds`); the scores ask it for each layer's preconditioner. `name` is what FactorArguments.strategy
holds and what is saved with the factors; `label` is how figures and tables write it.
"""

from __future__ import annotations

import torch

from influence import flops
from influence.capture import per_example_gradient
from influence.errors import InfluenceError
from influence.modules import Layer
from influence.precondition import (
    LayerPreconditioner,
    heuristic_damping,
    rotated_gradient,
    squared_gradient_norm,
    weighted_square_sums,
    wide,
)
from influence.products import matmul

# The factor files, by kind (the file is <kind>.safetensors in the factors folder).
COVARIANCES = ("activation_covariance", "gradient_covariance")
EIGENDECOMPOSITION = (
    "activation_eigenvalues",
    "activation_eigenvectors",
    "gradient_eigenvalues",
    "gradient_eigenvectors",
)
LAMBDA = "lambda_matrix"


class Strategy:
    """One curvature strategy. Subclasses say how a layer's preconditioner is built and applied.

    eigenbasis: fits the covariances A and S and their eigendecompositions.
    fits_lambda: fits Lambda in a pass over the data (in the eigenbasis when `eigenbasis`, elementwise otherwise);
        a strategy with an eigenbasis that does not takes Lambda from the eigenvalues (K-FAC).
    """

    eigenbasis = False
    fits_lambda = False

    def __init__(self, name: str, label: str) -> None:
        self.name, self.label = name, label

    def __repr__(self) -> str:
        return f"<strategy {self.name}>"

    @property
    def uses_lambda(self) -> bool:
        """Whether a Lambda file is among the factors (every strategy that preconditions at all)."""
        return self.eigenbasis or self.fits_lambda

    @property
    def lambda_from_eigenvalues(self) -> bool:
        """Lambda is the outer product of the eigenvalues of S and A, saved with the eigendecomposition."""
        return self.eigenbasis and not self.fits_lambda

    def factor_kinds(self) -> list[str]:
        """The factor files the strategy leaves on disk, in the order they are made."""
        eigen = list(COVARIANCES) + list(EIGENDECOMPOSITION) if self.eigenbasis else []
        return eigen + ([LAMBDA] if self.uses_lambda else [])

    def preconditioner(
        self, factors: dict[str, torch.Tensor], damping: float | None, layer: Layer
    ) -> LayerPreconditioner:
        """From a module's factors ({kind: tensor}, as on disk, in the weight's column order), for gradients in
        the engine's column order (see Layer). damping: added to Lambda, or None for the heuristic."""
        raise NotImplementedError

    def precondition(self, preconditioner: LayerPreconditioner, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """P(G[n]) as [B, out, in'] for the examples whose patches and output gradients are a and g."""
        raise NotImplementedError

    def self_score(self, preconditioner: LayerPreconditioner, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """<P(G[n]), G[n]> for every example."""
        raise NotImplementedError


def _damped_inverse(factors: dict[str, torch.Tensor], damping: float | None) -> torch.Tensor:
    """1 / (Lambda + d), d the heuristic when `damping` is None."""
    lambda_matrix = factors[LAMBDA]
    d = heuristic_damping(lambda_matrix) if damping is None else damping
    return 1.0 / (lambda_matrix + d)


class Identity(Strategy):
    """No curvature: P(G) = G, so scores are plain gradient dot products."""

    def preconditioner(self, factors, damping, layer) -> LayerPreconditioner:
        return LayerPreconditioner(self)

    def precondition(self, preconditioner, a, g) -> torch.Tensor:
        return per_example_gradient(a, g)

    def self_score(self, preconditioner, a, g) -> torch.Tensor:
        return squared_gradient_norm(a, g)


class Diagonal(Strategy):
    """A diagonal curvature, the second moment of each weight's gradient: P(G) = G / (Lambda + d)."""

    fits_lambda = True

    def preconditioner(self, factors, damping, layer) -> LayerPreconditioner:
        return LayerPreconditioner(self, layer.to_engine(_damped_inverse(factors, damping)))

    def precondition(self, preconditioner, a, g) -> torch.Tensor:
        return per_example_gradient(a, g) * preconditioner.inverse

    def self_score(self, preconditioner, a, g) -> torch.Tensor:
        gradient = per_example_gradient(a, g)
        flops.add(3 * gradient.numel(), wide(gradient.dtype), gradient.device)
        return weighted_square_sums(gradient, preconditioner.inverse)


class Eigenbasis(Strategy):
    """F = (Q_S (x) Q_A) diag(Lambda) (Q_S (x) Q_A)^T: P(G) = Q_S [(Q_S^T G Q_A) / (Lambda + d)] Q_A^T.

    fits_lambda: Lambda fitted in the eigenbasis (EK-FAC), else the eigenvalues' outer product (K-FAC)."""

    eigenbasis = True

    def __init__(self, name: str, label: str, fits_lambda: bool) -> None:
        super().__init__(name, label)
        self.fits_lambda = fits_lambda

    def preconditioner(self, factors, damping, layer) -> LayerPreconditioner:
        inverse = _damped_inverse(factors, damping)
        q_a = layer.to_engine(factors["activation_eigenvectors"], dims=(0,))
        return LayerPreconditioner(self, inverse, q_a, factors["gradient_eigenvectors"])

    def precondition(self, preconditioner, a, g) -> torch.Tensor:
        """The rotation into the eigenbasis takes the fewest multiply-adds (rotated_gradient); only the
        rotation back needs G's full out x in' products."""
        p = preconditioner
        rotated = rotated_gradient(a, g, p.q_a, p.q_s) * p.inverse
        batch, out_dim, in_dim = rotated.shape
        flops.add(2 * batch * out_dim * in_dim * (out_dim + in_dim), rotated.dtype, rotated.device)
        return matmul(matmul(p.q_s, rotated), p.q_a.T)

    def self_score(self, preconditioner, a, g) -> torch.Tensor:
        """Without rotating back: sum((Q_S^T G Q_A)^2 / (Lambda + d))."""
        p = preconditioner
        rotated = rotated_gradient(a, g, p.q_a, p.q_s)
        flops.add(3 * rotated.numel(), wide(rotated.dtype), rotated.device)
        return weighted_square_sums(rotated, p.inverse)


IDENTITY = Identity("identity", "identity")
DIAGONAL = Diagonal("diagonal", "diagonal")
KFAC = Eigenbasis("kfac", "K-FAC", fits_lambda=False)
EKFAC = Eigenbasis("ekfac", "EK-FAC", fits_lambda=True)

ALL_STRATEGIES: tuple[Strategy, ...] = (IDENTITY, DIAGONAL, KFAC, EKFAC)
STRATEGIES = tuple(strategy.name for strategy in ALL_STRATEGIES)  # the names, cheapest first
STRATEGY_LABELS = {strategy.name: strategy.label for strategy in ALL_STRATEGIES}
DEFAULT_STRATEGY = EKFAC.name
_BY_NAME = {strategy.name: strategy for strategy in ALL_STRATEGIES}


def get_strategy(name: str | Strategy) -> Strategy:
    """The strategy named `name` (one of STRATEGIES; a Strategy is returned as it is)."""
    if isinstance(name, Strategy):
        return name
    try:
        return _BY_NAME[name]
    except (KeyError, TypeError):  # TypeError: an unhashable value
        raise InfluenceError(f"unknown factor strategy {name!r}: choose one of {', '.join(STRATEGIES)}") from None
