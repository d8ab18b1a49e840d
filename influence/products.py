"""The engine's matrix products, and bf16 products carried in fp32 where torch's bf16 kernels are slow.

torch multiplies bf16 matrices on a CPU with oneDNN where oneDNN has bf16 kernels for it (x86 with AVX-512, Arm
with bf16). Elsewhere (x86 with AVX2 only: AMD Zen 3 and older, most laptops) it falls back to generic kernels that
run at 0.3 to 21 GFLOP/s against 100 to 190 in fp32 on a 2-core AMD EPYC Zen 3, and ResNet-9's forward and
backward under bf16 autocast 18 to 26 times slower than in fp32 (docs/performance.md#bf16). There the bf16 products
multiply the bf16 values in fp32 and round the result to bf16, which is what bf16 units compute (products of bf16
values are exact in fp32, the sums are fp32, the result is rounded to bf16), up to the order of the sums, at the
fp32 rate: the engine's own (`matmul`) and the model's under autocast (`bf16_autocast`), where gradients are
rounded to bf16 at the same points as autocast's.
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


def _widens_on(device_type: str) -> bool:
    """Whether bf16 products on this device type are carried in fp32: a CPU without native bf16 kernels."""
    return device_type == "cpu" and not native_cpu_bf16()


def widens_bf16(tensor: torch.Tensor) -> bool:
    """Whether `matmul` carries products of this tensor in fp32: bf16, on a CPU without native bf16 kernels."""
    return tensor.dtype == torch.bfloat16 and _widens_on(tensor.device.type)


def held_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype to keep an operand of many `dtype` products in: fp32 for bf16 on a CPU without native bf16 kernels,
    its values still bf16's (round them on the way in), so that it is converted once, not at every product: for a
    pairwise pass's [1,000, 589,824] queries the conversion took as long as their product with a batch of 128
    (about 1 s each on the 2-core EPYC); else `dtype`."""
    if dtype == torch.bfloat16 and _widens_on(torch.device(device).type):
        return torch.float32
    return dtype


def matmul(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """x @ y (torch.matmul's broadcasting). On a CPU without native bf16 kernels, bf16 operands (one of them may be
    held in fp32, see held_dtype) are multiplied in fp32 and the result rounded to bf16 (see above)."""
    if (widens_bf16(x) or widens_bf16(y)) and {x.dtype, y.dtype} <= {torch.bfloat16, torch.float32}:
        with torch.autocast("cpu", enabled=False):  # an fp32 product, even where the caller runs under autocast
            return torch.matmul(x.float(), y.float()).to(torch.bfloat16)
    return torch.matmul(x, y)


# The products CPU autocast runs in bf16, as a model calls them; those inside other functions (einsum, recurrent
# layers) run with the mode off, in torch's own kernels.
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
        torch.Tensor.addbmm,
        F.scaled_dot_product_attention,
    }
)


def _autocast_casts(value) -> bool:
    """Whether CPU autocast casts this argument of a bf16 op to bf16: a floating tensor other than float64."""
    return isinstance(value, torch.Tensor) and value.is_floating_point() and value.dtype != torch.float64


def _bf16_values_in_fp32(value):
    """An argument autocast would cast to bf16, rounded to bf16 and held in fp32 for the product."""
    return value.to(torch.bfloat16).float() if _autocast_casts(value) else value


class _WidenedProducts(TorchFunctionMode):
    """Under CPU autocast: each product autocast would run in bf16 runs on the bf16-rounded operands in fp32, its
    result rounded to bf16. The backward of the two roundings rounds the gradients of the operands to bf16, where
    autocast's bf16 kernels produce them in bf16. Calls autocast leaves alone (out=, no castable operand) run as
    they are."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        values = [*args, *kwargs.values()]
        if func not in _AUTOCAST_PRODUCTS or "out" in kwargs or not any(map(_autocast_casts, values)):
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
    if _widens_on(device_type):
        stack.enter_context(_WidenedProducts())
    return stack
