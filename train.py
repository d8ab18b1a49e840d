"""Train ResNet-9 on CIFAR-10 and save a safetensors checkpoint.

Full run (the original example's settings; a GPU makes it take minutes), then the same with 10% of the
labels corrupted (the defaults are the original's):

    python train.py --dataset_dir ./data --checkpoint_dir ./checkpoints \
        --train_batch_size 512 --eval_batch_size 1024 --learning_rate 0.4 --weight_decay 0.001 \
        --num_train_epochs 25 --seed 1004
    python train.py --dataset_dir ./data --checkpoint_dir ./checkpoints --corrupt_percentage 0.1

CPU-sized run (about 15 minutes on 2 cores; the model fits its 2,000 labels), clean and corrupted:

    python train.py --dataset_dir ./data --checkpoint_dir ./checkpoints \
        --num_train 2000 --train_batch_size 32 --num_train_epochs 35
    python train.py --dataset_dir ./data --checkpoint_dir ./checkpoints \
        --num_train 2000 --train_batch_size 32 --num_train_epochs 35 --corrupt_percentage 0.1

Several processes (one per GPU, or CPU processes), data-parallel; each step's batch of --train_batch_size is
split across them, and rank 0 evaluates and writes the checkpoint:

    torchrun --nproc_per_node=2 train.py --num_train 2000 --train_batch_size 32 --num_train_epochs 35

Writes {checkpoint_dir}/model.safetensors, model_corrupt_{p}.safetensors with --corrupt_percentage p, or
model_noisy_{key}.safetensors with --noisy_labels. An existing checkpoint of the same name is overwritten.

Every --save_interval seconds (default 120), and when stopped by SIGTERM or SIGINT (at the end of the step in
progress), the training state is saved beside it as <checkpoint>.partial.safetensors; the same command resumes
from it, ending with the weights an uninterrupted run would have made, and removes it once the checkpoint is written.
"""

from __future__ import annotations

import hashlib
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from cli import FP32_POLICY, ArgumentParser, add_process_flags, is_main, keep_freed_memory, run_cli, start_processes
from influence import interrupt
from influence.distributed import Group
from pipeline import (
    PipelineError,
    TensorBatches,
    checkpoint_path,
    construct_resnet9,
    evaluate,
    get_cifar10,
    save_model,
)
from train_state import partial_path, read_training_state, restore_training_state, save_training_state

# Fraction of training at which the learning rate peaks (epoch 5 of the original 25).
WARMUP_FRACTION = 0.2


# ---- Arguments ----


def parse_args(argv=None):
    parser = ArgumentParser(description="Train ResNet-9 on CIFAR-10.")
    parser.add_argument("--dataset_dir", default="./data", help="holds cifar-10-batches-py/ (default: ./data)")
    parser.add_argument("--checkpoint_dir", default="./checkpoints", help="created if missing (default: ./checkpoints)")
    parser.add_argument("--train_batch_size", type=int, default=512)
    parser.add_argument("--eval_batch_size", type=int, default=1024)
    parser.add_argument("--learning_rate", type=float, default=0.4, help="peak learning rate (default: 0.4)")
    parser.add_argument("--weight_decay", type=float, default=0.001)
    parser.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default: 0, plain SGD)")
    parser.add_argument("--num_train_epochs", type=int, default=25)
    parser.add_argument("--seed", type=int, default=1004)
    parser.add_argument(
        "--num_train", type=int, default=None, help="train on the first N training examples (default: all 50,000)"
    )
    parser.add_argument(
        "--num_test", type=int, default=None, help="report test accuracy on the first N test images (default: all)"
    )
    parser.add_argument(
        "--corrupt_percentage",
        type=float,
        default=None,
        help="give the first ceil(p*N) examples a wrong label; saves model_corrupt_{p}.safetensors",
    )
    parser.add_argument(
        "--noisy_labels",
        default=None,
        metavar="FILE.npz",
        help="train on human labels from an .npz (e.g. CIFAR-10N's, with an aggre_label array); "
        "saves model_noisy_{key}.safetensors",
    )
    parser.add_argument(
        "--noisy_labels_key", default="aggre_label", help="key in --noisy_labels (default: aggre_label)"
    )
    parser.add_argument(
        "--use_half_precision", action="store_true", help=f"bf16 autocast for forward passes; without it {FP32_POLICY}"
    )
    parser.add_argument("--use_channels_last", action="store_true", help="channels-last memory format (GPU speed)")
    parser.add_argument(
        "--save_interval",
        type=float,
        default=120.0,
        help="seconds between saves of the training state, from which a stopped run resumes (default 120)",
    )
    add_process_flags(parser)
    args = parser.parse_args(argv)

    for name in ("train_batch_size", "eval_batch_size", "num_train_epochs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive, got {getattr(args, name)}")
    if args.save_interval < 0:
        parser.error(f"--save_interval must not be negative, got {args.save_interval}")
    if args.learning_rate < 0 or args.weight_decay < 0 or args.momentum < 0:
        parser.error("--learning_rate, --weight_decay and --momentum must not be negative")
    if args.corrupt_percentage is not None and not 0.0 <= args.corrupt_percentage <= 1.0:
        parser.error(f"--corrupt_percentage must be between 0 and 1, got {args.corrupt_percentage}")
    if args.corrupt_percentage is not None and args.noisy_labels is not None:
        parser.error("--corrupt_percentage and --noisy_labels cannot be combined")
    return args


# ---- Training ----


def say(message: str) -> None:
    if is_main():
        tqdm.write(message)


def main(argv=None) -> None:
    args = parse_args(argv)
    keep_freed_memory()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    device = start_processes(args.dist_timeout)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if args.train_batch_size < world:
        raise PipelineError(f"--train_batch_size {args.train_batch_size} is smaller than the {world} processes")
    out_path = checkpoint_path(
        args.checkpoint_dir, args.corrupt_percentage, args.noisy_labels_key if args.noisy_labels else None
    )

    common = dict(
        num_train=args.num_train,
        corrupt_percentage=args.corrupt_percentage,
        noisy_labels=args.noisy_labels,
        noisy_labels_key=args.noisy_labels_key,
        device=device,
    )
    train_data = get_cifar10(args.dataset_dir, "train", **common)
    eval_train_data = get_cifar10(args.dataset_dir, "eval_train", **common)
    valid_data = get_cifar10(args.dataset_dir, "valid", device=device).subset(args.num_test)
    num_changed = int(train_data.changed.sum())
    where = f"{world} processes on {device.type}" if world > 1 else f"device {device}"
    say(f"training on {len(train_data)} examples ({num_changed} with changed labels), {where}")

    # Every rank shuffles the same way and takes its slice of each step's batch; a last batch too small to give
    # every rank an example is dropped.
    drop_last = world > 1 and 0 < len(train_data) % args.train_batch_size < world
    train_batches = TensorBatches(
        train_data,
        args.train_batch_size,
        shuffle=True,
        augment=True,
        drop_last=drop_last,
        seed=args.seed,
        shard=(rank, world),
    )
    model = construct_resnet9().to(device)
    memory_format = torch.channels_last if args.use_channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)

    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay
    )
    # Piecewise linear per step: 0 -> peak at 20% of training -> 0 at the end, so shorter runs keep the shape.
    total_steps = args.num_train_epochs * len(train_batches)
    knots = [0.0, total_steps * WARMUP_FRACTION, float(total_steps)]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: float(np.interp(step, knots, [0, 1, 0])))

    # ---- Resuming a stopped run (its training state, read by rank 0 and shared) ----
    group = Group(device)
    state_path = partial_path(out_path)
    steps = len(train_batches)
    run_arguments = {
        **{name: getattr(args, name) for name in RUN_FLAGS},
        "examples": len(train_data),
        "labels_sha256": hashlib.sha256(train_data.labels.cpu().numpy().tobytes()).hexdigest(),
        "steps_per_epoch": steps,
    }
    saved = group.on_main(lambda: read_state(state_path, run_arguments, device), device=device)
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
        say(
            f"resuming from {state_path.name} at {position(start_epoch, start_step, args.num_train_epochs, steps)}, "
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
        return f"the training state at {position(epoch, step, args.num_train_epochs, steps)} to {state_path}"

    def stop(signum: int, epoch: int, step: int, epoch_loss: torch.Tensor, epoch_count: int) -> None:
        began = time.monotonic()
        saved = save_state(epoch, step, epoch_loss, epoch_count)
        group.barrier()  # torchrun stops the other workers as soon as one exits: let rank 0 finish writing
        raise interrupt.stopped(signum, f"{saved} in {time.monotonic() - began:.2f} s")

    model.train()
    last_save = time.monotonic()
    with interrupt.polling():
        for epoch in range(start_epoch, args.num_train_epochs):
            # Summed on the device: reading the loss every step would make the host wait for the GPU every step.
            epoch_loss, epoch_count = torch.zeros((), device=device), 0
            skip = 0
            if epoch == start_epoch and resumed_loss is not None:
                epoch_loss, epoch_count, skip = resumed_loss, resumed_count, start_step
            progress = tqdm(
                train_batches, desc=f"epoch {epoch + 1}/{args.num_train_epochs}", leave=False, disable=not is_main()
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
                if step % 20 == 0:
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
            say(f"epoch {epoch + 1}: train loss {epoch_loss / epoch_count:.4f} ({time.time() - start:.1f} s)")

        # The trained weights stay saved as a training state until the checkpoint is written, so a stop during
        # the evaluation below loses no training.
        zero = torch.zeros((), device=device)
        _, signum = group.sync_round(False, interrupt.requested())
        if signum:
            stop(signum, args.num_train_epochs, 0, zero, 0)
        if start_epoch < args.num_train_epochs:
            save_state(args.num_train_epochs, 0, zero, 0)

    # ---- Evaluation and checkpoint (rank 0) ----
    if rank != 0:
        return
    model.eval()
    train_loss, train_acc = evaluate(model, TensorBatches(eval_train_data, args.eval_batch_size))
    valid_loss, valid_acc = evaluate(model, TensorBatches(valid_data, args.eval_batch_size))
    say(f"train loss {train_loss:.4f}, train accuracy {train_acc:.4f} (on the labels trained on)")
    print(f"test loss {valid_loss:.4f}, test accuracy {valid_acc:.4f}")
    save_model(model, out_path)
    state_path.unlink(missing_ok=True)
    print(f"saved {out_path} (training took {time.time() - start:.1f} s)")


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


def position(epoch: int, step: int, epochs: int, steps: int) -> str:
    if epoch >= epochs:
        return "the end of training"
    return f"epoch {epoch + 1}/{epochs}, step {step}/{steps}"


def read_state(path, run_arguments: dict, device: torch.device):
    """Rank 0: the saved training state of this run, or None; one that cannot be read is discarded, saying so."""
    saved = read_training_state(path, device)
    if isinstance(saved, str):
        say(f"discarding {path} ({saved}); training from the start")
        path.unlink()
        return None
    if saved is not None:
        recorded = saved[1].get("arguments", {})
        for key in sorted(set(recorded) | set(run_arguments)):
            if recorded.get(key) != run_arguments.get(key):
                raise PipelineError(
                    f"{path} holds the state of a run with {key}={recorded.get(key)!r}, now "
                    f"{key}={run_arguments.get(key)!r}: rerun with the same arguments to resume it, or delete it "
                    "to start over"
                )
    return saved


if __name__ == "__main__":
    run_cli(main)
