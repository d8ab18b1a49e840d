"""The training recipe: its flags (one group) and the loop that trains a ResNet-9 with it, resumably.

Not run directly; train.py trains its checkpoint with it and evaluate_lds.py trains every retraining with it,
so both run the same code:

    add_recipe_flags(parser)                      # --train_batch_size ... --save_interval, checked as read
    model, seconds = train_model(args, data, device, state_path)   # stopped by SIGTERM: saved, Interrupted raised

The recipe is the original example's: SGD (momentum 0 by default), the learning rate rising linearly per step to
its peak at 20% of training and falling linearly to 0, weight decay, random crops and flips, batches reshuffled
every epoch from --seed + epoch, initial weights from --seed. Two details differ from kronfluence's train.py: it
drops each epoch's last, smaller batch (97 steps per epoch at 50,000 images and batches of 512, here 98), and it
peaks after epochs // 5 whole epochs (the same as 20% when the epochs divide by 5, as the original's 25 do). Under
torchrun each step's batch is split across the processes as one process draws it (order, crops and flips), and
the gradients are those of the whole batch's mean loss; BatchNorm normalises each process's slice by its own
statistics (DistributedDataParallel without SyncBatchNorm), so G processes train a slightly different model.
The training state (example/train_state.py) is saved every --save_interval seconds, at a stop, and when the last
epoch ends; a run with the same recipe resumes from it to the weights an uninterrupted run makes (bit for bit on
the CPU). When to save and stop, and how a saved state is read back (discarded when unusable, refused when another
recipe made it), are the engine's, as for its passes (influence.Saver, influence.Store.resume).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from example.errors import PipelineError
from example.flags import FP32_POLICY, NON_NEGATIVE, POSITIVE_INT, add_save_interval_flag, seed
from example.hardware import bf16_hardware_note
from example.sgd import SGD
from example.train_state import not_a_training_state, restore_training_state, save_training_state
from influence import Group, Saver, Store, interrupt, products
from pipeline import CifarData, TensorBatches, construct_resnet9

# Fraction of training at which the learning rate peaks (epoch 5 of the original 25).
WARMUP_FRACTION = 0.2

# The flags that make a run: a training state saved with other values is not resumed.
RUN_FLAGS = (
    "train_batch_size",
    "learning_rate",
    "weight_decay",
    "momentum",
    "num_train_epochs",
    "seed",
    "use_half_precision",
    "use_channels_last",
)


# ---- Flags ----


def add_recipe_flags(
    parser: argparse.ArgumentParser,
    seeds: str = "initial weights, batch order and augmentation",
    saves: str = "the training state, from which a stopped run resumes",
) -> None:
    """The recipe's flags, with the original example's defaults; `seeds` and `saves` say, for --seed and
    --save_interval, what they seed and save in the script."""
    group = parser.add_argument_group("training recipe")
    group.add_argument("--train_batch_size", type=POSITIVE_INT, default=512, help="SGD batch (default 512)")
    group.add_argument("--learning_rate", type=NON_NEGATIVE, default=0.4, help="peak learning rate (default 0.4)")
    group.add_argument("--weight_decay", type=NON_NEGATIVE, default=0.001, help="weight decay (default 0.001)")
    group.add_argument("--momentum", type=NON_NEGATIVE, default=0.0, help="SGD momentum (default 0, plain SGD)")
    group.add_argument("--num_train_epochs", type=POSITIVE_INT, default=25, help="epochs (default 25)")
    group.add_argument("--seed", type=seed, default=1004, help=f"the training seed: {seeds} (default 1004)")
    group.add_argument(
        "--use_half_precision",
        action="store_true",
        help=f"bf16 autocast for forward passes ({bf16_hardware_note()}); without it {FP32_POLICY}",
    )
    group.add_argument(
        "--use_channels_last",
        action="store_true",
        help="channels-last memory format (faster on GPUs, and on the CPUs measured in docs/performance.md)",
    )
    add_save_interval_flag(group, saves)


def recipe_of(args: argparse.Namespace) -> dict:
    """The recipe's values, as JSON."""
    return {name: getattr(args, name) for name in RUN_FLAGS}


# ---- Training ----


class TrainingState:
    """Where a run is (epoch, step, the epoch's loss and examples so far) and its save: every rank's share of the
    epoch's loss is summed into rank 0's, which writes the training state (example/train_state.py)."""

    def __init__(self, path: Path, model, optimizer: SGD, group: Group, arguments: dict, start: float) -> None:
        self.path, self.model, self.optimizer = path, model, optimizer
        self.group, self.arguments, self.start = group, arguments, start
        self.epochs, self.steps = arguments["num_train_epochs"], arguments["steps_per_epoch"]
        self.at(0, 0, torch.zeros(()), 0)

    def at(self, epoch: int, step: int, loss: torch.Tensor, count: int) -> None:
        self.epoch, self.step, self.loss, self.count = epoch, step, loss, count

    def where(self) -> str:
        return position(self.epoch, self.step, self.epochs, self.steps)

    def save(self) -> str:
        """Save (every rank its share, rank 0 writes); says what and where, for Saver."""
        totals = [self.loss.detach().clone(), torch.tensor(self.count, dtype=torch.int64, device=self.loss.device)]
        self.group.sum_to_main(totals)
        if self.group.is_main:
            progress = {
                "epoch": self.epoch,
                "step": self.step,
                "epoch_examples": int(totals[1].item()),
                "elapsed": time.time() - self.start,
                "arguments": self.arguments,
            }
            save_training_state(self.path, self.model, self.optimizer, progress, epoch_loss=totals[0])
        return f"the training state at {self.where()} to {self.path}"


def train_model(
    args: argparse.Namespace,
    data: CifarData,
    device: torch.device,
    state_path: Path,
    group: Group | None = None,
    seed: int | None = None,
    verbose: bool = True,
) -> tuple[nn.Module, float]:
    """Train a ResNet-9 from scratch on `data` ("train" split) with the recipe in `args`; (model in train mode,
    seconds of training including any earlier run it resumed).

    `group`: the processes sharing each step's batch (data-parallel, influence.Group), or None for this process
    alone. `seed` replaces args.seed (the LDS retrainings each have their own). The state is kept at
    `state_path` (resumed when it holds this run; the caller removes it once its result is saved). SIGTERM and
    SIGINT stop at the end of the step in progress, saving it, with interrupt.Interrupted.
    """
    group = group if group is not None else Group(device, alone=True)
    seed = args.seed if seed is None else seed
    rank, world = group.rank, group.world
    say = (lambda message: tqdm.write(message)) if verbose and group.is_main else (lambda message: None)
    if args.train_batch_size < world:
        raise PipelineError(f"--train_batch_size {args.train_batch_size} is smaller than the {world} processes")
    if len(data) < world:
        raise PipelineError(f"{len(data)} training images cannot be split across {world} processes: train on more")

    # Every rank shuffles the same way and takes its slice of each step's batch; a last batch too small to give
    # every rank an example is dropped.
    drop_last = world > 1 and 0 < len(data) % args.train_batch_size < world
    train_batches = TensorBatches(
        data, args.train_batch_size, shuffle=True, augment=True, drop_last=drop_last, seed=seed, shard=(rank, world)
    )
    torch.manual_seed(seed)  # the same initial weights on every rank
    model = construct_resnet9().to(device)
    memory_format = torch.channels_last if args.use_channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)

    # Piecewise linear per step: 0 -> peak at 20% of training -> 0 at the end, so shorter runs keep the shape.
    epochs = args.num_train_epochs
    total_steps = epochs * len(train_batches)
    knots = [0.0, total_steps * WARMUP_FRACTION, float(total_steps)]
    optimizer = SGD(
        model.parameters(),
        args.learning_rate,
        args.momentum,
        args.weight_decay,
        schedule=lambda step: float(np.interp(step, knots, [0, 1, 0])),
    )

    # ---- Resuming a stopped run: its training state, read back by the engine's policy (influence.Store.resume:
    # one that cannot be used is discarded, saying so; one of a run with other arguments is refused) ----
    steps = len(train_batches)
    run_arguments = {
        **recipe_of(args),
        "seed": seed,
        "examples": len(data),
        "labels_sha256": hashlib.sha256(data.labels.cpu().numpy().tobytes()).hexdigest(),
        "steps_per_epoch": steps,
    }
    store = Store(state_path.parent, group, say)
    saved = store.resume(
        state_path, "training", usable(model), arguments=run_arguments, again="training from the start"
    )
    start_epoch, start_step, elapsed = 0, 0, 0.0
    resumed_loss = resumed_count = None
    if saved is not None:
        extra = restore_training_state(saved, model, optimizer)
        progress_saved = saved[1]
        start_epoch, start_step, elapsed = progress_saved["epoch"], progress_saved["step"], progress_saved["elapsed"]
        # Rank 0 carries the whole epoch's loss so far; the others' shares were summed into it when it was saved.
        resumed_loss = extra["epoch_loss"].to(device) if rank == 0 else torch.zeros((), device=device)
        resumed_count = progress_saved["epoch_examples"] if rank == 0 else 0
        train_batches.epoch = start_epoch  # each epoch's order and augmentation come from seed + epoch
        if group.is_main:  # said even when not verbose: which work is not redone
            tqdm.write(
                f"resuming from {state_path.name} at {position(start_epoch, start_step, epochs, steps)}, "
                "saved by an interrupted run"
            )
    trained = DistributedDataParallel(model) if world > 1 else model
    start = time.time() - elapsed
    state = TrainingState(state_path, model, optimizer, group, run_arguments, start)

    model.train()
    saver = Saver(group, args.save_interval, state.save)  # after every step: saves every --save_interval, stops
    with interrupt.polling():
        for epoch in range(start_epoch, epochs):
            # Summed on the device: reading the loss every step would make the host wait for the GPU every step.
            epoch_loss, epoch_count = torch.zeros((), device=device), 0
            skip, seen, epoch_start = 0, 0, time.time()
            if epoch == start_epoch and resumed_loss is not None:
                epoch_loss, epoch_count, skip = resumed_loss, resumed_count, start_step
            progress = tqdm(
                train_batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False, disable=not (verbose and group.is_main)
            )
            for step, (x, y) in enumerate(progress):
                if step < skip:  # done before the interruption (iterated all the same: it draws the augmentation)
                    continue
                x = x.contiguous(memory_format=memory_format)
                with products.bf16_autocast(device.type) if args.use_half_precision else nullcontext():
                    if world == 1:
                        loss = F.cross_entropy(trained(x), y)
                        summed = loss.detach() * len(y)
                    else:
                        whole = min(args.train_batch_size, len(data) - step * args.train_batch_size)
                        summed = F.cross_entropy(trained(x), y, reduction="sum")
                        loss = slice_loss(summed, world, whole)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                epoch_loss += summed.detach().float()
                epoch_count += len(y)
                seen += len(y)
                if step % 20 == 0 and verbose and group.is_main:
                    progress.set_postfix(loss=f"{summed.item() / len(y):.3f}")
                state.at(epoch, step + 1, epoch_loss, epoch_count)
                saver.meet()
            totals = torch.stack([epoch_loss, torch.tensor(float(epoch_count), device=device)])
            if world > 1:  # the loss over every rank's slices
                dist.all_reduce(totals)
            epoch_loss, epoch_count = totals.tolist()
            if not np.isfinite(epoch_loss):
                raise PipelineError(
                    f"training diverged at epoch {epoch + 1} (loss {epoch_loss}); lower --learning_rate"
                )
            rate = seen * world / max(time.time() - epoch_start, 1e-9)  # every rank trains its share of a batch
            say(
                f"epoch {epoch + 1}: train loss {epoch_loss / epoch_count:.4f} ({time.time() - start:.1f} s, "
                f"{rate:.0f} images/s)"
            )

        # The trained weights stay saved as a training state until the caller has saved its result, so a stop
        # during what follows (evaluation, margins) loses no training.
        state.at(epochs, 0, torch.zeros((), device=device), 0)
        saver.meet(may_save=False)
        if start_epoch < epochs:
            state.save()
    return model, time.time() - start


def slice_loss(summed: torch.Tensor, world: int, whole: int) -> torch.Tensor:
    """A rank's loss from the summed loss of its slice of a step's batch of `whole` examples, such that the mean of
    the ranks' gradients (what DDP takes) is the gradient of the whole batch's mean loss: the slices of a batch
    that `world` does not divide differ in size, and the mean of their means would weigh their examples unequally."""
    return summed * (world / whole)


def usable(model: nn.Module) -> Callable[[dict[str, torch.Tensor], dict], tuple | str]:
    """For Store.resume: a training state of `model` read back, as it is, or why it cannot be used."""

    def use(tensors: dict[str, torch.Tensor], progress: dict) -> tuple | str:
        positions = ("epoch", "step", "elapsed", "epoch_examples")
        why = not_a_training_state(tensors, progress, model, extra=("epoch_loss",), positions=positions)
        return why or (tensors, progress)

    return use


def position(epoch: int, step: int, epochs: int, steps: int) -> str:
    if epoch >= epochs:
        return "the end of training"
    return f"epoch {epoch + 1}/{epochs}, step {step}/{steps}"
