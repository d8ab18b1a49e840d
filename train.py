"""Train ResNet-9 on CIFAR-10 and save a safetensors checkpoint.

Full run (the original example's settings; a GPU makes it take minutes), then the same with 10% of the
labels corrupted (the defaults are the original's):

    python train.py --dataset_dir ./data --checkpoint_dir ./checkpoints \
        --train_batch_size 512 --eval_batch_size 1024 --learning_rate 0.4 --weight_decay 0.001 \
        --num_train_epochs 25 --seed 1004
    python train.py --dataset_dir ./data --checkpoint_dir ./checkpoints --corrupt_percentage 0.1

CPU-sized run (under an hour each on 2 cores; the model fits its 2,000 labels), clean and corrupted:

    python train.py --dataset_dir ./data --checkpoint_dir ./checkpoints/cpu \
        --num_train 2000 --train_batch_size 32 --num_train_epochs 35
    python train.py --dataset_dir ./data --checkpoint_dir ./checkpoints/cpu \
        --num_train 2000 --train_batch_size 32 --num_train_epochs 35 --corrupt_percentage 0.1

Several processes (one per GPU, or CPU processes), data-parallel; each step's batch of --train_batch_size is
split across them, and rank 0 evaluates and writes the checkpoint:

    torchrun --nproc_per_node=2 train.py --checkpoint_dir ./checkpoints/cpu --num_train 2000 --train_batch_size 32 \
        --num_train_epochs 35

Writes {checkpoint_dir}/model.safetensors, model_corrupt_{p}.safetensors with --corrupt_percentage p, or
model_noisy_{key}.safetensors with --noisy_labels. An existing checkpoint of the same name is overwritten.

Every --save_interval seconds (default 120), and when stopped by SIGTERM or SIGINT (at the end of the step in
progress), the training state is saved beside it as <checkpoint>.partial.safetensors; the same command resumes
from it, ending with the weights an uninterrupted run would have made, and removes it once the checkpoint is written.
"""

from __future__ import annotations

import signal

# Ctrl-C while torch loads (a few seconds) ends the script quietly; run_cli handles it from then on.
signal.signal(signal.SIGINT, signal.SIG_DFL)


import dataclasses
import time

from tqdm import tqdm

from example.checkpoints import checkpoint_path, save_model
from example.errors import PipelineError
from example.flags import (
    POSITIVE_INT,
    add_checkpoint_flags,
    add_data_flags,
    add_eval_batch_flag,
    add_label_flags,
    add_process_flags,
)
from example.hardware import keep_freed_memory
from example.run import ArgumentParser, is_main, run_cli, say_if_bf16_is_emulated, start_processes
from example.task import evaluate
from example.training import add_recipe_flags, train_model
from influence import Group, partial_path, this_rank, world_size
from pipeline import TensorBatches, check_label_options, get_cifar10

# ---- Arguments ----


def parse_args(argv=None):
    parser = ArgumentParser(description="Train ResNet-9 on CIFAR-10.")
    add_data_flags(parser, num_train=True)
    add_checkpoint_flags(parser)
    add_label_flags(parser)
    add_eval_batch_flag(parser)
    parser.add_argument(
        "--num_test",
        type=POSITIVE_INT,
        default=None,
        help="report test accuracy on the first N test images (default: all)",
    )
    add_recipe_flags(parser)  # the recipe (example/training.py), shared with evaluate_lds.py's retrainings
    add_process_flags(parser)
    args = parser.parse_args(argv)

    check_label_options(args.corrupt_percentage, args.noisy_labels)
    return args


# ---- Training ----


def say(message: str) -> None:
    if is_main():
        tqdm.write(message)


def main(argv=None) -> None:
    args = parse_args(argv)
    keep_freed_memory()
    device = start_processes(args.dist_timeout)
    say_if_bf16_is_emulated(device, args.use_half_precision)
    rank, world = this_rank(), world_size()
    out_path = checkpoint_path(
        args.checkpoint_dir, args.corrupt_percentage, args.noisy_labels_key if args.noisy_labels else None
    )

    if out_path.is_dir():
        raise PipelineError(f"{out_path} is a folder, where the checkpoint goes: remove it or choose another folder")
    common = dict(
        num_train=args.num_train,
        corrupt_percentage=args.corrupt_percentage,
        noisy_labels=args.noisy_labels,
        noisy_labels_key=args.noisy_labels_key,
        device=device,
    )
    train_data = get_cifar10(args.dataset_dir, "train", **common)
    eval_train_data = dataclasses.replace(train_data, split="eval_train")  # the same images and labels, read once
    valid_data = get_cifar10(args.dataset_dir, "valid", device=device).subset(args.num_test, "--num_test")
    num_changed = int(train_data.changed.sum())
    where = f"{world} processes on {device.type}" if world > 1 else f"device {device}"
    say(f"training on {len(train_data)} examples ({num_changed} with changed labels), {where}")

    # Data-parallel over the processes; the state is saved beside the checkpoint until the checkpoint is written.
    state_path = partial_path(out_path)
    model, seconds = train_model(args, train_data, device, state_path, group=Group(device))
    trained_at = time.time()

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
    print(f"saved {out_path} (training took {seconds + time.time() - trained_at:.1f} s)")


if __name__ == "__main__":
    run_cli(main)
