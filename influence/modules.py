"""Which layers are tracked, and how each one's input patches a and output gradients g are laid out.

For a tracked layer with weight W (out x in', in' = C_in*k*k for a conv, +1 when it has a bias),
every example contributes T rows: a[n, t] in R^in' and g[n, t] in R^out, so that its gradient is
G[n] = sum_t g[n, t] a[n, t]^T. Both are returned as [B, T, dim] (possibly strided views).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from influence.errors import InfluenceError

TRACKABLE = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True, eq=False)
class Layer:
    name: str
    module: nn.Module
    order: torch.Tensor | None = None  # see canonical_columns

    def to_engine(self, tensor: torch.Tensor, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
        """Reorder the in' axes `dims` of a tensor from the weight's column order to the engine's."""
        if self.order is None:
            return tensor
        for dim in dims:
            tensor = tensor.index_select(dim, self.order.to(tensor.device))
        return tensor

    def to_weight_order(self, tensor: torch.Tensor, dims: tuple[int, ...] = (-1,)) -> torch.Tensor:
        """Reorder the in' axes `dims` from the engine's column order back to the weight's."""
        if self.order is None:
            return tensor
        inverse = torch.argsort(self.order).to(tensor.device)
        for dim in dims:
            tensor = tensor.index_select(dim, inverse)
        return tensor

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    @property
    def out_dim(self) -> int:
        return self.module.weight.shape[0]

    @property
    def in_dim(self) -> int:
        """in' = columns of the flattened weight, counting the bias column."""
        return self.module.weight[0].numel() + int(self.has_bias)


def _check_supported(name: str, module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            raise InfluenceError(
                f"module {name!r} is a grouped convolution (groups={module.groups}), which the engine does not "
                "support: leave it out of tracked_modules()"
            )
        if module.padding_mode != "zeros":
            raise InfluenceError(
                f"module {name!r} uses padding_mode={module.padding_mode!r}; only 'zeros' is supported: "
                "leave it out of tracked_modules()"
            )


def find_layers(model: nn.Module, names: list[str] | None) -> list[Layer]:
    """The tracked layers: `names` if given, else every nn.Linear and nn.Conv2d, in module order."""
    named = dict(model.named_modules())
    if names is None:
        chosen = [name for name, module in named.items() if isinstance(module, TRACKABLE)]
    else:
        chosen = list(names)
        for name in chosen:
            if name not in named:
                raise InfluenceError(f"tracked module {name!r} is not in the model: pick names from named_modules()")
            if not isinstance(named[name], TRACKABLE):
                kind = type(named[name]).__name__
                raise InfluenceError(
                    f"tracked module {name!r} is a {kind}; only nn.Linear and nn.Conv2d can be tracked"
                )
    if not chosen:
        raise InfluenceError("the model has no nn.Linear or nn.Conv2d module to track")
    for name in chosen:
        _check_supported(name, named[name])
    return [Layer(name, named[name], canonical_columns(named[name])) for name in chosen]


def conv_padding(conv: nn.Conv2d) -> list[int]:
    """(left, right) zero padding per spatial dimension, height first, as the convolution applies it."""
    if conv.padding == "valid":
        return [0, 0, 0, 0]
    if conv.padding == "same":
        pads = []
        for k, d in zip(conv.kernel_size, conv.dilation, strict=True):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return pads
    (ph, pw) = conv.padding
    return [ph, ph, pw, pw]


def canonical_columns(module: nn.Module) -> torch.Tensor | None:
    """For each column of a as the engine lays it out, the weight column it stands for (None: the same order).

    A convolution's patches are gathered channels-last, (kh, kw, C_in): contiguous runs of C_in values copy
    an order of magnitude faster than the weight's own (C_in, kh, kw) order. Factors on disk and gradients
    returned to the user are in the weight's order.
    """
    if not isinstance(module, nn.Conv2d):
        return None
    channels, kh, kw = module.weight.shape[1:]
    order = torch.arange(channels * kh * kw).view(channels, kh, kw).permute(1, 2, 0).reshape(-1)
    if module.bias is not None:
        order = torch.cat([order, torch.tensor([channels * kh * kw])])
    return order


def input_patches(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """a as a contiguous [B, T, in']: a conv's receptive fields (channels-last, see canonical_columns), or
    the flattened positions of a linear layer's input; a last column of ones when the layer has a bias."""
    module = layer.module
    if isinstance(module, nn.Conv2d):
        if x.dim() != 4:
            raise InfluenceError(
                f"module {layer.name!r} got a {x.dim()}-d input; tracked convolutions need [B, C, H, W]"
            )
        top, bottom, left, right = conv_padding(module)
        nhwc = x.permute(0, 2, 3, 1)
        if top or bottom or left or right:
            nhwc = F.pad(nhwc, (0, 0, left, right, top, bottom))
        (kh, kw), (dh, dw), (sh, sw) = module.kernel_size, module.dilation, module.stride
        windows = nhwc.unfold(1, dh * (kh - 1) + 1, sh).unfold(2, dw * (kw - 1) + 1, sw)[..., ::dh, ::dw]
        windows = windows.permute(0, 1, 2, 4, 5, 3)  # [B, Ho, Wo, kh, kw, C]
        batch, positions = windows.shape[0], windows.shape[1] * windows.shape[2]
    else:
        windows = x.reshape(x.shape[0], -1, x.shape[-1])
        batch, positions = windows.shape[:2]
    if not layer.has_bias:
        return windows.reshape(batch, positions, -1)
    a = windows.new_empty(batch, positions, layer.in_dim)
    a[:, :, :-1].view(windows.shape).copy_(windows)
    a[:, :, -1] = 1
    return a


def output_gradients(layer: Layer, grad_output: torch.Tensor) -> torch.Tensor:
    """g as [B, T, out], positions in the same order as input_patches (a free view for channels-last outputs)."""
    if isinstance(layer.module, nn.Conv2d):
        return grad_output.permute(0, 2, 3, 1).reshape(grad_output.shape[0], -1, grad_output.shape[1])
    return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])
