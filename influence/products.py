"""The engine's matrix products, and bf16 products carried in fp32 where torch's bf16 kernels are slow.

torch multiplies bf16 matrices on a CPU with oneDNN where oneDNN has bf16 kernels for it (x86 with AVX-512, Arm
with bf16). Elsewhere (x86 with AVX2 only: AMD Zen 3 and older, most laptops) it falls back to generic kernels far
below the fp32 rate: on a 2-core AMD EPYC Zen 3, 0.7 GFLOP/s for [2048, 2304] @ [2304, 2304] and 19 to 23 GFLOP/s
with one operand transposed, against 120 to 160 in fp32, and ResNet-9's forward and backward under bf16 autocast
27 times slower than in fp32. There the bf16 products multiply the bf16 values in fp32 and round the result to
bf16, which is what bf16 units compute (products of bf16 values are exact in fp32, the sums are fp32, the result
is rounded to bf16), up to the order of the sums, at the fp32 rate: the engine's own (`matmul`) and the model's
under autocast (`bf16_autocast`), where gradients are rounded to bf16 at the same points as autocast's.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


@functools.cache
def native_cpu_bf16() -> bool:
    """Whether torch has fast bf16 product kernels on this CPU (oneDNN's), where bf16 products run as they are."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch without the check: trust its kernels
        return True


def widens_bf16(tensor: torch.Tensor) -> bool:
    """Whether `matmul` carries products of this tensor in fp32: bf16, on a CPU without native bf16 kernels."""
    return tensor.dtype == torch.bfloat16 and tensor.device.type == "cpu" and not native_cpu_bf16()


def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y (torch.matmul's broadcasting), in x's dtype; bf16 on a CPU without native bf16 kernels is multiplied
    in fp32 and rounded to bf16 (see above)."""
    if widens_bf16(x):
        return torch.matmul(x.float(), y.float()).to(torch.bfloat16)
    return torch.matmul(x, y)


# The products CPU autocast runs in bf16, as a model may call them.
_AUTOCAST_PRODUCTS = frozenset(
    {
        F.conv1d,
        F.conv2d,
        F.conv3d,
        F.conv_transpose1d,
        F.conv_transpose2d,
        F.conv_transpose3d,
        F.linear,
        torch.matmul,
        torch.mm,
        torch.bmm,
        torch.addmm,
        torch.baddbmm,
        torch.addbmm,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.Tensor.__rmatmul__,
        torch.Tensor.mm,
        torch.Tensor.bmm,
        torch.Tensor.addmm,
        torch.Tensor.baddbmm,
    }
)


def _bf16_values_in_fp32(value):
    """A floating tensor rounded to bf16 as autocast casts it, then held in fp32 for the product."""
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(torch.bfloat16).float()
    return value


class _WidenedProducts(TorchFunctionMode):
    """Under CPU autocast: each product autocast would run in bf16 runs on the bf16-rounded operands in fp32, its
    result rounded to bf16. The backward of the two roundings rounds the gradients of the operands to bf16, where
    autocast's bf16 kernels produce them in bf16."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _AUTOCAST_PRODUCTS:
            return func(*args, **kwargs)
        args = [_bf16_values_in_fp32(value) for value in args]
        kwargs = {key: _bf16_values_in_fp32(value) for key, value in kwargs.items()}
        with torch.autocast("cpu", enabled=False):
            return func(*args, **kwargs).to(torch.bfloat16)


def bf16_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """torch.autocast to bf16 on `device_type`; on a CPU without native bf16 kernels, with its products carried in
    fp32 (see above)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch.autocast(device_type, dtype=torch.bfloat16))
    if device_type == "cpu" and not native_cpu_bf16():
        stack.enter_context(_WidenedProducts())
    return stack
