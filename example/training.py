"""The training recipe: its flags (one group) and the loop that trains a ResNet-9 with it, resumably.

Not run directly; train.py trains its checkpoint with it and evaluate_lds.py trains every retraining with it,
so both run the same code:

    add_recipe_flags(parser)                      # --train_batch_size ... --save_interval, checked as read
    model, seconds = train_model(args, data, device, state_path)   # stopped by SIGTERM: saved, Interrupted raised

The recipe is the original example's: SGD (momentum 0 by default), the learning rate rising linearly per step to
its peak at 20% of training and falling linearly to 0, weight decay, random crops and flips, batches reshuffled
every epoch from --seed + epoch, initial weights from --seed. The training state (example/train_state.py) is saved every
--save_interval seconds, at a stop, and when the last epoch ends; a run with the same recipe resumes from it to the
weights an uninterrupted run makes (bit for bit on the CPU).
"""

from __future__ import annotations

import argparse
import hashlib
import time
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
from example.train_state import read_training_state, restore_training_state, save_training_state
from influence import first_difference, interrupt
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


class Alone:
    """The few collectives the loop uses, for a process training a model by itself (an LDS retraining under
    torchrun, or no torchrun at all)."""

    world, rank, is_main = 1, 0, True

    def on_main(self, read, device=None):
        return read()

    def sum_to_main(self, tensors) -> None:
        pass

    def sync_round(self, wanted: bool, stop: int | None = None) -> tuple[bool, int | None]:
        return wanted, stop

    def barrier(self) -> None:
        pass


def train_model(
    args: argparse.Namespace,
    data: CifarData,
    device: torch.device,
    state_path: Path,
    group=None,
    seed: int | None = None,
    verbose: bool = True,
) -> tuple[nn.Module, float]:
    """Train a ResNet-9 from scratch on `data` ("train" split) with the recipe in `args`; (model in train mode,
    seconds of training including any earlier run it resumed).

    `group`: the processes sharing each step's batch (data-parallel, influence.distributed.Group), or None for
    this process alone. `seed` replaces args.seed (the LDS retrainings each have their own). The state is kept at
    `state_path` (resumed when it holds this run; the caller removes it once its result is saved). SIGTERM and
    SIGINT stop at the end of the step in progress, saving it, with interrupt.Interrupted.
    """
    group = group if group is not None else Alone()
    seed = args.seed if seed is None else seed
    rank, world = group.rank, group.world
    say = (lambda message: tqdm.write(message)) if verbose and group.is_main else (lambda message: None)
    if args.train_batch_size < world:
        raise PipelineError(f"--train_batch_size {args.train_batch_size} is smaller than the {world} processes")

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

    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay
    )
    # Piecewise linear per step: 0 -> peak at 20% of training -> 0 at the end, so shorter runs keep the shape.
    epochs = args.num_train_epochs
    total_steps = epochs * len(train_batches)
    knots = [0.0, total_steps * WARMUP_FRACTION, float(total_steps)]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(np.interp(step, knots, [0, 1, 0])))

    # ---- Resuming a stopped run (its training state, read by rank 0 and shared) ----
    steps = len(train_batches)
    run_arguments = {
        **recipe_of(args),
        "seed": seed,
        "examples": len(data),
        "labels_sha256": hashlib.sha256(data.labels.cpu().numpy().tobytes()).hexdigest(),
        "steps_per_epoch": steps,
    }
    saved = group.on_main(lambda: read_state(state_path, run_arguments, device, say), device=device)
    start_epoch, start_step, elapsed = 0, 0, 0.0
    resumed_loss = resumed_count = None
    if saved is not None:
        extra = restore_training_state(saved, model, optimizer, scheduler)
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

    def save_state(epoch: int, step: int, epoch_loss: torch.Tensor, epoch_count: int) -> str:
        """Every rank's share of the epoch's loss summed into rank 0's, which writes the state; says what it saved."""
        totals = [epoch_loss.detach().clone(), torch.tensor(epoch_count, dtype=torch.int64, device=device)]
        group.sum_to_main(totals)
        if group.is_main:
            progress = {
                "epoch": epoch,
                "step": step,
                "epoch_examples": int(totals[1].item()),
                "elapsed": time.time() - start,
                "arguments": run_arguments,
            }
            save_training_state(state_path, model, optimizer, scheduler, progress, epoch_loss=totals[0])
        return f"the training state at {position(epoch, step, epochs, steps)} to {state_path}"

    def stop(signum: int, epoch: int, step: int, epoch_loss: torch.Tensor, epoch_count: int) -> None:
        began = time.monotonic()
        saved = save_state(epoch, step, epoch_loss, epoch_count)
        group.barrier()  # torchrun stops the other workers as soon as one exits: let rank 0 finish writing
        raise interrupt.stopped(signum, f"{saved} in {time.monotonic() - began:.2f} s")

    model.train()
    last_save = time.monotonic()
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
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.use_half_precision):
                    loss = F.cross_entropy(trained(x), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                epoch_loss += loss.detach().float() * len(y)
                epoch_count += len(y)
                seen += len(y)
                if step % 20 == 0 and verbose:
                    progress.set_postfix(loss=f"{loss.item():.3f}")
                wanted = time.monotonic() - last_save >= args.save_interval
                saving, signum = group.sync_round(wanted, interrupt.requested())
                if signum:
                    stop(signum, epoch, step + 1, epoch_loss, epoch_count)
                if saving:
                    save_state(epoch, step + 1, epoch_loss, epoch_count)
                    last_save = time.monotonic()
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
        zero = torch.zeros((), device=device)
        _, signum = group.sync_round(False, interrupt.requested())
        if signum:
            stop(signum, epochs, 0, zero, 0)
        if start_epoch < epochs:
            save_state(epochs, 0, zero, 0)
    return model, time.time() - start


def position(epoch: int, step: int, epochs: int, steps: int) -> str:
    if epoch >= epochs:
        return "the end of training"
    return f"epoch {epoch + 1}/{epochs}, step {step}/{steps}"


def read_state(path: Path, run_arguments: dict, device: torch.device, say=print):
    """Rank 0: the saved training state of this run, or None; one that cannot be read is discarded, saying so."""
    saved = read_training_state(path, device)
    if isinstance(saved, str):
        say(f"discarding {path} ({saved}); training from the start")
        path.unlink()
        return None
    if saved is not None:
        difference = first_difference(saved[1].get("arguments", {}), run_arguments)
        if difference:
            key, old, new = difference
            raise PipelineError(
                f"{path} holds the state of a run with {key}={old!r}, now {key}={new!r}: rerun with the same "
                "arguments to resume it, or delete it to start over"
            )
    return saved
