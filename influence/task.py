"""What the user supplies: the training loss, the query measurement and which modules to track."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class Task:
    """Subclass this to tell the engine how to score your model.

    Both losses are *summed* over the batch, so that the gradient with respect to a module's output
    at example n is the gradient of example n's own loss (the model must be in eval mode, so that
    examples do not interact through batch statistics).
    """

    def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> torch.Tensor:
        """Summed training loss of `batch`. With `sample=True`, labels are drawn from the model's
        own predictive distribution (used to fit the true Fisher); otherwise the dataset labels are used."""
        raise NotImplementedError

    def compute_measurement(self, batch: Any, model: nn.Module) -> torch.Tensor:
        """Summed measurement f of the query batch, whose gradient is scored against training gradients."""
        raise NotImplementedError

    def tracked_modules(self) -> list[str] | None:
        """Names (as in `model.named_modules()`) of the modules to track; None tracks every Linear and Conv2d."""
        return None
