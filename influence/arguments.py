"""The arguments that decide what a factor or score file holds; they are saved as JSON beside it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from influence.errors import InfluenceError
from influence.strategies import DEFAULT_STRATEGY, get_strategy

__all__ = ["DEFAULT_DAMPING", "FactorArguments", "ScoreArguments", "to_dict"]

# ScoreArguments' damping when none is given: small enough to leave the curvature as fitted.
DEFAULT_DAMPING = 1e-8


@dataclass
class FactorArguments:
    """How to fit the curvature.

    strategy: the name of a strategy, one of STRATEGIES: identity | diagonal | kfac | ekfac (see
        influence.strategies; a Strategy object is taken as its name).
    use_empirical_fisher: use the dataset labels instead of labels sampled from the model (true Fisher).
    max_examples: fit on at most this many training examples (None: all).
    seed: seed of the labels sampled for the true Fisher; a batch's labels depend on it and on which examples the
        batch holds only (not on the process or on what ran before), so results do not depend on the split.
    use_half_precision: run forward and backward under bf16 autocast (factors are still accumulated in fp32).
    info: free-form facts about the model and data (checkpoint, dataset size...) checked on reuse.
    """

    strategy: str = DEFAULT_STRATEGY
    use_empirical_fisher: bool = False
    max_examples: int | None = None
    seed: int = 0
    use_half_precision: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.strategy = get_strategy(self.strategy).name  # an unknown name: one line with the choices
        if self.max_examples is not None and self.max_examples < 1:
            raise InfluenceError(f"max_examples must be a positive number of examples, got {self.max_examples}")


@dataclass
class ScoreArguments:
    """How to compute scores.

    damping_factor: a number added to Lambda, or None for the heuristic 0.1 * mean(Lambda) per module.
    use_half_precision: bf16 autocast for forward/backward and bf16 for the pairwise contraction.
    per_module: also save one score tensor per tracked module (keyed by module name).
    info: free-form facts about the model and data checked on reuse.
    """

    damping_factor: float | None = DEFAULT_DAMPING
    use_half_precision: bool = False
    per_module: bool = False
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.damping_factor is not None and not self.damping_factor >= 0:
            raise InfluenceError(f"damping_factor must be >= 0 or None (heuristic), got {self.damping_factor}")


def to_dict(arguments: Any) -> dict[str, Any]:
    return dataclasses.asdict(arguments)
