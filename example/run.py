"""How each script runs: one-line errors and exit codes, signals, the processes of a torchrun job, and the start
of an influence run (sizes, memory, processes, batch size, the bf16 note).

    from example.run import ArgumentParser, is_main, run_cli, start_influence_run, start_processes
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from example.devices import environment_int, get_device
from example.errors import PipelineError
from example.flags import influence_batch_size
from example.hardware import emulated_bf16_note, keep_freed_memory
from influence import (
    InfluenceError,
    Interrupted,
    first_line,
    forget_groups,
    handling,
    publish_failure,
    remember_store,
    this_rank,
)

# ---- Errors and arguments ----


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage dump), like every other error here."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(): expected errors become `error: ...` on stderr and exit status 2.

    Under torchrun a failing rank first leaves a note naming itself, which the other ranks report when the
    collective they wait in fails; a rank that succeeds waits for the others before it leaves.

    SIGTERM (a scheduler's preemption) and SIGINT stop a pass or training at its next batch boundary, where it
    saves what it has (influence/interrupt.py); rank 0 says in one line what was saved, and every rank exits
    with 128 + the signal's number (143 for SIGTERM, 130 for SIGINT).
    """
    if threading.current_thread() is threading.main_thread():  # the scripts silenced Ctrl-C while torch loaded
        signal.signal(signal.SIGINT, signal.default_int_handler)
    with handling():
        try:
            main()
            if end_processes(success=True):
                leave(0, was_distributed=True)
        except (PipelineError, InfluenceError) as e:
            message = in_flags(str(e))
            publish_failure(message)
            print(f"error: {message}", file=sys.stderr)
            leave(2, end_processes(success=False))
        except Interrupted as e:
            if e.saved is None:  # stopped alone, outside a pass: ranks waiting for this one stop, naming it
                publish_failure(e.message())
            if is_main():
                print(e.message(), file=sys.stderr)
            leave(e.exit_status, end_processes(success=False))
        except KeyboardInterrupt:
            publish_failure("interrupted")
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as e:
            publish_failure(f"{type(e).__name__}: {e}")
            raise


# The engine's messages name its arguments (influence/ knows no command line); the scripts' users type flags.
ENGINE_ARGUMENTS = {
    "overwrite_output_dir=True": "--overwrite_output_dir",
    "overwrite_output_dir": "--overwrite_output_dir",
    "output_dir": "--output_dir",
    "smaller training or query batches": "a smaller --influence_batch_size or --query_batch_size",
}
_ARGUMENT = re.compile(r"(?<![\w/.-])(" + "|".join(map(re.escape, ENGINE_ARGUMENTS)) + r")(?![\w/])")


def in_flags(message: str) -> str:
    """An engine message in the scripts' terms: each Analyzer argument it names becomes the flag that sets it."""
    return _ARGUMENT.sub(lambda found: ENGINE_ARGUMENTS[found.group(1)], message)


def leave(status: int, was_distributed: bool) -> None:
    """Exit with `status`. A torchrun worker skips the interpreter's teardown: once the process group is destroyed,
    torch's C++ objects freed at interpreter exit can abort a finished rank ("terminate called without an active
    exception"), turning a run whose files are all written into a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    if was_distributed:
        os._exit(status)
    sys.exit(status)


def is_main() -> bool:
    """Rank 0, or the only process: the one that prints results and draws figures."""
    return this_rank() == 0


# ---- Several processes (torchrun) ----


def start_processes(timeout: float, device: torch.device | str | None = None) -> torch.device:
    """This process's device; under torchrun (WORLD_SIZE > 1) it first joins the process group.

    One process per device: nccl with GPU LOCAL_RANK when there are GPUs, gloo on the CPU otherwise; `device`
    ("cpu" or "cuda") chooses instead of the GPUs' presence (bench.py --device, the CPU tests on a GPU host).
    `timeout` (seconds) bounds every wait for another rank, so a rank that hangs or dies stops the others.
    """
    world = environment_int("WORLD_SIZE", 1)
    if world == 1 or (dist.is_available() and dist.is_initialized()):
        return get_device(device)
    if not dist.is_available():
        raise PipelineError("this torch build has no torch.distributed: run one process (python, not torchrun)")
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise PipelineError(f"WORLD_SIZE is set but {missing[0]} is not: start the processes with torchrun")
    rank, host, port = environment_int("RANK", 0), os.environ["MASTER_ADDR"], environment_int("MASTER_PORT", 0)
    wait = timedelta(seconds=timeout)
    device = get_device(device)
    # torchrun's agent hosts the rendezvous store; processes started by hand (the tests) let rank 0 host it.
    hosted_by_agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    try:
        store = dist.TCPStore(host, port, world, is_master=rank == 0 and not hosted_by_agent, timeout=wait)
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend, store=dist.PrefixStore("influence_pg", store), rank=rank, world_size=world, timeout=wait
        )
    except (RuntimeError, OSError) as e:
        raise PipelineError(
            f"rank {rank} could not join the other processes at {host}:{port}: {first_line(e)}"
        ) from None
    remember_store(dist.PrefixStore("influence", store), wait)
    return device


def end_processes(success: bool) -> bool:
    """Leave the process group (after the others, on success); whether there was one."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if success:  # rank 0 may host the store: nobody leaves while another still needs it
        try:
            dist.barrier()
        except RuntimeError:
            pass
    forget_groups()
    dist.destroy_process_group()
    return True


def start_influence_run(args: argparse.Namespace) -> torch.device:
    """What analyze.py and detect_mislabeled_dataset.py do first: keep freed memory, join the other processes;
    returns the device, with --influence_batch_size set for it."""
    keep_freed_memory()
    device = start_processes(args.dist_timeout)
    args.influence_batch_size = influence_batch_size(args, device)
    say_if_bf16_is_emulated(device, args.use_half_precision)
    return device


def say_if_bf16_is_emulated(device: torch.device, half: bool) -> None:
    """Rank 0 says in one line when bf16 was asked for on a CPU that emulates it (no faster than fp32 there)."""
    note = emulated_bf16_note(device, half)
    if note is not None and is_main():
        print(note, file=sys.stderr, flush=True)
