"""The scripts' shared command-line plumbing: one-line errors, shared flags, figures, memory, several processes.

Not run directly; imported by train.py, analyze.py and the other scripts:

    from cli import ArgumentParser, run_cli, start_processes

Flags are declared once, in groups each script adds in one line: add_data_flags (--dataset_dir),
add_checkpoint_flags, add_label_flags (--corrupt_percentage, --noisy_labels...), add_results_flags (where results
are and which), add_influence_flags (what analyze.py and detect_mislabeled_dataset.py compute with),
add_process_flags (torchrun). Figures: subplots() then save_figure(). Results on disk: results_store().
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import os
import signal
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from influence import STRATEGIES, Analyzer, FactorArguments, InfluenceError, ScoreArguments
from influence import distributed as influence_distributed
from influence import interrupt as influence_interrupt
from influence.distributed import Group
from influence.storage import PAIRWISE_SCORES, SCORE_ARGUMENTS, Store, load_tensors, read_json, write_atomically
from pipeline import ClassificationTask, PipelineError, get_device

# ---- Errors and arguments ----


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a bad flag is reported in one line (no usage dump), like every other error here."""

    def error(self, message: str):
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


# ---- Flag types: a bad value is refused while the flags are read, in one line, before any work starts ----


def number(low: float = 0.0, positive: bool = False, kind: type = float) -> Callable[[str], float]:
    """An argparse type: a finite number of `kind` at least `low` (above it when `positive`)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            expected = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not (float("-inf") < value < float("inf")) or value < low or (positive and value == low):
            expected = "an integer" if kind is int else "a finite number"
            raise argparse.ArgumentTypeError(f"expected {expected} {'>' if positive else '>='} {low:g}, got {text}")
        return value

    return parse


POSITIVE_INT = number(0, positive=True, kind=int)
NON_NEGATIVE_INT = number(0, kind=int)
NON_NEGATIVE = number(0)
POSITIVE = number(0, positive=True)


def seed(text: str) -> int:
    """An argparse type: a seed torch.manual_seed takes (0 <= seed < 2**63)."""
    value = NON_NEGATIVE_INT(text)
    if value >= 2**63:
        raise argparse.ArgumentTypeError(f"a seed must be below 2**63, got {text}")
    return value


def fraction(text: str) -> float:
    """An argparse type: a fraction strictly between 0 and 1 (of the training labels to corrupt)."""
    value = POSITIVE(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (0.1 is 10%), got {text}")
    return value


def folder(text: str) -> str:
    """An argparse type: a folder that is there or can be made, so that no file stands where it or a parent goes."""
    path = Path(text).expanduser()
    for place in (path, *path.parents):
        if place.exists():
            if not place.is_dir():
                raise argparse.ArgumentTypeError(f"{place} is a file, not a folder: choose another folder")
            break
    return str(path)


FIGURE_FORMATS = ("png", "pdf", "svg", "jpg", "jpeg", "tif", "tiff", "webp", "eps", "ps")


def figure_file(text: str) -> str:
    """An argparse type: a picture's file name, whose extension is a format matplotlib writes."""
    path = Path(text).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{path} is a folder: give a file name, such as {path / 'figure.png'}")
    if path.suffix.lower().lstrip(".") not in FIGURE_FORMATS:
        raise argparse.ArgumentTypeError(f"{path}: end the name with .png, .pdf or .svg (the format to draw in)")
    folder(str(path.parent))
    return str(path)


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
    with influence_interrupt.handling():
        try:
            main()
            if end_processes(success=True):
                leave(0, was_distributed=True)
        except (PipelineError, InfluenceError) as e:
            influence_distributed.publish_failure(str(e))
            print(f"error: {e}", file=sys.stderr)
            leave(2, end_processes(success=False))
        except influence_interrupt.Interrupted as e:
            if e.saved is None:  # stopped alone, outside a pass: ranks waiting for this one stop, naming it
                influence_distributed.publish_failure(e.message())
            if is_main():
                print(e.message(), file=sys.stderr)
            leave(e.exit_status, end_processes(success=False))
        except KeyboardInterrupt:
            influence_distributed.publish_failure("interrupted")
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as e:
            influence_distributed.publish_failure(f"{type(e).__name__}: {e}")
            raise


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
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


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
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PipelineError(f"rank {rank} could not join the other processes at {host}:{port}: {first}") from None
    influence_distributed.remember_store(dist.PrefixStore("influence", store), wait)
    return device


def environment_int(name: str, default: int) -> int:
    """An integer from the environment (torchrun's WORLD_SIZE, RANK...), or a one-line error naming it."""
    text = os.environ.get(name, str(default))
    try:
        return int(text)
    except ValueError:
        raise PipelineError(
            f"{name}={text!r} is not an integer: unset it, or start the processes with torchrun"
        ) from None


def end_processes(success: bool) -> bool:
    """Leave the process group (after the others, on success); whether there was one."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    if success:  # rank 0 may host the store: nobody leaves while another still needs it
        try:
            dist.barrier()
        except RuntimeError:
            pass
    influence_distributed.forget_groups()
    dist.destroy_process_group()
    return True


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dist_timeout",
        type=POSITIVE,
        default=600.0,
        help="under torchrun: seconds a process waits for another before it stops with an error (default 600)",
    )


# ---- bf16 on the CPU ----


def cpu_bf16_units(flags: str | None = None) -> str | None:
    """The CPU's bf16 product units, from its feature flags (/proc/cpuinfo's `flags` or `Features` words): "AMX"
    (amx_bf16: Intel Xeon since Sapphire Rapids), "AVX-512 BF16" (avx512_bf16: AMD since Zen 4, Intel Cooper Lake),
    "Arm BF16" (bf16: Armv8.6), or None, where torch emulates bf16 products in fp32 and they run slower than fp32.
    Without /proc/cpuinfo (macOS, Windows) torch's own x86 checks answer."""
    if flags is None:
        flags = _cpu_flags()
    if flags is None:
        if torch.cpu._is_amx_tile_supported():
            return "AMX"
        return "AVX-512 BF16" if torch.cpu._is_avx512_bf16_supported() else None
    words = set(flags.lower().split())
    for flag, units in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("bf16", "Arm BF16")):
        if flag in words:
            return units
    return None


def cpu_info_lines() -> list[str]:
    """/proc/cpuinfo's lines, or none where there is no such file (macOS, Windows)."""
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def _cpu_flags() -> str | None:
    found = [line.split(":", 1)[1] for line in cpu_info_lines() if line.split(":")[0].strip() in ("flags", "Features")]
    return found[0] if found else None


def bf16_hardware_note() -> str:
    """What bf16 costs on this machine, for the help of --use_half_precision."""
    if torch.cuda.is_available():
        return "this machine's GPU: " + ("bf16 units" if torch.cuda.is_bf16_supported() else "no bf16 units")
    units = cpu_bf16_units()
    return f"this CPU has {units} units" if units else "this CPU has no bf16 units: emulated, slower than fp32"


def emulated_bf16_note(device: torch.device, half: bool, units: str | None = "unknown") -> str | None:
    """The one line said when bf16 is asked for on a CPU that emulates it, else None."""
    units = cpu_bf16_units() if units == "unknown" else units
    if not half or device.type != "cpu" or units is not None:
        return None
    return "note: this CPU has no bf16 units (AMX or AVX-512 BF16): bf16 is emulated and slower than fp32 here"


def say_if_bf16_is_emulated(device: torch.device, half: bool) -> None:
    note = emulated_bf16_note(device, half)
    if note is not None and is_main():
        print(note, file=sys.stderr, flush=True)


# ---- Memory ----


def keep_freed_memory() -> None:
    """Let glibc keep freed memory for reuse instead of handing it back to the OS after every batch.

    The influence passes allocate and free host tensors of hundreds of MB per batch. By default glibc maps each
    one afresh, and the kernel faults in and zeroes every page: on the CPU that cost about as much as the copies
    themselves (patch extraction ran 3x faster with this). The process keeps its peak memory. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


# ---- Influence runs: flags and settings shared by analyze.py, detect_mislabeled_dataset.py and bench.py ----


# What "fp32" means on a GPU: torch's default, which the original example ran with (docs/gpu.md).
FP32_POLICY = "fp32, with torch's default on a GPU: convolutions in TF32 (cuDNN), matrix products in fp32"


# ---- Flag groups: each script adds the ones it needs in one line ----


def add_data_flags(parser: argparse.ArgumentParser, num_train: bool = False) -> None:
    """--dataset_dir, and --num_train for the scripts that train on, or score, the training set."""
    parser.add_argument("--dataset_dir", default="./data", help="folder holding cifar-10-batches-py/ (default ./data)")
    if num_train:
        parser.add_argument(
            "--num_train",
            type=POSITIVE_INT,
            default=None,
            help="use the first N training examples (default: all 50,000)",
        )


def add_checkpoint_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint_dir",
        type=folder,
        default="./checkpoints",
        help="folder of the trained checkpoints, created by train.py if missing (default ./checkpoints)",
    )


def add_label_flags(parser: argparse.ArgumentParser, corrupt_percentage: float | None = None) -> None:
    """The training labels a checkpoint was trained on, which also pick its file in --checkpoint_dir."""
    parser.add_argument(
        "--corrupt_percentage",
        type=fraction,
        default=corrupt_percentage,
        help="fraction p of training labels corrupted: train.py gives the first ceil(p*N) examples a wrong label "
        f"and saves model_corrupt_{{p}}.safetensors (default {corrupt_percentage})",
    )
    parser.add_argument(
        "--noisy_labels",
        default=None,
        help="file of given training labels (.npz, or CIFAR-10N's CIFAR-10_human.pt); replaces "
        "--corrupt_percentage; train.py saves model_noisy_{key}.safetensors",
    )
    parser.add_argument(
        "--noisy_labels_key", default="aggre_label", help="array to use in --noisy_labels (default: aggre_label)"
    )


def add_results_flags(parser: argparse.ArgumentParser) -> None:
    """Where factors and scores are, and which: the flags of the scripts that compute them and of those that read."""
    parser.add_argument(
        "--output_dir", type=folder, default="./influence_results", help="where factors and scores are saved"
    )
    parser.add_argument(
        "--factor_strategy",
        default="ekfac",
        choices=STRATEGIES,
        help="curvature used to precondition gradients (default: ekfac)",
    )


def add_influence_flags(parser: argparse.ArgumentParser) -> None:
    add_results_flags(parser)
    parser.add_argument(
        "--use_half_precision",
        action="store_true",
        help="bf16 autocast for forward/backward and bf16 pairwise products (results saved as *_half; "
        f"{bf16_hardware_note()}); without it {FP32_POLICY}",
    )
    parser.add_argument("--profile", action="store_true", help="print the timing table at the end")
    parser.add_argument(
        "--train_batch_size",
        type=int,
        default=None,
        help="training examples per forward/backward in the influence passes (default: 512 on a GPU, 128 on the "
        "CPU, where larger batches were slower and used more memory)",
    )
    parser.add_argument(
        "--overwrite_output_dir", action="store_true", help="recompute factors and scores even if saved ones exist"
    )
    parser.add_argument(
        "--damping_factor",
        type=parse_damping,
        default=1e-8,
        help="number added to the curvature eigenvalues, or 'heuristic' for 0.1 * mean(Lambda)",
    )
    parser.add_argument(
        "--use_empirical_fisher",
        action="store_true",
        help="fit factors with the dataset labels instead of labels sampled from the model",
    )
    parser.add_argument("--seed", type=seed, default=0, help="seed of the label sampling for the true Fisher")
    parser.add_argument(
        "--save_interval",
        type=NON_NEGATIVE,
        default=120.0,
        help="seconds between saves of a pass's partial results, from which a killed run resumes (default 120)",
    )
    add_process_flags(parser)


def parse_damping(text: str) -> float | None:
    if text == "heuristic":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'heuristic', got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"damping must be a finite number >= 0 or 'heuristic', got {text}")
    return value


def start_influence_run(args: argparse.Namespace, *sizes: str) -> torch.device:
    """What analyze.py and detect_mislabeled_dataset.py do first: check the `sizes` flags, keep freed memory, join
    the other processes; returns the device, with --train_batch_size set for it."""
    check_sizes(args, *sizes)
    keep_freed_memory()
    device = start_processes(args.dist_timeout)
    args.train_batch_size = train_batch_size(args, device)
    say_if_bf16_is_emulated(device, args.use_half_precision)
    return device


def check_sizes(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise PipelineError(f"--{name} must be a positive number, got {value}")


def train_batch_size(args: argparse.Namespace, device: torch.device) -> int:
    """--train_batch_size, or the device's default: a GPU wants large batches; on a 2-core CPU, batches of 512
    made detection on 512 images 8% slower than 128 or 64 (mostly in the covariance pass) and used more memory."""
    if args.train_batch_size is not None:
        return args.train_batch_size
    return 512 if device.type == "cuda" else 128


def results_name(strategy: str, half: bool, prefix: str = "") -> str:
    """Factors and scores are named after the strategy, with _half for bf16 (scores_ekfac, scores_ekfac_half)."""
    return f"{prefix}{strategy}{'_half' if half else ''}"


def train_command(args: argparse.Namespace, corrupt_percentage: float | None = None) -> str:
    """The train.py command that writes the checkpoint these flags look for, for missing-checkpoint hints."""
    parts = ["python train.py", f"--dataset_dir {args.dataset_dir}", f"--checkpoint_dir {args.checkpoint_dir}"]
    if getattr(args, "num_train", None) is not None:
        parts.append(f"--num_train {args.num_train}")
    if getattr(args, "noisy_labels", None) is not None:
        parts += [f"--noisy_labels {args.noisy_labels}", f"--noisy_labels_key {args.noisy_labels_key}"]
    elif corrupt_percentage is not None:
        parts.append(f"--corrupt_percentage {corrupt_percentage}")
    return " ".join(parts)


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a checkpoint, so results made with other weights are never silently reused."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def data_fingerprint(*tensors: torch.Tensor) -> str:
    """sha256 of the examples actually used (uint8 images, labels as given), with their dtypes and shapes, so that
    results made from other images or labels are never silently reused. Every byte is hashed, not a sample: an
    edited image or label anywhere changes it. 50,000 CIFAR-10 images (150 MB) take about 0.15 s."""
    digest = hashlib.sha256()
    for tensor in tensors:
        cpu = tensor.detach().to("cpu").contiguous()
        digest.update(f"{str(cpu.dtype).removeprefix('torch.')}{list(cpu.shape)};".encode())
        digest.update(cpu.reshape(-1).view(torch.uint8).numpy())  # the bytes as they are, without a copy
    return digest.hexdigest()


def check_shape(
    scores: torch.Tensor, expected: tuple[int, ...], folder: Path, fix: str = "rerun with --overwrite_output_dir"
) -> None:
    """Refuse scores whose shape is not that of the examples they are reported for (their files were replaced)."""
    if tuple(scores.shape) != expected:
        raise PipelineError(
            f"the scores in {folder} are {list(scores.shape)}, not {list(expected)} for these examples: {fix}"
        )


def make_analyzer(analysis_name: str, model: torch.nn.Module, args: argparse.Namespace) -> Analyzer:
    """The engine on the scripts' task, with the flags of add_influence_flags."""
    return Analyzer(
        analysis_name,
        model,
        ClassificationTask(),
        output_dir=args.output_dir,
        profile=args.profile,
        save_interval=args.save_interval,
    )


def influence_arguments(args: argparse.Namespace, info: dict) -> tuple[FactorArguments, ScoreArguments]:
    factors = FactorArguments(
        strategy=args.factor_strategy,
        use_empirical_fisher=args.use_empirical_fisher,
        use_half_precision=args.use_half_precision,
        seed=args.seed,
        info=info,
    )
    scores = ScoreArguments(damping_factor=args.damping_factor, use_half_precision=args.use_half_precision, info=info)
    return factors, scores


# ---- Figures ----


# How figures and tables name the strategies.
STRATEGY_NAMES = {"identity": "identity", "diagonal": "diagonal", "kfac": "K-FAC", "ekfac": "EK-FAC"}


def subplots(*args, **kwargs):
    """matplotlib's (figure, axes), drawn off-screen (no display needed); save with save_figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def results_store(output_dir: str | Path, analysis_name: str) -> Store:
    """The results of an analysis for a script that reads them (one process)."""
    return Store(Path(output_dir) / analysis_name, Group(torch.device("cpu")), print)


def read_pairwise_scores(output_dir: str | Path, strategy: str, half: bool) -> tuple[torch.Tensor, dict]:
    """analyze.py's pairwise scores [queries, training examples] and the `info` they record (sizes, fingerprints),
    for the scripts that only read them; anything missing or malformed is one line saying which analyze.py
    command makes them again."""
    store = results_store(output_dir, "cifar10")
    name = results_name(strategy, half)
    path, arguments = store.scores(name, PAIRWISE_SCORES), store.scores(name, SCORE_ARGUMENTS)
    remake = f"python analyze.py --factor_strategy {strategy}{' --use_half_precision' if half else ''}"
    if not path.exists():
        raise PipelineError(f"no scores at {path}: run {remake} first")
    try:
        scores = load_tensors(path).get("all_modules")
        info = read_json(arguments).get("info") if arguments.exists() else None
    except (InfluenceError, AttributeError) as e:
        raise PipelineError(
            f"cannot read the scores in {store.scores(name)} ({e}): make them again: {remake} --overwrite_output_dir"
        ) from None
    if scores is None or scores.ndim != 2 or not isinstance(info, dict) or "num_train" not in info:
        raise PipelineError(
            f"{store.scores(name)} does not hold analyze.py's scores (an [queries, training examples] "
            f"'all_modules' tensor and its {SCORE_ARGUMENTS} with 'info'): make them again: {remake} "
            "--overwrite_output_dir"
        )
    return scores, info


def save_figure(fig, path: str | Path) -> None:
    """Lay a matplotlib figure out and save it whole or not at all, creating its folder."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=150), folder="--figure")
    finally:
        plt.close(fig)
