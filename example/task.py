"""The influence task of the example (cross-entropy to train, the margin to query) and evaluation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from influence import Task
from pipeline import TensorBatches

# ---- Task ----


def label_margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per example: the logit of its label minus the logsumexp of the other logits (the query measurement, and
    what evaluate_lds.py records of every retrained model)."""
    rows = torch.arange(len(labels), device=logits.device)
    correct = logits[rows, labels]
    others = logits.clone()
    others[rows, labels] = -torch.inf
    return correct - others.logsumexp(dim=-1)


class ClassificationTask(Task):
    """Summed cross-entropy for training; minus the summed margin for queries."""

    def compute_train_loss(self, batch, model: nn.Module, sample: bool = False) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        if sample:
            # The "true Fisher": labels drawn from the model's own predictive distribution.
            with torch.no_grad():
                probs = torch.softmax(logits.detach().float(), dim=-1)
                # A row of NaN or inf logits would end in multinomial's long traceback (a device-side assert on a
                # GPU); drawing its label uniformly instead keeps its loss NaN, so the influence pass stops naming
                # the layer (influence.passes), with no host-device sync here.
                probs = torch.where(probs.isfinite().all(dim=-1, keepdim=True), probs, 1.0)
                y = torch.multinomial(probs, num_samples=1).flatten()
        return F.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model: nn.Module) -> torch.Tensor:
        x, y = batch
        return -label_margins(model(x), y).sum()

    def tracked_modules(self) -> list[str] | None:
        return None


# ---- Evaluation ----


@torch.no_grad()
def evaluate(model: nn.Module, batches: TensorBatches) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over all batches, in eval mode."""
    was_training = model.training
    model.eval()
    # Summed on the device and read once: reading per batch would make the host wait for the GPU every batch.
    total_loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        logits = model(x).float()
        total_loss = total_loss + F.cross_entropy(logits, y, reduction="sum").double()
        correct = correct + (logits.argmax(dim=-1) == y).sum()
        count += len(y)
    model.train(was_training)
    return float(total_loss) / max(count, 1), int(correct) / max(count, 1)
