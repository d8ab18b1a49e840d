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


@dataclass(frozen=True)
class Layer:
    name: str
    module: nn.Module

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

    def flatten_gradient(self, weight_grad: torch.Tensor, bias_grad: torch.Tensor | None) -> torch.Tensor:
        """[out, in'] view of a (weight, bias) gradient, bias as the last column, as the engine stores G."""
        flat = weight_grad.reshape(weight_grad.shape[0], -1)
        return torch.cat([flat, bias_grad[:, None]], dim=1) if bias_grad is not None else flat


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
    return [Layer(name, named[name]) for name in chosen]


def _same_padding(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    pads = []
    for k, d in zip(reversed(conv.kernel_size), reversed(conv.dilation), strict=True):
        total = d * (k - 1)
        pads += [total // 2, total - total // 2]
    return F.pad(x, pads)


def input_patches(layer: Layer, x: torch.Tensor) -> torch.Tensor:
    """a as [B, T, in']: the unfolded receptive fields of a conv, or the flattened positions of a linear input."""
    module = layer.module
    if isinstance(module, nn.Conv2d):
        if x.dim() != 4:
            raise InfluenceError(
                f"module {layer.name!r} got a {x.dim()}-d input; tracked convolutions need [B, C, H, W]"
            )
        padding = module.padding
        if padding == "same":
            x, padding = _same_padding(x, module), 0
        elif padding == "valid":
            padding = 0
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=padding, stride=module.stride)
        a = cols.transpose(1, 2)
    else:
        a = x.reshape(x.shape[0], -1, x.shape[-1])
    if layer.has_bias:
        a = torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
    return a


def output_gradients(layer: Layer, grad_output: torch.Tensor) -> torch.Tensor:
    """g as [B, T, out], positions in the same order as input_patches."""
    if isinstance(layer.module, nn.Conv2d):
        return grad_output.reshape(grad_output.shape[0], grad_output.shape[1], -1).transpose(1, 2)
    return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1])
