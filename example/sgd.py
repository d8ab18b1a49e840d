"""The training recipe's optimiser: SGD with weight decay and momentum, its learning rate a function of the step.

Not run directly; example/training.py trains with it:

    optimizer = SGD(model.parameters(), learning_rate, momentum, weight_decay, schedule=lambda step: ...)
    optimizer.zero_grad(); loss.backward(); optimizer.step()    # the step's rate: learning_rate * schedule(step)
    tensors, steps = optimizer.state(); optimizer.load_state(tensors, steps)   # for the training state on disk

The update is torch.optim.SGD's (dampening 0, no Nesterov) under torch.optim.lr_scheduler.LambdaLR, with the same
foreach arithmetic, so it makes the same weights (tests/example/test_pipeline.py holds it to them). It is not
torch.optim.SGD because constructing that imports torch._dynamo: 2-4 s of every training process's start on a
2-core CPU, for nothing this recipe uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

__all__ = ["SGD"]


class SGD:
    """p -= lr_t * v, where g' = grad + weight_decay * p, and v = g' (no momentum) or v = momentum * v + g' (v = g'
    at the first step); lr_t = learning_rate * schedule(t) at the t-th step (from 0)."""

    def __init__(
        self,
        parameters: Iterable[nn.Parameter],
        learning_rate: float,
        momentum: float,
        weight_decay: float,
        schedule: Callable[[int], float],
    ) -> None:
        self.parameters = list(parameters)
        self.learning_rate, self.momentum, self.weight_decay = learning_rate, momentum, weight_decay
        self.schedule = schedule
        self.steps = 0  # steps taken
        self.velocities: list[torch.Tensor] | None = None  # with momentum, made at the first step

    def zero_grad(self) -> None:
        for parameter in self.parameters:
            parameter.grad = None

    @torch.no_grad()
    def step(self) -> None:
        if any(parameter.grad is None for parameter in self.parameters):
            raise RuntimeError("every parameter needs a gradient at each step (the recipe trains them all)")
        parameters = self.parameters
        gradients = [parameter.grad for parameter in parameters]
        if self.weight_decay != 0:
            gradients = torch._foreach_add(gradients, parameters, alpha=self.weight_decay)
        if self.momentum != 0:
            if self.velocities is None:
                self.velocities = [gradient.clone() for gradient in gradients]
            else:
                torch._foreach_mul_(self.velocities, self.momentum)
                torch._foreach_add_(self.velocities, gradients)
            gradients = self.velocities
        torch._foreach_add_(parameters, gradients, alpha=-(self.learning_rate * self.schedule(self.steps)))
        self.steps += 1

    def state(self) -> tuple[dict[str, torch.Tensor], int]:
        """(the momentum velocities by parameter index, none before the first step or without momentum; steps)."""
        return {str(index): velocity for index, velocity in enumerate(self.velocities or [])}, self.steps

    def load_state(self, velocities: dict[str, torch.Tensor], steps: int) -> None:
        if self.momentum != 0 and steps > 0:
            if sorted(velocities) != sorted(str(index) for index in range(len(self.parameters))):
                raise ValueError(f"a velocity for each of the {len(self.parameters)} parameters is needed")
            self.velocities = [
                velocities[str(index)].to(parameter.device, parameter.dtype).clone()
                for index, parameter in enumerate(self.parameters)
            ]
            for velocity, parameter in zip(self.velocities, self.parameters, strict=True):
                if velocity.shape != parameter.shape:
                    raise ValueError(f"a velocity of shape {tuple(velocity.shape)} for {tuple(parameter.shape)}")
        self.steps = steps
