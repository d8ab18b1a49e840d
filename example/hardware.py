"""What this machine offers: bf16 units on the CPU, its name for the scripts' Device line, its matrix-product rates,
and glibc's handling of freed memory."""

from __future__ import annotations

import contextlib
import ctypes
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from influence import flops, products, synchronize

# ---- bf16 on the CPU ----

EMULATED_BF16 = "bf16 is emulated here, no faster than fp32"  # in fp32, rounded to bf16: influence/products.py


def cpu_bf16_units(flags: str | None = None) -> str | None:
    """The CPU's bf16 product units, from its feature flags (/proc/cpuinfo's `flags` or `Features` words): "AMX"
    (amx_bf16: Intel Xeon since Sapphire Rapids), "AVX-512 BF16" (avx512_bf16: AMD since Zen 4, Intel Cooper Lake),
    "Arm BF16" (bf16: Armv8.6), or None, where bf16 products are emulated in fp32 and run no faster than fp32.
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


def device_description(device: torch.device) -> str:
    """The device's name; on the CPU its model, torch's threads and its bf16 units (which decide whether bf16 pays):
    the Device line of bench.py and compare_kronfluence.py."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = next(
        (line.split(":", 1)[1].strip() for line in cpu_info_lines() if line.startswith("model name")), "unknown CPU"
    )
    units = cpu_bf16_units()
    threads = torch.get_num_threads()
    return f"{name}, {threads} threads, " + (f"{units} bf16 units" if units else "no bf16 units (bf16 is emulated)")


def bf16_hardware_note() -> str:
    """What bf16 costs on this machine, for the help of --use_half_precision. Not the GPU's own answer: asking
    starts CUDA on GPU 0 while the flags are read, before torchrun's processes pick their GPUs."""
    if torch.cuda.is_available():
        return "GPUs have bf16 units from compute capability 8.0 (A100) on"
    units = cpu_bf16_units()
    return f"this CPU has {units} units" if units else f"this CPU has no bf16 units: {EMULATED_BF16}"


def emulated_bf16_note(device: torch.device, half: bool, units: str | None = "unknown") -> str | None:
    """The one line said when bf16 is asked for on a CPU that emulates it, else None."""
    units = cpu_bf16_units() if units == "unknown" else units
    if not half or device.type != "cpu" or units is not None:
        return None
    return f"note: this CPU has no bf16 units (AMX or AVX-512 BF16): {EMULATED_BF16}"


# ---- Product rates ----


@contextlib.contextmanager
def tf32_matmuls(allowed: bool) -> Iterator[None]:
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def timed(device: torch.device, run: Callable[[], object]) -> float:
    """Seconds `run()` takes on the device: CUDA events on a GPU (the host's clock would add its own waits)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    synchronize(device)
    begin = time.perf_counter()
    run()
    return time.perf_counter() - begin


def matmul_rate(device: torch.device, precision: flops.Precision, size: int) -> float:
    """Best FLOP/s of a square matrix product in `precision` on this device (TF32: fp32 operands, TF32 allowed), as
    the engine multiplies (influence.products: bf16 in fp32 on a CPU without native bf16 kernels)."""
    dtype = torch.float32 if precision == flops.TF32 else precision
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    repeats = 10 if device.type == "cuda" else 1  # back to back, so that a launch does not count as a product
    best = float("inf")
    with tf32_matmuls(precision == flops.TF32):
        if device.type == "cuda":
            products.matmul(a, b)  # the first call picks the kernel
        for _ in range(5):
            best = min(best, timed(device, lambda: [products.matmul(a, b) for _ in range(repeats)]) / repeats)
    return 2 * size**3 / best


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
